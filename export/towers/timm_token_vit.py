"""open_clip's `TimmModel` around a timm `VisionTransformer` pooled by its class token or token mean.

MobileCLIP-B / MobileCLIP2-B (`vit_base_mci_224`: a convolutional `ConvStem`, a class token without
a position), MobileCLIP2-L-14 (`vit_large_patch14_clip_224`: patches, class token, `norm_pre`) and
ViTamin (`MbConvStages` stem, no class token, mean pooling, GeGLU MLPs with their own LayerNorm).
LeGrad follows the CLIP rule (docs/towers.md): the token mean, the tower's own final norm and
projection. A convolutional stem is not tensors the explicit model rebuilds: `stem_module` hands
it a frozen copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from legrad_runtime.errors import UnsupportedModelError

from .spec import Activation, TowerSpec
from .timm_vit import _trunk, activation_of, refuse_unless_plain

__all__ = ["is_timm_token_vit", "describe", "canonical_state_dict", "stem_module"]


def is_timm_token_vit(visual: nn.Module | None) -> bool:
    trunk = _trunk(visual)
    return trunk is not None and getattr(trunk, "global_pool", None) in ("token", "avg")


def _final_norm(trunk: nn.Module, model_name: str) -> nn.LayerNorm:
    """The one LayerNorm timm applies at the end: `norm` for token pooling, `fc_norm` for the mean."""
    norms = [m for m in (trunk.norm, trunk.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
        raise UnsupportedModelError(f"{model_name}'s timm tower does not end in exactly one LayerNorm")
    return norms[0]


def _projection(visual: nn.Module, model_name: str) -> nn.Linear:
    """The Linear after the pool: timm's classifier (MobileCLIP) or open_clip's `head.proj` (ViTamin)."""
    trunk_head = visual.trunk.head
    extra = [m for m in visual.head if not isinstance(m, nn.Dropout)]
    if isinstance(trunk_head, nn.Linear) and not extra:
        return trunk_head
    if isinstance(trunk_head, nn.Identity) and len(extra) == 1 and isinstance(extra[0], nn.Linear):
        return extra[0]
    raise UnsupportedModelError(
        f"{model_name}'s timm tower is not followed by one Linear projection "
        f"({trunk_head!r}, {visual.head!r})"
    )


def _stem_stride(trunk: nn.Module, model_name: str) -> tuple[str, int, int]:
    """(stem kind, total stride, native grid) of the patch embedding."""
    from timm.layers import HybridEmbed, PatchEmbed

    embed = trunk.patch_embed
    (grid_h, grid_w), (size_h, size_w) = embed.grid_size, embed.img_size
    if grid_h != grid_w or size_h != size_w:
        raise UnsupportedModelError(f"{model_name} has a non-square grid; only square ones supported")
    if type(embed) is PatchEmbed:
        refuse_unless_plain(model_name, patch_norm=embed.norm)
        (patch_h, patch_w) = embed.patch_size
        if patch_h != patch_w:
            raise UnsupportedModelError(f"{model_name} has non-square patches; only square ones supported")
        return "patch", patch_h, grid_h
    if type(embed) is HybridEmbed and isinstance(embed.proj, nn.Identity) and size_h % grid_h == 0:
        return "hybrid", size_h // grid_h, grid_h
    raise UnsupportedModelError(f"{model_name}'s patch embedding {type(embed).__name__} is not supported")


def _block_kind(block: nn.Module, model_name: str) -> tuple[str, Activation, set[float]]:
    """(mlp kind, activation, LayerNorm eps values) of a plain timm Block; refuses anything else."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block
    from timm.models.vitamin import GeGluMlp

    if type(block) is not Block or type(block.attn) is not Attention:
        raise UnsupportedModelError(
            f"{model_name} uses {type(block).__name__} blocks with {type(block.attn).__name__}; "
            "not supported yet"
        )
    norms = [block.norm1, block.norm2]
    if type(block.mlp) is Mlp:
        kind = "plain"
        refuse_unless_plain(model_name, mlp_norm=block.mlp.norm)
    elif type(block.mlp) is GeGluMlp:
        kind = "geglu"
        norms.append(block.mlp.norm)
    else:
        raise UnsupportedModelError(f"{model_name} uses an MLP {type(block.mlp).__name__}; not supported yet")
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        raise UnsupportedModelError(
            f"{model_name}'s blocks use norms other than LayerNorm; not supported yet"
        )
    refuse_unless_plain(
        model_name, q_norm=block.attn.q_norm, k_norm=block.attn.k_norm, attention_norm=block.attn.norm
    )
    return kind, activation_of(block.mlp.act, model_name), {n.eps for n in norms}


