"""`legrad-export --dtype fp16` (docs/fp16.md): the fp16 image graph agrees with the fp32 one.

Every comparison here runs on inputs other than the export's own check (2 images, 3 prompts, seed
1234), twice: the fp16 graph as written under onnxruntime's CPU provider with the runtime's session
options, and its twin that rounds every fp16 value as fp16 kernels do (the CPU provider computes
most fp16 nodes in fp32). Each map needs Pearson r >= 0.999; the embeddings (unit vectors) must
agree to 2e-3 per component (fp16 keeps 11 bits: about 5e-4 of relative error per rounding).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from legrad_export.cli import main as export_main
from legrad_export.fp16 import convert_to_fp16, emulate_fp16_compute
from legrad_export.fp16_export import MIN_PEARSON, convert_image_graph, pearson_per_map
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_runtime.errors import VerificationError
from legrad_runtime.metadata import IMAGE_GRAPH, TEXT_GRAPH, read_metadata, verify_files
from legrad_runtime.session import LeGradModel, session_options
from tiny_models import build_tiny_torchvision_vit, random_inputs, save_tiny_model_dir, wrap_tiny_classifier

pytestmark = pytest.mark.torch

EMBED_ATOL = 2e-3


def _outputs(model: str | onnx.ModelProto, feeds: dict, emulate: bool = False) -> dict[str, np.ndarray]:
    """Every output of a graph (a path, or a model to run from memory) on onnxruntime's CPU provider,
    with the runtime's session options, or the fp16-kernel twin (optimisations off, so the rounding
    casts stay)."""
    options = session_options()
    if emulate:
        model = emulate_fp16_compute(onnx.load(model) if isinstance(model, str) else model)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _assert_agrees(fp32: dict, fp16: dict, embeds: str) -> None:
    r = pearson_per_map(fp32["heatmaps"], fp16["heatmaps"])  # (B, P): over H×W
    r_layers = pearson_per_map(fp32["layer_maps"], fp16["layer_maps"])  # (B, P, L): over the grid
    diffs = {k: float(np.abs(fp32[k] - fp16[k]).max()) for k in fp32}
    print(f"min r {r.min():.7f}, mean r {r.mean():.7f}, layer maps min r {r_layers.min():.7f}, {diffs}")
    assert all(np.isfinite(v).all() for v in fp16.values())
    assert r.min() >= MIN_PEARSON, (r, diffs)
    assert r_layers.min() >= MIN_PEARSON, (r_layers, diffs)
    assert diffs[embeds] <= EMBED_ATOL, diffs
    assert np.all(fp16["heatmaps"] >= 0) and np.all(fp16["heatmaps"] <= 1)


def _assert_weights_are_fp16(fp32_path, fp16_path, max_size_ratio: float) -> None:
    """Nearly every float weight is stored in fp16, the file shrinks accordingly, IO stays float32."""
    model = onnx.load(str(fp16_path))
    counts = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for t in model.graph.initializer:
        if t.data_type in counts:
            counts[t.data_type] += int(np.prod(t.dims))
    share = counts[onnx.TensorProto.FLOAT16] / sum(counts.values())
    ratio = fp16_path.stat().st_size / fp32_path.stat().st_size
    print(f"fp16 share of float weights {share:.4f}, file size ratio {ratio:.3f}")
    assert share >= 0.95, share
    assert ratio <= max_size_ratio, ratio
    session = ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"])
    spec = {t.name: t.dtype for t in (*IMAGE_GRAPH.inputs, *IMAGE_GRAPH.outputs)} | {
        "class_ids": "int64",
        "logits": "float32",
    }
    types = {"float32": "tensor(float)", "int64": "tensor(int64)"}
    for value in (*session.get_inputs(), *session.get_outputs()):
        assert value.type == types[spec[value.name]], (value.name, value.type)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """(fp32 folder, fp16 folder) of the tiny LayerScale CLIP, side by side; fp16 through the CLI."""
    root = tmp_path_factory.mktemp("fp16")
    source = save_tiny_model_dir(root / "source", "layerscale")
    out = root / "models"
    assert export_main(["--model", f"local-dir:{source}", "--out", str(out), "--dtype", "fp16"]) == 0
    fp32 = export_model(load_openclip(f"local-dir:{source}", "none"), out, ExportSettings(verify=False))
    return fp32, fp32.with_name(fp32.name + "__fp16")


def test_the_fp16_folder_sits_beside_the_fp32_one_and_records_its_agreement(clip_folders):
    fp32, fp16 = clip_folders
    assert sorted(p.name for p in fp32.parent.iterdir()) == sorted([fp32.name, fp16.name])
    meta = read_metadata(fp16)
    verify_files(fp16, meta)
    assert meta.extra["dtype"] == "fp16" and meta.extra["fp16_graphs"] == [IMAGE_GRAPH.filename]
    record = meta.extra["fp16_agreement"]
    assert record["kept_fp32"] == ["maps_tail"]  # the cheapest candidate passes for a CLIP ViT
    assert min(record["min_pearson"], record["layer_maps_min_pearson"]) >= 0.9999
    assert set(record["runs"]) == {"onnxruntime_cpu", "fp16_emulated"}
    assert max(meta.extra["verification_max_abs_diff"].values()) <= 1e-4  # the fp32 graph was verified
    assert "dtype" not in read_metadata(fp32).extra
    text = onnx.load(str(fp16 / TEXT_GRAPH.filename))  # the text graph stays fp32 (docs/fp16.md)
    assert {t.data_type for t in text.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}


@pytest.mark.parametrize("emulate", [False, True], ids=["onnxruntime_cpu", "fp16_kernels"])
def test_every_fp16_map_agrees_with_the_fp32_graph_on_new_inputs(clip_folders, emulate):
    fp32, fp16 = clip_folders
    pixels, text = random_inputs(3, 5, 64, 32, seed=2024)
    feeds = {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    expected = _outputs(str(fp32 / IMAGE_GRAPH.filename), feeds)
    _assert_agrees(expected, _outputs(str(fp16 / IMAGE_GRAPH.filename), feeds, emulate), "image_embeds")


def test_the_weights_are_fp16_and_the_io_float32(clip_folders):
    fp32, fp16 = clip_folders
    _assert_weights_are_fp16(fp32 / IMAGE_GRAPH.filename, fp16 / IMAGE_GRAPH.filename, 0.75)


def test_the_runtime_explains_with_an_fp16_folder_as_with_the_fp32_one(clip_folders):
    fp32, fp16 = clip_folders
    image = (np.random.default_rng(5).random((90, 120, 3)) * 255).astype(np.uint8)
    prompts = ["a red circle", "a photo of a dog", "two cats"]
    want = LeGradModel(fp32, device="cpu").explain([image], prompts)
    got = LeGradModel(fp16, device="cpu").explain([image], prompts)
    assert pearson_per_map(want.heatmaps, got.heatmaps).min() >= MIN_PEARSON
    np.testing.assert_allclose(got.text_embeds, want.text_embeds, atol=0)  # the same fp32 text graph


def test_a_disagreeing_fp16_graph_is_one_verification_error(clip_folders, tmp_path, monkeypatch):
    fp32, _ = clip_folders
    folder = shutil.copytree(fp32, tmp_path / "copy")
    pixels, text = random_inputs(2, 3, 64, 32, seed=3)
    monkeypatch.setattr("legrad_export.fp16_export.MIN_PEARSON", 1.0 + 1e-9)  # nothing can pass
    monkeypatch.setattr("legrad_export.fp16_export.MARGIN_PEARSON", 1.0 + 1e-9)
    with pytest.raises(VerificationError) as info:
        convert_image_graph(folder, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})
    message = str(info.value)
    assert "\n" not in message and message.count("worst r") == 2  # both candidates, one line
    assert "max abs diff heatmaps" in message and "--dtype fp32" in message


def test_an_unknown_dtype_is_refused():
    with pytest.raises(SystemExit) as info:
        export_main(["--model", "ViT-B-16", "--dtype", "fp8"])
    assert info.value.code == 2


def test_a_classifier_exports_in_fp16(tmp_path):
    loaded = wrap_tiny_classifier(build_tiny_torchvision_vit(12))
    fp16 = export_model(loaded, tmp_path, ExportSettings(dtype="fp16"))
    fp32 = export_model(loaded, tmp_path, ExportSettings(verify=False))
    assert fp16.name == fp32.name + "__fp16"
    assert sorted(p.name for p in fp16.iterdir()) == ["legrad.json", "legrad_image.onnx"]
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    feeds = {"pixel_values": pixels.numpy(), "class_ids": np.array([3, 0, 11, 7], dtype=np.int64)}
    path32, path16 = str(fp32 / IMAGE_GRAPH.filename), str(fp16 / IMAGE_GRAPH.filename)
    expected = _outputs(path32, feeds)
    for emulate in (False, True):
        got = _outputs(path16, feeds, emulate)
        assert pearson_per_map(expected["heatmaps"], got["heatmaps"]).min() >= MIN_PEARSON
        assert pearson_per_map(expected["layer_maps"], got["layer_maps"]).min() >= MIN_PEARSON
        scale = np.abs(expected["logits"]).max()
        assert np.abs(expected["logits"] - got["logits"]).max() <= EMBED_ATOL * scale
    _assert_weights_are_fp16(fp32 / IMAGE_GRAPH.filename, fp16 / IMAGE_GRAPH.filename, 0.75)
    # why the maps' tail stays fp32: torchcam's normalisation divides by 1e-8, which overflows fp16
    everything = convert_to_fp16(onnx.load(path32), fp32_tail=False)
    assert not np.isfinite(_outputs(everything, feeds, emulate=True)["heatmaps"]).all()


@pytest.mark.slow
def test_vit_b16_exports_in_fp16_and_agrees_with_fp32(tmp_path):
    loaded = load_openclip("ViT-B-16", "none")
    fp16 = export_model(loaded, tmp_path, ExportSettings(dtype="fp16"))
    fp32 = export_model(loaded, tmp_path, ExportSettings(verify=False))
    record = read_metadata(fp16).extra["fp16_agreement"]
    assert record["kept_fp32"] == ["maps_tail"] and record["min_pearson"] >= 0.9999
    pixels, text = random_inputs(2, 4, 224, 512, seed=2024)
    feeds = {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    expected = _outputs(str(fp32 / IMAGE_GRAPH.filename), feeds)
    for emulate in (False, True):
        _assert_agrees(expected, _outputs(str(fp16 / IMAGE_GRAPH.filename), feeds, emulate), "image_embeds")
    _assert_weights_are_fp16(fp32 / IMAGE_GRAPH.filename, fp16 / IMAGE_GRAPH.filename, 0.51)
