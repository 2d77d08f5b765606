"""CoCa: open_clip's ViT with an attentional pooler, explained by its first latent's cross-attention
(the authors' `compute_legrad_coca`; their code itself is run in test_authors_parity.py).

The reference runs the untouched model's blocks and pooler with the softmax written out; the graph's
image embeddings equal open_clip's `encode_image`, an independent check of pooler, ln_post and proj.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch

from legrad_export.graphs import build_image_graph, explicit_vit
from legrad_export.layers import resolve_layers
from legrad_export.legrad_map import MapLeGrad
from legrad_export.load import load_openclip, wrap_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference_coca import legrad_reference_coca
from legrad_export.support import all_models
from legrad_runtime.errors import UnsupportedModelError
from legrad_runtime.metadata import IMAGE_GRAPH, TEXT_GRAPH, read_metadata
from tiny_models import (
    COCA_CFG,
    assert_each_pair_equals_single,
    meta_tower,
    random_inputs,
    save_tiny_coca_model,
)

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    return load_openclip(str(save_tiny_coca_model(tmp_path_factory.mktemp("coca"))))


def test_the_tower_is_described_as_its_config_says(coca):
    spec = coca.vit
    assert (spec.family, spec.head, spec.head_heads) == ("openclip_vit", "attn_pool", 4)
    assert spec.prefix_tokens == 1
    assert (spec.width, spec.embed_dim, spec.patch_size, spec.native_grid) == (64, 48, 16, 4)
    assert spec.explains_head and not spec.has_correction


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("layer_spec", ["-2", "all"])
def test_the_graph_equals_the_reference(coca, size, layer_spec):
    layers = resolve_layers(layer_spec, coca.vit.num_layers)
    graph = build_image_graph(coca, size, layers)
    pixels, text = random_inputs(3, 4, size, 48, seed=size + len(layers))
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    ref = legrad_reference_coca(coca.model, pixels, text, layer_spec)
    grid = size // 16
    assert ref.layers == layers and layer_maps.shape == (3, 4, len(layers), grid, grid)
    assert ref.layer_maps.abs().max() > 0
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5 * max(1.0, ref.layer_maps.abs().max())
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (image_embeds - ref.image_embeds).abs().max() <= 1e-5
    if size == 64:  # open_clip's own tower runs at its own size only
        with torch.no_grad():
            expected = coca.model.encode_image(pixels, normalize=True)
        assert (image_embeds - expected).abs().max() <= 1e-5
    flat = heatmaps.flatten(2)
    assert torch.allclose(flat.amax(-1), torch.ones(3, 4))
    assert torch.allclose(flat.amin(-1), torch.zeros(3, 4))


def test_the_map_depends_on_the_pools_values_not_on_its_queries(coca):
    """o = A V is linear in A, so ∂s/∂A = g_o · v never sees the queries: new latents leave every map
    alone (and change the embedding, which latent 0 pools); new value weights change the maps."""
    import copy

    model = copy.deepcopy(coca.model)
    pool = model.visual.attn_pool
    with torch.no_grad():
        pool.query.normal_()
    pixels, text = random_inputs(2, 2, 64, 48, seed=3)
    before = legrad_reference_coca(coca.model, pixels, text, "-2")
    after = legrad_reference_coca(model, pixels, text, "-2")
    torch.testing.assert_close(after.layer_maps, before.layer_maps, rtol=1e-5, atol=1e-7)
    assert (after.image_embeds - before.image_embeds).abs().max() > 1e-2
    with torch.no_grad():
        pool.attn.v_proj_weight.normal_()
    changed = legrad_reference_coca(model, pixels, text, "-2")
    assert (changed.heatmaps - before.heatmaps).abs().max() > 1e-2


def test_the_correction_is_refused_for_a_coca_head(coca):
    vit = explicit_vit(coca, 64)
    with pytest.raises(ValueError, match="correction is SigLIP's"):
        MapLeGrad(vit, (1, 2), torch.ones(48))


@pytest.fixture(scope="module")
def exported(coca, tmp_path_factory):
    return export_model(coca, tmp_path_factory.mktemp("coca-export"), ExportSettings(layers="all"))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_runtime_equals_the_reference_and_open_clip(coca, exported):
    meta = read_metadata(exported)
    assert (meta.tower.family, meta.tower.head, meta.tower.prefix_tokens) == ("openclip_vit", "attn_pool", 1)
    assert meta.correction is None and meta.layers == (0, 1, 2)
    pixels, text = random_inputs(2, 3, 64, 48, seed=5)
    got = _session(exported / IMAGE_GRAPH.filename).run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    ref = legrad_reference_coca(coca.model, pixels, text, "all")
    for have, want in zip(got, (ref.heatmaps, ref.layer_maps, ref.image_embeds)):
        assert np.abs(have - want.numpy()).max() <= 1e-4
    ids = coca.tokenizer(["a photo of a cat", "", "two dogs, at night!"])
    (text_embeds,) = _session(exported / TEXT_GRAPH.filename).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = coca.model.encode_text(ids, normalize=True).numpy()
    assert np.abs(text_embeds - expected).max() <= 1e-5


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("prompts", [1, 4])
def test_each_image_and_prompt_equals_its_single_result(exported, batch, prompts):
    session = _session(exported / IMAGE_GRAPH.filename)
    pixels, text = random_inputs(batch, prompts, 64, 48, seed=batch * 10 + prompts)
    assert_each_pair_equals_single(session, pixels, text)


def test_a_second_contrastive_pooler_is_refused():
    cfg = {k: v for k, v in COCA_CFG.items() if k != "custom_text"}
    cfg["vision_cfg"] = cfg["vision_cfg"] | {"attentional_pool": "parallel"}
    model = open_clip.CoCa(**cfg)
    with pytest.raises(UnsupportedModelError, match="second, contrastive attentional pooler"):
        wrap_openclip(model, "parallel-coca", tokenizer=object())


COCA_NAMES = [n for n, s in all_models() if s.family == "CoCa"]


@pytest.mark.parametrize("name", COCA_NAMES)
def test_every_coca_model_called_supported_has_a_tower_the_exporter_describes(name):
    """Built on the meta device: the spec matches the built tower (coca_base has no pooler: CLIP rule)."""
    from legrad_export.towers import canonical_state_dict, describe_tower

    cfg = open_clip.get_model_config(name)
    holder = meta_tower(name)
    spec = describe_tower(holder, name)
    pooled = bool(cfg["vision_cfg"].get("attentional_pool"))
    assert spec.head == ("attn_pool" if pooled else "token_mean")
    assert spec.embed_dim == cfg["embed_dim"] and spec.patch_size == cfg["vision_cfg"]["patch_size"]
    if pooled:
        sd = canonical_state_dict(holder, spec)
        q = cfg["embed_dim"]
        assert spec.head_heads == cfg["vision_cfg"]["attn_pooler_heads"]
        assert sd["pool.latent"].shape == (1, q) and sd["pool.k.weight"].shape == (q, spec.width)
        assert sd["head.proj"].shape == (q, cfg["embed_dim"])


def test_the_evaluation_refuses_a_coca_tower_by_name(coca):
    from legrad_export.evaluate import compute_heatmaps
    from legrad_runtime.errors import ExportError

    with pytest.raises(ExportError, match="tiny-coca explains its pooling head's attention"):
        compute_heatmaps(coca, [], 64, (1, 2))
