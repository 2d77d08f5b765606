"""The prompt loop and the folded backward: one prompt at a time gives the all-prompts answer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from legrad_export.graphs import build_image_graph
from legrad_export.legrad import BackwardWeights
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference import legrad_reference
from legrad_runtime import load
from legrad_runtime.metadata import IMAGE_GRAPH
from tiny_models import random_inputs

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    loaded = load_openclip(str(tiny_dirs["layerscale"]))
    return loaded.model, loaded


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    return export_model(
        tiny[1], tmp_path_factory.mktemp("chunking"), ExportSettings(layers=(1, 2), verify=False)
    )


def test_each_prompt_alone_gives_its_row_of_the_all_prompts_maps(tiny):
    _, loaded = tiny
    graph = build_image_graph(loaded, 64, (1, 2))
    pixels, text = random_inputs(3, 5, 64, 32, seed=7)
    with torch.no_grad():
        heat, maps, embeds = graph(pixels, text)
        for p in range(5):
            h1, m1, e1 = graph(pixels, text[p : p + 1])
            assert torch.allclose(m1[:, 0], maps[:, p], atol=1e-6, rtol=0)
            assert torch.allclose(h1[:, 0], heat[:, p], atol=1e-6, rtol=0)
            assert torch.equal(e1, embeds)


def test_folded_weights_equal_the_unfolded_backward_of_a_random_gradient(tiny):
    """K and the LN_2 correction reproduce (γ1 ⊙ (g_z + LN2_backward(g_pre @ W_fc))) @ W_o."""
    _, loaded = tiny
    graph = build_image_graph(loaded, 64, (2,))
    block, weights = graph.vit.blocks[2], graph.backward_weights[0]
    assert isinstance(weights, BackwardWeights)
    gen = torch.Generator().manual_seed(3)
    x_mid = torch.randn(2, 17, 64, generator=gen)
    g_pre = torch.randn(2, 17, 128, generator=gen)
    g_z = torch.randn(2, 1, 64, generator=gen)
    x_hat, rstd = block.ln_2.normalize(x_mid)
    unfolded = (block.gamma_1 * (g_z + block.ln_2.backward(g_pre @ block.fc_weight, x_hat, rstd))) @ (
        block.out_proj_weight
    )
    pre = torch.nn.functional.linear(block.ln_2(x_mid), block.fc_weight, block.fc_bias)
    c = (g_pre * (pre - weights.pre_offset)).sum(-1, keepdim=True) / 64
    folded = g_z @ weights.wo_g1 + rstd * (g_pre @ weights.k - c * (x_hat @ weights.wo_g1))
    assert (folded - unfolded).abs().max() <= 1e-5 * unfolded.abs().max()


def test_onnx_graph_runs_prompts_in_a_scan_and_matches_the_reference_for_many_prompts(tiny, folder):
    model, _ = tiny
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    pixels, text = random_inputs(2, 40, 64, 32, seed=11)  # more prompts than the trace's 2
    heat, maps, _ = session.run(None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})
    ref = legrad_reference(model, pixels, text, (1, 2))
    assert np.abs(maps - ref.layer_maps.numpy()).max() <= 1e-5
    assert np.abs(heat - ref.heatmaps.numpy()).max() <= 1e-4
    assert load(folder, device="cpu").prompts_in_graph_loop
    nodes = onnx.load(str(folder / IMAGE_GRAPH.filename), load_external_data=False).graph.node
    assert [n.op_type for n in nodes].count("Scan") == 1


def test_chunked_runtime_calls_equal_one_call_and_prompts_are_split_only_when_needed(folder):
    model = load(folder, device="cpu")
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
    text = rng.standard_normal((30, 32)).astype(np.float32)
    whole = model.explain(images, text_embeds=text, memory_budget=2**40)
    assert model.chunk_sizes(30, None, 2**40) == (32, 30)  # at most 32 images per call
    seen = set()
    for budget in (2 * 2**20, 2**19, 1):
        sizes = model.chunk_sizes(30, None, budget)
        seen.add(sizes)
        batches = list(model.explain_batches(images, text_embeds=text, memory_budget=budget))
        assert all(len(b.heatmaps) <= sizes[0] for b in batches)
        heat = np.concatenate([b.heatmaps for b in batches])
        layer_maps = np.concatenate([b.layer_maps for b in batches])
        assert np.abs(heat - whole.heatmaps).max() <= 1e-6
        assert np.abs(layer_maps - whole.layer_maps).max() <= 1e-6
    assert len(seen) == 3 and (1, 1) in seen  # three different splits, down to one pair per call

    # with the prompt loop, memory hardly grows with P: a budget that fits one image keeps every prompt
    assert model.chunk_sizes(1000, 1, 64 * 2**20) == (1, 1000)
    # an older export (no prompt loop) holds every prompt's backward at once: it must split them
    model.metadata = replace(model.metadata, extra={})
    assert not model.prompts_in_graph_loop
    assert model.chunk_sizes(1000, 1, 64 * 2**20)[1] < 1000
