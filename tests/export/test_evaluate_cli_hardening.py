"""`legrad-evaluate` as a hostile or careless user runs it: bombs, FIFOs, unwritable outputs.

The cases folder is checked before the model loads, so every case here ends in exit 2 with one
`legrad-evaluate: error:` line naming the file, no Traceback, no raw PIL warning, nothing written.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile import jpeg_declaring, listing, png_bomb
from legrad_export.evaluate_cli import main

pytestmark = pytest.mark.torch

_UNKNOWN_MODEL = "ViT-B-61"  # never reached: each case fails before the model would load


def _cases_folder(root: Path) -> Path:
    """A hand-written cases folder: one 32 px image with a square mask."""
    root.mkdir()
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:20, 8:20] = (255, 0, 0)
    Image.fromarray(image).save(root / "img.png")
    Image.fromarray((image[..., 0] > 0).astype(np.uint8) * 255).save(root / "mask.png")
    with (root / "cases.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image", "prompt", "mask"), ("img.png", "a red square", "mask.png")])
    return root


def _error_line(capsys, *argv: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the case
        code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("legrad-evaluate: error:"), err
    return lines[0]


@pytest.mark.parametrize("which", ["img.png", "mask.png"])
def test_a_bomb_image_or_mask_is_refused_before_decoding(tmp_path, capsys, which):
    cases = _cases_folder(tmp_path / "cases")
    png_bomb(cases / which)
    before = listing(tmp_path)
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL)
    assert which in line and "10000x10000" in line and "over the limit of 64.0 MP" in line
    assert _UNKNOWN_MODEL not in line
    assert listing(tmp_path) == before


def test_a_jpeg_declaring_a_frame_beyond_pils_limit_is_refused(tmp_path, capsys):
    cases = _cases_folder(tmp_path / "cases")
    jpeg_declaring(cases / "big.jpg", 30_000, 30_000)
    with (cases / "cases.csv").open("a", newline="") as f:
        csv.writer(f).writerow(("big.jpg", "a grey square", "mask.png"))
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL)
    assert "big.jpg" in line and "row 2" in line and "too many pixels to decode safely" in line


def test_max_pixels_raises_the_limit_for_the_cases(tmp_path, capsys):
    cases = _cases_folder(tmp_path / "cases")
    Image.new("RGB", (300, 200)).save(cases / "img.png")  # 0.06 MP; its mask no longer fits
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL, "--max-pixels", "0.01")
    assert "img.png" in line and "over the limit of 0.0 MP" in line
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL, "--max-pixels", "0.1")
    assert "mask.png is 32x32 but its image" in line


def test_a_fifo_named_like_an_image_is_refused_not_waited_for(tmp_path):
    cases = _cases_folder(tmp_path / "cases")
    (cases / "img.png").unlink()
    os.mkfifo(cases / "img.png")
    run = subprocess.run(
        [sys.executable, "-m", "legrad_export.evaluate_cli", str(cases), "--model", _UNKNOWN_MODEL],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "img.png is a FIFO (named pipe), not a regular file" in run.stderr.strip().splitlines()[-1]


def test_a_cases_csv_that_is_a_folder_is_one_line(tmp_path, capsys):
    cases = _cases_folder(tmp_path / "cases")
    (cases / "cases.csv").unlink()
    (cases / "cases.csv").mkdir()
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL)
    assert "cases.csv is a directory, not a file" in line


@pytest.mark.parametrize(
    "option, where",
    [
        ("--json", "under-a-file"),
        ("--json", "missing-folder"),
        ("--json", "a-folder"),
        ("--save-heatmaps", "under-a-file"),
        ("--save-heatmaps", "proc"),
    ],
)
def test_unwritable_outputs_fail_before_the_cases_and_the_model_load(tmp_path, capsys, option, where):
    cases = _cases_folder(tmp_path / "cases")
    png_bomb(cases / "img.png")  # would be the error if the outputs were checked later
    (tmp_path / "afile").write_text("x")
    target = {
        "under-a-file": tmp_path / "afile" / "out",
        "missing-folder": tmp_path / "nowhere" / "scores.json",
        "a-folder": tmp_path,
        "proc": Path("/proc/legrad-maps"),
    }[where]
    before = listing(tmp_path)
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL, option, str(target))
    assert option in line or str(target) in line or "output folder" in line
    assert "img.png" not in line and _UNKNOWN_MODEL not in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "option, value",
    [("--threshold", "1.5"), ("--batch-size", "0"), ("--image-size", "0"), ("--max-pixels", "0")],
)
def test_bad_option_values_are_one_line(tmp_path, capsys, option, value):
    cases = _cases_folder(tmp_path / "cases")
    line = _error_line(capsys, str(cases), "--model", _UNKNOWN_MODEL, option, value)
    assert line.split("error: ")[1].startswith(option) and value in line
