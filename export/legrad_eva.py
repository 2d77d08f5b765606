"""LeGrad's closed-form backward through EVA-CLIP's two non-plain blocks (EVA01-g's are plain: legrad.py).

EVA02-B/L, pre-norm, a LayerNorm inside the attention and a SwiGLU with its own LayerNorm:

    x_mid = x + γ1·W_o LN_a(o),  o = A V,  [a_g, a_x] = LN_2(x_mid) [W_g; W_x]ᵀ + b,
    z = x_mid + γ2·W2 LN_m(silu(a_g) ⊙ a_x) + b2

EVA02-E, post-norm, a plain GELU MLP:

    y = W_o o + b_o,  x_mid = x + LN_1(y),  m = W2 gelu(W1 x_mid + b1) + b2,  z = x_mid + LN_2(m)

The gradient g_z reaching z (from the token mean: the same for every token) goes back to g_o, the
gradient at o = A V, and then through `relevance`. Write LN*(g; x̂, r) = r·(g − mean g − x̂·mean(g ⊙ x̂))
for a LayerNorm's backward without its scale λ (folded into the weights next to it). SwiGLU block:

    w   = g_z diag(γ2) W2 diag(λ_m)   (B, M), the same for every token;  w̄ = w − mean(w)
    g_y = (C_i ⊙ [w̄, w̄]) W_gxλ − (ĥ_i · w) T_i,   C_i = r_h,i [a_x ⊙ silu'(a_g), silu(a_g)],
          T_i = (C_i ⊙ [ĥ_i, ĥ_i]) W_gxλ / M,      W_gxλ = [W_g; W_x] diag(λ_2)
    g_mid = g_z + LN_2*(g_y),   g_o = LN_a*(g_mid diag(γ1) W_o diag(λ_a))

(LN_m's backward with a per-image constant input folded: ĥ, r_h its statistics.) Post-norm block:

    w   = λ_2 ⊙ g_z,  w̄ = w − mean(w)
    g_pre = a_i ⊙ (w̄ W2) − (m̂_i · w) q_i,   a_i = r_m,i gelu'(pre_i),  q_i = a_i ⊙ (m̂_i W2) / D
    g_o = LN_1*(λ_1 ⊙ g_z + g_pre W1 diag(λ_1)) W_o

C, T, a, q and every LayerNorm's statistics are per image (`prepare_eva_layer`); per prompt the work is
one (N, 2M) @ (2M, D) or (N, M) @ (M, D) product, (N, D) @ (D, D) and LayerNorm backwards. See
docs/towers.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import HeadTrace
from .ops import activation_derivative, frozen, relevance
from .vit import Block, BlockTrace, ExplicitViT

__all__ = ["EvaWeights", "SwigluPrep", "PostNormPrep", "prepare_eva_layer", "eva_prompt_map"]


def _ln_backward(g: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's backward without its scale (folded into the weights): d loss / d input."""
    return rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def _silu_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


class EvaWeights(nn.Module):
    """Constants of one EVA block's backward, folded once at build time (in float64); the LayerNorms
    whose statistics the backward needs are shared with the block."""

    def __init__(self, block: Block):
        super().__init__()
        d = {name: t.double() for name, t in block.named_parameters()}
        w_o, w2 = d["out_proj_weight"], d["proj_weight"]  # (D, D), (D, M)
        self.ln_1, self.ln_2, self.ln_attn, self.ln_mlp = block.ln_1, block.ln_2, block.ln_attn, block.ln_mlp
        if block.spec.post_norm:
            lam1 = d["ln_1.weight"]
            self.lam1, self.lam2 = frozen(lam1), frozen(d["ln_2.weight"])  # (D,)
            self.w2 = frozen(w2)  # (D, M)
            self.w1_l1 = frozen(d["fc_weight"] * lam1)  # W1 diag(λ_1), (M, D)
            self.w_o = frozen(w_o)  # (D, D)
        else:
            lam_a = d["ln_attn.weight"]
            self.w2_g2_lm = frozen(d["gamma_2"].unsqueeze(1) * w2 * d["ln_mlp.weight"])  # (D, M)
            self.w_gx_l2 = frozen(d["fc_weight"] * d["ln_2.weight"])  # [W_g; W_x] diag(λ_2), (2M, D)
            self.wo_g1_la = frozen(d["gamma_1"].unsqueeze(1) * w_o * lam_a)  # diag(γ1) W_o diag(λ_a)


