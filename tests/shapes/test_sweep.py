"""`python -m legrad_shapes.sweep`: runs the training command per run and scores each model folder."""

from __future__ import annotations

import json

import pytest

from legrad_export.evaluate import LEGRAD, evaluate_cases
from legrad_export.layers import resolve_layers
from legrad_export.load import load_openclip
from legrad_runtime.evaluation import ALL, load_cases
from legrad_shapes.cases import write_scene_cases
from legrad_shapes.sweep import main

pytestmark = pytest.mark.torch

TINY = dict(
    vision_width=64, vision_layers=2, head_width=64, text_width=64, text_layers=1, embed_dim=32,
    batch_size=8, steps=2, warmup=1, pool=16, threads=1, layers="all",
)  # fmt: skip


def test_a_sweep_trains_each_run_and_scores_it_as_legrad_evaluate_does(tmp_path, capsys):
    write_scene_cases(tmp_path / "cases", seed=7, count=3, n_objects=(2, 3))
    runs = {"plain": TINY, "dropout": TINY | {"patch_dropout": 0.5, "fused_adamw": True}}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    argv = [str(tmp_path / "runs.json"), str(tmp_path / "out"), "--cases", str(tmp_path / "cases")]
    assert main(argv + ["--device", "cpu", "--parallel", "2", "--layers", "-1", "all"]) == 0

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == set(runs)
    for name, fields in runs.items():
        folder = tmp_path / "out" / name
        summary = json.loads((folder / "training.json").read_text())
        assert {k: summary["config"][k] for k in fields} == fields
        assert results[name]["zero_shot"] == summary["val_zero_shot"]["accuracy"]
        loaded = load_openclip(str(folder))
        cases = load_cases(tmp_path / "cases")
        for spec in ("-1", "all"):
            direct = evaluate_cases(loaded, cases, 64, resolve_layers(spec, 2)).row(LEGRAD, ALL)
            assert results[name][f"{spec}|all|legrad"] == pytest.approx([direct.pointing, direct.miou])
    table = capsys.readouterr().out
    assert "plain" in table and "dropout" in table and "pt all" in table


def test_a_bad_run_is_refused_before_anything_trains(tmp_path, capsys):
    (tmp_path / "runs.json").write_text(json.dumps({"ok": TINY, "bad": TINY | {"patch_dropout": 1.5}}))
    argv = [str(tmp_path / "runs.json"), str(tmp_path / "out"), "--cases", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    assert "patch_dropout 1.5 must lie in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "ok").exists()
