"""What LeGrad needs to know about an image tower that its weights alone do not tell: one frozen spec.

Every family's adapter (openclip_vit.py, timm_vit.py) describes its tower as a `TowerSpec` and
renames its tensors onto one canonical state dict (timm's names, the best-known ones), so the
explicit model (`vit.py`, `heads.py`) and the closed-form backward never see a family's own names.

Canonical names (D width, M MLP width, E embedding, N tokens, R = prefix_tokens):

    patch_embed.proj.weight (D, 3, p, p), patch_embed.proj.bias (D,)?    cls_token (D,)?  if R = 1
    pos_embed (R + g·g, D)                                               norm_pre.{weight,bias}?
    blocks.{i}.norm1 / attn.qkv (3D, D) / attn.proj / ls1.gamma? / norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma?
        mlp "geglu": mlp.norm / mlp.w0 (M, D) / mlp.w1 (M, D) / mlp.w2 (D, M) instead of fc1/fc2 (ViTamin)
        mlp "swiglu": mlp.fc1_g (M, D) / mlp.fc1_x (M, D) / mlp.norm (M) / mlp.fc2 (D, M) (EVA02)
        attn.norm.{weight,bias}? (D,) if attn_norm: a LayerNorm on A·V before attn.proj (EVA02)
    head "token_mean": head.norm.{weight,bias}, head.proj (D, E), head.proj_bias (E,)?
    head "map":        norm.{weight,bias} (the trunk's final norm), pool.latent (1, D),
                       pool.q / pool.kv (2D, D) / pool.proj / pool.norm / pool.mlp.fc1 / pool.mlp.fc2,
                       head.fc.{weight,bias}? (E, D): a projection after the pool (PE-Core)
    head "attn_pool":  the pooler's latent query 0 pool.latent (1, Q), pool.q / pool.k / pool.v (Q, D) with
                       biases, pool.proj (Q, Q) / bias, pool.norm_q / pool.norm_k, then head.norm (ln_post)
                       and head.proj (Q, E): open_clip's AttentionalPooler (CoCa), Q its width
    rope (g·g, 2·head_dim)?: a RoPE table, sin then cos, for the export grid (PE-Core)

A "hybrid" stem (MobileCLIP-B, ViTamin) is a convolutional module, not tensors: the adapter hands
the explicit model a frozen copy (`stem_module`), and `patch_size` is its total stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TowerSpec", "Activation", "Head", "Stem", "Mlp", "Score"]

Activation = Literal["gelu", "quick_gelu", "gelu_tanh"]
Head = Literal["token_mean", "map", "attn_pool"]
Stem = Literal["patch", "hybrid"]
Mlp = Literal["plain", "geglu", "swiglu"]
Score = Literal["cosine", "logit"]


@dataclass(frozen=True)
class TowerSpec:
    """Architecture facts of a ViT image tower, shared by the explicit model and the metadata."""

    family: str  # which adapter read it: legrad_runtime.metadata.TOWER_FAMILIES
    width: int
    heads: int
    num_layers: int
    patch_size: int
    native_grid: int
    embed_dim: int
    activation: Activation = "gelu"
    head: Head = "token_mean"  # token_mean: LeGrad explains the blocks' attention; map, attn_pool: the head's
    prefix_tokens: int = 1  # a class token (1) or none (0)
    pool_type: Literal["tok", "avg"] = "tok"  # token_mean towers: what the model's own embedding pools
    final_ln_after_pool: bool = False
    eps: float = 1e-5
    head_heads: int = 0  # map, attn_pool: the attention pool's heads
    rope: bool = False  # 2-D RoPE (interleaved) on the patch tokens' q and k, table `rope` (PE-Core)
    stem: Stem = "patch"  # patch: one strided convolution; hybrid: a convolutional stem module
    mlp: Mlp = "plain"  # plain: fc1 → act → fc2; geglu: LN → act(w0)·w1 → w2 (ViTamin)
    #   swiglu: silu(fc1_g)·fc1_x → LN → fc2, SiLU whatever `activation` says (EVA02)
    attn_norm: bool = False  # a LayerNorm on the attention output A·V before its projection (EVA02)
    post_norm: bool = False  # x + LN_1(Attn(x)), then + LN_2(MLP(·)): norms after, not before (EVA02-E)
    score: Score = "cosine"  # cosine: CLIP's, with a text embedding; logit: a classifier's raw class logit

    @property
    def is_classifier(self) -> bool:
        """A supervised classifier: its prompts are class ids and its score a logit (docs/classifiers.md)."""
        return self.score == "logit"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def tokens(self, grid: int | tuple[int, int]) -> int:
        """Tokens of a (gh, gw) grid (an int is a square): the patches and the prefix."""
        gh, gw = (grid, grid) if isinstance(grid, int) else grid
        return self.prefix_tokens + gh * gw

    @property
    def explains_head(self) -> bool:
        """Whether the explained attention is the pooling head's (one query) rather than the blocks'."""
        return self.head in ("map", "attn_pool")

    @property
    def has_correction(self) -> bool:
        """Whether the authors' rule for this head has the empty-prompt correction (SigLIP's MAP head)."""
        return self.head == "map"
