"""open_clip's own `VisionTransformer`: its description and its tensors under the canonical names.

CoCa's towers are this class with an `AttentionalPooler` (`attn_pool`, open_clip's original CoCa
setup: pooler, then ln_post, then the first latent @ proj); LeGrad explains the pooler's
cross-attention (head "attn_pool", shared/design/legrad.md).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer

from legrad_runtime.errors import UnsupportedModelError

from .spec import TowerSpec

__all__ = ["is_openclip_vit", "describe", "canonical_state_dict"]

# open_clip name → canonical name, as timm's `_convert_openai_clip` maps them
_RENAMES = [
    (r"^conv1\.weight$", "patch_embed.proj.weight"),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^ln_pre\.", "norm_pre."),
    (r"^ln_post\.", "head.norm."),
    (r"^proj$", "head.proj"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^transformer\.resblocks\.(\d+)\.ls_(\d)\.gamma$", r"blocks.\1.ls\2.gamma"),
]


def is_openclip_vit(visual: nn.Module | None) -> bool:
    return isinstance(visual, VisionTransformer)


def describe(visual: VisionTransformer, model_name: str) -> TowerSpec:
    """The spec of an open_clip ViT; UnsupportedModelError for the variants LeGrad export lacks."""
    pooler = visual.attn_pool
    if pooler is not None and getattr(visual, "attn_pool_contrastive", None) is not None:
        raise UnsupportedModelError(
            f"{model_name} has a second, contrastive attentional pooler ({visual.attn_pool_type!r}); "
            "LeGrad export supports open_clip's original CoCa pooling (one pooler, its first latent)"
        )
    blocks = list(visual.transformer.resblocks)
    odd = {type(b).__name__ for b in blocks if type(b) is not ResidualAttentionBlock}
    if odd:
        raise UnsupportedModelError(
            f"{model_name} uses {', '.join(sorted(odd))} blocks (qk-norm / scaled-cosine attention); "
            "LeGrad export supports standard ResidualAttentionBlock towers"
        )
    act = blocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        activation = "quick_gelu"
    elif isinstance(act, nn.GELU) and act.approximate in ("none", "tanh"):
        activation = "gelu" if act.approximate == "none" else "gelu_tanh"
    else:
        raise UnsupportedModelError(f"{model_name} uses activation {act!r}; expected GELU or QuickGELU")
    if visual.pool_type not in ("tok", "avg") or visual.proj is None:
        raise UnsupportedModelError(f"{model_name} has pool_type {visual.pool_type!r} or no projection")
    (patch_h, patch_w), (grid_h, grid_w) = visual.patch_size, visual.grid_size
    if patch_h != patch_w or grid_h != grid_w:
        raise UnsupportedModelError(
            f"{model_name} has non-square patches or grid; only square ones supported"
        )
    return TowerSpec(
        family="openclip_vit",
        width=visual.transformer.width,
        heads=blocks[0].attn.num_heads,
        num_layers=len(blocks),
        patch_size=patch_h,
        native_grid=grid_h,
        embed_dim=visual.proj.shape[1],
        activation=activation,
        head="token_mean" if pooler is None else "attn_pool",
        prefix_tokens=1,
        pool_type=visual.pool_type,
        final_ln_after_pool=bool(visual.final_ln_after_pool),
        eps=blocks[0].ln_1.eps,
        head_heads=0 if pooler is None else pooler.attn.num_heads,
    )


def _rename(name: str) -> str | None:
    for pattern, target in _RENAMES:
        if re.search(pattern, name):
            return re.sub(pattern, target, name)
    return None


def canonical_state_dict(visual: VisionTransformer) -> dict[str, torch.Tensor]:
    """The tower's tensors (views, not copies) under the canonical names of spec.py."""
    out = {}
    for name, tensor in visual.state_dict().items():
        new = _rename(name)
        if new is not None:
            out[new] = tensor
    if visual.attn_pool is not None:
        out |= _pooler_state_dict(visual.attn_pool)
    return out


def _pooler_state_dict(pooler: nn.Module) -> dict[str, torch.Tensor]:
    """CoCa's AttentionalPooler: only latent 0 reaches the embedding LeGrad explains (and the model's)."""
    mha = pooler.attn
    if mha.in_proj_weight is not None:  # the pooler's width equals the tower's: one packed weight
        q, k, v = mha.in_proj_weight.chunk(3)
    else:
        q, k, v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    qb, kb, vb = mha.in_proj_bias.chunk(3)
    out = {"pool.latent": pooler.query[:1]}
    for name, weight, bias in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        out[f"pool.{name}.weight"], out[f"pool.{name}.bias"] = weight, bias
    out["pool.proj.weight"], out["pool.proj.bias"] = mha.out_proj.weight, mha.out_proj.bias
    for name, norm in (("norm_q", pooler.ln_q), ("norm_k", pooler.ln_k)):
        out[f"pool.{name}.weight"], out[f"pool.{name}.bias"] = norm.weight, norm.bias
    return out
