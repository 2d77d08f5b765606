"""The stages every block and head share, each forward next to its backward: LayerNorm, activations;
and `relevance`, LeGrad's map of one self-attention from the gradient reaching its output."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["frozen", "LayerNorm", "activation", "activation_derivative", "relevance"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A float32 copy of `t` as a constant of the graph (never a view of the caller's model)."""
    return nn.Parameter(t.detach().clone().float().contiguous(), requires_grad=False)


class LayerNorm(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor], prefix: str, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = frozen(sd[prefix + "weight"]), frozen(sd[prefix + "bias"]), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂ and 1/σ, the two things LayerNorm's backward needs."""
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + self.eps)
        return (x - mu) * rstd, rstd

    def backward(self, g: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        """d loss / d input, given d loss / d output `g` (broadcasts over leading axes)."""
        g = g * self.weight
        return rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """GELU (erf), GELU (tanh approximation) or QuickGELU."""
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def activation_derivative(x: torch.Tensor, kind: str) -> torch.Tensor:
    """d activation(x) / dx."""
    if kind == "quick_gelu":
        s = torch.sigmoid(1.702 * x)
        return s * (1 + 1.702 * x * (1 - s))
    if kind == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3)))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def relevance(g_o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mean_h mean_i max(0, ∂s/∂A[h, i, j]) from g_o = ∂s/∂(A V) (B, N, D) and the values of the
    explained columns j, v (B, H, J, dh): ∂s/∂A[h, i, j] = g_o,h[i] · v_h[j]. (B, J).

    The gradient is laid out (B, H, J, N), queries last, so that the big mean runs over the last
    axis: onnxruntime's CUDA reduction has a fast kernel only for leading or trailing axes, and
    sends (B, H, N, J) reduced over (1, 2) to cuDNN (docs/gpu.md). On the CPU it makes no difference."""
    B, N, _ = g_o.shape
    U = g_o.reshape(B, N, v.shape[1], -1).transpose(1, 2)  # (B, H, N, dh)
    return torch.relu(v @ U.transpose(-1, -2)).mean(-1).mean(1)  # (B, H, J, N) → (B, H, J) → (B, J)