class SwigluPrep(NamedTuple):
    """Per image and layer of a SwiGLU block, what every prompt's backward shares."""

    head: HeadTrace
    mid_hat: torch.Tensor  # (B, N, D) LN_2's normalised input
    mid_rstd: torch.Tensor  # (B, N, 1)
    h_hat: torch.Tensor  # (B, N, M) LN_m's normalised input silu(a_g) ⊙ a_x
    c: torch.Tensor  # (B, N, 2M) r_h [a_x ⊙ silu'(a_g), silu(a_g)]
    t: torch.Tensor  # (B, N, D) (C ⊙ [ĥ, ĥ]) W_gxλ / M
    o_hat: torch.Tensor  # (B, N, D) LN_a's normalised input A·V
    o_rstd: torch.Tensor  # (B, N, 1)
    v: torch.Tensor  # (B, H, N-R, dh) attention values of the patch tokens


class PostNormPrep(NamedTuple):
    """Per image and layer of a post-norm block, what every prompt's backward shares."""

    head: HeadTrace
    m_hat: torch.Tensor  # (B, N, D) LN_2's normalised input, the MLP's output
    a: torch.Tensor  # (B, N, M) r_m · gelu'(pre)
    q: torch.Tensor  # (B, N, M) a ⊙ (m̂ W2) / D
    y_hat: torch.Tensor  # (B, N, D) LN_1's normalised input, the attention's output
    y_rstd: torch.Tensor  # (B, N, 1)
    v: torch.Tensor  # (B, H, N-R, dh)


def prepare_eva_layer(
    vit: ExplicitViT, block: Block, weights: EvaWeights, trace: BlockTrace
) -> SwigluPrep | PostNormPrep:
    """The prompt-independent part of one EVA layer's backward, for every image."""
    v = trace.v[:, :, vit.cfg.prefix_tokens :]  # (B, H, N-R, dh): the CLS column dropped
    head = vit.head.forward_traced(trace.z)
    if vit.cfg.post_norm:
        D = trace.z.shape[-1]
        m_hat, m_rstd = block.ln_2.normalize(trace.mlp_out)
        a = m_rstd * activation_derivative(trace.pre, vit.cfg.activation)  # (B, N, M)
        q = a * ((m_hat @ weights.w2) / D)
        y_hat, y_rstd = block.ln_1.normalize(trace.attn_out)
        return PostNormPrep(head, m_hat, a, q, y_hat, y_rstd, v)
    mid_hat, mid_rstd = block.ln_2.normalize(trace.x_mid)
    a_g, a_x = trace.pre.chunk(2, dim=-1)  # (B, N, M) each
    s_g = F.silu(a_g)
    h_hat, h_rstd = block.ln_mlp.normalize(s_g * a_x)
    c = h_rstd * torch.cat([a_x * _silu_derivative(a_g), s_g], dim=-1)  # (B, N, 2M)
    t = ((c * torch.cat([h_hat, h_hat], dim=-1)) @ weights.w_gx_l2) / h_hat.shape[-1]  # (B, N, D)
    o_hat, o_rstd = block.ln_attn.normalize(trace.o)
    return SwigluPrep(head, mid_hat, mid_rstd, h_hat, c, t, o_hat, o_rstd, v)


def eva_prompt_map(
    vit: ExplicitViT, weights: EvaWeights, prep: SwigluPrep | PostNormPrep, text_embed: torch.Tensor
) -> torch.Tensor:
    """Raw LeGrad map of one EVA layer for one prompt (E,) and every image: (B, N-R)."""
    g_z = vit.head.backward(prep.head, text_embed, prep.v.shape[-2] + vit.cfg.prefix_tokens)  # (B, D)
    if isinstance(prep, PostNormPrep):
        w = weights.lam2 * g_z  # (B, D)
        w_c = w - w.mean(-1, keepdim=True)
        s = prep.m_hat @ w.unsqueeze(-1)  # (B, N, 1)
        g_pre = prep.a * (w_c @ weights.w2).unsqueeze(1) - s * prep.q  # (B, N, M)
        g_y = (weights.lam1 * g_z).unsqueeze(1) + g_pre @ weights.w1_l1  # λ_1 ⊙ g_mid, (B, N, D)
        return relevance(_ln_backward(g_y, prep.y_hat, prep.y_rstd) @ weights.w_o, prep.v)
    w = g_z @ weights.w2_g2_lm  # (B, M)
    w_c = w - w.mean(-1, keepdim=True)
    s = prep.h_hat @ w.unsqueeze(-1)  # (B, N, 1)
    g_y = (prep.c * w_c.repeat(1, 2).unsqueeze(1)) @ weights.w_gx_l2 - s * prep.t  # (B, N, D)
    g_mid = g_z.unsqueeze(1) + _ln_backward(g_y, prep.mid_hat, prep.mid_rstd)
    return relevance(_ln_backward(g_mid @ weights.wo_g1_la, prep.o_hat, prep.o_rstd), prep.v)
