"""Exported folders under onnxruntime against the autograd reference and open_clip."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from legrad_export.layers import resolve_layers
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference import legrad_reference
from legrad_runtime.metadata import (
    IMAGE_GRAPH,
    METADATA_FILE,
    ONNX_METADATA_KEY,
    TEXT_GRAPH,
    read_metadata,
    sha256_file,
    verify_files,
)
from tiny_models import random_inputs

pytestmark = pytest.mark.torch

# (variant, image size, layers): the tiny half of the matrix; ViT-B-16 runs in test_vit_b16_end_to_end
EXPORTS = [
    ("b32_like", 96, "-2"),
    ("b16_like", 64, "-2"),
    ("b16_like", 128, "all"),  # 2× native: resampled positional embedding
    ("quickgelu", 64, "-2"),
    ("layerscale", 64, "all"),
]

PROMPTS = [
    "a photo of a cat",
    "A REMOTE CONTROL!!",
    "café, naïve — déjà vu 🐱",
    "  spaces\tand\nnewlines  ",
    "a " + "very " * 100 + "long prompt",
    "",
]


@pytest.fixture(scope="module", params=EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}-{e[2]}")
def exported(request, tiny_dirs, tmp_path_factory):
    variant, size, layers = request.param
    loaded = load_openclip(str(tiny_dirs[variant]))
    out = tmp_path_factory.mktemp("exports")
    folder = export_model(loaded, out, ExportSettings(image_size=size, layers=layers))
    checkpoint = tiny_dirs[variant] / "open_clip_pytorch_model.bin"
    return loaded, folder, size, layers, checkpoint


def _run(folder, pixels, text):
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})


def test_onnx_outputs_match_the_reference(exported):
    loaded, folder, size, layers, _ = exported
    pixels, text = random_inputs(3, 4, size, loaded.vit.embed_dim, seed=7)
    heatmaps, layer_maps, image_embeds = _run(folder, pixels, text)
    ref = legrad_reference(loaded.model, pixels, text, layers)
    assert np.abs(heatmaps - ref.heatmaps.numpy()).max() <= 1e-4
    assert np.abs(layer_maps - ref.layer_maps.numpy()).max() <= 1e-4
    assert np.abs(image_embeds - ref.image_embeds.numpy()).max() <= 1e-4
    assert heatmaps.shape == (3, 4, size, size) and heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_text_graph_matches_open_clip_encode_text(exported):
    loaded, folder, _, _, _ = exported
    ids = loaded.tokenizer(PROMPTS)
    session = ort.InferenceSession(str(folder / TEXT_GRAPH.filename), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        want = loaded.model.encode_text(ids, normalize=True).numpy()
    assert np.abs(got - want).max() <= 1e-5


def test_every_batch_and_prompt_count_gives_the_single_pair_maps(exported):
    loaded, folder, size, _, _ = exported
    for batch, prompts in [(1, 1), (3, 4), (5, 1), (1, 4), (5, 4)]:
        pixels, text = random_inputs(batch, prompts, size, loaded.vit.embed_dim, seed=batch * 10 + prompts)
        heatmaps, layer_maps, embeds = _run(folder, pixels, text)
        assert heatmaps.shape[:2] == (batch, prompts)
        for b in range(batch):
            for p in range(prompts):
                single = _run(folder, pixels[b : b + 1], text[p : p + 1])
                assert np.abs(heatmaps[b, p] - single[0][0, 0]).max() <= 1e-5
                assert np.abs(layer_maps[b, p] - single[1][0, 0]).max() <= 1e-6
                assert np.abs(embeds[b] - single[2][0]).max() <= 1e-6


def test_constant_map_gives_zeros_in_onnx(exported):
    loaded, folder, size, _, _ = exported
    pixels, _ = random_inputs(2, 1, size, loaded.vit.embed_dim)
    heatmaps, _, _ = _run(folder, pixels, torch.zeros(2, loaded.vit.embed_dim))
    assert np.isfinite(heatmaps).all() and not heatmaps.any()


def test_folder_is_self_describing_and_checksummed(exported):
    loaded, folder, size, layers, checkpoint = exported
    meta = read_metadata(folder)
    verify_files(folder, meta)
    grid = size // loaded.vit.patch_size
    assert meta.image_size == (size, size) and meta.grid_size == (grid, grid)
    assert meta.patch_size == loaded.vit.patch_size and meta.embed_dim == loaded.vit.embed_dim
    assert meta.activation == loaded.vit.activation
    assert meta.checkpoint_sha256 == sha256_file(checkpoint)
    assert meta.layers == resolve_layers(layers, loaded.vit.num_layers)
    assert meta.logit_scale == pytest.approx(loaded.model.logit_scale.exp().item())
    assert meta.tokenizer.kind == "clip-bpe" and meta.tokenizer.context_length == 77
    assert (
        meta.preprocess.mean == tuple(loaded.preprocess["mean"]) and meta.preprocess.resize_mode == "squash"
    )
    listed = set(meta.files)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {METADATA_FILE}
    assert listed == on_disk
    assert {IMAGE_GRAPH.filename, TEXT_GRAPH.filename, *meta.tokenizer.files} <= listed
    for entry in meta.files.values():
        assert sha256_file(folder / entry.path) == entry.sha256
    sidecar = json.loads((folder / METADATA_FILE).read_text())
    for spec in (IMAGE_GRAPH, TEXT_GRAPH):
        model = onnx.load(str(folder / spec.filename))
        onnx.checker.check_model(model, full_check=True)
        embedded = {p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY]
        assert json.loads(embedded) == {k: v for k, v in sidecar.items() if k not in ("files", "extra")}
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
