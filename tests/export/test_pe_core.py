"""PE-Core (a timm Eva trunk: class token, 2-D RoPE, LayerScale, a MAP head and a Linear after it).

The authors' code does not handle it; the rule is docs/towers.md's (the SigLIP rule, the class
token's column dropped). The reference runs the untouched timm trunk (its own RoPE attention), so
its image embeddings equal open_clip's `encode_image`, an independent check of the explicit RoPE.
At 2× the native size the reference resizes a copy of the trunk with timm's own `set_input_size`
(positions resampled, RoPE table rebuilt), which our table, built from the bands, must match.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from legrad_export.graphs import build_image_graph, empty_prompt_embed
from legrad_export.layers import resolve_layers
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference_siglip import legrad_reference_siglip
from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import IMAGE_GRAPH, read_metadata
from tiny_models import encode_at, random_inputs, save_tiny_pe_core_model

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def pe_core(tmp_path_factory):
    return load_openclip(str(save_tiny_pe_core_model(tmp_path_factory.mktemp("pe-core"))))


def test_the_tower_is_described_as_pe_core(pe_core):
    spec = pe_core.vit
    assert (spec.family, spec.head, spec.prefix_tokens, spec.rope) == ("timm_eva", "map", 1, True)
    assert (spec.width, spec.embed_dim, spec.head_heads) == (64, 48, 8)
    assert pe_core.logit_bias is None  # a softmax model


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("layer_spec", ["-2", "all"])
@pytest.mark.parametrize("correction", [True, False])
def test_the_graph_equals_the_reference(pe_core, size, layer_spec, correction):
    layers = resolve_layers(layer_spec, pe_core.vit.num_layers)
    graph = build_image_graph(pe_core, size, layers, correction=correction)
    pixels, text = random_inputs(3, 4, size, 48, seed=len(layers))
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
        expected_embeds = encode_at(pe_core.model, pixels)
    empty = empty_prompt_embed(pe_core) if correction else None
    ref = legrad_reference_siglip(pe_core.model, pixels, text, layer_spec, empty)
    grid = size // 16
    assert layer_maps.shape == (3, 4, len(layers), grid, grid)  # the class token's column is dropped
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (image_embeds - expected_embeds).abs().max() <= 1e-5
    assert (ref.image_embeds - expected_embeds).abs().max() <= 1e-5
    assert layer_maps.amax() > 0 and heatmaps.amax() > 0.5


def test_the_reference_at_another_size_leaves_the_model_alone(pe_core):
    trunk = pe_core.model.visual.trunk
    pos, table = trunk.pos_embed.detach().clone(), trunk.rope.get_embed().clone()
    pixels, text = random_inputs(1, 1, 128, 48, seed=2)
    legrad_reference_siglip(pe_core.model, pixels, text, "-1")
    assert tuple(trunk.patch_embed.img_size) == (64, 64)
    assert torch.equal(trunk.pos_embed, pos) and torch.equal(trunk.rope.get_embed(), table)


@pytest.mark.parametrize("size", [64, 128])
def test_the_export_runs_under_onnxruntime(pe_core, tmp_path, size):
    folder = export_model(pe_core, tmp_path, ExportSettings(layers="all", image_size=size))
    meta = read_metadata(folder)
    assert (meta.tower.family, meta.tower.prefix_tokens, meta.logit_bias) == ("timm_eva", 1, None)
    assert meta.correction.enabled and meta.image_size == (size, size)
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    pixels, text = random_inputs(2, 3, size, 48, seed=5)
    got = session.run(None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})
    ref = legrad_reference_siglip(pe_core.model, pixels, text, "all", empty_prompt_embed(pe_core))
    for have, want in zip(got, (ref.heatmaps, ref.layer_maps, ref.image_embeds)):
        assert np.abs(have - want.numpy()).max() <= 1e-4


def test_a_size_off_the_patch_grid_is_refused(pe_core, tmp_path):
    with pytest.raises(ExportError, match="not a positive multiple of .* patch size 16; use e.g. 96 or 112"):
        export_model(pe_core, tmp_path, ExportSettings(image_size=100))
