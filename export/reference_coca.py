"""The autograd LeGrad reference for CoCa towers, as the authors' `compute_legrad_coca` computes it.

The semantics are `../shared/design/legrad.md`, "CoCa": for each explained block l, its output z_l
goes through the tower's `AttentionalPooler` again; the explained attention is the pooler's
cross-attention A (B, H, latents, N); the score is t_p · (pool(z_l)[:, 0] @ proj), without ln_post
and not normalised. E_l,p = mean_h max(0, ∂s/∂A)[latent 0, 1:] (the class column dropped); the maps
are upsampled by the patch size, summed over layers and min-max normalised per (image, prompt).
The authors' code takes one image per call and sums its prompts' scores into one map; this computes
every (image, prompt) pair at once, each equal to their code called with that image and prompt.

It runs the UNTOUCHED open_clip model: the tower's own blocks in order, and the pooler's own
submodules with the softmax written out (all its latents, as the model does), so that A is a tensor
autograd differentiates against. Shares no code with vit.py / heads.py / legrad_map.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .layers import DEFAULT_LAYERS, resolve_layers
from .reference import LeGradOutput, _embed, _min_max

__all__ = ["legrad_reference_coca", "pooler_with_attention"]


def pooler_with_attention(pooler, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's AttentionalPooler on tokens x (B, N, D): (out (B, latents, Q), A (B, H, latents, N))."""
    mha = pooler.attn
    B, N, _ = x.shape
    H = mha.num_heads
    x = pooler.ln_k(x)
    q = pooler.ln_q(pooler.query)  # (latents, Q)
    if mha.in_proj_weight is not None:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(q, w_q, b_q)
    k, v = F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)  # (B, N, Q)
    Q = q.shape[-1]
    q = q.reshape(1, -1, H, Q // H).transpose(1, 2)  # (1, H, latents, dq)
    k, v = (t.reshape(B, N, H, Q // H).transpose(1, 2) for t in (k, v))  # (B, H, N, dq)
    attn = torch.softmax(q @ k.transpose(-1, -2) / (Q // H) ** 0.5, dim=-1)  # (B, H, latents, N)
    attn = attn.detach().requires_grad_(True)
    out = (attn @ v).transpose(1, 2).reshape(B, -1, Q)
    return mha.out_proj(out), attn


def legrad_reference_coca(
    model,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor,
    layers: int | str | Sequence[int] = DEFAULT_LAYERS,
) -> LeGradOutput:
    """LeGrad maps for B images × P prompts of an open_clip CoCa model; `text_embeds` (P, E)."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    chosen = resolve_layers(layers, len(blocks))
    patch = visual.patch_size[0]
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)

    outputs = []
    with torch.no_grad():
        x = _embed(visual, pixel_values)
        for i, block in enumerate(blocks):
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if i in chosen:
                outputs.append(x)
        pooled, _ = visual._global_pool(visual.ln_post(visual.attn_pool(x)))
        image_embeds = F.normalize(pooled @ visual.proj, dim=-1)

    per_layer = []
    for z in outputs:
        with torch.enable_grad():
            out, attn = pooler_with_attention(visual.attn_pool, z)
            sim = (out[:, 0] @ visual.proj) @ text_embeds.T  # (B, P): the first latent, no ln_post
            maps = []
            for p in range(text_embeds.shape[0]):
                (grad,) = torch.autograd.grad(sim[:, p].sum(), attn, retain_graph=True)
                relevance = grad.clamp(min=0).mean(dim=1)[:, 0, 1:]  # heads averaged, latent 0, (B, gh·gw)
                maps.append(relevance.reshape(-1, *grid))
        per_layer.append(torch.stack(maps, dim=1).detach())  # (B, P, gh, gw)

    layer_maps = torch.stack(per_layer, dim=2)  # (B, P, L, gh, gw)
    upsampled = sum(
        F.interpolate(m, scale_factor=patch, mode="bilinear", align_corners=False) for m in per_layer
    )
    return LeGradOutput(_min_max(upsampled), layer_maps, image_embeds.detach(), chosen)
