"""Pooling heads: tokens (B, N, D) → one image embedding, each with the backward LeGrad needs.

- `TokenMeanHead` (CLIP): LayerNorm + projection of the class token or the token mean. LeGrad
  explains the blocks' attention through it; the blocks' backward is in legrad.py.
- `MapHead` (SigLIP, PE-Core): timm's `AttentionPoolLatent` with one latent query (PE-Core adds
  a Linear projection after it). LeGrad explains the
  head's own attention A (B, H, 1, N): per prompt, ∂s/∂A[h, 0, j] = ∂s/∂o_h · v_h[j] where
  o = A V, so each prompt costs one short backward through proj, the residual MLP and the norm.
- `AttnPoolHead` (CoCa): open_clip's `AttentionalPooler`, then ln_post and the projection of its
  first latent. LeGrad explains that latent's cross-attention A (B, H, 1, N), scored as the authors
  do, without ln_post or normalising: s = t · (proj_pool(A V) @ proj), so ∂s/∂o = (t projᵀ) W_pool,
  the same for every image: a prompt's backward is one product with the values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import LayerNorm, activation, activation_derivative, frozen
from .towers import TowerSpec

__all__ = ["HeadTrace", "TokenMeanHead", "ClassifierHead", "MapHead", "MapTrace", "AttnPoolHead"]


class HeadTrace(NamedTuple):
    """Per image and explained layer, what every prompt's backward through the token-mean head shares."""

    f_hat: torch.Tensor  # (B, E) normalised layer embedding
    f_norm: torch.Tensor  # (B, 1) its norm before normalising
    u_hat: torch.Tensor  # (B, D) LN_post's normalised input (the token mean)
    u_rstd: torch.Tensor  # (B, 1)


