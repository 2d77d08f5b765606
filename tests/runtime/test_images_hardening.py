"""Images as a hostile user sends them: bombs, FIFOs, devices, loops, empty paths. Torch-free."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from hostile import jpeg_declaring, png_bomb
from legrad_runtime.errors import ImageInputError
from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import DEFAULT_MAX_PIXELS, load_image, preprocess


def test_a_declared_huge_png_is_refused_before_decoding_without_pil_warnings(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageInputError, match=r"10000x10000 = 100.0 MP, over the limit of 64.0 MP"):
            load_image(bomb)
    assert caught == []


def _tiff_with_exif_orientation() -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.arange(16 * 8 * 3, dtype=np.uint8).reshape(16, 8, 3))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: the reader must get the tag to turn the image upright
    image.save(buffer, format="TIFF", exif=exif)
    return buffer.getvalue()


def test_every_truncation_of_a_tiff_is_an_image_or_a_typed_error_never_a_pil_warning(tmp_path):
    data, path = _tiff_with_exif_orientation(), tmp_path / "cut.tif"
    path.write_bytes(data)
    assert load_image(path).size == (16, 8)  # whole: upright per its EXIF
    outcomes = set()
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_image(path)
                outcomes.add("image")
            except ImageInputError as exc:
                outcomes.add("corrupt" if "corrupt or truncated" in str(exc) else "unreadable")
        assert [str(w.message) for w in caught] == [], cut
    assert {"corrupt", "unreadable"} <= outcomes  # PIL warned "Truncated File Read" for some cuts


def test_the_pixel_limit_is_a_parameter(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(path)
    assert load_image(path, max_pixels=2000).size == (50, 40)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(path, max_pixels=1999)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(Image.open(path), max_pixels=1999)  # in-memory images too


def test_a_png_beyond_pils_own_bomb_limit_is_a_typed_error(tmp_path):
    with pytest.raises(ImageInputError, match="too many pixels to decode safely"):
        load_image(png_bomb(tmp_path / "b.png", 20_000, 20_000), max_pixels=10**9)


def test_declared_huge_images_stay_under_200_mb_above_baseline(tmp_path):
    png = png_bomb(tmp_path / "bomb.png")
    jpeg = jpeg_declaring(tmp_path / "bomb.jpg", 12_000, 8_000)  # 96 MP: decoded at 1/2 scale
    script = textwrap.dedent(
        """
        import json, sys
        from legrad_runtime.errors import ImageInputError
        from legrad_runtime.preprocess import load_image

        def peak_kb():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

        base, outcomes = peak_kb(), []
        for path in sys.argv[1:]:
            try:
                outcomes.append(f"decoded {load_image(path).size}")
            except ImageInputError as exc:
                outcomes.append(str(exc))
        print(json.dumps({"growth_mb": (peak_kb() - base) / 1024, "outcomes": outcomes}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(png), str(jpeg)], capture_output=True, text=True, timeout=120
    )
    report = json.loads(result.stdout)
    assert report["growth_mb"] < 200, report
    assert "over the limit" in report["outcomes"][0]
    assert report["outcomes"][1] == "decoded (6000, 4000)"  # libjpeg pads the missing data; 1/2 scale


@pytest.fixture(scope="module")
def photo(tmp_path_factory, width=4000, height=3000):
    """A 12 MP photo-like JPEG: smooth colour waves plus sensor-like noise."""
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    y, x = np.mgrid[0:height, 0:width] / 1000.0
    waves = np.stack([np.sin(x * 3 + y), np.cos(y * 2.5 - x), np.sin(x * y)], -1) * 100 + 128
    noise = np.random.default_rng(0).normal(0, 8, (height, width, 3))
    Image.fromarray(np.clip(waves + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.mark.parametrize("size", [64, 224, 448])
@pytest.mark.parametrize("mode", ["squash", "shortest"])
def test_a_jpeg_over_the_limit_decodes_reduced_to_the_same_pixels_after_resizing(photo, size, mode):
    path = photo
    cfg = PreprocessCfg(
        size, (0.5, 0.5, 0.5), (1 / 255, 1 / 255, 1 / 255), "bicubic", mode
    )  # 1 unit = 1 level
    full, _ = preprocess(load_image(path), cfg)
    reduced_image = load_image(path, max_pixels=4_000_000)
    assert reduced_image.size == (2000, 1500)  # the least DCT reduction (1/2) that fits
    reduced, _ = preprocess(reduced_image, cfg)
    levels = np.abs(full - reduced)
    assert levels.max() <= 2.0 + 1e-3  # at most two 8-bit levels: rounding in two resizes
    assert levels.mean() < 0.25


def test_a_png_over_the_limit_is_not_reduced_but_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(path)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(path, max_pixels=100_000)


def test_the_default_limit_is_64_megapixels():
    assert DEFAULT_MAX_PIXELS == 64_000_000


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (os.mkfifo(d / "fifo.png"), d / "fifo.png")[1], "is a FIFO"),
        (lambda d: "/dev/zero", "is a character device"),
        (lambda d: (os.symlink(d / "b", d / "a"), os.symlink(d / "a", d / "b"), d / "a")[2], "symlink loop"),
        (lambda d: "", "is an empty path"),
        (lambda d: d, "is a directory"),
        (lambda d: d / "missing.png", "does not exist"),
        (
            lambda d: (d / "f").write_text("x") and d / "f" / "under-a-file.png",
            "a part of its path is a file",
        ),
    ],
    ids=["fifo", "device", "symlink-loop", "empty", "directory", "missing", "under-a-file"],
)
def test_paths_that_are_not_image_files_get_the_error_they_deserve(tmp_path, make, match):
    source = make(tmp_path)
    with pytest.raises(ImageInputError, match=match):
        load_image(source)  # never blocks on the FIFO, never reads /dev/zero forever
