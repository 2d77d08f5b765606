"""`legrad explain`'s run options: --threads, --memory-budget, --no-verify and --style. Torch-free.

Each option either leaves the maps exactly as they were (threads, budget) or changes what the
user asked for (what is verified, how a map is drawn), and a bad value is one line and exit 2.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import legrad_runtime.cli as cli
from hostile import copy_folder, edit_metadata, listing
from legrad_runtime.cli import main
from legrad_runtime.metadata import TEXT_GRAPH

PROMPTS = ["-p", "a photo of a cat", "-p", "a red square", "-p", "a remote control"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    paths = []
    for k, (w, h) in enumerate([(64, 48), (90, 120)]):
        path = folder / f"photo{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _explain(capsys, folder: Path, photos: list[Path], out: Path, *options: str) -> tuple[int, list[str]]:
    argv = ["explain", str(folder), *map(str, photos), *PROMPTS, "--save-npy", "--out", str(out), *options]
    code = main(argv)
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _maps(out: Path) -> dict[str, np.ndarray]:
    return {p.parent.name: np.load(p) for p in sorted(out.glob("*/heatmaps.npy"))}


def _scores(out: Path) -> list[float]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return [float(row["cosine_similarity"]) for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def default_run(model_folder, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "out"
    assert (
        main(["explain", str(model_folder), *map(str, photos), *PROMPTS, "--save-npy", "--out", str(out)])
        == 0
    )
    return out


def _same_results(out: Path, default_run: Path) -> None:
    maps, expected = _maps(out), _maps(default_run)
    assert maps.keys() == expected.keys() and len(maps) == 2
    for name in maps:
        np.testing.assert_allclose(maps[name], expected[name], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_scores(out), _scores(default_run), rtol=0, atol=1e-6)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_thread_count_gives_the_same_maps(model_folder, photos, tmp_path, capsys, default_run, threads):
    code, err = _explain(capsys, model_folder, photos, tmp_path / "o", "--threads", threads)
    assert code == 0, err
    _same_results(tmp_path / "o", default_run)


@pytest.mark.parametrize("gib", ["0.000001", "0.01"])  # about 1 KiB: one image and one prompt per call
def test_a_small_memory_budget_gives_the_same_maps(model_folder, photos, tmp_path, capsys, default_run, gib):
    code, err = _explain(capsys, model_folder, photos, tmp_path / "o", "--memory-budget", gib)
    assert code == 0, err
    _same_results(tmp_path / "o", default_run)


def test_the_memory_budget_sizes_every_call_of_the_image_graph(
    model_folder, photos, tmp_path, capsys, monkeypatch
):
    """--memory-budget of about 1 KiB leaves room for one image and one prompt per onnxruntime call."""
    pairs: list[int] = []  # images × prompts of each call
    loaded = cli.load

    class CallLog:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            pairs.append(len(feeds["pixel_values"]) * len(feeds["text_embeds"]))
            return self.session.run(names, feeds)

    def logged_load(*args, **kwargs):
        model = loaded(*args, **kwargs)
        model._image_io.session = CallLog(model._image_io.session)  # the CPU path: session.run
        return model

    monkeypatch.setattr(cli, "load", logged_load)
    assert _explain(capsys, model_folder, photos, tmp_path / "small", "--memory-budget", "0.000001")[0] == 0
    assert pairs == [1] * (len(photos) * 3)
    pairs.clear()
    assert _explain(capsys, model_folder, photos, tmp_path / "default")[0] == 0
    assert len(pairs) < len(photos) * 3 and sum(pairs) == len(photos) * 3


def test_no_verify_loads_a_folder_whose_checksum_disagrees(
    model_folder, photos, tmp_path, capsys, default_run
):
    folder = copy_folder(model_folder, tmp_path / "model")
    edit_metadata(folder, lambda d: d["files"][TEXT_GRAPH.filename].update(sha256="0" * 64))
    code, err = _explain(capsys, folder, photos, tmp_path / "checked")
    assert code == 2 and len(err) == 1 and f"{TEXT_GRAPH.filename} was altered" in err[0]
    assert "re-export" in err[0]
    code, err = _explain(capsys, folder, photos, tmp_path / "trusted", "--no-verify")
    assert code == 0, err
    _same_results(tmp_path / "trusted", default_run)


def test_no_verify_still_keeps_every_path_inside_the_folder(model_folder, photos, tmp_path, capsys):
    folder = copy_folder(model_folder, tmp_path / "model")
    outside = tmp_path / "outside-vocab.json"
    outside.write_bytes((folder / "tokenizer" / "vocab.json").read_bytes())
    edit_metadata(folder, lambda d: d["tokenizer"].update(files=[str(outside), "tokenizer/merges.txt"]))
    code, err = _explain(capsys, folder, photos, tmp_path / "o", "--no-verify")
    assert code == 2 and len(err) == 1 and "not a relative '/'-separated path" in err[0]


@pytest.mark.parametrize(
    "option, value",
    [
        ("--threads", "0"),
        ("--threads", "-2"),
        ("--memory-budget", "0"),
        ("--memory-budget", "-1"),
        ("--memory-budget", "nan"),
        ("--memory-budget", "inf"),
        ("--memory-budget", "20000"),
    ],
)
def test_a_bad_thread_count_or_budget_is_one_line_before_anything_is_written(
    model_folder, photos, tmp_path, capsys, option, value
):
    before = listing(tmp_path)
    code, err = _explain(capsys, model_folder, photos, tmp_path / "o", f"{option}={value}")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"legrad: error: {option} must be") and value.lstrip("-") in err[0]
    assert listing(tmp_path) == before


def _picture(out: Path, photo: Path, prompt: str = "a-red-square") -> np.ndarray:
    with Image.open(out / photo.stem / f"{prompt}.png") as im:
        return np.asarray(im.convert("RGB"))


def test_style_contour_leaves_most_of_the_image_untouched(
    model_folder, photos, tmp_path, capsys, default_run
):
    code, err = _explain(capsys, model_folder, photos, tmp_path / "o", "--style", "contour")
    assert code == 0, err
    for photo in photos:
        original, picture = np.asarray(Image.open(photo).convert("RGB")), _picture(tmp_path / "o", photo)
        assert picture.shape == original.shape
        untouched = (picture == original).all(axis=-1).mean()
        assert untouched > 0.5, untouched  # lines and a ring, not a wash of color
        blended = _picture(default_run, photo)
        assert (blended == original).all(axis=-1).mean() < 0.1  # the default overlay covers it all


def test_style_side_by_side_puts_the_image_left_of_its_overlay_with_a_caption(
    model_folder, photos, tmp_path, capsys, default_run
):
    code, err = _explain(capsys, model_folder, photos, tmp_path / "o", "--style", "side-by-side")
    assert code == 0, err
    for photo in photos:
        original = np.asarray(Image.open(photo).convert("RGB"))
        h, w, _ = original.shape
        picture = _picture(tmp_path / "o", photo)
        assert picture.shape[1] == 2 * w and picture.shape[0] > h  # the caption's strip below
        np.testing.assert_array_equal(picture[:h, :w], original)
        np.testing.assert_array_equal(picture[:h, w:], _picture(default_run, photo))


def test_an_unknown_style_is_a_usage_error(model_folder, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "explain",
                str(model_folder),
                str(photos[0]),
                "-p",
                "x",
                "--style",
                "heat",
                "--out",
                str(tmp_path),
            ]
        )
    assert info.value.code == 2
    assert "invalid choice: 'heat'" in capsys.readouterr().err
