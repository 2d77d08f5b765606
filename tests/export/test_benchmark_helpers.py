"""The benchmark's helpers: map agreement against numpy, the plain-forward cut, slope fitting."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from variants import extract_plain_forward, map_agreement, quantize_int8  # noqa: E402


def test_map_agreement_pearson_equals_numpy_corrcoef_map_by_map():
    rng = np.random.default_rng(0)
    a = rng.random((3, 2, 7, 5)).astype(np.float32)
    b = (0.5 * a + 0.5 * rng.random(a.shape)).astype(np.float32)
    b[1, 0] = 1 - a[1, 0]  # one anti-correlated map: the minimum must be -1
    got = map_agreement(a, b)
    want = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a.reshape(6, 35), b.reshape(6, 35))]
    assert got["pearson_min"] == pytest.approx(min(want), abs=1e-9) == pytest.approx(-1.0, abs=1e-6)
    assert got["pearson_mean"] == pytest.approx(np.mean(want), abs=1e-9)
    assert got["max_abs_diff"] == pytest.approx(float(np.abs(a.astype(np.float64) - b).max()))
    assert got["maps"] == 6


def test_map_agreement_of_equal_constant_maps_is_one_and_shapes_must_match():
    z = np.zeros((1, 1, 4, 4), np.float32)
    assert map_agreement(z, z)["pearson_min"] == 1.0
    assert np.isnan(map_agreement(z, z + np.eye(4, dtype=np.float32))["pearson_min"])  # as corrcoef
    with pytest.raises(ValueError, match="shape"):
        map_agreement(z, np.zeros((1, 2, 4, 4), np.float32))


def test_plain_forward_cut_from_the_graph_and_int8_graph_agree_with_the_fp32_graph(model_folder, tmp_path):
    import onnxruntime as ort

    graph = model_folder / "legrad_image.onnx"
    plain = extract_plain_forward(graph, tmp_path / "plain.onnx")
    int8 = quantize_int8(graph, tmp_path / "int8.onnx")
    cpu = ["CPUExecutionProvider"]
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, 3, 64, 64), dtype=np.float32)
    text = rng.standard_normal((3, 32), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    full = ort.InferenceSession(str(graph), providers=cpu).run(
        None, {"pixel_values": pixels, "text_embeds": text}
    )
    plain_session = ort.InferenceSession(str(plain), providers=cpu)
    assert [i.name for i in plain_session.get_inputs()] == ["pixel_values"]
    (embeds,) = plain_session.run(None, {"pixel_values": pixels})
    assert np.array_equal(embeds, full[2])
    quant = ort.InferenceSession(str(int8), providers=cpu).run(
        None, {"pixel_values": pixels, "text_embeds": text}
    )
    agree = map_agreement(full[0], quant[0])
    assert agree["pearson_min"] > 0.95 and agree["maps"] == 6
    assert not np.array_equal(full[1], quant[1])  # the weights really were quantised


def _report(steal: dict[str, float | None]) -> dict:
    row = {"median_s": 1.0, "images_per_s": 8.0, "latency_b1_ms": None, "rss_mb": {"peak_workload": 100.0}}
    return {
        "rows": {name: row | {"steal_fraction": f} for name, f in steal.items()},
        "settings": {
            "model_name": "m", "image_size": 64, "layers": [1], "batch": 8, "prompts": 1,
            "device": "cpu", "ort_options": "tuned", "repeats": 1,
        },
        "machine": {
            "cpu": "x", "nproc": 2, "memory_gb": 1, "platform": "p", "loadavg_1min_before_after": [0, 0],
        },
        "versions": {},
    }  # fmt: skip


def test_the_report_warns_when_the_hypervisor_stole_cpu_time_from_a_row(capsys):
    from bench import print_report, steal_fraction

    print_report(_report({"quiet row": 0.01, "stolen row": 0.37, "unknown row": None}))
    out = capsys.readouterr().out
    assert "WARNING" in out and "stolen row (37%)" in out
    assert "quiet row (" not in out and "unknown row (" not in out
    print_report(_report({"quiet row": 0.01}))
    assert "WARNING" not in capsys.readouterr().out
    assert steal_fraction(None, 1.0) is None
