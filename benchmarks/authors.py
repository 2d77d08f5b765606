"""The authors' approach (legrad_torch 1.1, `LeWrapper.compute_legrad_clip`), emulated in PyTorch.

It runs on the untouched open_clip model without patching it: one image at a time, repeated once
per prompt, the attention of the explained blocks kept in the autograd graph, and
`autograd.grad(..., create_graph=True)` per layer, as the released code does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

__all__ = ["authors_legrad"]

LAYER_INDEX = -2  # the authors' default: the last two blocks


def _embed(visual: Any, pixels: torch.Tensor) -> torch.Tensor:
    """conv1, CLS, positional embedding (resampled into a new tensor if needed), ln_pre."""
    grid = pixels.shape[-1] // visual.patch_size[0]
    pos = visual.positional_embedding
    if pos.shape[0] != grid * grid + 1:
        pos = resample_abs_pos_embed(
            pos.unsqueeze(0), [grid, grid], num_prefix_tokens=1, interpolation="bicubic", antialias=True
        ).squeeze(0)
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + pos
    return visual.ln_pre(x)


def _block_keeping_attention(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ResidualAttentionBlock (batch-first); the attention probabilities stay IN the graph."""
    mha = block.attn
    B, N, D = x.shape
    H = mha.num_heads
    q, k, v = F.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax((q * (D // H) ** -0.5) @ k.transpose(-1, -2), dim=-1)  # (B, H, N, N)
    x = x + block.ls_1(mha.out_proj((attn @ v).transpose(1, 2).reshape(B, N, D)))
    return x + block.ls_2(block.mlp(block.ln_2(x))), attn


def authors_legrad(
    model: Any, image: torch.Tensor, text: torch.Tensor, layer_index: int = LAYER_INDEX
) -> torch.Tensor:
    """LeWrapper.compute_legrad_clip for ONE image (1, 3, S, S) and P prompts → (1, P, S, S).

    `layer_index` as the authors': k < 0 explains the last |k| blocks, k ≥ 0 blocks k..L-1.
    """
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    start = len(blocks) + layer_index if layer_index < 0 else layer_index
    patch, num_prompts = visual.patch_size[0], text.shape[0]
    grid = image.shape[-1] // patch
    image = image.repeat(num_prompts, 1, 1, 1)  # one copy of the image per prompt
    with torch.no_grad():  # LeWrapper freezes the parameters of these blocks: no graph recorded
        x = _embed(visual, image)
        for block in blocks[:start]:
            x = block(x)
    feats, attns = [], []
    for block in blocks[start:]:
        x, attn = _block_keeping_attention(block, x)
        feats.append(x)
        attns.append(attn)
    pooled, _ = visual._pool(x)
    _ = pooled @ visual.proj  # encode_image's own output, computed and discarded as in LeWrapper
    one_hot = F.one_hot(torch.arange(num_prompts, device=text.device)).float()
    accum: torch.Tensor | float = 0.0
    for feat, attn in zip(feats, attns, strict=True):
        img_feat = F.normalize(visual.ln_post(feat.mean(dim=1)) @ visual.proj, dim=-1)  # (P, E)
        sim = text @ img_feat.T  # (P, P): prompt p against copy p on the diagonal
        (grad,) = torch.autograd.grad(torch.sum(one_hot * sim), [attn], retain_graph=True, create_graph=True)
        relevance = grad.clamp(min=0.0).mean(dim=1).mean(dim=1)[:, 1:]  # (P, N-1)
        expl = relevance.reshape(1, num_prompts, grid, grid)
        accum = accum + F.interpolate(expl, scale_factor=patch, mode="bilinear")
    assert isinstance(accum, torch.Tensor)
    flat = accum.flatten(2)
    lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    return ((accum - lo) / (hi - lo)).detach()
