"""`prompts="batch"`: the image graph takes every prompt of a call at once, with no loop in it.

Its maps must equal the prompt loop's and the autograd reference's, for each block kind that has a
backward of its own (CLIP, a classifier, EVA02's SwiGLU); the exported graph must hold no Scan, and
the runtime must split prompts across calls for it (its memory grows with P).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from legrad_export.fp16 import emulate_fp16_compute, loop_nodes
from legrad_export.fp16_export import MIN_PEARSON, pearson_per_map
from legrad_export.graphs import build_image_graph
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference import legrad_reference
from legrad_runtime import load
from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import IMAGE_GRAPH, read_metadata
from legrad_runtime.session import session_options
from tiny_models import (
    build_tiny_torchvision_vit,
    random_inputs,
    save_tiny_eva_model,
    save_tiny_timm_token_model,
    wrap_tiny_classifier,
)

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def clip(tiny_dirs):
    return load_openclip(str(tiny_dirs["layerscale"]))


@pytest.fixture(scope="module")
def folder(clip, tmp_path_factory):
    settings = ExportSettings(layers=(1, 2), verify=True, prompts="batch")
    return export_model(clip, tmp_path_factory.mktemp("batch"), settings)


def _both_modes(loaded, size: int, layers: tuple[int, ...], text: torch.Tensor, pixels: torch.Tensor):
    outs = []
    for mode in ("loop", "batch"):
        graph = build_image_graph(loaded, size, layers, prompts=mode)
        with torch.no_grad():
            outs.append(graph(pixels, text))
    return outs


def test_batched_prompts_equal_the_loop_for_clip_eva_and_a_classifier(clip, tmp_path):
    pixels, text = random_inputs(3, 5, 64, 32, seed=5)
    cases = [(clip, 64, (1, 2), text)]
    eva = load_openclip(str(save_tiny_eva_model(tmp_path, "eva02")))
    eva_size = eva.preprocess["size"]
    cases.append((eva, eva_size, (0, 1), random_inputs(3, 5, eva_size, 48, seed=6)[1]))
    classifier = wrap_tiny_classifier(build_tiny_torchvision_vit(num_classes=20))
    cases.append((classifier, 64, (1, 2), torch.tensor([3, 0, 19, 3, 7])))
    for loaded, size, layers, targets in cases:
        images = pixels if size == 64 else random_inputs(3, 1, size, 48, seed=7)[0]
        loop, batch = _both_modes(loaded, size, layers, targets, images)
        for a, b in zip(loop, batch):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-6, loaded.model_name


def test_the_batched_graph_has_no_scan_and_matches_the_reference_for_many_prompts(clip, folder):
    nodes = onnx.load(str(folder / IMAGE_GRAPH.filename), load_external_data=False).graph.node
    assert "Scan" not in {n.op_type for n in nodes}
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    for batch, prompts in ((1, 1), (2, 13)):  # neither is the trace's (2, 2)
        pixels, text = random_inputs(batch, prompts, 64, 32, seed=batch + prompts)
        heat, maps, _ = session.run(None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})
        ref = legrad_reference(clip.model, pixels, text, (1, 2))
        assert maps.shape == (batch, prompts, 2, 4, 4)
        assert np.abs(maps - ref.layer_maps.numpy()).max() <= 1e-5
        assert np.abs(heat - ref.heatmaps.numpy()).max() <= 1e-4


@pytest.mark.parametrize("family", ["eva02", "vitamin"])  # backward stages of their own (SwiGLU, GeGLU)
def test_batched_graphs_of_other_blocks_keep_both_axes_dynamic_and_equal_the_loop(family, tmp_path):
    save = {"eva02": save_tiny_eva_model, "vitamin": save_tiny_timm_token_model}[family]
    loaded = load_openclip(str(save(tmp_path / "source", family)))
    size, layers = loaded.preprocess["size"], (0, 1)
    folder = export_model(loaded, tmp_path, ExportSettings(layers=layers, verify=True, prompts="batch"))
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    loop = build_image_graph(loaded, size, layers, prompts="loop")
    for batch, prompts in ((1, 1), (3, 5)):
        pixels, text = random_inputs(batch, prompts, size, loaded.vit.embed_dim, seed=prompts)
        with torch.no_grad():
            want = loop(pixels, text)
        got = session.run(None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})
        assert np.abs(got[1] - want[1].numpy()).max() <= 1e-5
        assert np.abs(got[0] - want[0].numpy()).max() <= 1e-4


def test_the_runtime_splits_prompts_for_a_batched_graph_and_gets_the_same_maps(folder):
    model = load(folder, device="cpu")
    assert not model.prompts_in_graph_loop
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    text = rng.standard_normal((12, 32)).astype(np.float32)
    whole = model.explain(images, text_embeds=text, memory_budget=2**40)
    budget = 2**19
    per_call = model.chunk_sizes(12, None, budget)
    assert per_call[1] < 12  # the prompts do not fit in one call at this budget
    split = model.explain(images, text_embeds=text, memory_budget=budget)
    assert np.abs(split.heatmaps - whole.heatmaps).max() <= 1e-6
    assert np.abs(split.layer_maps - whole.layer_maps).max() <= 1e-6


def _maps(path, feeds: dict, emulate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    options, model = session_options(), str(path)
    if emulate:  # every fp16 value rounded as fp16 kernels do (docs/fp16.md)
        model = emulate_fp16_compute(onnx.load(model)).SerializeToString()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    heat, layer_maps, _ = session.run(None, feeds)
    return heat, layer_maps


def test_a_batched_graph_converts_to_fp16_with_its_per_prompt_nodes_kept_fp32_when_needed(clip, tmp_path):
    """CLIP passes with the cheapest candidate; EVA02 needs its per-prompt backward in fp32, which in
    a batched graph is every node downstream of the prompts (there is no loop body to keep)."""
    eva = load_openclip(str(save_tiny_eva_model(tmp_path / "source", "eva02")))
    cases = (
        ("clip", clip, 32, (1, 2), ["maps_tail"]),
        ("eva02", eva, 48, (0, 1), ["maps_tail", "prompt_loop"]),
    )
    for name, loaded, embed_dim, layers, kept in cases:
        settings = ExportSettings(layers=layers, verify=False, prompts="batch")
        fp32 = export_model(loaded, tmp_path / name, settings)
        fp16 = export_model(loaded, tmp_path / name, replace(settings, dtype="fp16"))
        assert len(loop_nodes(onnx.load(str(fp32 / IMAGE_GRAPH.filename)).graph)) > 20
        assert read_metadata(fp16).extra["fp16_agreement"]["kept_fp32"] == kept, name
        size = loaded.preprocess["size"]
        pixels, text = random_inputs(3, 4, size, embed_dim, seed=2025)
        feeds = {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
        want = _maps(fp32 / IMAGE_GRAPH.filename, feeds)
        for emulate in (False, True):
            got = _maps(fp16 / IMAGE_GRAPH.filename, feeds, emulate)
            assert pearson_per_map(want[0], got[0]).min() >= MIN_PEARSON, (name, emulate)
            assert pearson_per_map(want[1], got[1]).min() >= MIN_PEARSON, (name, emulate)


def test_an_unknown_prompts_mode_is_refused(clip, tmp_path):
    with pytest.raises(ExportError, match="prompts mode 'all'.*'loop', 'batch'"):
        export_model(clip, tmp_path, ExportSettings(prompts="all", verify=False))
    with pytest.raises(ValueError, match="prompts must be one of"):
        build_image_graph(clip, 64, (1,), prompts="all")


def test_a_graph_whose_dynamic_axes_were_fixed_by_the_trace_is_refused():
    """torch.onnx quietly falls back to fixed shapes when torch.export cannot keep an axis dynamic."""
    from legrad_export.onnx_export import _check_dynamic

    def proto(prompts: int | str) -> onnx.ModelProto:
        inputs = [
            onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, ["batch", 3, 64, 64]),
            onnx.helper.make_tensor_value_info("text_embeds", onnx.TensorProto.FLOAT, [prompts, 32]),
        ]
        return onnx.helper.make_model(onnx.helper.make_graph([], "g", inputs, []))

    _check_dynamic(proto("prompts"), IMAGE_GRAPH)
    with pytest.raises(ExportError, match=r"fixed text_embeds\[0\] \(prompts\) to the example's size"):
        _check_dynamic(proto(2), IMAGE_GRAPH)


def test_the_cli_exports_a_batched_graph_and_refuses_an_unknown_mode(tiny_dirs, tmp_path, capsys):
    from legrad_export.cli import main as export_main

    source = f"local-dir:{tiny_dirs['layerscale']}"
    assert export_main(["--model", source, "--out", str(tmp_path), "--prompts", "batch", "--no-verify"]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    nodes = onnx.load(str(folder / IMAGE_GRAPH.filename), load_external_data=False).graph.node
    assert "Scan" not in {n.op_type for n in nodes}
    assert read_metadata(folder).extra["prompt_loop"] is False
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", source, "--out", str(tmp_path), "--prompts", "all"])
    assert exit_info.value.code == 2 and "invalid choice: 'all'" in capsys.readouterr().err
