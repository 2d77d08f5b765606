"""The image towers LeGrad export knows: one adapter per family, one spec and canonical state dict.

All open_clip/timm knowledge of the torch side that is not loading lives here: a new family adds
an adapter module (describe + canonical_state_dict) and a line below.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from legrad_runtime.errors import UnsupportedModelError

from . import openclip_vit, timm_eva, timm_eva_clip, timm_token_vit, timm_vit, torchvision_vit
from .spec import Activation, Head, Mlp, Stem, TowerSpec

__all__ = [
    "TowerSpec",
    "Activation",
    "Head",
    "Mlp",
    "Stem",
    "describe_tower",
    "canonical_state_dict",
    "stem_module",
]


def describe_tower(model: nn.Module, model_name: str = "model") -> TowerSpec:
    """The spec of an open_clip model's image tower; UnsupportedModelError if LeGrad cannot explain it."""
    visual = getattr(model, "visual", None)
    if openclip_vit.is_openclip_vit(visual):
        return openclip_vit.describe(visual, model_name)
    if timm_vit.is_timm_map_vit(visual):
        return timm_vit.describe(visual, model_name)
    if timm_token_vit.is_timm_token_vit(visual):
        return timm_token_vit.describe(visual, model_name)
    if timm_eva.is_timm_eva_map(visual):
        return timm_eva.describe(visual, model_name)
    if timm_eva_clip.is_timm_eva_token(visual):
        return timm_eva_clip.describe(visual, model_name)
    kind = type(visual).__name__ if visual is not None else "no image tower"
    raise UnsupportedModelError(
        f"{model_name}'s image tower is {kind}, which LeGrad export does not support; it exports "
        "OpenCLIP ViTs (e.g. ViT-B-16), SigLIP/SigLIP2, PE-Core, MobileCLIP, ViTamin and EVA-CLIP towers; "
        "see `legrad-export --list-models`"
    )


def canonical_state_dict(
    model: nn.Module, spec: TowerSpec, grid: int | tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """The image tower's tensors (views; the explicit model copies what it keeps), canonical names.

    `grid` ((gh, gw), an int is a square; default: the native one) only matters to towers whose
    tensors depend on it: a RoPE table.
    """
    if spec.family == "torchvision_vit":  # a classifier, the holder's `.visual` (load_classifier.py)
        return torchvision_vit.canonical_state_dict(model.visual)
    grid = spec.native_grid if grid is None else grid
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if spec.family == "timm_eva" and spec.head == "token_mean":  # EVA-CLIP
        return timm_eva_clip.canonical_state_dict(model.visual, grid)
    if spec.family == "timm_eva":
        return timm_eva.canonical_state_dict(model.visual, grid)
    if spec.family == "timm_vit" and spec.head == "token_mean":
        return timm_token_vit.canonical_state_dict(model.visual)
    adapter = {"openclip_vit": openclip_vit, "timm_vit": timm_vit}[spec.family]
    return adapter.canonical_state_dict(model.visual)


def stem_module(model: nn.Module, spec: TowerSpec) -> nn.Module | None:
    """A frozen copy of the tower's convolutional stem when it has one (spec.stem "hybrid"), else None."""
    return timm_token_vit.stem_module(model.visual) if spec.stem == "hybrid" else None
