"""EVA-CLIP towers (timm Eva, class-token pooled): EVA01-g's plain blocks, EVA02-B/L's (separate q/k/v,
attn.norm, SwiGLU with its LayerNorm, 2-D RoPE) and EVA02-E's post-norm blocks. The CLIP rule of
docs/towers.md; the closed-form backward of EVA02's blocks is legrad_eva.py.

The reference runs the untouched timm trunk (at 2× a copy resized by timm's `set_input_size`, which
rebuilds the RoPE table); the image embeddings equal open_clip's `encode_image`. EVA02 is exported
once, through the CLI, in the shared runtime folders (tests/conftest.py `model_folders`).
"""

from __future__ import annotations

import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

from legrad_export.graphs import build_image_graph
from legrad_export.layers import resolve_layers
from legrad_export.load import load_openclip
from legrad_export.reference_timm import legrad_reference_timm
from legrad_export.towers import describe_tower
from legrad_runtime.errors import UnsupportedModelError
from legrad_runtime.metadata import IMAGE_GRAPH, read_metadata
from tiny_models import (
    EVA_VARIANTS,
    assert_each_pair_equals_single,
    encode_at,
    random_inputs,
    save_tiny_eva_model,
)

pytestmark = pytest.mark.torch

VARIANTS = list(EVA_VARIANTS)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("eva-clip")
    return {v: load_openclip(str(save_tiny_eva_model(root, v))) for v in VARIANTS}


def test_the_towers_are_described_as_their_configs_say(towers):
    got = {v: (s.mlp, s.attn_norm, s.post_norm, s.rope, s.patch_size) for v, s in
           ((v, towers[v].vit) for v in VARIANTS)}  # fmt: skip
    assert got == {
        "eva01": ("plain", False, False, False, 14),
        "eva02": ("swiglu", True, False, True, 16),
        "eva02_e": ("plain", False, True, False, 14),
    }
    assert all(
        (s.family, s.head, s.prefix_tokens, s.pool_type, s.embed_dim)
        == ("timm_eva", "token_mean", 1, "tok", 48)
        for s in (towers[v].vit for v in VARIANTS)
    )


@pytest.mark.parametrize(
    ("variant", "scale"),
    [(v, 1) for v in VARIANTS] + [("eva02", 2)],  # 2×: RoPE rebuilt, positions resampled
)
def test_the_graph_equals_the_reference(towers, variant, scale):
    loaded = towers[variant]
    size = loaded.preprocess["size"] * scale
    layers = resolve_layers("all", loaded.vit.num_layers)
    graph = build_image_graph(loaded, size, layers)
    pixels, text = random_inputs(3, 4, size, 48, seed=scale)
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    ref = legrad_reference_timm(loaded.model, pixels, text, "all")
    grid = size // loaded.vit.patch_size
    assert layer_maps.shape == (3, 4, len(layers), grid, grid)
    scale_of_maps = ref.layer_maps.abs().max()
    assert scale_of_maps > 0
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5 * max(1.0, scale_of_maps)
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-4 * scale_of_maps  # relative, too: maps are small
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    expected_embeds = encode_at(loaded.model, pixels)
    assert (image_embeds - expected_embeds).abs().max() <= 1e-5
    assert (ref.image_embeds - expected_embeds).abs().max() <= 1e-5
    assert heatmaps.amax() > 0.5


def _tiny_trunk_model(**kwargs):
    """Just what describe_tower reads: model.visual.trunk (a tiny EVA02 trunk, changed) and .head."""
    import timm

    trunk = timm.create_model("legrad_tiny_eva02", num_classes=48, **kwargs)
    return types.SimpleNamespace(visual=types.SimpleNamespace(trunk=trunk, head=torch.nn.Sequential()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scale_mlp=False), "MLP GluMlp"),  # SwiGLU without its LayerNorm: packed weights
        (dict(use_post_norm=True), "combines a swiglu MLP"),  # no real EVA has a post-norm SwiGLU
        (dict(qk_norm=True), "q_norm, k_norm"),
        (dict(rope_rotate_half=True), "rotates halves|RoPE other than interleaved"),
    ],
)
def test_eva_variants_without_a_backward_are_refused(kwargs, match):
    with pytest.raises(UnsupportedModelError, match=match):
        describe_tower(_tiny_trunk_model(**kwargs), "odd-eva")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_cli_export_equals_the_reference(towers, model_folders):
    loaded, folder = towers["eva02"], model_folders["eva02"]
    meta = read_metadata(folder)
    assert (meta.tower.family, meta.tower.head, meta.tower.prefix_tokens) == ("timm_eva", "token_mean", 1)
    assert meta.correction is None or not meta.correction.enabled
    diffs = meta.extra["verification_max_abs_diff"]  # the CLI's own check: verify_export
    assert max(v for k, v in diffs.items() if k != "text_embeds") <= 1e-4 and diffs["text_embeds"] <= 1e-5
    pixels, text = random_inputs(2, 3, meta.image_size, 48, seed=5)
    got = _session(folder / IMAGE_GRAPH.filename).run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    ref = legrad_reference_timm(loaded.model, pixels, text, meta.layers)
    for have, want in zip(got, (ref.heatmaps, ref.layer_maps, ref.image_embeds)):
        assert np.abs(have - want.numpy()).max() <= 1e-4


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("prompts", [1, 4])
def test_each_image_and_prompt_equals_its_single_result(model_folders, batch, prompts):
    """Traced at B = P = 2; every [b, p] of a batch equals that image and prompt run alone (EVA02)."""
    session = _session(model_folders["eva02"] / IMAGE_GRAPH.filename)
    pixels, text = random_inputs(batch, prompts, 64, 48, seed=batch * 10 + prompts)
    assert_each_pair_equals_single(session, pixels, text)
