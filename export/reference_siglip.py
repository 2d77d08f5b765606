"""The autograd LeGrad reference for MAP-head towers (SigLIP, PE-Core via timm), as the authors compute it.

The semantics are `../shared/design/legrad.md`, "Pooling heads other than the token mean": for each
explained block l, its output z_l (no final norm) goes through the tower's MAP head again; the
explained attention is the head's single-query attention A (B, H, 1, N); per prompt p,
E_l,p = mean_h max(0, ∂(t_p · f_l/‖f_l‖)/∂A[:, h, 0, :]). Maps are summed over layers at grid
resolution; with the correction, cells where the (min-max) map of the empty prompt exceeds the
threshold are zeroed; then min-max per (image, prompt) and a bilinear upsampling by the patch size.

It runs the UNTOUCHED open_clip model (`TimmModel` with a timm VisionTransformer trunk): the trunk's
own modules in order, and the head's own submodules with the softmax written out, so that A is a
tensor autograd differentiates against. Nothing is patched or hooked. At another input size the
positional embedding is resampled into a new tensor as timm's `dynamic_img_size` does (bicubic,
antialiased), which is what the authors' wrapper switches on.

PE-Core (a timm `Eva` trunk, which the authors' code does not handle) follows the same rule with
what its trunk adds (docs/towers.md): a class token, whose column is dropped; RoPE in the blocks
(at another size, timm's own resizing of a copy of the trunk); and a Linear after the pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .layers import resolve_layers
from .reference import LeGradOutput, timm_trunk_at

__all__ = ["legrad_reference_siglip", "map_head_with_attention"]


def map_head_with_attention(pool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's AttentionPoolLatent on tokens x (B, N, C): (pooled (B, C), attention (B, H, latents, N))."""
    B, N, C = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim)
    k, v = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q.transpose(1, 2)), pool.k_norm(k)
    attn = torch.softmax((q * pool.scale) @ k.transpose(-2, -1), dim=-1)
    out = pool.proj((attn @ v).transpose(1, 2).reshape(B, pool.latent_len, C))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    pooled = out[:, 0] if pool.pool == "token" else out.mean(1) if pool.pool == "avg" else out
    return pooled, attn


def _embed_eva(trunk, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PE-Core (timm Eva): class token (if any) and patch tokens with positions, and the RoPE table."""
    x = trunk.patch_embed(pixel_values)  # (B, g·g, D)
    if trunk.cls_token is not None:  # PE-Core-bigG has none
        x = torch.cat([trunk.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + trunk.pos_embed
    return trunk.norm_pre(trunk.pos_drop(x)), trunk.rope.get_embed()


def _embed(trunk, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, N, D) with positions, as the trunk makes them, at any multiple of the patch."""
    if trunk.cls_token is not None or getattr(trunk, "reg_token", None) is not None:
        raise ValueError(
            "the trunk has prefix (class or register) tokens; this reference is for MAP-head towers"
        )
    patch = trunk.patch_embed.patch_size[0]
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    x = trunk.patch_embed.norm(trunk.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2))
    pos = trunk.pos_embed
    if grid != tuple(trunk.patch_embed.grid_size):
        pos = resample_abs_pos_embed(
            pos, new_size=grid, old_size=trunk.patch_embed.grid_size, num_prefix_tokens=0
        )
    return trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(x + pos)))


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Per (image, prompt) over the last two axes; a constant map becomes zeros."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def _layer_maps(trunk, tokens: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, P, L, gh, gw): E_l,p for each explained block's tokens and each prompt embedding."""
    per_layer = []
    prefix = trunk.num_prefix_tokens  # PE-Core's class token: its column is dropped
    for z in tokens:
        z = z.detach().requires_grad_(False)
        pooled, attn = map_head_with_attention(trunk.attn_pool, z)
        pooled = trunk.head(trunk.fc_norm(pooled))  # identities for SigLIP; PE-Core's projection
        scores = F.normalize(pooled, dim=-1) @ text.T  # (B, P)
        maps = []
        for p in range(text.shape[0]):  # one prompt at a time, as the authors' code is called
            (grad,) = torch.autograd.grad(scores[:, p].sum(), attn, retain_graph=True)
            maps.append(grad.clamp(min=0).mean(dim=1)[:, 0, prefix:])  # (B, gh·gw): heads averaged, one query
        per_layer.append(torch.stack(maps, dim=1).reshape(z.shape[0], text.shape[0], *grid))
    return torch.stack(per_layer, dim=2)


def legrad_reference_siglip(
    model,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor,
    layers: int | str | tuple[int, ...] = -2,
    empty_embed: torch.Tensor | None = None,
    threshold: float = 0.8,
) -> LeGradOutput:
    """LeGrad maps of a MAP-head open_clip model; `empty_embed` (E,) turns the correction on."""
    trunk = model.visual.trunk
    used = resolve_layers(layers, len(trunk.blocks))
    patch = trunk.patch_embed.patch_size[0]
    height, width = pixel_values.shape[-2:]
    grid = (height // patch, width // patch)
    eva = trunk.__class__.__name__ == "Eva"
    if eva:
        trunk = timm_trunk_at(trunk, (height, width))
    with torch.no_grad():
        x, rope = _embed_eva(trunk, pixel_values) if eva else (_embed(trunk, pixel_values), None)
        tokens = []
        for i, block in enumerate(trunk.blocks):
            x = block(x, rope=rope) if eva else block(x)
            if i in used:
                tokens.append(x)
        image_embeds = F.normalize(model.visual.head(trunk.forward_head(trunk.norm(x))), dim=-1)
    with torch.enable_grad():
        layer_maps = _layer_maps(trunk, tokens, text_embeds, grid)
        summed = layer_maps.sum(dim=2)  # (B, P, gh, gw)
        if empty_embed is not None:
            empty = _layer_maps(trunk, tokens, empty_embed.reshape(1, -1), grid).sum(dim=2)
            summed = summed.masked_fill(_min_max(empty) > threshold, 0.0)
    covered = (grid[0] * patch, grid[1] * patch)  # the patches may leave a strip uncovered
    heatmaps = F.interpolate(_min_max(summed), size=covered, mode="bilinear", align_corners=False)
    heatmaps = F.pad(heatmaps, (0, width - covered[1], 0, height - covered[0]))
    return LeGradOutput(heatmaps.detach(), layer_maps.detach(), image_embeds.detach(), used)
