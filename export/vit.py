"""An OpenCLIP ViT image tower rebuilt with explicit attention, from its state dict alone.

Weights are read by their state-dict names (`transformer.resblocks.{i}.attn.in_proj_weight`, ...),
which have survived open_clip's rewrites of its attention code. Plain matmuls and softmax only, so
the module traces to ONNX as it reads. The open_clip model is never touched: tensors are copied.

    embed → blocks → pool_project
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

__all__ = ["ViTConfig", "BlockTrace", "ExplicitViT", "resample_pos_embed"]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture facts of an OpenCLIP VisionTransformer that the weights alone do not tell."""

    width: int
    heads: int
    num_layers: int
    patch_size: int
    native_grid: int
    embed_dim: int
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    pool_type: Literal["tok", "avg"] = "tok"
    final_ln_after_pool: bool = False
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, D) positional embedding resampled to grid×grid (bicubic, antialiased; CLS kept)."""
    old_grid = math.isqrt(pos.shape[0] - 1)
    if grid == old_grid:
        return pos.clone()
    out = resample_abs_pos_embed(
        pos.unsqueeze(0), new_size=[grid, grid], num_prefix_tokens=1, interpolation="bicubic", antialias=True
    )
    return out.squeeze(0)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().float(), requires_grad=False)


class LayerNorm(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor], prefix: str, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = _param(sd[prefix + "weight"]), _param(sd[prefix + "bias"]), eps

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


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x) if kind == "quick_gelu" else F.gelu(x)


def act_derivative(x: torch.Tensor, kind: str) -> torch.Tensor:
    """d act(x) / dx for GELU (erf) or QuickGELU."""
    if kind == "quick_gelu":
        s = torch.sigmoid(1.702 * x)
        return s * (1 + 1.702 * x * (1 - s))
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


class BlockTrace(NamedTuple):
    """What the closed-form backward of one block needs from its forward."""

    x_mid: torch.Tensor  # (B, N, D) residual stream after attention
    pre: torch.Tensor  # (B, N, M) MLP pre-activation
    v: torch.Tensor  # (B, H, N, dh) attention values
    z: torch.Tensor  # (B, N, D) block output


class Block(nn.Module):
    """x_mid = x + γ1·Attn(LN1(x));  z = x_mid + γ2·MLP(LN2(x_mid))."""

    def __init__(self, cfg: ViTConfig, sd: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.cfg = cfg
        self.ln_1 = LayerNorm(sd, prefix + "ln_1.", cfg.eps)
        self.ln_2 = LayerNorm(sd, prefix + "ln_2.", cfg.eps)
        self.in_proj_weight = _param(sd[prefix + "attn.in_proj_weight"])  # (3D, D)
        self.in_proj_bias = _param(sd[prefix + "attn.in_proj_bias"])
        self.out_proj_weight = _param(sd[prefix + "attn.out_proj.weight"])  # (D, D)
        self.out_proj_bias = _param(sd[prefix + "attn.out_proj.bias"])
        self.fc_weight = _param(sd[prefix + "mlp.c_fc.weight"])  # (M, D)
        self.fc_bias = _param(sd[prefix + "mlp.c_fc.bias"])
        self.proj_weight = _param(sd[prefix + "mlp.c_proj.weight"])  # (D, M)
        self.proj_bias = _param(sd[prefix + "mlp.c_proj.bias"])
        ones = torch.ones(cfg.width)
        self.gamma_1 = _param(sd.get(prefix + "ls_1.gamma", ones))
        self.gamma_2 = _param(sd.get(prefix + "ls_2.gamma", ones))

    def attention_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention (B, H, N, N) and values (B, H, N, dh) of block input x (B, N, D)."""
        B, N, D = x.shape
        H, dh = self.cfg.heads, self.cfg.head_dim
        qkv = F.linear(self.ln_1(x), self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        q, k, v = qkv.reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, dh)
        return torch.softmax((q * dh**-0.5) @ k.transpose(-1, -2), dim=-1), v  # (B, H, N, N)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        attn, v = self.attention_probs(x)
        o = (attn @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return F.linear(o, self.out_proj_weight, self.out_proj_bias), v

    def forward_traced(self, x: torch.Tensor) -> BlockTrace:
        o, v = self.attention(x)
        x_mid = x + self.gamma_1 * o
        pre = F.linear(self.ln_2(x_mid), self.fc_weight, self.fc_bias)  # (B, N, M)
        z = x_mid + self.gamma_2 * F.linear(_act(pre, self.cfg.activation), self.proj_weight, self.proj_bias)
        return BlockTrace(x_mid, pre, v, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_traced(x).z


class ExplicitViT(nn.Module):
    """The image tower at a fixed input size; `pos_embed` is resampled once, at build time."""

    def __init__(self, cfg: ViTConfig, visual_state_dict: dict[str, torch.Tensor], image_size: int):
        super().__init__()
        if image_size % cfg.patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {cfg.patch_size}")
        sd = visual_state_dict
        self.cfg = cfg
        self.image_size = image_size
        self.grid = image_size // cfg.patch_size
        self.conv_weight = _param(sd["conv1.weight"])  # (D, 3, p, p)
        self.class_embedding = _param(sd["class_embedding"])  # (D,)
        self.pos_embed = _param(resample_pos_embed(sd["positional_embedding"].float(), self.grid))
        self.ln_pre = LayerNorm(sd, "ln_pre.", cfg.eps) if "ln_pre.weight" in sd else None
        self.blocks = nn.ModuleList(
            Block(cfg, sd, f"transformer.resblocks.{i}.") for i in range(cfg.num_layers)
        )
        self.ln_post = LayerNorm(sd, "ln_post.", cfg.eps)
        self.proj = _param(sd["proj"])  # (D, E)

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid * self.grid

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(pixel_values, self.conv_weight, stride=self.cfg.patch_size)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N, D)
        return self.ln_pre(x) if self.ln_pre is not None else x

    def pool_project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding (unnormalised) from the last block's tokens (B, N, D)."""
        if self.cfg.pool_type == "tok":  # LayerNorm is per token: pooling first changes nothing
            return self.ln_post(tokens[:, 0]) @ self.proj
        if self.cfg.final_ln_after_pool:
            return self.ln_post(tokens[:, 1:].mean(1)) @ self.proj
        return self.ln_post(tokens)[:, 1:].mean(1) @ self.proj

    def forward_traced(self, pixel_values: torch.Tensor, layers: tuple[int, ...]):
        """Final tokens and one BlockTrace per block in `layers`."""
        x = self.embed(pixel_values)
        traces = []
        for i, block in enumerate(self.blocks):
            if i in layers:
                trace = block.forward_traced(x)
                traces.append(trace)
                x = trace.z
            else:
                x = block(x)
        return x, traces

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, E)."""
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return F.normalize(self.pool_project(x), dim=-1)
