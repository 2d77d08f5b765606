"""The autograd LeGrad reference: the oracle everything else is checked against, and a torch API.

It runs the UNTOUCHED open_clip model: blocks outside the explained set run through their own
`forward`; explained blocks run through their own submodules (ln_1, attn weights, ls_1, ln_2, mlp,
ls_2) with the attention softmax written out, so its probabilities are a tensor autograd can
differentiate against. Nothing is patched, hooked or written back (the authors' wrapper overwrites
the positional embedding in place; here it is resampled into a new tensor).

Deliberately independent of `vit.py` / `legrad.py`: it shares no code with the analytic path.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .layers import DEFAULT_LAYERS, resolve_layers

__all__ = ["LeGradOutput", "legrad_reference", "mha_attention", "timm_trunk_at"]


@dataclass(frozen=True)
class LeGradOutput:
    heatmaps: torch.Tensor  # (B, P, H, W) in [0, 1]
    layer_maps: torch.Tensor  # (B, P, L, gh, gw) raw per-layer maps
    image_embeds: torch.Tensor  # (B, E) L2-normalised
    layers: tuple[int, ...]


def timm_trunk_at(trunk, size: int | tuple[int, int]):
    """A timm trunk for input of `size` ((height, width), an int is a square): itself at its own size,
    else a deep copy resized by timm's `set_input_size` (positions resampled, a RoPE table rebuilt);
    the model is never touched."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size == tuple(trunk.patch_embed.img_size):
        return trunk
    resized = copy.deepcopy(trunk)
    resized.set_input_size(img_size=size)
    return resized


def _embed(visual, pixel_values: torch.Tensor) -> torch.Tensor:
    patch = visual.patch_size[0]
    grid = [pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch]
    pos = visual.positional_embedding
    if grid != list(visual.grid_size):
        pos = resample_abs_pos_embed(
            pos.unsqueeze(0),
            new_size=grid,
            old_size=list(visual.grid_size),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=True,
        ).squeeze(0)
    x = visual.conv1(pixel_values).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
    return visual.ln_pre(x)


def mha_attention(mha, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`nn.MultiheadAttention` (packed in_proj, batch-first) on h (B, N, D) with its softmax written
    out: the out_proj input (B, N, D) and the attention probabilities (B, H, N, N), a leaf that
    requires grad (the score of a layer reaches them only through its own block)."""
    B, N, D = h.shape
    H = mha.num_heads
    q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
    attn = attn.detach().requires_grad_(True)
    return (attn @ v).transpose(1, 2).reshape(B, N, D), attn


def _block_with_attention(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ResidualAttentionBlock, batch-first, returning its output and attention probabilities."""
    o, attn = mha_attention(block.attn, block.ln_1(x))
    x = x + block.ls_1(block.attn.out_proj(o))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, attn


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    out = (maps - lo) / (hi - lo)
    return torch.nan_to_num(out, nan=0.0)  # constant map: the authors' code returns NaN, we return 0


def legrad_reference(
    model,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor,
    layers: int | str | Sequence[int] = DEFAULT_LAYERS,
) -> LeGradOutput:
    """LeGrad maps for B images × P prompts with one image forward and autograd.

    `model` is an open_clip CLIP with a VisionTransformer image tower; `pixel_values` (B, 3, H, W)
    preprocessed, H and W any multiples of the patch size; `text_embeds` (P, E) L2-normalised.
    """
    visual = model.visual
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    chosen = resolve_layers(layers, len(blocks))
    patch = visual.patch_size[0]
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    num_prompts = text_embeds.shape[0]

    outputs: dict[int, torch.Tensor] = {}
    attentions: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        x = _embed(visual, pixel_values)
    for i, block in enumerate(blocks):
        if i in chosen:
            with torch.enable_grad():
                x, attentions[i] = _block_with_attention(block, x)
            outputs[i] = x
        else:
            with torch.no_grad():
                x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)

    with torch.no_grad():
        pooled, _ = visual._pool(x)
        image_embeds = F.normalize(pooled @ visual.proj, dim=-1)

    per_layer = []
    for i in chosen:
        with torch.enable_grad():
            feat = F.normalize(visual.ln_post(outputs[i].mean(dim=1)) @ visual.proj, dim=-1)  # (B, E)
            sim = feat @ text_embeds.T  # (B, P)
            maps = []
            for p in range(num_prompts):
                (grad,) = torch.autograd.grad(sim[:, p].sum(), attentions[i], retain_graph=True)
                relevance = grad.clamp(min=0).mean(dim=1).mean(dim=1)[:, 1:]  # (B, N-1)
                maps.append(relevance.reshape(-1, *grid))
        per_layer.append(torch.stack(maps, dim=1).detach())  # (B, P, gh, gw)

    layer_maps = torch.stack(per_layer, dim=2)  # (B, P, L, gh, gw)
    upsampled = sum(
        F.interpolate(m, scale_factor=patch, mode="bilinear", align_corners=False) for m in per_layer
    )
    return LeGradOutput(_min_max(upsampled), layer_maps, image_embeds.detach(), chosen)
