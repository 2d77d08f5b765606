"""The README's main job, offline: export the shipped model, explain a sample scene, run the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legrad_export.cli import main as export_main
from legrad_runtime.cli import main as legrad_main
from legrad_runtime.evaluation import load_cases, pointing_hit

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
SCENE = "assets/sample/images/00005.png"  # three objects, each of a colour of its own
PROMPTS = ["a red square", "a blue cross"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models")
    assert export_main(["--model", str(ROOT / "assets" / "shapes-clip"), "--out", str(out)]) == 0
    folder = out / "shapes-clip__open_clip_model__64"
    assert folder.is_dir()
    return folder


def test_the_readme_cli_line_explains_a_sample_scene(shipped, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's relative paths; outputs go to tmp_path
    argv = ["explain", str(shipped), SCENE, "--style", "contour", "--layers-figure", "--save-npy"]
    argv += [a for p in PROMPTS for a in ("-p", p)] + ["--out", str(tmp_path / "out")]
    assert legrad_main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "00005"
    for prompt in PROMPTS:
        for suffix in ("", "__layers"):
            assert (out / f"{prompt.replace(' ', '-')}{suffix}.png").is_file()
    with Image.open(out / "a-red-square.png") as overlay:
        assert overlay.size == (256, 256)

    # objects with a colour of their own are found: each heatmap peaks inside its object's mask
    heatmaps = np.load(out / "heatmaps.npy")  # (P, H, W) on the original image
    for case in (c for c in load_cases(ROOT / "assets" / "sample") if c.image.name == "00005.png"):
        if case.prompt in PROMPTS:
            with Image.open(case.mask) as m:
                assert pointing_hit(heatmaps[PROMPTS.index(case.prompt)], np.asarray(m) > 0) == 1.0


def test_the_demo_counts_the_hits_legrad_evaluate_counts(shipped, tmp_path):
    """The demo's "N of M" against the pointing game of `legrad_runtime.evaluation`, case by case."""
    demo = [sys.executable, str(ROOT / "examples" / "demo.py"), str(shipped), str(ROOT / "assets" / "sample")]
    done = subprocess.run([*demo, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    from legrad_runtime import load

    model, hits, cases = load(shipped), 0, load_cases(ROOT / "assets" / "sample")
    for case in cases:
        result = model.explain([str(case.image)], [case.prompt])
        with Image.open(case.mask) as m:
            hits += pointing_hit(result.heatmap_on_original(0, 0), np.asarray(m) > 0) > 0.5
    assert f"{hits} of {len(cases)} prompts peak on the object they name" in done.stdout
    assert (tmp_path / "demo.png").is_file()
