"""A ViT image tower rebuilt with explicit attention from a canonical state dict (towers/spec.py).

Plain matmuls and softmax only, so the module traces to ONNX as it reads. The source model is never
touched: tensors are copied. Any family (an open_clip ViT, a timm SigLIP trunk) arrives here as a
`TowerSpec` and canonical tensors; the pooling head is a stage of its own (heads.py).

    embed → blocks → head
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from legrad_runtime.metadata import Size, as_size

from .heads import AttnPoolHead, ClassifierHead, MapHead, TokenMeanHead
from .ops import LayerNorm, activation, frozen
from .towers import TowerSpec

__all__ = ["BlockTrace", "Block", "ExplicitViT", "Rope", "resample_pos_embed"]


def resample_pos_embed(pos: torch.Tensor, grid: int | Size, prefix_tokens: int) -> torch.Tensor:
    """(R + g·g, D) positional embedding of a square grid resampled to (gh, gw) (bicubic, antialiased;
    prefix kept), as timm's `resample_abs_pos_embed`; rows then columns, row-major."""
    old_grid = math.isqrt(pos.shape[0] - prefix_tokens)
    gh, gw = as_size(grid)
    if (gh, gw) == (old_grid, old_grid):
        return pos.clone()
    out = resample_abs_pos_embed(
        pos.unsqueeze(0),
        new_size=[gh, gw],
        old_size=[old_grid, old_grid],
        num_prefix_tokens=prefix_tokens,
        interpolation="bicubic",
        antialias=True,
    )
    return out.squeeze(0)