def describe(visual: nn.Module, model_name: str) -> TowerSpec:
    """The spec of a class-token or mean-pooled timm ViT; UnsupportedModelError for what LeGrad lacks."""
    trunk = _trunk(visual)
    blocks = list(trunk.blocks)
    if getattr(trunk, "reg_token", None) is not None:
        raise UnsupportedModelError(f"{model_name} has register tokens; not supported yet")
    if trunk.global_pool == "token" and trunk.cls_token is None:
        raise UnsupportedModelError(f"{model_name} pools a class token it does not have")
    mlps, acts, eps = set(), set(), set()
    for block in blocks:
        mlp, act, block_eps = _block_kind(block, model_name)
        mlps.add(mlp), acts.add(act), eps.update(block_eps)
    norm = _final_norm(trunk, model_name)
    eps.add(norm.eps)
    if not isinstance(trunk.norm_pre, nn.Identity):
        eps.add(trunk.norm_pre.eps)
    if len(mlps) != 1 or len(acts) != 1 or len(eps) != 1:
        raise UnsupportedModelError(
            f"{model_name} mixes MLPs {sorted(mlps)}, activations {sorted(acts)} or LayerNorm eps "
            f"{sorted(eps)}; not supported"
        )
    stem, stride, grid = _stem_stride(trunk, model_name)
    return TowerSpec(
        family="timm_vit",
        width=trunk.embed_dim,
        heads=blocks[0].attn.num_heads,
        num_layers=len(blocks),
        patch_size=stride,
        native_grid=grid,
        embed_dim=_projection(visual, model_name).out_features,
        activation=acts.pop(),
        head="token_mean",
        prefix_tokens=0 if trunk.cls_token is None else 1,
        pool_type="tok" if trunk.global_pool == "token" else "avg",
        final_ln_after_pool=not isinstance(trunk.fc_norm, nn.Identity),  # timm's fc_norm follows the pool
        eps=eps.pop(),
        stem=stem,
        mlp=mlps.pop(),
    )


def canonical_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors (views, or small new tensors) under the canonical names of spec.py."""
    trunk = visual.trunk
    norm, proj = _final_norm(trunk, "model"), _projection(visual, "model")
    out = {}
    for name, tensor in trunk.state_dict().items():
        if name.startswith(("norm.", "fc_norm.", "head.", "patch_embed.backbone.")):
            continue
        if name == "cls_token":
            out[name] = tensor.reshape(-1)
        elif name == "pos_embed":
            pos = tensor[0]  # (N, D)
            if trunk.no_embed_class and trunk.cls_token is not None:  # the class token has no position
                pos = torch.cat([pos.new_zeros(1, pos.shape[-1]), pos])
            out[name] = pos
        else:
            out[name] = tensor
    if trunk.pos_embed is None:  # ViTamin-XL has no positional embedding: the same as a zero one
        tokens = trunk.num_prefix_tokens + trunk.patch_embed.num_patches
        out["pos_embed"] = proj.weight.new_zeros(tokens, trunk.embed_dim)
    for i, block in enumerate(trunk.blocks):
        if block.attn.qkv.bias is None:  # e.g. the GAP ViT: the same as a zero bias
            out[f"blocks.{i}.attn.qkv.bias"] = block.attn.qkv.weight.new_zeros(block.attn.qkv.out_features)
    out["head.norm.weight"], out["head.norm.bias"] = norm.weight, norm.bias
    out["head.proj"] = proj.weight.T  # (D, E)
    if proj.bias is not None:
        out["head.proj_bias"] = proj.bias
    return out


def stem_module(visual: nn.Module) -> nn.Module | None:
    """A frozen copy of a convolutional stem (None for a patch convolution): images → (B, g·g, D)."""
    from timm.layers import HybridEmbed

    embed = visual.trunk.patch_embed
    if type(embed) is not HybridEmbed:
        return None
    stem = copy.deepcopy(embed).eval()
    for p in stem.parameters():
        p.requires_grad_(False)
    return stem
