"""`legrad explain` and `legrad info` as a hostile or careless user runs them. Torch-free.

Each case checks the exit code, one line on stderr naming the problem, and that nothing was
written outside --out (a listing of the parent before and after).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import legrad_runtime.cli as cli
from hostile import copy_folder, edit_metadata, listing, png_bomb, read_only_folder
from legrad_runtime.cli import main


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


def _one_error(capsys, *argv: str) -> str:
    code, err, _ = _run(capsys, *argv)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("legrad: error:"), err
    return err[0]


HOSTILE_STEMS = ["..", ".", ".hidden", "scores.csv", "prompts.csv", "a" * 250, "猫", "-rf"]
HOSTILE_PROMPTS = [
    "..",
    ".",
    "/",
    "../../x",
    "scores.csv",
    "a cat!",
    "a cat?",
    "A CAT",
    "猫",
    "🐱",
    "x" * 300,
]


def test_every_output_lands_inside_out_whatever_the_names(model_folder, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for k, stem in enumerate(HOSTILE_STEMS):
        array = np.full((32, 40, 3), 20 * k, np.uint8)
        Image.fromarray(array).save(images / f"{stem}.png", format="PNG")
    before = listing(tmp_path)
    out = tmp_path / "out"
    args = [f"-p={p}" for p in HOSTILE_PROMPTS]
    code, err, _ = _run(
        capsys, "explain", str(model_folder), str(images), *args, "--out", str(out), "--save-npy"
    )
    assert code == 0, err
    after = listing(tmp_path)
    assert [p for p in after if not p.startswith("out")] == before  # nothing new outside out/
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == len(HOSTILE_STEMS)  # one folder per image: no collisions
    assert all(not p.name.startswith(".") for p in out.iterdir())
    with open(out / "prompts.csv", newline="", encoding="utf-8") as fh:
        mapping = {row["file"]: row["prompt"] for row in csv.DictReader(fh)}
    assert sorted(mapping.values()) == sorted(HOSTILE_PROMPTS)  # reversible: every prompt, once
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == set(mapping) | {"heatmaps.npy"}
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(HOSTILE_STEMS) * len(HOSTILE_PROMPTS)
    assert {r["folder"] for r in rows} == {f.name for f in folders}


def test_prompts_that_differ_only_in_punctuation_or_case_get_their_own_files(
    model_folder, photo, capsys, tmp_path
):
    out = tmp_path / "out"
    code, err, _ = _run(capsys, "explain", str(model_folder), str(photo), "-p", "a cat!", "-p", "a cat?",
                        "-p", "A CAT", "--out", str(out), "--save-npy")  # fmt: skip
    assert code == 0, err
    pngs = sorted(p.name for p in (out / "photo").glob("*.png"))
    assert len(pngs) == 3
    maps = np.load(out / "photo" / "heatmaps.npy")
    with open(out / "prompts.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["prompt"] for r in rows] == ["a cat!", "a cat?", "A CAT"]
    for k, row in enumerate(rows):  # each file shows its own prompt's map
        with Image.open(out / "photo" / row["file"]) as overlay:
            expected = cli.load(model_folder).explain([photo], [row["prompt"]]).overlay(0, 0)
            assert np.array_equal(np.asarray(overlay), np.asarray(expected))
        assert np.allclose(
            maps[k], cli.load(model_folder).explain([photo], [row["prompt"]]).heatmap_on_original(0, 0)
        )


@pytest.mark.parametrize("where", ["file", "under-a-file", "proc"])
def test_an_unwritable_out_fails_before_the_model_loads(tmp_path, photo, capsys, where):
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under-a-file": tmp_path / "afile" / "out", "proc": "/proc/legrad-out"}
    before = listing(tmp_path)
    # the model folder does not exist: an error about --out proves it was checked first
    line = _one_error(
        capsys, "explain", str(tmp_path / "no-model"), str(photo), "-p", "x", "--out", str(out[where])
    )
    assert "output folder" in line and "no-model" not in line
    assert listing(tmp_path) == before


def test_a_read_only_out_fails_before_the_model_loads(tmp_path, photo, capsys):
    with read_only_folder(tmp_path / "ro") as ro:
        line = _one_error(
            capsys, "explain", str(tmp_path / "no-model"), str(photo), "-p", "x", "--out", str(ro / "o")
        )
    assert "read-only file system" in line


def test_an_image_named_like_an_output_file_does_not_crash_the_run(model_folder, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for name in ("scores.csv.png", "prompts.csv.png"):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / name)
    code, err, _ = _run(
        capsys, "explain", str(model_folder), str(images), "-p", "x", "--out", str(tmp_path / "o")
    )
    assert code == 0, err
    assert (tmp_path / "o" / "scores.csv").is_file() and (tmp_path / "o" / "prompts.csv").is_file()


def test_partial_failures_exit_1_name_each_bad_image_and_keep_the_good_results(
    model_folder, photo, tmp_path, capsys
):
    bad = tmp_path / "bad"
    bad.mkdir()
    png_bomb(bad / "bomb.png")
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = ["-p", "a cat", "-p", "a dog", "--save-npy"]
    out_all, out_alone = tmp_path / "all", tmp_path / "alone"
    inputs = [str(bad / "bomb.png"), str(photo), str(bad / "corrupt.png"), str(bad / "missing.png")]
    code, err, _ = _run(capsys, "explain", str(model_folder), *inputs, *args, "--out", str(out_all))
    assert code == 1
    skipped = [ln for ln in err if ln.startswith("legrad: skipped:")]
    assert len(skipped) == 3
    assert "bomb.png" in skipped[0] and "over the limit" in skipped[0]
    assert "corrupt.png" in skipped[1] and "missing.png" in skipped[2]
    assert _run(capsys, "explain", str(model_folder), str(photo), *args, "--out", str(out_alone))[0] == 0
    assert np.array_equal(
        np.load(out_all / "photo" / "heatmaps.npy"), np.load(out_alone / "photo" / "heatmaps.npy")
    )


def test_when_every_image_fails_the_exit_code_is_2_and_nothing_is_written(model_folder, tmp_path, capsys):
    png_bomb(tmp_path / "bomb.png")
    code, err, _ = _run(capsys, "explain", str(model_folder), str(tmp_path / "bomb.png"), "-p", "x",
                        "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and err[-1].startswith("legrad: error: none of the 1 image(s)")
    assert listing(tmp_path / "o") == []


def test_a_fifo_is_skipped_not_waited_for(model_folder, photo, tmp_path):
    os.mkfifo(photo.parent / "fifo.png")
    run = subprocess.run(
        [sys.executable, "-m", "legrad_runtime.cli", "explain", str(model_folder), str(photo.parent),
         "-p", "x", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1
    assert [ln for ln in run.stderr.splitlines() if "skipped" in ln][0].endswith(
        "fifo.png is a FIFO (named pipe), not a regular file; pass an image file"
    )


def test_an_internal_error_is_exit_3_with_one_line(model_folder, photo, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "save_png", broken)
    code, err, _ = _run(
        capsys, "explain", str(model_folder), str(photo), "-p", "x", "--out", str(tmp_path / "o")
    )
    assert code == 3 and len(err) == 1
    assert (
        err[0].startswith("legrad: internal error: RuntimeError: disk on fire") and "LEGRAD_DEBUG=1" in err[0]
    )


def test_cuda_without_cuda_warns_once(model_folder, photo, tmp_path, capsys):
    code, err, _ = _run(capsys, "explain", str(model_folder), str(photo), "-p", "x", "--device", "cuda",
                        "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 0
    warnings = [ln for ln in err if "device='cuda'" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("legrad: warning:")


@pytest.mark.parametrize("value", ["0", "-1", "20000"])
def test_a_bad_pixel_limit_is_refused(model_folder, photo, capsys, value):
    assert "--max-pixels" in _one_error(capsys, "explain", str(model_folder), str(photo), "-p", "x",
                                        f"--max-pixels={value}")  # fmt: skip


def test_info_prints_escapes_in_metadata_as_text(model_folder, tmp_path, capsys):
    folder = copy_folder(model_folder, tmp_path / "m")
    edit_metadata(folder, lambda d: d.update(model_name="\x1b[2J\x1b]0;pwned\x07evil\nforged line"))
    code, err, out = _run(capsys, "info", str(folder))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b]0;pwned\\x07evil\\nforged line" in out
    code, _, out = _run(capsys, "info", str(folder), "--json")
    assert code == 0 and "\x1b" not in out and json.loads(out)["model_name"].startswith("\x1b")


@pytest.mark.parametrize(
    "template", ["{color.__class__}", "{color:>500000000}", "{color!r}", "{0}", "{}", "{color[0]}", "{color"]
)
def test_vocabulary_templates_beyond_plain_slots_are_refused(model_folder, tmp_path, capsys, template):
    folder = copy_folder(model_folder, tmp_path / "m")
    edit_metadata(
        folder, lambda d: d.update(vocabulary={"slots": {"color": ["red"]}, "templates": [template]})
    )
    line = _one_error(capsys, "info", str(folder))
    assert "vocabulary.templates" in line


def test_a_huge_vocabulary_is_summarised_not_expanded(model_folder, tmp_path, capsys, photo):
    folder = copy_folder(model_folder, tmp_path / "m")
    slots = {f"s{k}": [f"v{k}{j}" for j in range(10)] for k in range(8)}  # 10^8 combinations
    template = " ".join(f"{{s{k}}}" for k in range(8))
    edit_metadata(folder, lambda d: d.update(vocabulary={"slots": slots, "templates": [template]}))
    code, err, out = _run(capsys, "info", str(folder))
    assert code == 0, err
    assert "e.g. 'v00 v10 v20 v30 v40 v50 v60 v70'" in out and "100,000,000" in out
    line = _one_error(
        capsys, "explain", str(folder), str(photo), "--vocabulary", "--out", str(tmp_path / "o")
    )
    assert "100,000,000 prompts, more than the 4,096 allowed" in line


def test_a_reader_that_closes_the_pipe_early_ends_quietly():
    """`legrad info | head`: stdout's reader went away. No 'internal error', no traceback at exit
    (Python's own flush of the dead stdout), and the pipe's exit code."""
    code = (
        "import sys\nfrom legrad_runtime.cli_runner import run_main\n"
        "def body():\n    print('x' * 100)\n    raise BrokenPipeError(32, 'Broken pipe')\n"
        "sys.exit(run_main('legrad', body))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 141 and run.stderr == ""
