"""LeGrad in closed form: the gradient of each layer's score w.r.t. its own attention, no autograd.

See shared/design/legrad.md. For layer l and prompt p, with z_l the block output:

    f = LN_post(mean_i z_l[i]) @ proj,   s = t_p · f / ‖f‖
    G[h,i,j] = ∂s/∂A_l[h,i,j] = U_h[i] · V_h[j]     (U: the backward path through block l's MLP)
    E[j] = mean_h mean_i max(0, G[h,i,j]),  j over the patch tokens (a class token's column dropped)

One image forward serves every prompt; only a short backward runs per prompt and layer. The
backward is split in two: `prepare_layer` computes, once per image, everything that does not
depend on the prompt, and `prompt_map` is what remains per prompt. By default (prompts="loop")
the layers run inside a scan over prompts, so the per-prompt intermediates (heads × N² per layer)
exist for one prompt at a time: memory does not grow with the number of prompts, and the image
forward still runs once. prompts="batch" runs every prompt at once instead (no loop in the graph,
for executors where a loop iteration is costly; memory grows with P, so callers split prompts).

Folding (exact algebra, precomputed per layer in `BackwardWeights`). With a = act'(pre),
λ, β the LN_2 affine, x̂ and rstd its normalised input and 1/σ, γ1 the attention LayerScale:

    U_i = (γ1 ⊙ g_z) @ W_o + rstd_i · ((g_hidden ⊙ a_i) @ K − c_i · (x̂_i @ diag(γ1) W_o))
    K   = W_fc diag(λ) (I − 11ᵀ/D) diag(γ1) W_o          (M, D): LN_2's centring and W_o folded in
    c_i = mean_d(λ_d h_id x̂_id) = (g_hidden ⊙ a_i) · r_i / D,   r_i = pre_i − b_fc − W_fc β

so the per-prompt work is one (N, M) @ (M, D) product and U_h V_hᵀ; the (N, D) @ (D, D) product
of the plain backward moves to once per image, and r comes free from the forward's `pre`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan

from .arguments import PROMPT_MODES
from .heads import HeadTrace
from .legrad_eva import EvaWeights, eva_prompt_map, prepare_eva_layer
from .legrad_geglu import GegluWeights, geglu_prompt_map, prepare_geglu_layer
from .ops import activation_derivative, relevance
from .vit import Block, BlockTrace, ExplicitViT

__all__ = ["LeGrad", "BackwardWeights", "LayerPrep", "prepare_layer", "prompt_map", "min_max", "upsample"]


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Normalise each (b, p) map over its pixels to [0, 1]; a constant map becomes zeros, not NaN."""
    flat = maps.flatten(-2)  # (B, P, H*W)
    lo = flat.min(-1, keepdim=True).values.unsqueeze(-1)  # (B, P, 1, 1)
    span = flat.max(-1, keepdim=True).values.unsqueeze(-1) - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, P, gh, gw) → (B, P, H, W) (an int size is a square), bilinear, align_corners=False (ONNX
    Resize half_pixel)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.float().contiguous(), requires_grad=False)


class BackwardWeights(nn.Module):
    """Constants of one block's closed-form backward, folded once at build time (in float64)."""

    def __init__(self, block: Block):
        super().__init__()
        w_fc, w_o = block.fc_weight.double(), block.out_proj_weight.double()  # (M, D), (D, D)
        lam, beta = block.ln_2.weight.double(), block.ln_2.bias.double()  # (D,)
        wo_g1 = block.gamma_1.double().unsqueeze(1) * w_o  # diag(γ1) W_o, (D, D)
        w_fc_lam = w_fc * lam  # W_fc diag(λ), (M, D)
        self.k = _frozen((w_fc_lam - w_fc_lam.mean(1, keepdim=True)) @ wo_g1)  # (M, D)
        self.wo_g1 = _frozen(wo_g1)  # (D, D)
        self.pre_offset = _frozen(block.fc_bias.double() + w_fc @ beta)  # (M,): pre − this = (λ⊙x̂) W_fcᵀ
        self.proj_g2 = _frozen(block.gamma_2.double().unsqueeze(1) * block.proj_weight.double())  # (D, M)


class LayerPrep(NamedTuple):
    """Per image and layer, what every prompt's backward shares."""

    head: HeadTrace  # the layer embedding and LN_post's statistics
    a: torch.Tensor  # (B, N, M) rstd_i · act'(pre_i)
    q: torch.Tensor  # (B, N, M) rstd_i · act'(pre_i) ⊙ r_i / D
    w: torch.Tensor  # (B, N, D) x̂_i @ diag(γ1) W_o
    v: torch.Tensor  # (B, H, N-R, dh) attention values of the patch tokens


