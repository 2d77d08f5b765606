"""Ray Data (the `ray` extra): explain_dataset's rows equal the in-process runtime's, row by row, for
images read from a folder, Parquet and WebDataset; `legrad explain --engine ray` writes the local
engine's files. One local Ray cluster (2 CPUs) for the module."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the `ray` extra: pip install 'legrad-onnx[ray]'")

from legrad_runtime import load  # noqa: E402
from legrad_runtime.cli import main  # noqa: E402
from legrad_runtime.ray import explain_dataset, read_image_folder, read_parquet_images, top_region  # noqa: E402
from legrad_runtime.visualize import overlay  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]
SIZES = [(40, 30), (64, 64), (23, 57), (50, 41), (64, 64)]  # (width, height): ragged batches


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _check_rows(rows, model, sources, prompts=PROMPTS, classes=None):
    """Each row against the in-process runtime on the same image: scores, maps, peak, top region."""
    assert len(rows) == len(SIZES)
    for row in rows:
        ref = model.explain([sources(row)], prompts, classes=classes)
        np.testing.assert_allclose(row["similarity"], ref.similarities[0], atol=1e-6)
        np.testing.assert_allclose(row["probability"], ref.probabilities[0], atol=1e-6)
        assert list(row["label"]) == [ref.label(0, p) for p in range(len(ref.prompts))]
        for p in range(len(ref.prompts)):
            expected = ref.heatmap_on_original(0, p)
            if "heatmap" in row:
                assert row["heatmap"][p].shape == expected.shape
                np.testing.assert_allclose(row["heatmap"][p], expected, atol=1e-6)
            peak, box = top_region(expected)
            assert tuple(row["peak"][p]) == peak and tuple(row["top_region"][p]) == box
            if "png" in row:
                # the row's PNG is its own heatmap drawn on the original, bit for bit; the in-process
                # map (another batch size) differs by float rounding, which can move a pixel one
                # colormap step, so against it a few pixels may differ by a few levels
                drawn = np.asarray(Image.open(io.BytesIO(row["png"][p])))
                assert np.array_equal(drawn, np.asarray(overlay(ref.images[0], row["heatmap"][p])))
                off = np.abs(drawn.astype(int) - np.asarray(ref.overlay(0, p)).astype(int))
                assert (off.max(-1) > 0).mean() <= 0.01 and off.max() <= 8


def test_folder_rows_equal_the_in_process_runtime_with_two_actors(cluster, image_folder, model_folder):
    ds = read_image_folder(image_folder)
    rows = explain_dataset(ds, model_folder, PROMPTS, batch_size=2, concurrency=2).take_all()
    assert sorted(Path(r["path"]).name for r in rows) == [f"img{i}.png" for i in range(len(SIZES))]
    assert "image" not in rows[0] and rows[0]["top_region"].shape == (2, 4)
    _check_rows(rows, load(model_folder), lambda row: row["path"])


def test_parquet_image_bytes_give_the_runtime_overlays(cluster, image_folder, model_folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(image_folder.iterdir())
    table = pa.table({"name": [f.name for f in files], "jpeg": [f.read_bytes() for f in files]})
    pq.write_table(table, tmp_path / "images.parquet")
    ds = read_parquet_images(tmp_path / "images.parquet")
    rows = explain_dataset(ds, model_folder, PROMPTS, image_column="jpeg", output="both").take_all()
    _check_rows(rows, load(model_folder), lambda row: image_folder / row["name"])


def test_webdataset_tar_and_a_classifier_top_k(cluster, image_folder, model_folders, tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for f in sorted(image_folder.iterdir()):
            tar.add(f, arcname=f"{f.stem}.png")
    ds = ray.data.read_webdataset(str(tmp_path / "shard-000.tar"), decoder=None)
    folder = model_folders["classifier"]
    rows = explain_dataset(ds, folder, classes="top-2", image_column="png").take_all()
    _check_rows(rows, load(folder), lambda row: image_folder / f"{row['__key__']}.png", None, "top-2")


def test_unreadable_images_are_skipped_or_raised(cluster, image_folder, model_folder, tmp_path):
    paths = [str(p) for p in sorted(image_folder.iterdir())[:2]] + [str(tmp_path / "missing.png")]
    ds = ray.data.from_items([{"path": p} for p in paths])
    rows = explain_dataset(ds, model_folder, PROMPTS, image_column="path", on_error="skip").take_all()
    assert sorted(r["path"] for r in rows) == paths[:2]
    with pytest.raises(Exception, match="missing.png"):
        explain_dataset(ds, model_folder, PROMPTS, image_column="path").take_all()


def test_bad_arguments_fail_before_any_actor_starts(cluster, image_folder, model_folder, model_folders):
    ds = read_image_folder(image_folder)
    with pytest.raises(ValueError, match="output must be"):
        explain_dataset(ds, model_folder, PROMPTS, output="jpeg")
    with pytest.raises(ValueError, match="no column 'pixels'"):
        explain_dataset(ds, model_folder, PROMPTS, image_column="pixels")
    with pytest.raises(ValueError, match="classifier"):
        explain_dataset(ds, model_folders["classifier"], PROMPTS)


def _flood_box(heatmap, threshold):
    """The top region by a plain pixel flood fill (the independent check of `top_region`)."""
    h, w = heatmap.shape
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    mask = heatmap >= threshold * heatmap[y, x]
    seen, todo = {(y, x)}, [(y, x)]
    while todo:
        cy, cx = todo.pop()
        for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and (ny, nx) not in seen:
                seen.add((ny, nx))
                todo.append((ny, nx))
    ys, xs = zip(*seen)
    return (int(x), int(y)), (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


@pytest.mark.parametrize("seed", range(20))
def test_top_region_is_the_flood_fill_of_the_peak(seed):
    rng = np.random.default_rng(seed)
    heatmap = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))).astype(np.float32)
    threshold = float(rng.choice([0.0, 0.3, 0.5, 0.9, 1.0]))
    assert top_region(heatmap, threshold) == _flood_box(heatmap, threshold)


def test_a_u_shaped_region_is_joined_through_its_base():
    heatmap = np.zeros((5, 7), np.float32)
    heatmap[0:4, 1] = heatmap[0:4, 5] = heatmap[3, 1:6] = 0.6
    heatmap[0, 5] = 1.0
    assert top_region(heatmap) == ((5, 0), (1, 0, 6, 4))


def _scores(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.mark.parametrize("style", ["overlay", "side-by-side"])
def test_cli_ray_engine_writes_the_local_engine_files(cluster, image_folder, model_folder, tmp_path, style):
    common = [
        "explain",
        str(model_folder),
        str(image_folder),
        "-p",
        PROMPTS[0],
        "-p",
        PROMPTS[1],
        "--style",
        style,
    ]
    assert main([*common, "--out", str(tmp_path / "local"), "--save-npy"]) == 0
    assert (
        main([*common, "--out", str(tmp_path / "ray"), "--save-npy", "--engine", "ray", "--actors", "2"]) == 0
    )
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*"))
    assert local == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*"))
    for name in local:
        a, b = tmp_path / "local" / name, tmp_path / "ray" / name
        if name.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), name
        elif name.suffix == ".npy":
            np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-6)
        elif name.name == "scores.csv":
            rows_a, rows_b = _scores(a), _scores(b)
            assert [r[:3] for r in rows_a] == [r[:3] for r in rows_b]
            np.testing.assert_allclose(
                [float(r[3]) for r in rows_a[1:]], [float(r[3]) for r in rows_b[1:]], atol=1e-6
            )
        elif a.is_file():
            assert a.read_bytes() == b.read_bytes(), name


def test_cli_ray_engine_refuses_a_classifier(cluster, image_folder, model_folders, tmp_path, capsys):
    argv = ["explain", str(model_folders["classifier"]), str(image_folder), "--top-k", "1", "--engine", "ray"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "--engine local" in capsys.readouterr().err


def test_importing_the_runtime_never_imports_ray_and_its_absence_names_the_extra():
    code = (
        "import sys; import legrad_runtime, legrad_runtime.session, legrad_runtime.cli\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "sys.modules['ray'] = None\n"
        "from legrad_runtime.ray import explain_dataset\n"
        "try:\n    explain_dataset(None, 'x', ['a'])\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "legrad-onnx[ray]"' in done.stdout
