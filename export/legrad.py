"""LeGrad in closed form: the gradient of each layer's score w.r.t. its own attention, no autograd.

See shared/design/legrad.md. For layer l and prompt p, with z_l the block output:

    f = LN_post(mean_i z_l[i]) @ proj,   s = t_p · f / ‖f‖
    G[h,i,j] = ∂s/∂A_l[h,i,j] = U_h[i] · V_h[j]     (U: the backward path through block l's MLP)
    E[j] = mean_h mean_i max(0, G[h,i,j]),  j ≥ 1

One image forward serves every prompt; only this short backward runs per prompt and layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import Block, BlockTrace, ExplicitViT, act_derivative

__all__ = ["LeGrad", "min_max", "upsample"]


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Normalise each (b, p) map over its pixels to [0, 1]; a constant map becomes zeros, not NaN."""
    flat = maps.flatten(-2)  # (B, P, H*W)
    lo = flat.min(-1, keepdim=True).values.unsqueeze(-1)  # (B, P, 1, 1)
    span = flat.max(-1, keepdim=True).values.unsqueeze(-1) - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, P, g, g) → (B, P, size, size), bilinear, align_corners=False (ONNX Resize half_pixel)."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def layer_map(vit: ExplicitViT, block: Block, trace: BlockTrace, text_embeds: torch.Tensor) -> torch.Tensor:
    """Raw LeGrad map of one layer for every image and prompt: (B, P, g, g)."""
    cfg = vit.cfg
    B, N, D = trace.z.shape
    H, dh = cfg.heads, cfg.head_dim

    # score s = t · f̂ and its gradient w.r.t. f
    u = trace.z.mean(1)  # (B, D)
    u_hat, u_rstd = vit.ln_post.normalize(u)
    f = vit.ln_post(u) @ vit.proj  # (B, E)
    f_norm = f.norm(dim=-1, keepdim=True)  # (B, 1)
    f_hat = f / f_norm
    s = f_hat @ text_embeds.T  # (B, P)
    g_f = (text_embeds.unsqueeze(0) - s.unsqueeze(-1) * f_hat.unsqueeze(1)) / f_norm.unsqueeze(1)  # (B, P, E)

    # back through LN_post and the token mean: the same gradient reaches every token
    g_u = vit.ln_post.backward(g_f @ vit.proj.T, u_hat.unsqueeze(1), u_rstd.unsqueeze(1))  # (B, P, D)
    g_z = g_u / N  # (B, P, D)

    # back through the MLP branch, per token
    g_hidden = (block.gamma_2 * g_z) @ block.proj_weight  # (B, P, M)
    g_pre = g_hidden.unsqueeze(2) * act_derivative(trace.pre, cfg.activation).unsqueeze(1)  # (B, P, N, M)
    mid_hat, mid_rstd = block.ln_2.normalize(trace.x_mid)  # (B, N, D), (B, N, 1)
    g_mid = g_z.unsqueeze(2) + block.ln_2.backward(
        g_pre @ block.fc_weight, mid_hat.unsqueeze(1), mid_rstd.unsqueeze(1)
    )  # (B, P, N, D)

    # back through the output projection to the per-head attention outputs A_h V_h
    U = (block.gamma_1 * g_mid) @ block.out_proj_weight  # (B, P, N, D)
    U = U.reshape(B, -1, N, H, dh).transpose(2, 3)  # (B, P, H, N, dh)
    G = U @ trace.v[:, :, 1:].transpose(-1, -2).unsqueeze(1)  # (B, P, H, N, N-1): CLS column dropped
    E = torch.relu(G).mean(dim=(2, 3))  # (B, P, N-1)
    return E.reshape(B, -1, vit.grid, vit.grid)


class LeGrad(nn.Module):
    """Images and text embeddings in; heatmaps, per-layer maps and image embeddings out."""

    def __init__(self, vit: ExplicitViT, layers: Sequence[int]):
        super().__init__()
        if not layers:
            raise ValueError("LeGrad needs at least one layer")
        bad = [i for i in layers if not 0 <= i < vit.cfg.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {vit.cfg.num_layers}-block model")
        self.vit = vit
        self.layers = tuple(sorted(set(layers)))

    def forward(
        self, pixel_values: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, traces = self.vit.forward_traced(pixel_values, self.layers)
        image_embeds = F.normalize(self.vit.pool_project(tokens), dim=-1)  # (B, E)
        layer_maps = torch.stack(
            [
                layer_map(self.vit, self.vit.blocks[i], trace, text_embeds)
                for i, trace in zip(self.layers, traces)
            ],
            dim=2,
        )  # (B, P, L, g, g)
        heatmaps = min_max(upsample(layer_maps.sum(2), self.vit.image_size))  # (B, P, S, S)
        return heatmaps, layer_maps, image_embeds