class Rope(nn.Module):
    """2-D rotary position embedding on the patch tokens (prefix tokens untouched), interleaved
    pairs as timm's `apply_rot_embed_cat`: x·cos + rot(x)·sin, rot(x) = [-x1, x0, -x3, x2, ...]."""

    def __init__(self, table: torch.Tensor, prefix_tokens: int):
        super().__init__()
        sin, cos = table.float().chunk(2, dim=-1)  # (gh·gw, dh) each
        self.sin, self.cos, self.prefix = frozen(sin), frozen(cos), prefix_tokens
        dh = sin.shape[-1]
        rot = torch.zeros(dh, dh)  # x @ rot = rot(x)
        rot[torch.arange(1, dh, 2), torch.arange(0, dh, 2)] = -1.0
        rot[torch.arange(0, dh, 2), torch.arange(1, dh, 2)] = 1.0
        self.rot = frozen(rot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, N, dh) → the same with the patch tokens rotated."""
        prefix, patches = x[:, :, : self.prefix], x[:, :, self.prefix :]
        return torch.cat([prefix, patches * self.cos + (patches @ self.rot) * self.sin], dim=2)


class BlockTrace(NamedTuple):
    """What the closed-form backward of one block needs from its forward."""

    x_mid: torch.Tensor  # (B, N, D) residual stream after attention
    pre: torch.Tensor  # (B, N, M) MLP pre-activation
    v: torch.Tensor  # (B, H, N, dh) attention values
    z: torch.Tensor  # (B, N, D) block output
    o: torch.Tensor | None = None  # (B, N, D) A·V before attn.norm and attn.proj (EVA blocks only)
    attn_out: torch.Tensor | None = None  # (B, N, D) attn.proj's output (EVA blocks only)
    mlp_out: torch.Tensor | None = None  # (B, N, D) the MLP's output (EVA blocks only)


class Block(nn.Module):
    """x_mid = x + γ1·Attn(LN1(x));  z = x_mid + γ2·MLP(LN2(x_mid)); MLP plain, GeGLU or SwiGLU
    (spec.mlp); EVA's options: a LayerNorm inside the attention, post-norm residuals (spec.post_norm)."""

    def __init__(self, spec: TowerSpec, sd: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.spec = spec
        self.ln_1 = LayerNorm(sd, prefix + "norm1.", spec.eps)
        self.ln_2 = LayerNorm(sd, prefix + "norm2.", spec.eps)
        self.in_proj_weight = frozen(sd[prefix + "attn.qkv.weight"])  # (3D, D)
        self.in_proj_bias = frozen(sd[prefix + "attn.qkv.bias"])
        self.out_proj_weight = frozen(sd[prefix + "attn.proj.weight"])  # (D, D)
        self.out_proj_bias = frozen(sd[prefix + "attn.proj.bias"])
        self.ln_attn = LayerNorm(sd, prefix + "attn.norm.", spec.eps) if spec.attn_norm else None
        self.ln_mlp = None
        if spec.mlp == "swiglu":  # silu(fc1_g) ⊙ fc1_x → LN → fc2; fc1_g and fc1_x stacked: (2M, D)
            self.ln_mlp = LayerNorm(sd, prefix + "mlp.norm.", spec.eps)
            fc = [sd[f"{prefix}mlp.fc1_{i}.{kind}"] for kind in ("weight", "bias") for i in ("g", "x")]
            self.fc_weight, self.fc_bias = frozen(torch.cat(fc[:2])), frozen(torch.cat(fc[2:]))
            self.proj_weight = frozen(sd[prefix + "mlp.fc2.weight"])
            self.proj_bias = frozen(sd[prefix + "mlp.fc2.bias"])
        elif spec.mlp == "geglu":  # LN → act(w0) ⊙ w1 → w2; w0 and w1 stacked into one (2M, D) product
            self.ln_mlp = LayerNorm(sd, prefix + "mlp.norm.", spec.eps)
            fc = [sd[f"{prefix}mlp.w{i}.{kind}"] for kind in ("weight", "bias") for i in (0, 1)]
            self.fc_weight, self.fc_bias = frozen(torch.cat(fc[:2])), frozen(torch.cat(fc[2:]))
            self.proj_weight, self.proj_bias = (
                frozen(sd[prefix + "mlp.w2.weight"]),
                frozen(sd[prefix + "mlp.w2.bias"]),
            )
        else:
            self.fc_weight = frozen(sd[prefix + "mlp.fc1.weight"])  # (M, D)
            self.fc_bias = frozen(sd[prefix + "mlp.fc1.bias"])
            self.proj_weight = frozen(sd[prefix + "mlp.fc2.weight"])  # (D, M)
            self.proj_bias = frozen(sd[prefix + "mlp.fc2.bias"])
        ones = torch.ones(spec.width)
        self.gamma_1 = frozen(sd.get(prefix + "ls1.gamma", ones))
        self.gamma_2 = frozen(sd.get(prefix + "ls2.gamma", ones))

    def attention_probs(self, x: torch.Tensor, rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention (B, H, N, N) and values (B, H, N, dh) of block input x (B, N, D)."""
        B, N, D = x.shape
        H, dh = self.spec.heads, self.spec.head_dim
        h = x if self.spec.post_norm else self.ln_1(x)  # a post-norm block attends to x itself
        qkv = F.linear(h, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        q, k, v = qkv.reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, dh)
        if rope is not None:
            q, k = rope(q), rope(k)
        return torch.softmax((q * dh**-0.5) @ k.transpose(-1, -2), dim=-1), v  # (B, H, N, N)

    def attention(self, x: torch.Tensor, rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        attn, v = self.attention_probs(x, rope)
        o = (attn @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return F.linear(o, self.out_proj_weight, self.out_proj_bias), v

    def forward_traced(self, x: torch.Tensor, rope: Rope | None = None) -> BlockTrace:
        if self.spec.attn_norm or self.spec.post_norm or self.spec.mlp == "swiglu":
            return self._forward_traced_eva(x, rope)
        o, v = self.attention(x, rope)
        x_mid = x + self.gamma_1 * o
        y = self.ln_2(x_mid)
        if self.ln_mlp is not None:
            y = self.ln_mlp(y)
        pre = F.linear(y, self.fc_weight, self.fc_bias)  # (B, N, M), or (B, N, 2M): [a0, a1]
        if self.ln_mlp is not None:
            gate, lin = pre.chunk(2, dim=-1)
            hidden = activation(gate, self.spec.activation) * lin
        else:
            hidden = activation(pre, self.spec.activation)
        mlp = F.linear(hidden, self.proj_weight, self.proj_bias)
        return BlockTrace(x_mid, pre, v, x_mid + self.gamma_2 * mlp)

    def _forward_traced_eva(self, x: torch.Tensor, rope: Rope | None) -> BlockTrace:
        """timm's EvaBlock (pre-norm, optional attn.norm, SwiGLU) or EvaBlockPostNorm:
        pre:  x_mid = x + γ1·W_o LN_a(A·V),   z = x_mid + γ2·MLP(LN_2(x_mid))
        post: x_mid = x + LN_1(W_o (A·V)),    z = x_mid + LN_2(MLP(x_mid))"""
        B, N, D = x.shape
        attn, v = self.attention_probs(x, rope)
        o = (attn @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        y = F.linear(o if self.ln_attn is None else self.ln_attn(o), self.out_proj_weight, self.out_proj_bias)
        post = self.spec.post_norm
        x_mid = x + (self.ln_1(y) if post else self.gamma_1 * y)
        pre = F.linear(x_mid if post else self.ln_2(x_mid), self.fc_weight, self.fc_bias)
        if self.spec.mlp == "swiglu":  # pre = [a_g, a_x]
            gate, lin = pre.chunk(2, dim=-1)
            hidden = self.ln_mlp(F.silu(gate) * lin)
        else:
            hidden = activation(pre, self.spec.activation)
        m = F.linear(hidden, self.proj_weight, self.proj_bias)  # (B, N, D)
        z = x_mid + (self.ln_2(m) if post else self.gamma_2 * m)
        return BlockTrace(x_mid, pre, v, z, o=o, attn_out=y, mlp_out=m)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        return self.forward_traced(x, rope).z


class ExplicitViT(nn.Module):
    """The image tower at a fixed input size (height, width; an int is a square); `pos_embed` is
    resampled once, at build time."""

    def __init__(
        self,
        spec: TowerSpec,
        sd: dict[str, torch.Tensor],
        image_size: int | Size,
        stem: nn.Module | None = None,
    ):
        super().__init__()
        height, width = image_size = as_size(image_size)
        if min(image_size) < spec.patch_size:
            raise ValueError(f"image size {image_size} is smaller than the patch size {spec.patch_size}")
        self.cfg = spec
        self.image_size: Size = image_size
        # the convolution floors, as timm's patch embedding does
        self.grid: Size = (height // spec.patch_size, width // spec.patch_size)
        gh, gw = self.grid
        self.stem = None
        if spec.stem == "hybrid":  # a frozen copy of the tower's convolutional stem (towers.stem_module)
            if stem is None:
                raise ValueError(
                    "this tower has a convolutional stem: pass stem=towers.stem_module(model, spec)"
                )
            self.stem = stem
            with torch.no_grad():
                tokens = stem(torch.zeros(1, 3, height, width)).shape[1]
            if tokens != gh * gw:
                raise ValueError(
                    f"the stem makes {tokens} tokens of a {width}x{height} px image, not {gh}×{gw}: "
                    f"use a multiple of its stride {spec.patch_size}"
                )
        else:
            self.conv_weight = frozen(sd["patch_embed.proj.weight"])  # (D, 3, p, p)
            bias = sd.get("patch_embed.proj.bias")
            self.conv_bias = None if bias is None else frozen(bias)
        self.class_embedding = frozen(sd["cls_token"]) if spec.prefix_tokens else None  # (D,)
        pos = resample_pos_embed(sd["pos_embed"].float(), self.grid, spec.prefix_tokens)
        self.pos_embed = frozen(pos)  # (N, D)
        self.ln_pre = LayerNorm(sd, "norm_pre.", spec.eps) if "norm_pre.weight" in sd else None
        self.rope = None
        if spec.rope:
            if sd["rope"].shape[0] != gh * gw:
                raise ValueError(
                    f"the state dict's RoPE table has {sd['rope'].shape[0]} rows, not {gh}×{gw} for "
                    f"{width}x{height} px: build it for this size (visual_state_dict(loaded, {image_size}))"
                )
            self.rope = Rope(sd["rope"], spec.prefix_tokens)
        self.blocks = nn.ModuleList(Block(spec, sd, f"blocks.{i}.") for i in range(spec.num_layers))
        heads = {"map": MapHead, "attn_pool": AttnPoolHead, "token_mean": TokenMeanHead}
        self.head = (ClassifierHead if spec.is_classifier else heads[spec.head])(spec, sd)

    @property
    def num_tokens(self) -> int:
        return self.cfg.tokens(self.grid)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(pixel_values)  # (B, gh*gw, D)
        else:
            x = F.conv2d(pixel_values, self.conv_weight, self.conv_bias, stride=self.cfg.patch_size)
            x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # (B, N, D)
        x = x + self.pos_embed
        return self.ln_pre(x) if self.ln_pre is not None else x

    def block_outputs(self, pixel_values: torch.Tensor, layers: tuple[int, ...]):
        """Final tokens and the output z of each block in `layers`."""
        x, outputs = self.embed(pixel_values), []
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope)
            if i in layers:
                outputs.append(x)
        return x, outputs

    def forward_traced(self, pixel_values: torch.Tensor, layers: tuple[int, ...]):
        """Final tokens and one BlockTrace per block in `layers`."""
        x = self.embed(pixel_values)
        traces = []
        for i, block in enumerate(self.blocks):
            if i in layers:
                trace = block.forward_traced(x, self.rope)
                traces.append(trace)
                x = trace.z
            else:
                x = block(x, self.rope)
        return x, traces

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, E)."""
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x, self.rope)
        return F.normalize(self.head(x), dim=-1)
