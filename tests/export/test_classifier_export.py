"""Supervised ViT classifiers (torchvision and timm) exported: closed form = reference = ONNX.

The references (reference_classifier.py) run autograd on the untouched models; the torchvision one
equals torchcam 0.5.0 (test_classifier_reference.py), and so does the graph here, on the same map.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_classifier_reference import torchcam_maps

from legrad_export.cli import main as export_main
from legrad_export.graphs import build_image_graph
from legrad_export.layers import resolve_layers
from legrad_export.load_classifier import load_classifier
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference_classifier import legrad_reference_classifier
from legrad_runtime.classes import imagenet1k_classes
from legrad_runtime.metadata import CLASSIFIER_GRAPH, TEXT_GRAPH, read_metadata, verify_files
from tiny_models import (
    TIMM_CLASSIFIER_VARIANTS,
    build_tiny_timm_classifier,
    build_tiny_torchvision_vit,
    wrap_tiny_classifier,
)

pytestmark = pytest.mark.torch

MODELS = {  # name → (a tiny classifier, its loader name)
    "torchvision": lambda: (build_tiny_torchvision_vit(12), "torchvision:tiny_vit"),
    **{
        f"timm_{v}": (lambda v=v: (build_tiny_timm_classifier(v), f"timm:tiny_{v}"))
        for v in TIMM_CLASSIFIER_VARIANTS
    },
}


@pytest.fixture(scope="module", params=list(MODELS))
def classifier(request):
    model, name = MODELS[request.param]()
    return wrap_tiny_classifier(model, name)


def _inputs(batch: int, classes: list[int], seed: int = 0):
    pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return pixels, torch.tensor(classes, dtype=torch.int64)


@pytest.mark.parametrize("layer_spec", ["-2", "all"])
def test_the_graph_equals_the_reference(classifier, layer_spec):
    layers = resolve_layers(layer_spec, classifier.vit.num_layers)
    graph = build_image_graph(classifier, 64, layers)
    pixels, class_ids = _inputs(3, [3, 7, 0, 9])
    with torch.no_grad():
        heatmaps, layer_maps, logits = graph(pixels, class_ids)
        own_logits = classifier.model(pixels)
    ref = legrad_reference_classifier(classifier.model, pixels, class_ids, layer_spec)
    assert heatmaps.shape == (3, 4, 64, 64) and layer_maps.shape == (3, 4, len(layers), 4, 4)
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5 * max(1.0, ref.layer_maps.abs().max())
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (logits - own_logits).abs().max() <= 1e-4 and (ref.logits - own_logits).abs().max() <= 1e-4
    assert ref.maps.std() > 0.1  # real maps, not constant ones


@pytest.mark.parametrize("size", [(48, 80), (128, 128)], ids=["80x48", "2x"])
def test_other_sizes_equal_the_reference(classifier, size):
    """Positions resampled to the grid, as for CLIP towers; the references resample by themselves."""
    graph = build_image_graph(classifier, size, (1, 2))
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    class_ids = torch.tensor([1, 8])
    with torch.no_grad():
        heatmaps, layer_maps, logits = graph(pixels, class_ids)
    ref = legrad_reference_classifier(classifier.model, pixels, class_ids, (1, 2))
    assert heatmaps.shape == (2, 2, *size)
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5 and (logits - ref.logits).abs().max() <= 1e-4
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5 * max(1.0, ref.layer_maps.abs().max())


def test_the_graph_equals_torchcam_on_its_grid_map(torchcam_legrad):
    classifier = wrap_tiny_classifier(build_tiny_torchvision_vit(12))
    graph = build_image_graph(classifier, 64, (1, 2))
    pixels, class_ids = _inputs(2, [5, 11], seed=3)
    with torch.no_grad():
        heatmaps = graph(pixels, class_ids)[0]
    ref = legrad_reference_classifier(classifier.model, pixels, class_ids, (1, 2))
    for p, c in enumerate(class_ids.tolist()):
        theirs = torchcam_maps(torchcam_legrad, classifier.model, pixels, c, (1, 2))
        assert (ref.maps[:, p] - theirs).abs().max() <= 1e-5
        upsampled = torch.nn.functional.interpolate(theirs[:, None], scale_factor=16, mode="bilinear")
        assert (heatmaps[:, p] - upsampled[:, 0]).abs().max() <= 1e-5


def test_an_export_verifies_and_describes_itself(classifier, tmp_path):
    folder = export_model(classifier, tmp_path, ExportSettings())
    meta = read_metadata(folder)
    verify_files(folder, meta)
    assert meta.is_classifier and meta.tokenizer is None and meta.embed_dim == classifier.vit.embed_dim
    assert meta.classes == tuple(f"class {i}" for i in range(meta.embed_dim))
    assert not (folder / TEXT_GRAPH.filename).exists() and not (folder / "tokenizer").exists()
    assert (
        meta.preprocess.resize_mode == "shortest"
        and meta.preprocess.crop_pct == classifier.preprocess["crop_pct"]
    )
    diffs = meta.extra["verification_max_abs_diff"]
    assert set(diffs) == {"heatmaps", "layer_maps", "logits"} and max(diffs.values()) <= 1e-4

    session = ort.InferenceSession(
        str(folder / CLASSIFIER_GRAPH.filename), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 3, 5):
        for classes in ([4], [0, 9, 2, 2]):
            pixels, class_ids = _inputs(batch, classes, seed=batch)
            heatmaps, layer_maps, logits = session.run(
                None, {"pixel_values": pixels.numpy(), "class_ids": class_ids.numpy()}
            )
            for b in range(batch):
                for p, c in enumerate(classes):
                    one = session.run(
                        None, {"pixel_values": pixels[b : b + 1].numpy(), "class_ids": np.array([c])}
                    )
                    np.testing.assert_allclose(heatmaps[b, p], one[0][0, 0], atol=1e-5)
                    np.testing.assert_allclose(layer_maps[b, p], one[1][0, 0], atol=1e-6, rtol=1e-5)
            np.testing.assert_allclose(logits, classifier.model(pixels).detach().numpy(), atol=1e-4)


def test_a_1000_class_head_gets_the_imagenet_names(tmp_path):
    classifier = wrap_tiny_classifier(build_tiny_torchvision_vit(1000))
    meta = read_metadata(export_model(classifier, tmp_path, ExportSettings(verify=False)))
    assert meta.classes == imagenet1k_classes() and meta.classes[281] == "tabby, tabby cat"


def test_the_classifier_is_not_modified(tmp_path):
    model = build_tiny_torchvision_vit(12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(wrap_tiny_classifier(model), tmp_path, ExportSettings())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "torchvision:vit_b_99", "--pretrained", "none"],
            "unknown torchvision ViT 'vit_b_99'; choose one of vit_b_16",
        ),
        (["--model", "torchvision:vit_b_16", "--pretrained", "IMAGENET9K"], "IMAGENET1K_V1"),
        (["--model", "timm:vit_nonexistent_patch16", "--pretrained", "none"], "unknown timm model"),
        (["--model", "timm:vit_tiny_patch16_224", "--pretrained", "laion2b"], "must be 'hub'"),
        (["--model", "torchvision:vit_b_16", "--tokenizer", "x"], "--tokenizer is for CLIP-style models"),
        (["--model", "torchvision:"], "names no classifier"),
    ],
)
def test_bad_classifier_arguments_are_one_line(tmp_path, capsys, args, message):
    assert export_main([*args, "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("legrad-export: error:") and message in line


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save(build_tiny_torchvision_vit(12).state_dict(), path)
    code = export_main(
        ["--model", "torchvision:vit_b_16", "--pretrained", str(path), "--out", str(tmp_path / "o")]
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "does not fit torchvision:vit_b_16" in line


def test_a_saved_state_dict_loads_as_its_weights(tmp_path):
    model = build_tiny_timm_classifier("token", num_classes=1000)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    import timm.models.vision_transformer as tv

    name = "legrad_tiny_vit_classifier"
    if name not in tv.__dict__:  # a timm entrypoint of the tiny config, so `timm:NAME` builds it

        @tv.register_model
        def legrad_tiny_vit_classifier(pretrained: bool = False, **kwargs):
            args = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
            return tv._create_vision_transformer(name, pretrained=pretrained, **(args | kwargs))

    loaded = load_classifier(f"timm:{name}", str(path))
    assert loaded.pretrained == "tiny.pth" and loaded.checkpoint_sha256 is not None
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(pixels), model(pixels))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:vit_b_16", "timm:vit_base_patch16_224.augreg_in21k_ft_in1k"])
def test_a_real_vit_b16_classifier_exports_through_the_cli(tmp_path, name):
    assert export_main(["--model", name, "--pretrained", "none", "--out", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    meta = read_metadata(folder)
    assert meta.classes[281] == "tabby, tabby cat" and meta.image_size == (224, 224)
    assert meta.preprocess.crop_pct == (0.875 if name.startswith("torchvision") else 0.9)
    assert max(meta.extra["verification_max_abs_diff"].values()) <= 1e-4
