"""benchmarks/classifier_bench.py's helpers on the tiny torchvision ViT: every method's runner gives the
outputs the report compares, ours equal torchcam's upsampled maps, and a worker process measures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import classifier_bench as cb  # noqa: E402

from tiny_models import build_tiny_torchvision_vit, wrap_tiny_classifier  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    model = cb.randomise_head(build_tiny_torchvision_vit(10, seed=3), seed=0, std=0.5)
    spec = cb.prepare(wrap_tiny_classifier(model), "-2", tmp_path_factory.mktemp("clsbench"))
    assert spec["arch"] == {
        "image_size": 64,
        "patch_size": 16,
        "num_layers": 3,
        "num_heads": 4,
        "hidden_dim": 64,
        "mlp_dim": 128,
        "num_classes": 10,
    }
    assert spec["layers"] == [1, 2]
    return spec | {"batch": 3, "class_ids": cb.class_ids(2, 10), "seed": 0, "repeats": 1, "warmups": 0}


def run(spec: dict, method: str) -> dict[str, np.ndarray]:
    pixels, classes = cb.workload(spec)
    return cb.make_runner(dict(spec, method=method))(pixels, classes)


def test_every_runner_and_the_agreement_report(prepared, torchcam_legrad):
    methods = ["plain", "legrad", "reference", "torchcam", "torchcam_per_class", "torch_plain"]
    outputs = {m: run(prepared, m) for m in methods}
    for m, out in outputs.items():
        assert out["logits"].shape == (3, 10), m
        if m not in ("plain", "torch_plain"):
            assert out["heatmaps"].shape == (3, 2, 64, 64), m
    report = cb.agreement(outputs)
    for key in ("legrad_vs_torchcam_heatmaps", "legrad_vs_reference_heatmaps", "reference_vs_torchcam_maps"):
        assert report[key]["max_abs_diff"] < 1e-5, key
    assert report["torchcam_vs_torchcam_per_class_maps"]["max_abs_diff"] < 1e-6
    assert max(report["logits_max_abs_diff_vs_plain"].values()) < 1e-4
    assert report["legrad_heatmaps_min_per_map_std"] > 0.05  # real maps, not constant ones
    rows = {
        m: {"median_s": 1.0 + i, "images_per_s": 3.0, "rss_mb": {"peak_workload": 100.0}}
        for i, m in enumerate(methods)
    }
    text = cb.table({"rows": rows})
    assert "| **LeGrad ONNX (ours)** | 2.000 | 3.00 | 2.00× | – |" in text
    assert "| torchcam LeGrad (1 forward, a call per class) | 4.000 | 3.00 | 4.00× | 2.00× |" in text


def test_worker_processes_measure_and_save_their_outputs(prepared, tmp_path):
    """In worker processes, like the benchmark (grad-cam's folder, when there, never enters this one)."""
    methods = ["legrad"] + (["gradcam"] if cb.GRADCAM_SITE.is_dir() else [])
    outputs = {}
    for method in methods:
        save = tmp_path / f"{method}.npz"
        row = cb.worker(dict(prepared, method=method, save=str(save), repeats=2))
        assert len(row["seconds"]) == 2 and row["median_s"] > 0 and row["rss_mb"]["peak_workload"] > 0
        with np.load(save) as data:
            outputs[method] = {k: data[k] for k in data.files}
        assert outputs[method]["heatmaps"].shape == (3, 2, 64, 64), method
    if "gradcam" in outputs:
        assert set(row["versions"]) == {"grad-cam"}
        report = cb.agreement(outputs)
        assert np.isfinite(report["legrad_vs_gradcam_heatmaps_(different_method)"]["pearson_mean"])
