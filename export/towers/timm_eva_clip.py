"""open_clip's `TimmModel` around a timm `Eva` trunk pooled by its class token: EVA-CLIP.

EVA01-g (`eva_giant_patch14_224`): plain pre-norm `EvaBlock`s, fused qkv with q and v biases (k's is
zero), GELU MLPs, absolute positions, no RoPE. EVA02-B/L (`eva02_*_clip_*`): separate q/k/v
projections, a LayerNorm on the attention output before its projection (`attn.norm`), SwiGLU MLPs
with a LayerNorm over the hidden width, interleaved 2-D RoPE on the patch tokens. EVA02-E
(`eva02_enormous_patch14_clip_224`): `EvaBlockPostNorm` (x + LN_1(Attn(x)), then + LN_2(MLP(·))),
GELU MLPs, fused qkv. All end in `norm` and timm's classifier as the projection (`timm_proj` null).
LeGrad follows the CLIP rule (docs/towers.md), as for MobileCLIP; family "timm_eva", head "token_mean".
"""

from __future__ import annotations

import torch
import torch.nn as nn

from legrad_runtime.errors import UnsupportedModelError

from .spec import Activation, Mlp, TowerSpec
from .timm_eva import rope_table
from .timm_token_vit import _projection
from .timm_vit import activation_of, refuse_unless_plain

__all__ = ["is_timm_eva_token", "describe", "canonical_state_dict"]

# (mlp, attn_norm, post_norm) the closed-form backward has: EVA01-g, EVA02-B/L, EVA02-E
_KINDS = {("plain", False, False), ("swiglu", True, False), ("plain", False, True)}


def _trunk(visual: nn.Module | None) -> nn.Module | None:
    from timm.models.eva import Eva

    trunk = getattr(visual, "trunk", None)
    return trunk if isinstance(trunk, Eva) else None


def is_timm_eva_token(visual: nn.Module | None) -> bool:
    trunk = _trunk(visual)
    return trunk is not None and getattr(trunk, "global_pool", None) == "token"


def _block_kind(block: nn.Module, model_name: str) -> tuple[Mlp, bool, bool, Activation | None, set[float]]:
    """(mlp, attn_norm, post_norm, activation, LayerNorm eps values) of one EVA block; refuses the rest."""
    from timm.layers import Mlp as TimmMlp
    from timm.layers import SwiGLU
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

    attn = block.attn
    if type(block) not in (EvaBlock, EvaBlockPostNorm) or type(attn) is not EvaAttention:
        raise UnsupportedModelError(
            f"{model_name} uses {type(block).__name__} blocks with {type(attn).__name__}; not supported yet"
        )
    if (
        getattr(attn, "rotate_half", False)
        or attn.head_dim * attn.num_heads != block.norm1.normalized_shape[0]
    ):
        raise UnsupportedModelError(
            f"{model_name}'s EVA attention rotates halves or has a head width other than width/heads"
        )
    refuse_unless_plain(model_name, q_norm=attn.q_norm, k_norm=attn.k_norm, gate=attn.gate)
    norms = [block.norm1, block.norm2]
    if type(block.mlp) is TimmMlp:
        mlp: Mlp = "plain"
        refuse_unless_plain(model_name, mlp_norm=block.mlp.norm)
        act = activation_of(block.mlp.act, model_name)
    elif (
        type(block.mlp) is SwiGLU
        and isinstance(block.mlp.norm, nn.LayerNorm)
        and type(block.mlp.act) is nn.SiLU
    ):
        mlp, act = "swiglu", None
        norms.append(block.mlp.norm)
    else:
        raise UnsupportedModelError(
            f"{model_name} uses an MLP {type(block.mlp).__name__} ({block.mlp.norm!r}); not supported yet"
        )
    attn_norm = isinstance(attn.norm, nn.LayerNorm)
    if attn_norm:
        norms.append(attn.norm)
    else:
        refuse_unless_plain(model_name, attention_norm=attn.norm)
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        raise UnsupportedModelError(
            f"{model_name}'s blocks use norms other than LayerNorm; not supported yet"
        )
    post = type(block) is EvaBlockPostNorm
    if (mlp, attn_norm, post) not in _KINDS:
        raise UnsupportedModelError(
            f"{model_name} combines a {mlp} MLP, attention norm {attn_norm} and post-norm {post}: not one of "
            "EVA01-g's, EVA02-B/L's or EVA02-E's blocks; not supported yet"
        )
    return mlp, attn_norm, post, act, {n.eps for n in norms}


