"""`legrad-export --dtype fp16`: the verified fp32 image graph replaced by an fp16 one that agrees with it.

Two conversions are tried, cheapest first (docs/fp16.md has the measurements behind them):

    maps_tail               everything fp16 but the maps' tail (layer sum, resize, min-max)
    maps_tail, prompt_loop  the per-prompt LeGrad backward fp32 too (EVA02 needs it)

Each candidate runs on the verification's inputs twice, against the fp32 graph: as written, under
onnxruntime's CPU provider with the runtime's own session options (it loads and runs), and with
every fp16 value rounded as fp16 kernels would (`emulate_fp16_compute`: the CPU provider computes
most fp16 nodes in fp32, which hides the activations' rounding a GPU shows). The first candidate
whose every map reaches Pearson r ≥ MARGIN_PEARSON in both runs is kept; the last one only needs
MIN_PEARSON, the target. Nothing passing is one VerificationError.

The text graph stays fp32: it runs once per prompt list, and onnxruntime 1.32's CPU provider crashes
(SIGSEGV) opening every converted text graph tried (microsoft/onnxruntime#28392).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from legrad_runtime.errors import ExportError, VerificationError
from legrad_runtime.metadata import IMAGE_GRAPH, Size
from legrad_runtime.session import session_options

from .fp16 import convert_to_fp16, emulate_fp16_compute
from .graphs import example_classifier_inputs, example_image_inputs

__all__ = [
    "DTYPES",
    "FP16_SUFFIX",
    "MIN_PEARSON",
    "MARGIN_PEARSON",
    "CANDIDATES",
    "verification_feeds",
    "convert_image_graph",
    "pearson_per_map",
    "agreement",
]

DTYPES = ("fp32", "fp16")
FP16_SUFFIX = "__fp16"  # an fp16 folder's name: MODEL__PRETRAINED__SIZE__fp16, beside the fp32 one
MIN_PEARSON = 0.999  # every map of the fp16 graph against the fp32 graph's, over its pixels
MARGIN_PEARSON = 0.9999  # a cheaper candidate must be ten times inside the target (1 − r ≤ 1e-4)
CANDIDATES = (("maps_tail",), ("maps_tail", "prompt_loop"))  # what stays fp32, cheapest first
_TWO_GB = 2**31 - 2**24  # protobuf's limit, with room for the graph itself


def verification_feeds(image_size: Size, embed_dim: int, classifier: bool) -> dict[str, np.ndarray]:
    """The verification's inputs (2 images, 3 prompts or classes, seed 1234) as the graph's feeds."""
    if classifier:
        pixels, ids = example_classifier_inputs(image_size, embed_dim, 2, 3, seed=1234)
        return {"pixel_values": pixels.numpy(), "class_ids": ids.numpy()}
    pixels, text = example_image_inputs(image_size, embed_dim, 2, 3, seed=1234)
    return {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}


def convert_image_graph(folder: Path, feeds: Mapping[str, np.ndarray]) -> dict:
    """Replace the folder's fp32 image graph by the first fp16 candidate that agrees with it on
    `feeds`; return the entries for metadata extra: "dtype" ('fp16'), "fp16_graphs" (the files
    converted) and "fp16_agreement" (`agreement` of both runs, and what was kept fp32)."""
    path = folder / IMAGE_GRAPH.filename
    fp32 = onnx.load(str(path))
    expected = _run(path, feeds, session_options())
    tried = []
    for i, kept in enumerate(CANDIDATES):
        _save(convert_to_fp16(fp32, fp32_loop="prompt_loop" in kept), path)
        onnx.checker.check_model(str(path), full_check=True)
        _probe_load(path)
        runs = {
            "onnxruntime_cpu": agreement(expected, _run(path, feeds, session_options())),
            "fp16_emulated": agreement(expected, _emulated_run(path, feeds)),
        }
        record = _combine(runs, kept)
        tried.append(record)
        bar = MIN_PEARSON if i == len(CANDIDATES) - 1 else MARGIN_PEARSON
        if record["finite"] and min(record["min_pearson"], record["layer_maps_min_pearson"]) >= bar:
            return {"dtype": "fp16", "fp16_graphs": [IMAGE_GRAPH.filename], "fp16_agreement": record}
    raise VerificationError(
        "the fp16 image graph disagrees with the fp32 one: "
        + "; ".join(_describe(r) for r in tried)
        + f"; every map needs Pearson r >= {MIN_PEARSON}: export with --dtype fp32"
    )


def _describe(record: dict) -> str:
    diffs = ", ".join(f"{k} {v:.3g}" for k, v in record["max_abs_diff"].items())
    finite = "" if record["finite"] else "non-finite outputs, "
    return (
        f"with {' and '.join(record['kept_fp32'])} fp32: worst r {record['min_pearson']:.6f} (heatmaps), "
        f"{record['layer_maps_min_pearson']:.6f} (layer maps), {finite}max abs diff {diffs}"
    )


def _save(model: onnx.ModelProto, path: Path) -> None:
    side = path.with_name(path.name + ".data")
    side.unlink(missing_ok=True)
    if model.ByteSize() < _TWO_GB:
        onnx.save_model(model, str(path))
    else:  # weights in one side file, as the fp32 export writes them
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=side.name
        )


def _run(path: Path, feeds: Mapping[str, np.ndarray], options: ort.SessionOptions) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def _emulated_run(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph at `path` run with every fp16 value rounded as fp16 kernels would (optimisations
    off: onnxruntime would fold the rounding casts away)."""
    twin = path.with_name(".fp16-emulated.onnx")
    try:
        _save(emulate_fp16_compute(onnx.load(str(path))), twin)
        options = session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return _run(twin, feeds, options)
    finally:
        twin.unlink(missing_ok=True)
        twin.with_name(twin.name + ".data").unlink(missing_ok=True)


