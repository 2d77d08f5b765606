"""open_clip's `TimmModel` around a timm `Eva` trunk with a MAP head and 2-D RoPE: PE-Core.

Its blocks are `EvaBlock`s with fused-qkv `AttentionRope` (RoPE on the patch tokens' q and k,
interleaved), optional LayerScale (`gamma_1`/`gamma_2`), a class token (not in bigG), `norm_pre`, the same
single-latent MAP head as SigLIP, and a Linear projection after it (`trunk.head`). The RoPE table
(g·g, 2·head_dim: sin then cos) travels in the canonical state dict as `rope`, built for the export
grid from the trunk's frequency bands as timm builds it when the trunk is resized (`set_input_size`):
positions are rescaled to the native grid (`ref_feat_shape`), so a 2× input sees half-steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from legrad_runtime.errors import UnsupportedModelError

from .spec import TowerSpec
from .timm_vit import check_map_trunk

__all__ = ["is_timm_eva_map", "describe", "canonical_state_dict", "rope_table"]


def _trunk(visual: nn.Module | None) -> nn.Module | None:
    from timm.models.eva import Eva

    trunk = getattr(visual, "trunk", None)
    return trunk if isinstance(trunk, Eva) else None


def is_timm_eva_map(visual: nn.Module | None) -> bool:
    trunk = _trunk(visual)
    return trunk is not None and getattr(trunk, "global_pool", None) == "map"


def describe(visual: nn.Module, model_name: str) -> TowerSpec:
    """The spec of a PE-Core-like Eva trunk; UnsupportedModelError for variants LeGrad export lacks."""
    from timm.layers import Mlp
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
    from timm.models.eva import AttentionRope, EvaBlock

    trunk = _trunk(visual)
    pool = trunk.attn_pool
    blocks = list(trunk.blocks)
    plain_blocks = all(
        type(b) is EvaBlock
        and type(b.attn) is AttentionRope
        and type(b.mlp) is Mlp
        and b.attn.qkv is not None
        and b.attn.qkv.bias is not None
        and not getattr(b.attn, "rotate_half", False)
        and isinstance(b.norm1, nn.LayerNorm)
        and isinstance(b.norm2, nn.LayerNorm)
        for b in blocks
    )
    if not plain_blocks or type(trunk.rope) is not RotaryEmbeddingCat or getattr(trunk, "rope_mixed", False):
        raise UnsupportedModelError(
            f"{model_name} uses EVA blocks other than PE-Core's (fused-qkv RoPE attention, GELU MLP, "
            "interleaved 2-D RoPE); not supported yet"
        )
    if getattr(trunk, "reg_token", None) is not None or (
        trunk.no_embed_class and trunk.cls_token is not None
    ):
        raise UnsupportedModelError(
            f"{model_name} has register tokens, or a class token without a position; not supported yet"
        )
    if not isinstance(trunk.head, nn.Linear):
        raise UnsupportedModelError(f"{model_name}'s head after the pool is {trunk.head!r}, not a Linear")
    activation, patch, grid = check_map_trunk(visual, model_name, "PE-Core")
    return TowerSpec(
        family="timm_eva",
        width=trunk.embed_dim,
        heads=blocks[0].attn.num_heads,
        num_layers=len(blocks),
        patch_size=patch,
        native_grid=grid,
        embed_dim=trunk.head.out_features,
        activation=activation,
        head="map",
        prefix_tokens=0 if trunk.cls_token is None else 1,  # PE-Core-bigG has none
        eps=blocks[0].norm1.eps,
        head_heads=pool.num_heads,
        rope=True,
    )


def rope_table(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The RoPE table (gh·gw, 2·head_dim), sin then cos, that timm's trunk uses at the (gh, gw) grid."""
    from timm.layers.pos_embed_sincos import build_rotary_pos_embed

    rope = visual.trunk.rope
    if list(grid) == list(rope.feat_shape):
        return rope.get_embed().float()  # the cached table, bit for bit
    sin, cos = build_rotary_pos_embed(
        list(grid),
        bands=rope.bands,
        in_pixels=rope.in_pixels,
        ref_feat_shape=rope.ref_feat_shape,
        grid_offset=rope.grid_offset,
        grid_indexing=rope.grid_indexing,
        rotate_half=rope.rotate_half,
        device=rope.bands.device,
        grid_type=rope.grid_type,
        normalize_coords=rope.normalize_coords,
    )
    return torch.cat([sin, cos], dim=-1).float()


def canonical_state_dict(visual: nn.Module, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The tower's tensors (views) under the canonical names of spec.py, plus the RoPE table for the
    (gh, gw) `grid`."""
    out = {}
    for name, tensor in visual.trunk.state_dict().items():
        if name in ("cls_token", "pos_embed"):
            out[name] = tensor.reshape(-1, tensor.shape[-1]) if name == "pos_embed" else tensor.reshape(-1)
        elif name == "attn_pool.latent":
            out["pool.latent"] = tensor[0]
        elif name.startswith("attn_pool."):
            out["pool." + name[len("attn_pool.") :]] = tensor
        elif name.startswith("head."):
            out["head.fc." + name[len("head.") :]] = tensor
        elif ".gamma_" in name:
            out[name.replace(".gamma_", ".ls") + ".gamma"] = tensor
        elif not name.startswith("rope."):
            out[name] = tensor
    with torch.no_grad():
        out["rope"] = rope_table(visual, grid)
    return out
