"""The closed-form LeGrad (vit.py + legrad.py) against the autograd reference on the same weights."""

from __future__ import annotations

import pytest
import torch

from legrad_export.graphs import build_image_graph
from legrad_export.layers import resolve_layers
from legrad_export.legrad import min_max
from legrad_export.load import load_openclip, wrap_openclip
from legrad_export.reference import legrad_reference
from tiny_models import TINY_VARIANTS, assert_matches_reference, build_tiny_model, random_inputs

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("layers", ["-2", "all"])
@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_analytic_maps_match_autograd_reference_on_tiny_models(variant, scale, layers):
    model = build_tiny_model(variant)
    loaded = wrap_openclip(model, f"tiny-{variant}", tokenizer=object())
    assert_matches_reference(loaded, model.visual.image_size[0] * scale, layers)


# The real configurations of the matrix, random weights, no ONNX: (model, image size, layers)
REAL_CONFIGS = [
    ("ViT-B-32", 224, "-2"),
    ("ViT-B-16", 224, "-2"),
    ("ViT-B-16", 448, "-2"),
    ("ViT-B-32-quickgelu", 224, "all"),
    ("ViT-M-16-alt", 224, "-2"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "layers"), REAL_CONFIGS)
def test_analytic_maps_match_autograd_reference_on_real_configs(name, size, layers):
    loaded = load_openclip(name, "none")
    if name.endswith("quickgelu"):
        assert loaded.vit.activation == "quick_gelu"
    if name == "ViT-M-16-alt":
        assert any(k.endswith("ls_1.gamma") for k in loaded.model.visual.state_dict())
    assert_matches_reference(loaded, size, layers, batch=2, prompts=2)


def test_reference_image_embeddings_equal_open_clip_encode_image():
    model = build_tiny_model("layerscale")
    pixels, text = random_inputs(3, 2, 64, 32)
    ref = legrad_reference(model, pixels, text)
    with torch.no_grad():
        expected = model.encode_image(pixels, normalize=True)
    assert (ref.image_embeds - expected).abs().max() <= 1e-6


def test_reference_and_export_never_modify_the_model():
    model = build_tiny_model("b16_like").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    loaded = wrap_openclip(model, "tiny", tokenizer=object())
    for size in (64, 96, 64):  # the authors' wrapper crashes on the second size: it overwrites pos embeds
        pixels, text = random_inputs(1, 2, size, 32)
        legrad_reference(model, pixels, text)
        build_image_graph(loaded, size, (1, 2))(pixels, text)
    assert model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_constant_maps_become_zeros_not_nan():
    model = build_tiny_model("b16_like")
    loaded = wrap_openclip(model, "tiny", tokenizer=object())
    pixels, _ = random_inputs(2, 1, 64, 32)
    zero_text = torch.zeros(2, 32)  # s ≡ 0: every gradient is zero, every map constant
    heatmaps, layer_maps, _ = build_image_graph(loaded, 64, (1, 2))(pixels, zero_text)
    assert torch.equal(heatmaps, torch.zeros_like(heatmaps))
    ref = legrad_reference(model, pixels, zero_text)
    assert torch.equal(ref.heatmaps, torch.zeros_like(ref.heatmaps))
    assert torch.equal(min_max(torch.full((1, 2, 5, 5), 3.0)), torch.zeros(1, 2, 5, 5))


def test_layer_specs_resolve_like_the_reference_layer_index():
    assert resolve_layers(-2, 12) == (10, 11)
    assert resolve_layers("-2", 12) == (10, 11)
    assert resolve_layers(9, 12) == (9, 10, 11)
    assert resolve_layers("all", 3) == (0, 1, 2)
    assert resolve_layers("8,-1", 12) == (8, 11)
    for bad in ("-13", "12", "x", ""):
        with pytest.raises(ValueError):
            resolve_layers(bad, 12)