_PROBE = (
    "import sys, onnxruntime as ort; from legrad_runtime.session import session_options; "
    "ort.InferenceSession(sys.argv[1], session_options(1), providers=['CPUExecutionProvider'])"
)


def _probe_load(path: Path) -> None:
    """Open the graph in a child process first: onnxruntime releases have crashed (SIGSEGV) while
    optimising fp16 graphs on x86-64 (microsoft/onnxruntime#28392), which would take the export down
    with it and leave its temporary folder behind."""
    result = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True)
    if result.returncode:
        how = f"crashed (signal {-result.returncode})" if result.returncode < 0 else "failed"
        last = (result.stderr.strip().splitlines() or [""])[-1]
        raise ExportError(
            f"onnxruntime {ort.__version__} {how} opening the fp16 image graph on the CPU"
            f"{': ' + last if last else ''}; export with --dtype fp32"
        )


def pearson_per_map(a: np.ndarray, b: np.ndarray, axes: int = 2) -> np.ndarray:
    """Pearson r of each map over its last `axes` axes (float64): 1 where both maps are constant,
    0 where only one is."""
    lead = a.shape[: a.ndim - axes]
    x = a.reshape(*lead, -1).astype(np.float64)
    y = b.reshape(*lead, -1).astype(np.float64)
    x -= x.mean(-1, keepdims=True)
    y -= y.mean(-1, keepdims=True)
    sxx, syy = (x * x).sum(-1), (y * y).sum(-1)
    den = np.sqrt(sxx * syy)
    r = (x * y).sum(-1) / np.where(den > 0, den, 1.0)
    return np.where(den > 0, r, np.where((sxx == 0) & (syy == 0), 1.0, 0.0))


def agreement(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict:
    """Per-map Pearson r of heatmaps (each image and prompt, over H×W) and of layer maps (each
    image, prompt and layer, over the grid): min and mean; max abs difference of every output."""
    r = pearson_per_map(expected["heatmaps"], got["heatmaps"])
    r_layers = pearson_per_map(expected["layer_maps"], got["layer_maps"])
    return {
        "min_pearson": float(r.min()),
        "mean_pearson": float(r.mean()),
        "layer_maps_min_pearson": float(r_layers.min()),
        "max_abs_diff": {k: float(np.abs(expected[k] - got[k]).max()) for k in expected},
        "finite": bool(all(np.isfinite(v).all() for v in got.values())),
    }


def _combine(runs: dict[str, dict], kept: tuple[str, ...]) -> dict:
    """The worst of the runs, each run's own numbers, and what stayed fp32."""
    first = next(iter(runs.values()))
    return {
        "min_pearson": min(r["min_pearson"] for r in runs.values()),
        "mean_pearson": min(r["mean_pearson"] for r in runs.values()),
        "layer_maps_min_pearson": min(r["layer_maps_min_pearson"] for r in runs.values()),
        "max_abs_diff": {k: max(r["max_abs_diff"][k] for r in runs.values()) for k in first["max_abs_diff"]},
        "finite": all(r["finite"] for r in runs.values()),
        "kept_fp32": list(kept),
        "runs": runs,
        "onnxruntime": ort.__version__,
    }
