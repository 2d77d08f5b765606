"""timm towers pooled by a class token or the token mean: MobileCLIP (conv stem, class token without a
position, timm's classifier as projection), MobileCLIP2-L-14 (a plain CLIP ViT in timm) and ViTamin
(MbConv stem, no class token, GeGLU MLPs with an inner LayerNorm). The CLIP rule of docs/towers.md.

The reference runs the untouched timm trunk (at 2× a copy resized by timm's `set_input_size`); its
image embeddings and the graph's equal open_clip's `encode_image`, an independent check of the stems,
the projection and the GeGLU forward.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from legrad_export.graphs import build_image_graph
from legrad_export.layers import resolve_layers
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference_timm import legrad_reference_timm
from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import IMAGE_GRAPH, TEXT_GRAPH, read_metadata
from tiny_models import (
    TIMM_TOKEN_VARIANTS,
    assert_each_pair_equals_single,
    encode_at,
    random_inputs,
    save_tiny_timm_token_model,
)

pytestmark = pytest.mark.torch

VARIANTS = list(TIMM_TOKEN_VARIANTS)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm-token")
    return {v: load_openclip(str(save_tiny_timm_token_model(root, v))) for v in VARIANTS}


def test_the_towers_are_described_as_their_configs_say(towers):
    got = {v: (s.stem, s.mlp, s.prefix_tokens, s.pool_type, s.patch_size) for v, s in
           ((v, towers[v].vit) for v in VARIANTS)}  # fmt: skip
    assert got == {
        "mobileclip": ("hybrid", "plain", 1, "tok", 16),
        "clip_l14": ("patch", "plain", 1, "tok", 14),
        "vitamin": ("hybrid", "geglu", 0, "avg", 16),
    }
    assert all(towers[v].vit.head == "token_mean" and towers[v].vit.embed_dim == 48 for v in VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("layer_spec", ["-2", "all"])
def test_the_graph_equals_the_reference(towers, variant, scale, layer_spec):
    loaded = towers[variant]
    size = loaded.preprocess["size"] * scale
    layers = resolve_layers(layer_spec, loaded.vit.num_layers)
    graph = build_image_graph(loaded, size, layers)
    pixels, text = random_inputs(3, 4, size, 48, seed=len(layers) + scale)
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    ref = legrad_reference_timm(loaded.model, pixels, text, layer_spec)
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


def test_the_reference_at_another_size_leaves_the_model_alone(towers):
    trunk = towers["vitamin"].model.visual.trunk
    pos = trunk.pos_embed.detach().clone()
    pixels, text = random_inputs(1, 1, 128, 48, seed=2)
    legrad_reference_timm(towers["vitamin"].model, pixels, text, "-1")
    assert tuple(trunk.patch_embed.img_size) == (64, 64) and torch.equal(trunk.pos_embed, pos)


@pytest.fixture(scope="module")
def exported(towers, tmp_path_factory):
    root = tmp_path_factory.mktemp("timm-token-export")
    return {v: export_model(towers[v], root / v, ExportSettings(layers="all")) for v in VARIANTS}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_runtime_equals_the_reference_and_open_clip(towers, exported, variant):
    loaded, folder = towers[variant], exported[variant]
    meta = read_metadata(folder)
    assert (meta.tower.family, meta.tower.head) == ("timm_vit", "token_mean")
    assert meta.tower.prefix_tokens == loaded.vit.prefix_tokens and meta.patch_size == loaded.vit.patch_size
    assert meta.correction is None or not meta.correction.enabled
    size = meta.image_size
    pixels, text = random_inputs(2, 3, size, 48, seed=5)
    got = _session(folder / IMAGE_GRAPH.filename).run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    ref = legrad_reference_timm(loaded.model, pixels, text, "all")
    for have, want in zip(got, (ref.heatmaps, ref.layer_maps, ref.image_embeds)):
        assert np.abs(have - want.numpy()).max() <= 1e-4
    ids = loaded.tokenizer(["a photo of a cat", "", "two dogs, at night!"])
    (text_embeds,) = _session(folder / TEXT_GRAPH.filename).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = loaded.model.encode_text(ids, normalize=True).numpy()
    assert np.abs(text_embeds - expected).max() <= 1e-5


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("prompts", [1, 4])
def test_each_image_and_prompt_equals_its_single_result(exported, batch, prompts):
    """Traced at B = P = 2; every [b, p] of a batch equals that image and prompt run alone (ViTamin)."""
    session = _session(exported["vitamin"] / IMAGE_GRAPH.filename)
    pixels, text = random_inputs(batch, prompts, 64, 48, seed=batch * 10 + prompts)
    assert_each_pair_equals_single(session, pixels, text)


def test_a_size_off_the_stem_stride_is_refused(towers, tmp_path):
    with pytest.raises(ExportError, match="not a positive multiple of .* patch size 16; use e.g. 96 or 112"):
        export_model(towers["mobileclip"], tmp_path, ExportSettings(image_size=100))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "blocks", "embed_dim"), [("MobileCLIP-B", 12, 512)])
def test_a_real_size_tower_exports_end_to_end(tmp_path, capsys, name, blocks, embed_dim):
    """A real tower through the CLI, offline, random weights (its CLIP tokenizer is local). ViTamin-S
    passes too ("ViTamin-S", 14, 384) but costs 1.6 more minutes, which CI's budget does not have."""
    from legrad_export.cli import main
    from legrad_runtime import load

    code = main(["--model", name, "--pretrained", "none", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = tmp_path / "out" / f"{name}__none__224"
    assert out.strip() == str(folder)
    meta = read_metadata(folder)
    assert (meta.layers, meta.grid_size, meta.embed_dim) == ((blocks - 2, blocks - 1), (14, 14), embed_dim)
    assert meta.tower.head == "token_mean" and meta.tower.prefix_tokens == (name == "MobileCLIP-B")
    assert max(meta.extra["verification_max_abs_diff"].values()) <= 1e-4
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    explained = load(folder).explain(image, ["a photo of a cat", "a dog"])
    assert explained.heatmaps.shape == (1, 2, 224, 224) and explained.heatmaps.max() > 0.5
