"""The README's main job, offline: export the shipped model, explain the shipped sample scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legrad_export.cli import main as export_main
from legrad_runtime.cli import main as legrad_main
from legrad_runtime.evaluation import load_cases

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red triangle", "a red cross", "a purple triangle"]


def test_the_main_job_exports_the_shipped_model_and_explains_the_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's relative paths; outputs go to tmp_path
    assert export_main(["--model", "assets/shapes-clip", "--out", str(tmp_path / "models")]) == 0
    folder = tmp_path / "models" / "shapes-clip__open_clip_model__64"
    assert folder.is_dir(), capsys.readouterr()

    argv = ["explain", str(folder), "assets/sample/images/00001.png", "--layers-figure", "--save-npy"]
    argv += [a for p in PROMPTS for a in ("-p", p)] + ["--out", str(tmp_path / "out")]
    assert legrad_main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "00001"
    for prompt in PROMPTS:
        for suffix in ("", "__layers"):
            assert (out / f"{prompt.replace(' ', '-')}{suffix}.png").is_file()
    with Image.open(out / "a-red-triangle.png") as overlay:
        assert overlay.size == (256, 256)

    # the object with a colour of its own is found: its heatmap peaks inside its mask
    heatmaps = np.load(out / "heatmaps.npy")  # (P, H, W) on the original image
    case = next(c for c in load_cases("assets/sample") if c.prompt == "a purple triangle")
    with Image.open(case.mask) as m:
        mask = np.asarray(m) > 0
    peak = np.unravel_index(heatmaps[PROMPTS.index(case.prompt)].argmax(), mask.shape)
    assert mask[peak]
