"""LeGrad in closed form for towers whose head's attention is explained (SigLIP, PE-Core, CoCa).

See shared/design/legrad.md, "Pooling heads other than the token mean". For each explained block l,
its output z_l goes through the MAP head again (heads.py); the explained attention is the head's
one query over the N patch tokens, so the per-prompt work is a backward through the head alone:
(B, P, D) vectors and one (B, P, H, N) product, all prompts at once. Maps are summed over layers at
grid resolution; with the correction, cells where the min-max map of the empty prompt ("a photo of
a", embedded at export) exceeds the threshold are zeroed; then min-max, then bilinear upsampling.
Some SigLIP sizes are no multiple of the patch (SO400M-14 at 384 px sees a 27×27 grid = 378 px).

CoCa (head "attn_pool") follows the authors' `compute_legrad_coca` instead: no correction, and the
layers' sum is upsampled first and min-max normalised at image resolution (the two orders differ).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .legrad import min_max, upsample
from .ops import frozen
from .vit import ExplicitViT

__all__ = ["MapLeGrad", "upsample_cover"]


class MapLeGrad(nn.Module):
    """Images and text embeddings in; heatmaps, per-layer maps and image embeddings out (SigLIP rule,
    or CoCa's for head "attn_pool")."""

    def __init__(
        self,
        vit: ExplicitViT,
        layers: Sequence[int],
        empty_embed: torch.Tensor | None = None,
        threshold: float = 0.8,
    ):
        super().__init__()
        if not vit.cfg.explains_head:
            raise ValueError("MapLeGrad explains a tower's pooling head; use LeGrad for token-mean ones")
        if empty_embed is not None and vit.cfg.head != "map":
            raise ValueError("the empty-prompt correction is SigLIP's, for MAP-head towers only")
        if not layers:
            raise ValueError("LeGrad needs at least one layer")
        bad = [i for i in layers if not 0 <= i < vit.cfg.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {vit.cfg.num_layers}-block model")
        if empty_embed is not None and not 0 < threshold <= 1:
            raise ValueError(f"correction threshold {threshold} must be in (0, 1]")
        self.vit = vit
        self.layers = tuple(sorted(set(layers)))
        self.empty_embed = (
            None if empty_embed is None else frozen(F.normalize(empty_embed.reshape(1, -1), dim=-1))
        )
        self.threshold = threshold

    def forward(
        self, pixel_values: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, outputs = self.vit.block_outputs(pixel_values, self.layers)
        head = self.vit.head
        image_embeds = F.normalize(head(x), dim=-1)  # (B, E)

        P = text_embeds.shape[0]
        texts = text_embeds if self.empty_embed is None else torch.cat([text_embeds, self.empty_embed])
        maps = torch.stack([head.prompt_maps(head.forward_traced(z), texts) for z in outputs], dim=2)
        B, (gh, gw) = pixel_values.shape[0], self.vit.grid
        maps = maps.reshape(B, -1, len(self.layers), gh, gw)  # (B, P or P+1, L, gh, gw)
        summed = maps[:, :P].sum(2)  # (B, P, gh, gw)
        if self.empty_embed is not None:
            empty = min_max(maps[:, P:].sum(2))  # (B, 1, gh, gw)
            summed = torch.where(empty > self.threshold, torch.zeros_like(summed), summed)
        if self.vit.cfg.head == "attn_pool":
            return min_max(upsample(summed, self.vit.image_size)), maps, image_embeds
        return (
            upsample_cover(min_max(summed), self.vit.cfg.patch_size, self.vit.image_size),
            maps[:, :P],
            image_embeds,
        )


def upsample_cover(maps: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, P, gh, gw) → (B, P, H, W): bilinear by the patch size; where a side is no multiple of the
    patch, the strip right or below that the patches never cover (the model floors, as timm does) is 0."""
    (height, width), covered_h, covered_w = size, maps.shape[-2] * patch, maps.shape[-1] * patch
    out = upsample(maps, (covered_h, covered_w))
    return F.pad(out, (0, width - covered_w, 0, height - covered_h)) if out.shape[-2:] != size else out
