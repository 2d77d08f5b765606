"""LeGrad's closed-form backward through a block whose MLP is a GeGLU with its own LayerNorm (ViTamin).

    x_mid = x + γ1·Attn(LN_1(x)),  n = LN_in(LN_2(x_mid)),  [a0, a1] = n [W0; W1]ᵀ + b,
    z = x_mid + γ2·(gelu(a0) ⊙ a1) W2ᵀ + b2

The gradient g_z reaching z (from the token mean: the same for every token) goes back as

    g_h   = (γ2 ⊙ g_z) W2                                   (B, M), the same for every token
    g_n   = (C_i ⊙ [g_h, g_h]) [W0; W1],  C_i = [a1 ⊙ gelu'(a0), gelu(a0)]    per token
    g_mid = g_z + LN_2ᵀ(LN_inᵀ(g_n)),     U = g_mid diag(γ1) W_o

C and both LayerNorms' statistics are per image (`prepare_geglu_layer`); per prompt the work is one
(N, 2M) @ (2M, D) product, two LayerNorm backwards and one (N, D) @ (D, D) product. The plain MLP's
folding (legrad.py) does not carry over: the inner LayerNorm sits between LN_2 and W0/W1.
See docs/towers.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from .heads import HeadTrace
from .ops import activation, activation_derivative, frozen, relevance
from .vit import Block, BlockTrace, ExplicitViT

__all__ = ["GegluWeights", "GegluPrep", "prepare_geglu_layer", "geglu_prompt_map"]


class GegluWeights(nn.Module):
    """Constants of one GeGLU block's backward; the block's two LayerNorms are shared with it."""

    def __init__(self, block: Block):
        super().__init__()
        self.ln_2, self.ln_mlp = block.ln_2, block.ln_mlp
        self.w01 = frozen(block.fc_weight)  # (2M, D): [W0; W1]
        self.w2_g2 = frozen(block.gamma_2.unsqueeze(1) * block.proj_weight)  # diag(γ2) W2, (D, M)
        self.wo_g1 = frozen(block.gamma_1.unsqueeze(1) * block.out_proj_weight)  # diag(γ1) W_o, (D, D)


class GegluPrep(NamedTuple):
    """Per image and layer, what every prompt's backward shares."""

    head: HeadTrace
    mid_hat: torch.Tensor  # (B, N, D) LN_2's normalised input
    mid_rstd: torch.Tensor  # (B, N, 1)
    n_hat: torch.Tensor  # (B, N, D) the inner LN's normalised input
    n_rstd: torch.Tensor  # (B, N, 1)
    c: torch.Tensor  # (B, N, 2M) [a1 ⊙ gelu'(a0), gelu(a0)]
    v: torch.Tensor  # (B, H, N-R, dh) attention values of the patch tokens


def prepare_geglu_layer(
    vit: ExplicitViT, block: Block, weights: GegluWeights, trace: BlockTrace
) -> GegluPrep:
    """The prompt-independent part of one GeGLU layer's backward, for every image."""
    mid_hat, mid_rstd = block.ln_2.normalize(trace.x_mid)
    n_hat, n_rstd = block.ln_mlp.normalize(block.ln_2(trace.x_mid))
    a0, a1 = trace.pre.chunk(2, dim=-1)  # (B, N, M) each
    kind = vit.cfg.activation
    c = torch.cat([a1 * activation_derivative(a0, kind), activation(a0, kind)], dim=-1)
    v = trace.v[:, :, vit.cfg.prefix_tokens :]
    return GegluPrep(vit.head.forward_traced(trace.z), mid_hat, mid_rstd, n_hat, n_rstd, c, v)


def geglu_prompt_map(
    vit: ExplicitViT, weights: GegluWeights, prep: GegluPrep, text_embed: torch.Tensor
) -> torch.Tensor:
    """Raw LeGrad map of one GeGLU layer for one prompt (E,) and every image: (B, N-R)."""
    g_z = vit.head.backward(prep.head, text_embed, prep.c.shape[1])  # (B, D)
    g_h = g_z @ weights.w2_g2  # (B, M)
    g_n = (prep.c * g_h.repeat(1, 2).unsqueeze(1)) @ weights.w01  # (B, N, D)
    g_y = weights.ln_mlp.backward(g_n, prep.n_hat, prep.n_rstd)
    g_mid = g_z.unsqueeze(1) + weights.ln_2.backward(g_y, prep.mid_hat, prep.mid_rstd)  # (B, N, D)
    return relevance(g_mid @ weights.wo_g1, prep.v)