class TokenMeanHead(nn.Module):
    """f = LN_post(token 0 or token mean) @ proj (+ bias), as the tower pools; LeGrad's layers use the
    mean of all tokens, and `backward` takes a score's gradient back to that mean's tokens."""

    def __init__(self, spec: TowerSpec, sd: dict[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.ln_post = LayerNorm(sd, "head.norm.", spec.eps)
        self.proj = frozen(sd["head.proj"])  # (D, E)
        # its transpose as a tensor of its own: a `.T` view taken inside the prompt loop reaches the
        # Scan once per layer as aliased inputs, which torch.export before 2.14 refuses
        self.proj_t = frozen(sd["head.proj"].T)  # (E, D)
        bias = sd.get("head.proj_bias")
        self.proj_bias = None if bias is None else frozen(bias)  # (E,) timm's classifier (MobileCLIP)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        f = self.ln_post(pooled) @ self.proj
        return f if self.proj_bias is None else f + self.proj_bias

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding (unnormalised) from the last block's tokens (B, N, D)."""
        if self.spec.pool_type == "tok":  # LayerNorm is per token: pooling first changes nothing
            return self.project(tokens[:, 0])
        patches = tokens[:, self.spec.prefix_tokens :]
        if self.spec.final_ln_after_pool:
            return self.project(patches.mean(1))
        f = self.ln_post(tokens)[:, self.spec.prefix_tokens :].mean(1) @ self.proj
        return f if self.proj_bias is None else f + self.proj_bias

    def forward_traced(self, z: torch.Tensor) -> HeadTrace:
        """LeGrad's layer embedding of a block output z (B, N, D): the mean of all N tokens."""
        u = z.mean(1)  # (B, D)
        u_hat, u_rstd = self.ln_post.normalize(u)
        f = self.project(u)  # (B, E)
        f_norm = f.norm(dim=-1, keepdim=True)  # (B, 1)
        return HeadTrace(f / f_norm, f_norm, u_hat, u_rstd)

    def backward(self, trace: HeadTrace, text_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """∂(t · f̂)/∂z[i] for one prompt (E,): (B, D), the same for every token i."""
        s = trace.f_hat @ text_embed  # (B,)
        g_f = (text_embed - s.unsqueeze(-1) * trace.f_hat) / trace.f_norm  # (B, E)
        g_u = self.ln_post.backward(g_f @ self.proj_t, trace.u_hat, trace.u_rstd)  # (B, D)
        return g_u / num_tokens


class ClassifierHead(TokenMeanHead):
    """A supervised classifier's head, logits = LN(token 0 or mean) @ Wᵀ + b (`proj` = Wᵀ, (D, C)).

    LeGrad's score of a layer for class c is the raw logit of its token mean (docs/classifiers.md):
    s = W[c] · LN(u) + b[c], so a prompt is the direction W[c] (D,), and its backward is the
    LayerNorm's alone: no normalisation, no projection.
    """

    def directions(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Class ids (P,) int64 → the head's rows W[c], (P, D): ∂ logit_c / ∂ LN(u)."""
        return self.proj_t[class_ids]

    def backward(self, trace: HeadTrace, direction: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """∂ logit_c / ∂z[i] for one class, given its direction W[c] (D,): (B, D), the same for every i."""
        return self.ln_post.backward(direction, trace.u_hat, trace.u_rstd) / num_tokens


class MapTrace(NamedTuple):
    """Per image and explained layer, what every prompt's backward through the MAP head shares."""

    f_hat: torch.Tensor  # (B, E) normalised layer embedding (after the projection, if any)
    f_norm: torch.Tensor  # (B, 1)
    y_hat: torch.Tensor  # (B, D) the pool MLP's LayerNorm input, normalised
    y_rstd: torch.Tensor  # (B, 1)
    a: torch.Tensor  # (B, M) act'(pre) of the pool MLP
    v: torch.Tensor  # (B, H, N, dh) the pool's attention values


class MapHead(nn.Module):
    """f = y + MLP(LN(y)),  y = proj(A V),  A = softmax(q kᵀ · scale): one latent query over N tokens.

    PE-Core adds a Linear after it (`head.fc`), and its class token's column is dropped from maps.
    """

    def __init__(self, spec: TowerSpec, sd: dict[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.heads = spec.head_heads
        self.norm = LayerNorm(sd, "norm.", spec.eps)  # the trunk's final norm: the model's own embedding only
        self.latent = frozen(sd["pool.latent"])  # (1, D)
        self.q_weight, self.q_bias = frozen(sd["pool.q.weight"]), frozen(sd["pool.q.bias"])
        self.kv_weight, self.kv_bias = frozen(sd["pool.kv.weight"]), frozen(sd["pool.kv.bias"])
        self.proj_weight, self.proj_bias = frozen(sd["pool.proj.weight"]), frozen(sd["pool.proj.bias"])
        self.mlp_norm = LayerNorm(sd, "pool.norm.", spec.eps)
        self.fc1_weight, self.fc1_bias = frozen(sd["pool.mlp.fc1.weight"]), frozen(sd["pool.mlp.fc1.bias"])
        self.fc2_weight, self.fc2_bias = frozen(sd["pool.mlp.fc2.weight"]), frozen(sd["pool.mlp.fc2.bias"])
        has_out = "head.fc.weight" in sd
        self.out_weight = frozen(sd["head.fc.weight"]) if has_out else None  # (E, D)
        self.out_bias = frozen(sd["head.fc.bias"]) if has_out else None

    def _attend(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's output before its MLP, y (B, D), and its values (B, H, N, dh)."""
        B, N, D = z.shape
        H = self.heads
        dh = D // H
        q = F.linear(self.latent, self.q_weight, self.q_bias).reshape(1, H, 1, dh)  # (1, H, 1, dh)
        k, v = F.linear(z, self.kv_weight, self.kv_bias).reshape(B, N, 2, H, dh).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * dh**-0.5) @ k.transpose(-1, -2), dim=-1)  # (B, H, 1, N)
        o = (attn @ v).reshape(B, D)  # (B, H, 1, dh) → (B, D): heads in order, as timm reshapes
        return F.linear(o, self.proj_weight, self.proj_bias), v

    def _pooled(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """f (B, E): pool, MLP and projection; with y (B, D), the MLP's pre-activation and the values."""
        y, v = self._attend(z)
        pre = F.linear(self.mlp_norm(y), self.fc1_weight, self.fc1_bias)  # (B, M)
        f = y + F.linear(activation(pre, self.spec.activation), self.fc2_weight, self.fc2_bias)
        if self.out_weight is not None:
            f = F.linear(f, self.out_weight, self.out_bias)
        return f, y, pre, v

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding (unnormalised): the pool of the normed last tokens."""
        return self._pooled(self.norm(tokens))[0]

    def forward_traced(self, z: torch.Tensor) -> MapTrace:
        """The head on an explained block's output z (no final norm, as the authors do)."""
        f, y, pre, v = self._pooled(z)
        f_norm = f.norm(dim=-1, keepdim=True)
        y_hat, y_rstd = self.mlp_norm.normalize(y)
        a = activation_derivative(pre, self.spec.activation)
        return MapTrace(f / f_norm, f_norm, y_hat, y_rstd, a, v)

    def prompt_maps(self, trace: MapTrace, text_embeds: torch.Tensor) -> torch.Tensor:
        """mean_h max(0, ∂(t_p · f/‖f‖)/∂A[h, 0, j]) per image, prompt and patch token j: (B, P, N − R)."""
        B, H, N, dh = trace.v.shape
        s = trace.f_hat @ text_embeds.T  # (B, P)
        g_f = text_embeds.unsqueeze(0) - s.unsqueeze(-1) * trace.f_hat.unsqueeze(1)
        g_f = g_f / trace.f_norm.unsqueeze(1)  # (B, P, E)
        if self.out_weight is not None:
            g_f = g_f @ self.out_weight  # (B, P, D): back through the projection
        g_pre = (g_f @ self.fc2_weight) * trace.a.unsqueeze(1)  # (B, P, M)
        g_ln = g_pre @ self.fc1_weight  # (B, P, D)
        g_y = g_f + self.mlp_norm.backward(g_ln, trace.y_hat.unsqueeze(1), trace.y_rstd.unsqueeze(1))
        g_o = (g_y @ self.proj_weight).reshape(B, -1, H, dh)  # (B, P, H, dh)
        v = trace.v[:, :, self.spec.prefix_tokens :]  # a class token's column is dropped
        grad = torch.einsum("bphd,bhnd->bphn", g_o, v)  # (B, P, H, N − R)
        return torch.relu(grad).mean(dim=2)


class AttnPoolHead(nn.Module):
    """f = LN_post(proj_pool(A V)) @ proj, A = softmax(q kᵀ · scale) of latent 0 over the N tokens,
    q = LN_q(latent) W_q, k and V from LN_k(tokens); its `prompt_maps` follow compute_legrad_coca."""

    def __init__(self, spec: TowerSpec, sd: dict[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.heads = spec.head_heads
        self.norm_k = LayerNorm(sd, "pool.norm_k.", spec.eps)
        norm_q = LayerNorm(sd, "pool.norm_q.", spec.eps)
        with torch.no_grad():  # the query is a constant: fold LN_q and W_q into it
            latent = norm_q(sd["pool.latent"].float())
            query = F.linear(latent, sd["pool.q.weight"].float(), sd["pool.q.bias"].float())
        self.query = frozen(query)  # (1, Q)
        self.k_weight, self.k_bias = frozen(sd["pool.k.weight"]), frozen(sd["pool.k.bias"])
        self.v_weight, self.v_bias = frozen(sd["pool.v.weight"]), frozen(sd["pool.v.bias"])
        self.proj_weight, self.proj_bias = frozen(sd["pool.proj.weight"]), frozen(sd["pool.proj.bias"])
        self.ln_post = LayerNorm(sd, "head.norm.", spec.eps)
        self.proj = frozen(sd["head.proj"])  # (Q, E)
        self.g_o = frozen(sd["head.proj"].T.float() @ sd["pool.proj.weight"].float())  # (E, Q): ∂s/∂o per t

    def _pool(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent 0's pooled vector before ln_post (B, Q) and the pool's values (B, H, N, dq)."""
        B, N, _ = z.shape
        H = self.heads
        dq = self.query.shape[-1] // H
        x = self.norm_k(z)
        k = F.linear(x, self.k_weight, self.k_bias).reshape(B, N, H, dq).transpose(1, 2)  # (B, H, N, dq)
        v = F.linear(x, self.v_weight, self.v_bias).reshape(B, N, H, dq).transpose(1, 2)
        q = self.query.reshape(1, H, 1, dq)
        attn = torch.softmax((q * dq**-0.5) @ k.transpose(-1, -2), dim=-1)  # (B, H, 1, N)
        o = (attn @ v).reshape(B, -1)  # (B, H, 1, dq) → (B, Q): heads in order, as torch's MHA
        return F.linear(o, self.proj_weight, self.proj_bias), v

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding (unnormalised): ln_post on latent 0, then the projection."""
        return self.ln_post(self._pool(tokens)[0]) @ self.proj

    def forward_traced(self, z: torch.Tensor) -> torch.Tensor:
        """What every prompt's backward needs of an explained block's output z: the values (B, H, N, dq)."""
        return self._pool(z)[1]

    def prompt_maps(self, v: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """mean_h max(0, ∂(t_p · f)/∂A[h, 0, j]) per image, prompt and patch token j: (B, P, N − R)."""
        B, H, N, dq = v.shape
        g_o = (text_embeds @ self.g_o).reshape(-1, H, dq)  # (P, H, dq)
        grad = torch.einsum("phd,bhnd->bphn", g_o, v[:, :, self.spec.prefix_tokens :])  # class column dropped
        return torch.relu(grad).mean(dim=2)
