"""SigLIP and SigLIP2 (MAP-head timm towers): the closed-form graph against the autograd reference.

Tiny towers shrunk from the real ones (tiny_models.SIGLIP_VARIANTS: no class token, a MAP head,
exact or tanh GELU, their kind of HF tokenizer), random weights, loaded through open_clip's own
local-dir code. The reference (reference_siglip.py) shares no code with the graph, and equals the
authors' `compute_legrad_siglip` (test_authors_parity.py).
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
from legrad_runtime.metadata import IMAGE_GRAPH, TEXT_GRAPH, read_metadata
from tiny_models import SIGLIP_VARIANTS, assert_each_pair_equals_single, random_inputs, save_tiny_siglip_model

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def siglips(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    return {
        v: load_openclip(str(save_tiny_siglip_model(root, v, seed=i))) for i, v in enumerate(SIGLIP_VARIANTS)
    }


@pytest.mark.parametrize("variant", list(SIGLIP_VARIANTS))
@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("layer_spec", ["-2", "all"])
@pytest.mark.parametrize("correction", [True, False])
def test_the_graph_equals_the_reference(siglips, variant, scale, layer_spec, correction):
    loaded = siglips[variant]
    size = SIGLIP_VARIANTS[variant]["image_size"] * scale
    layers = resolve_layers(layer_spec, loaded.vit.num_layers)
    graph = build_image_graph(loaded, size, layers, correction=correction)
    pixels, text = random_inputs(3, 4, size, loaded.vit.embed_dim, seed=scale)
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    empty = empty_prompt_embed(loaded) if correction else None
    ref = legrad_reference_siglip(loaded.model, pixels, text, layer_spec, empty)
    grid = size // loaded.vit.patch_size
    assert ref.layers == layers and layer_maps.shape == (3, 4, len(layers), grid, grid)
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (image_embeds - ref.image_embeds).abs().max() <= 1e-5
    assert layer_maps.amax() > 0 and heatmaps.amax() > 0.5  # real maps, not blank ones


def test_the_correction_changes_the_maps_it_should(siglips):
    loaded = siglips["siglip"]
    layers = resolve_layers("all", loaded.vit.num_layers)
    pixels, text = random_inputs(2, 3, 48, 64, seed=11)
    with torch.no_grad():
        on = build_image_graph(loaded, 48, layers, correction=True)(pixels, text)
        off = build_image_graph(loaded, 48, layers, correction=False)(pixels, text)
        strict = build_image_graph(loaded, 48, layers, correction=True, threshold=0.3)(pixels, text)
    torch.testing.assert_close(on[1], off[1])  # per-layer maps are raw: the correction acts on the sum
    assert (on[0] != off[0]).any()
    # a lower threshold zeroes more cells: at least as many zero pixels as at 0.8
    assert (strict[0] == 0).sum() >= (on[0] == 0).sum()


def test_a_size_the_patches_do_not_tile_leaves_an_uncovered_strip_at_zero(siglips):
    """SO400M-14 at 384 px sees 27 patches of 14 (378 px); here 52 px with patches of 8 (48 px)."""
    loaded = siglips["siglip"]
    layers = resolve_layers("-2", loaded.vit.num_layers)
    pixels, text = random_inputs(2, 2, 52, 64, seed=12)
    with torch.no_grad():
        heatmaps, layer_maps, _ = build_image_graph(loaded, 52, layers)(pixels, text)
    ref = legrad_reference_siglip(loaded.model, pixels, text, "-2", empty_prompt_embed(loaded))
    assert heatmaps.shape == (2, 2, 52, 52) and layer_maps.shape[-1] == 6
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (heatmaps[..., 48:, :] == 0).all() and (heatmaps[..., :, 48:] == 0).all()


@pytest.fixture(scope="module")
def exported(siglips, tmp_path_factory):
    loaded = siglips["siglip2"]
    return loaded, export_model(loaded, tmp_path_factory.mktemp("siglip-export"), ExportSettings())


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_exported_folder_records_the_tower(exported):
    loaded, folder = exported
    meta = read_metadata(folder)
    assert (meta.tower.family, meta.tower.head, meta.tower.prefix_tokens) == ("timm_vit", "map", 0)
    assert meta.tower.grid == (4, 4) and meta.activation == "gelu_tanh"
    assert meta.correction.enabled and meta.correction.threshold == 0.8
    assert meta.correction.prompt == "a photo of a"
    assert meta.logit_bias == pytest.approx(loaded.logit_bias) and meta.logit_bias == -10
    assert meta.tokenizer.kind == "hf"


def test_onnx_runtime_equals_the_reference_and_open_clip(exported):
    loaded, folder = exported
    pixels, text = random_inputs(3, 4, 64, 64, seed=21)
    got = _session(folder / IMAGE_GRAPH.filename).run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    meta = read_metadata(folder)
    ref = legrad_reference_siglip(loaded.model, pixels, text, meta.layers, empty_prompt_embed(loaded))
    for have, want in zip(got, (ref.heatmaps, ref.layer_maps, ref.image_embeds)):
        assert np.abs(have - want.numpy()).max() <= 1e-4
    prompts = ["a photo of a cat", "", "two dogs, at night!"]
    ids = loaded.tokenizer(prompts)
    (text_embeds,) = _session(folder / TEXT_GRAPH.filename).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = loaded.model.encode_text(ids, normalize=True).numpy()
    assert np.abs(text_embeds - expected).max() <= 1e-5


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("prompts", [1, 4])
def test_each_image_and_prompt_equals_its_single_result(exported, batch, prompts):
    """Traced at B = P = 2; every [b, p] of a batch equals that image and prompt run alone."""
    _, folder = exported
    session = _session(folder / IMAGE_GRAPH.filename)
    pixels, text = random_inputs(batch, prompts, 64, 64, seed=batch * 10 + prompts)
    assert_each_pair_equals_single(session, pixels, text)


def test_an_export_without_the_correction_says_so_and_matches_the_plain_reference(siglips, tmp_path):
    loaded = siglips["siglip"]
    folder = export_model(loaded, tmp_path, ExportSettings(correction=False, layers="all"))
    meta = read_metadata(folder)
    assert meta.correction is not None and not meta.correction.enabled
    pixels, text = random_inputs(2, 2, 48, 64, seed=31)
    heatmaps = _session(folder / IMAGE_GRAPH.filename).run(
        ["heatmaps"], {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )[0]
    ref = legrad_reference_siglip(loaded.model, pixels, text, "all", None)
    assert np.abs(heatmaps - ref.heatmaps.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_vit_b16_siglip_export_end_to_end(tmp_path, capsys):
    """The real tower through the CLI, offline: random weights, a small HF tokenizer via --tokenizer."""
    from hf_tokenizers import save_hf_tokenizer
    from legrad_export.cli import main
    from legrad_runtime import load

    save_hf_tokenizer("unigram", tmp_path / "tokenizer")
    args = ["--model", "ViT-B-16-SigLIP", "--pretrained", "none", "--tokenizer", str(tmp_path / "tokenizer")]
    code = main(args + ["--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = tmp_path / "out" / "ViT-B-16-SigLIP__none__224"
    assert out.strip() == str(folder)
    meta = read_metadata(folder)
    assert (meta.layers, meta.grid_size, meta.embed_dim, meta.tower.head) == ((10, 11), (14, 14), 768, "map")
    assert meta.correction.enabled and meta.logit_bias == -10
    assert max(meta.extra["verification_max_abs_diff"].values()) <= 1e-4

    model = load(folder)
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    explained = model.explain(image, ["a photo of a cat", "a dog"])
    assert explained.heatmaps.shape == (1, 2, 224, 224) and explained.heatmaps.max() > 0.5
    logits = meta.logit_scale * (explained.image_embeds @ explained.text_embeds.T) + meta.logit_bias
    np.testing.assert_allclose(explained.probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-6)