def prepare_layer(vit: ExplicitViT, block: Block, weights: BackwardWeights, trace: BlockTrace) -> LayerPrep:
    """The prompt-independent part of one layer's backward, for every image."""
    D = trace.z.shape[-1]
    mid_hat, mid_rstd = block.ln_2.normalize(trace.x_mid)  # (B, N, D), (B, N, 1)
    a = mid_rstd * activation_derivative(trace.pre, vit.cfg.activation)  # (B, N, M)
    q = a * ((trace.pre - weights.pre_offset) / D)  # (B, N, M)
    w = mid_hat @ weights.wo_g1  # (B, N, D)
    v = trace.v[:, :, vit.cfg.prefix_tokens :]  # (B, H, N-R, dh): a CLS column dropped
    return LayerPrep(vit.head.forward_traced(trace.z), a, q, w, v)


def prompt_map(
    vit: ExplicitViT, weights: BackwardWeights, prep: LayerPrep, text_embed: torch.Tensor
) -> torch.Tensor:
    """Raw LeGrad map of one layer for one prompt (E,) and every image: (B, N-R)."""
    g_z = vit.head.backward(prep.head, text_embed, prep.w.shape[1])  # (B, D), the same for every token

    # back through the MLP, LN_2 and the output projection (folded, see the module docstring)
    g_hidden = (g_z @ weights.proj_g2).unsqueeze(1)  # (B, 1, M)
    c = prep.q @ g_hidden.transpose(1, 2)  # (B, N, 1)
    U = (prep.a * g_hidden) @ weights.k - c * prep.w + (g_z @ weights.wo_g1).unsqueeze(1)  # (B, N, D)
    return relevance(U, prep.v)


class LeGrad(nn.Module):
    """Images and text embeddings in; heatmaps, per-layer maps and image embeddings out."""

    def __init__(self, vit: ExplicitViT, layers: Sequence[int], prompts: str = "loop"):
        super().__init__()
        if prompts not in PROMPT_MODES:
            raise ValueError(f"prompts must be one of {PROMPT_MODES}, not {prompts!r}")
        self.prompts = prompts
        if not layers:
            raise ValueError("LeGrad needs at least one layer")
        if any(side % vit.cfg.patch_size for side in vit.image_size):
            raise ValueError(
                f"image size {vit.image_size} (height, width) is not divisible by the patch size "
                f"{vit.cfg.patch_size}"
            )
        bad = [i for i in layers if not 0 <= i < vit.cfg.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {vit.cfg.num_layers}-block model")
        self.vit = vit
        self.layers = tuple(sorted(set(layers)))
        # ViTamin's GeGLU and EVA02's blocks have backward stages of their own (legrad_geglu/_eva.py)
        cfg = vit.cfg
        kind = "eva" if cfg.mlp == "swiglu" or cfg.attn_norm or cfg.post_norm else cfg.mlp
        weights, self._prepare, self._prompt_map = {
            "plain": (BackwardWeights, prepare_layer, prompt_map),
            "geglu": (GegluWeights, prepare_geglu_layer, geglu_prompt_map),
            "eva": (EvaWeights, prepare_eva_layer, eva_prompt_map),
        }[kind]
        self.backward_weights = nn.ModuleList(weights(vit.blocks[i]) for i in self.layers)

    def forward(
        self, pixel_values: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, layer_maps = self.layer_maps(pixel_values, text_embeds)
        image_embeds = F.normalize(self.vit.head(tokens), dim=-1)  # (B, E)
        heatmaps = min_max(upsample(layer_maps.sum(2), self.vit.image_size))  # (B, P, H, W)
        return heatmaps, layer_maps, image_embeds

    def layer_maps(
        self, pixel_values: torch.Tensor, prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's tokens (B, N, D) and the raw maps (B, P, L, gh, gw) of every prompt vector
        (P, ·): a text embedding, or a classifier's head direction (heads.ClassifierHead)."""
        tokens, traces = self.vit.forward_traced(pixel_values, self.layers)
        preps = [
            self._prepare(self.vit, self.vit.blocks[i], weights, trace)
            for i, weights, trace in zip(self.layers, self.backward_weights, traces)
        ]

        def one_prompt(count: torch.Tensor, text_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = [
                self._prompt_map(self.vit, w, prep, text_embed)
                for w, prep in zip(self.backward_weights, preps)
            ]
            return count + 1, torch.stack(maps, dim=1)  # (B, L, N-R)

        # "loop": one prompt at a time, so per-prompt memory stays flat as P grows: an ONNX Scan when
        # traced; a plain loop in eager mode, where scan would run through dynamo on every call (slow).
        # "batch": every prompt at once (vmap), no loop in the graph; memory grows with P.
        if self.prompts == "batch":
            maps = torch.vmap(lambda t: one_prompt(torch.zeros((), dtype=torch.int64), t)[1])(prompts)
        elif torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            _, maps = scan(one_prompt, torch.zeros((), dtype=torch.int64), prompts)  # (P, B, L, N-R)
        else:
            count = torch.zeros((), dtype=torch.int64)
            maps = torch.stack([one_prompt(count, t)[1] for t in prompts])  # (P, B, L, N-R)
        B, (gh, gw) = pixel_values.shape[0], self.vit.grid
        return tokens, maps.transpose(0, 1).reshape(B, -1, len(self.layers), gh, gw)  # (B, P, L, gh, gw)
