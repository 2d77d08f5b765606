"""Graph variants the benchmark compares against the LeGrad graph, and how their maps agree.

- `extract_plain_forward`: the image-embedding forward cut out of the LeGrad graph itself
  (pixel_values → image_embeds), so the baseline has the very same weights and forward ops.
- `quantize_int8`: onnxruntime's dynamic int8 quantisation (weights int8, activations quantised
  per call) of every MatMul whose second input is a weight.
- `map_agreement`: per-map Pearson correlation and max abs difference of two sets of heatmaps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

__all__ = ["extract_plain_forward", "quantize_int8", "map_agreement"]


def extract_plain_forward(legrad_graph: Path, out: Path) -> Path:
    """Write the subgraph pixel_values → image_embeds of an exported LeGrad image graph to `out`."""
    onnx.utils.extract_model(str(legrad_graph), str(out), ["pixel_values"], ["image_embeds"])
    return out


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation (QInt8 weights) of the MatMuls with a constant weight."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it suggests pre-processing, which changes nothing here
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
    return dst


def map_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement of two heatmap stacks (..., H, W), map by map.

    Pearson r of each pair of maps over their pixels (a constant map has r = 1 with an equal
    constant map and NaN otherwise, as numpy's corrcoef would give), then the minimum and mean
    over maps, and the max abs difference over everything.
    """
    if a.shape != b.shape:
        raise ValueError(f"map stacks differ in shape: {a.shape} vs {b.shape}")
    x = a.reshape(-1, a.shape[-2] * a.shape[-1]).astype(np.float64)
    y = b.reshape(-1, b.shape[-2] * b.shape[-1]).astype(np.float64)
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(1) / denom
    same = (denom == 0) & np.all(x == y, axis=1)
    r = np.where(same, 1.0, r)
    return {
        "pearson_min": float(np.min(r)),
        "pearson_mean": float(np.mean(r)),
        "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()),
        "maps": int(r.size),
    }