def describe(visual: nn.Module, model_name: str) -> TowerSpec:
    """The spec of a class-token-pooled EVA trunk; UnsupportedModelError for variants LeGrad lacks."""
    from timm.layers import PatchEmbed
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    trunk = _trunk(visual)
    blocks = list(trunk.blocks)
    if trunk.cls_token is None or getattr(trunk, "reg_token", None) is not None or trunk.no_embed_class:
        raise UnsupportedModelError(
            f"{model_name} has register tokens, or no class token with a position; not supported yet"
        )
    rope = trunk.rope
    if rope is not None and (
        type(rope) is not RotaryEmbeddingCat or getattr(trunk, "rope_mixed", False) or rope.rotate_half
    ):
        raise UnsupportedModelError(f"{model_name} uses a RoPE other than interleaved 2-D; not supported yet")
    kinds = {_block_kind(b, model_name)[:4] for b in blocks}
    eps = set().union(*(_block_kind(b, model_name)[4] for b in blocks))
    for norm in (trunk.norm, trunk.norm_pre):
        if not isinstance(norm, nn.Identity):
            eps.add(norm.eps)
    if not isinstance(trunk.norm, nn.LayerNorm) or not isinstance(trunk.fc_norm, nn.Identity):
        raise UnsupportedModelError(f"{model_name}'s EVA tower does not end in exactly one LayerNorm")
    if len(kinds) != 1 or len(eps) != 1:
        raise UnsupportedModelError(
            f"{model_name} mixes block kinds or LayerNorm eps {sorted(eps)}; not supported"
        )
    mlp, attn_norm, post, act = kinds.pop()
    embed = trunk.patch_embed
    if type(embed) is not PatchEmbed or len(set(embed.patch_size)) != 1 or len(set(embed.grid_size)) != 1:
        raise UnsupportedModelError(f"{model_name}'s patch embedding is not a square patch convolution")
    refuse_unless_plain(model_name, patch_norm=embed.norm)
    return TowerSpec(
        family="timm_eva",
        width=trunk.embed_dim,
        heads=blocks[0].attn.num_heads,
        num_layers=len(blocks),
        patch_size=embed.patch_size[0],
        native_grid=embed.grid_size[0],
        embed_dim=_projection(visual, model_name).out_features,
        activation=act or "gelu",  # a SwiGLU's gate is SiLU (spec.mlp), not this
        head="token_mean",
        prefix_tokens=1,
        pool_type="tok",
        eps=eps.pop(),
        rope=rope is not None,
        mlp=mlp,
        attn_norm=attn_norm,
        post_norm=post,
    )


def canonical_state_dict(visual: nn.Module, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The tower's tensors (views, or small new tensors) under the canonical names of spec.py, plus the
    RoPE table for the (gh, gw) `grid` when the trunk has RoPE."""
    trunk = visual.trunk
    proj = _projection(visual, "model")
    out = {}
    for name, tensor in trunk.state_dict().items():
        if name.startswith(("norm.", "fc_norm.", "head.", "rope.")) or ".attn.q" in name or ".attn.k" in name:
            continue
        if ".attn.v_" in name:  # v_bias, v_proj: assembled into attn.qkv below
            continue
        if name == "cls_token":
            out[name] = tensor.reshape(-1)
        elif name == "pos_embed":
            out[name] = tensor[0]  # (1 + g·g, D)
        elif ".gamma_" in name:
            out[name.replace(".gamma_", ".ls") + ".gamma"] = tensor
        else:
            out[name] = tensor
    for i, block in enumerate(trunk.blocks):
        attn = block.attn
        if attn.qkv is not None:
            weight = attn.qkv.weight
            biases = (attn.q_bias, attn.k_bias, attn.v_bias)
        else:
            weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            biases = tuple(p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        zeros = weight.new_zeros(weight.shape[0] // 3)
        out[f"blocks.{i}.attn.qkv.weight"] = weight
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([zeros if b is None else b for b in biases])
    if trunk.pos_embed is None:
        out["pos_embed"] = proj.weight.new_zeros(
            trunk.num_prefix_tokens + trunk.patch_embed.num_patches, trunk.embed_dim
        )
    out["head.norm.weight"], out["head.norm.bias"] = trunk.norm.weight, trunk.norm.bias
    out["head.proj"] = proj.weight.T  # (D, E)
    if proj.bias is not None:
        out["head.proj_bias"] = proj.bias
    if trunk.rope is not None:
        with torch.no_grad():
            out["rope"] = rope_table(visual, grid)
    return out
