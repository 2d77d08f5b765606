"""Attention baselines for the evaluation, from the same explicit-attention ViT LeGrad explains.

Both are text-agnostic: one map per image, whatever the prompt.

- `cls_attention`: the last block's attention from the CLS token to every patch, mean over heads.
- `attention_rollout` (Abnar & Zuidema 2020): per block Â = 0.5·mean_h A + 0.5·I with rows
  renormalised, multiplied over all blocks (R = Â_L ⋯ Â_1); the CLS row's patch columns.
"""

from __future__ import annotations

import torch

from .vit import ExplicitViT

__all__ = ["attention_probs", "attention_rollout", "cls_attention"]


@torch.no_grad()
def attention_probs(vit: ExplicitViT, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Every block's softmax attention, (B, H, N, N) each, first block first."""
    x = vit.embed(pixel_values)
    probs = []
    for block in vit.blocks:
        probs.append(block.attention_probs(x)[0])
        x = block(x)
    return probs


def _patch_grid(rows: torch.Tensor, vit: ExplicitViT) -> torch.Tensor:
    """(B, N) rows over all tokens → (B, g, g) over the patches (CLS column dropped)."""
    return rows[:, 1:].reshape(-1, *vit.grid)


@torch.no_grad()
def cls_attention(vit: ExplicitViT, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, g, g): the last block's CLS-to-patch attention, mean over heads."""
    x = vit.embed(pixel_values)
    for block in vit.blocks[:-1]:
        x = block(x)
    attn = vit.blocks[-1].attention_probs(x)[0]  # (B, H, N, N)
    return _patch_grid(attn[:, :, 0].mean(1), vit)


@torch.no_grad()
def attention_rollout(vit: ExplicitViT, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, g, g): attention rollout over all blocks, the CLS token's row."""
    rollout = None
    for attn in attention_probs(vit, pixel_values):
        eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
        a = 0.5 * attn.mean(1) + 0.5 * eye  # (B, N, N)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return _patch_grid(rollout[:, 0], vit)
