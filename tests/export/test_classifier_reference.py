"""The classifier reference against torchcam 0.5.0's LeGrad on the same torchvision weights.

torchcam comes from the `torchcam_legrad` fixture (conftest.py: installed into `.torchcam-site/`).
It hooks the model it is given, so it gets a deep copy; ours runs on the untouched model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from legrad_export.reference_classifier import legrad_reference_torchvision
from tiny_models import build_tiny_torchvision_vit

pytestmark = pytest.mark.torch


def tiny_vit(seed: int = 0):
    return build_tiny_torchvision_vit(10, seed)


def torchcam_maps(LeGrad, model, pixels, class_idx, layers) -> torch.Tensor:
    hooked = copy.deepcopy(model)
    with LeGrad(hooked, [hooked.encoder.layers[i] for i in layers]) as cam:
        return cam(class_idx, hooked(pixels))[0].detach()  # (B, g, g)


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 2), (2,)])
def test_maps_equal_torchcam_for_every_class_of_every_image(torchcam_legrad, layers):
    model = tiny_vit()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = [3, 7, 0]
    ours = legrad_reference_torchvision(model, pixels, classes, list(layers))
    assert ours.layers == layers and ours.maps.shape == (3, 3, 4, 4)
    for p, c in enumerate(classes):  # torchcam: one class per call (here the same for every image)
        theirs = torchcam_maps(torchcam_legrad, model, pixels, c, layers)
        assert (ours.maps[:, p] - theirs).abs().max() <= 1e-5
        assert theirs.std() > 0.1  # a real map, not a constant one
    per_image = torchcam_maps(torchcam_legrad, model, pixels, classes, layers)  # a class per image
    for b in range(3):
        assert (ours.maps[b, b] - per_image[b]).abs().max() <= 1e-5


def test_outputs_and_the_model_are_as_documented(torchcam_legrad):
    model = tiny_vit(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    out = legrad_reference_torchvision(model, pixels, [1, 4], -2)
    with torch.no_grad():
        assert torch.equal(out.logits, model(pixels))
    expected = F.interpolate(out.maps, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(out.heatmaps, expected) and out.layer_maps.shape == (2, 2, 2, 4, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_wrong_inputs_are_refused_with_the_fix():
    model = tiny_vit()
    with pytest.raises(ValueError, match="multiple of the patch 16"):
        legrad_reference_torchvision(model, torch.randn(1, 3, 48, 40), [0])
    with pytest.raises(ValueError, match="eval mode"):
        legrad_reference_torchvision(model.train(), torch.randn(1, 3, 64, 64), [0])
