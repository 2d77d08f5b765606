"""LeGrad in closed form for supervised ViT classifiers: images and class ids in; heatmaps, per-layer
maps and logits out (docs/classifiers.md, the rule of torchcam 0.5.0's `LeGrad`).

The blocks' backward is the CLIP one (legrad.py); only the score differs. A layer's score for class
c is the raw logit of its token mean, so a class is the direction W[c] of the classifier's head
(heads.ClassifierHead), gathered from the class ids inside the graph. As torchcam does, the layers'
maps are averaged and min-max normalised per (image, class) over the patch grid with eps 1e-8;
the heatmap is that map upsampled bilinearly by the patch size (half-pixel), not normalised again.
"""

from __future__ import annotations

import torch

from .heads import ClassifierHead
from .legrad import LeGrad, upsample

__all__ = ["ClassifierLeGrad", "TORCHCAM_EPS", "torchcam_normalize"]

TORCHCAM_EPS = 1e-8


def torchcam_normalize(maps: torch.Tensor) -> torch.Tensor:
    """(M − min) / (max(M − min) + 1e-8) per map over its last two axes: torchcam's `_normalize`.

    Written scaled by 1/eps: the ONNX exporter's optimiser drops an added constant as small as 1e-8
    (it takes it for zero), which would turn a constant map's 0/0 into NaN instead of 0.
    """
    shifted = (maps - maps.amin(dim=(-2, -1), keepdim=True)) / TORCHCAM_EPS
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + 1.0)


class ClassifierLeGrad(LeGrad):
    """(pixel_values (B, 3, H, W), class_ids (P,) int64) → heatmaps (B, P, H, W), layer_maps
    (B, P, L, gh, gw), logits (B, C)."""

    def __init__(self, vit, layers, prompts: str = "loop"):
        if not isinstance(vit.head, ClassifierHead):
            raise ValueError("ClassifierLeGrad explains a classifier (a tower whose score is a logit)")
        super().__init__(vit, layers, prompts)

    def forward(  # type: ignore[override]
        self, pixel_values: torch.Tensor, class_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, layer_maps = self.layer_maps(pixel_values, self.vit.head.directions(class_ids))
        logits = self.vit.head(tokens)  # (B, C), the model's own output
        maps = torchcam_normalize(layer_maps.mean(2))  # (B, P, gh, gw)
        return upsample(maps, self.vit.image_size), layer_maps, logits
