"""The autograd LeGrad reference for timm towers pooled by a class token or the token mean
(MobileCLIP, ViTamin, EVA-CLIP): the CLIP rule of docs/towers.md on the UNTOUCHED open_clip `TimmModel`.

The trunk's own modules run in order (stem or patch embedding, `_pos_embed`, `norm_pre`, blocks);
explained blocks run through their own submodules with the attention softmax written out, so that
A is a tensor autograd differentiates against. The layer embedding is the tower's own final norm
(`norm` or `fc_norm`) on the mean of all tokens, then its own projection (timm's classifier or
open_clip's head). At another input size a deep copy of the trunk is resized by timm's
`set_input_size`; the model is not touched. Shares no code with vit.py / legrad.py.

An EVA trunk's explained blocks run `EvaAttention`'s steps written out (fused or separate q/k/v with
its own biases, timm's `apply_rot_embed_cat` on the patch tokens with the trunk's own RoPE table, then
`attn.norm` and `attn.proj`), and the block's own norms, MLP and LayerScale, pre- or post-norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DEFAULT_LAYERS, resolve_layers
from .reference import LeGradOutput, timm_trunk_at

__all__ = ["legrad_reference_timm"]


def _block_with_attention(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm Block on x (B, N, D): its output and its attention probabilities, a leaf requiring grad."""
    attn_mod = block.attn
    B, N, D = x.shape
    H = attn_mod.num_heads
    qkv = attn_mod.qkv(block.norm1(x)).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = torch.softmax((q * attn_mod.scale) @ k.transpose(-2, -1), dim=-1)
    attn = attn.detach().requires_grad_(True)
    o = attn_mod.proj(attn_mod.norm((attn @ v).transpose(1, 2).reshape(B, N, D)))
    x = x + block.ls1(o)
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, attn


def _eva_block_with_attention(block, x: torch.Tensor, rope: torch.Tensor | None):
    """A timm EvaBlock or EvaBlockPostNorm on x (B, N, D): its output and its attention
    probabilities, a leaf requiring grad."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import EvaBlockPostNorm

    attn_mod, post = block.attn, isinstance(block, EvaBlockPostNorm)
    h = x if post else block.norm1(x)
    B, N, _ = h.shape
    H = attn_mod.num_heads
    if attn_mod.qkv is not None:
        bias = None
        if attn_mod.q_bias is not None:
            bias = torch.cat((attn_mod.q_bias, attn_mod.k_bias, attn_mod.v_bias))
        qkv = F.linear(h, attn_mod.qkv.weight, bias).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q, k, v = (
            p(h).reshape(B, N, H, -1).transpose(1, 2)
            for p in (attn_mod.q_proj, attn_mod.k_proj, attn_mod.v_proj)
        )
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    if rope is not None:
        npt = attn_mod.num_prefix_tokens
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope)], dim=2)
    attn = torch.softmax((q * attn_mod.scale) @ k.transpose(-2, -1), dim=-1)
    attn = attn.detach().requires_grad_(True)
    o = attn_mod.proj(attn_mod.norm((attn @ v).transpose(1, 2).reshape(B, N, -1)))
    if post:
        x = x + block.norm1(o)
        return x + block.norm2(block.mlp(x)), attn
    x = x + (o if block.gamma_1 is None else block.gamma_1 * o)
    m = block.mlp(block.norm2(x))
    return x + (m if block.gamma_2 is None else block.gamma_2 * m), attn


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def legrad_reference_timm(
    model,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor,
    layers: int | str | Sequence[int] = DEFAULT_LAYERS,
) -> LeGradOutput:
    """LeGrad maps for B images × P prompts of an open_clip model with a class-token or mean-pooled
    timm ViT tower; `text_embeds` (P, E) L2-normalised."""
    visual = model.visual
    size = tuple(pixel_values.shape[-2:])  # (H, W)
    trunk = timm_trunk_at(visual.trunk, size)
    chosen = resolve_layers(layers, len(trunk.blocks))
    grid = tuple(trunk.patch_embed.grid_size)  # (gh, gw)
    stride = size[0] // grid[0]
    final_norm = trunk.fc_norm if isinstance(trunk.norm, nn.Identity) else trunk.norm

    def project(pooled: torch.Tensor) -> torch.Tensor:
        return visual.head(trunk.head(pooled))

    from timm.models.eva import Eva

    eva = isinstance(trunk, Eva)
    outputs, attentions, rope = {}, {}, None
    with torch.no_grad():
        if eva:  # its _pos_embed hands back the RoPE table too
            x, rope = trunk._pos_embed(trunk.patch_embed(pixel_values))
            x = trunk.norm_pre(x)
        else:
            x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixel_values))))
    for i, block in enumerate(trunk.blocks):
        if i in chosen:
            with torch.enable_grad():
                x, attentions[i] = (
                    _eva_block_with_attention(block, x, rope) if eva else _block_with_attention(block, x)
                )
            outputs[i] = x
        else:
            with torch.no_grad():
                x = block(x, rope=rope) if eva else block(x)
    with torch.no_grad():
        image_embeds = F.normalize(project(trunk.forward_head(trunk.norm(x), pre_logits=True)), dim=-1)

    prefix = trunk.num_prefix_tokens
    per_layer = []
    for i in chosen:
        with torch.enable_grad():
            feat = F.normalize(project(final_norm(outputs[i].mean(dim=1))), dim=-1)  # (B, E)
            sim = feat @ text_embeds.T  # (B, P)
            maps = []
            for p in range(text_embeds.shape[0]):
                (grad,) = torch.autograd.grad(sim[:, p].sum(), attentions[i], retain_graph=True)
                relevance = grad.clamp(min=0).mean(dim=(1, 2))[:, prefix:]  # (B, gh·gw)
                maps.append(relevance.reshape(-1, *grid))
        per_layer.append(torch.stack(maps, dim=1).detach())  # (B, P, gh, gw)

    layer_maps = torch.stack(per_layer, dim=2)  # (B, P, L, gh, gw)
    upsampled = F.interpolate(layer_maps.sum(2), scale_factor=stride, mode="bilinear", align_corners=False)
    return LeGradOutput(_min_max(upsampled), layer_maps, image_embeds.detach(), chosen)
