"""The host path of explain(): images → pixel values (vectorised, threaded) and the rows that come back.

Each optimised step is compared with a plain per-image reference written here with PIL and numpy
(open_clip's ToTensor + Normalize on an (H, W, 3) array), bit for bit, on varied sizes and modes,
and the threaded path with the single-threaded one. Torch-free.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from legrad_runtime import load
from legrad_runtime.errors import ImageInputError, InputError
from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import (
    load_image,
    model_view,
    normalise,
    preprocess,
    preprocess_batch,
    preprocess_into,
    run_each,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _cfg(
    size: int | tuple[int, int] = 32, resize_mode: str = "squash", crop_pct: float = 1.0
) -> PreprocessCfg:
    return PreprocessCfg(size, MEAN, STD, "bicubic", resize_mode, crop_pct)


def _pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reference_pixels(image: Image.Image, cfg: PreprocessCfg) -> np.ndarray:
    """The straightforward per-image transform: the model's view (open_clip's resize, crop or pad;
    for 'squash' a plain PIL resize, or none at size), RGB, / 255, - mean, / std, to (3, H, W)."""
    h, w = cfg.size
    if cfg.resize_mode == "squash":
        seen = image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BICUBIC)
    else:
        seen = model_view(image, cfg)
    x = np.asarray(seen.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _pil(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rgba = Image.fromarray(_pixels((size[1], size[0], 4), seed), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(37)
    return rgba.convert(mode)


# sources: (what load_image takes, its description); sizes include the model's own (32 x 32) and odd ones
SOURCES = [
    (lambda: _pixels((32, 32, 3), 1), "RGB array at size"),
    (lambda: _pixels((37, 53, 3), 2), "RGB array, odd size"),
    (lambda: _pixels((32, 32), 3), "L array at size"),
    (lambda: _pixels((19, 41), 4), "L array, odd size"),
    (lambda: _pixels((32, 32, 4), 5), "RGBA array at size"),
    (lambda: _pixels((45, 27, 4), 6), "RGBA array, odd size"),
    (lambda: np.asfortranarray(_pixels((33, 31, 3), 7)), "non-contiguous array"),
    (lambda: _pixels((64, 96, 3), 8)[::2, ::3], "strided view"),
    *[
        (lambda m=m: _pil(m, (32, 32), 9), f"PIL {m} at size")
        for m in ("RGB", "L", "RGBA", "LA", "P", "1", "CMYK")
    ],
    *[
        (lambda m=m: _pil(m, (51, 23), 10), f"PIL {m}, odd size")
        for m in ("RGB", "L", "RGBA", "LA", "P", "1", "CMYK")
    ],
    (lambda: _pil("RGB", (1, 40), 11), "a 1-pixel strip"),
]
CFGS = [_cfg(32, "squash"), _cfg(32, "shortest"), _cfg(32, "shortest", 0.875), _cfg((24, 40), "longest")]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c.resize_mode}-{c.size}-{c.crop_pct}")
@pytest.mark.parametrize("make, what", SOURCES, ids=[w for _, w in SOURCES])
def test_preprocess_is_bit_equal_to_the_per_image_reference(make, what, cfg):
    image = load_image(make())
    expected = reference_pixels(image, cfg)
    x, _ = preprocess(image, cfg)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c.resize_mode}-{c.size}-{c.crop_pct}")
def test_a_batch_threaded_or_not_is_the_reference_of_each_image(cfg):
    images = [load_image(make()) for make, _ in SOURCES]
    expected = np.stack([reference_pixels(image, cfg) for image in images])
    single, placements = preprocess_batch(images, cfg, workers=1)
    np.testing.assert_array_equal(single, expected)
    for workers in (2, 3, 8, 64):
        threaded, threaded_placements = preprocess_batch(images, cfg, workers=workers)
        np.testing.assert_array_equal(threaded, single)
        assert threaded_placements == placements == [preprocess(im, cfg)[1] for im in images]


def test_normalise_matches_the_channels_last_formula_for_every_byte_and_writes_only_out():
    cfg = _cfg(16)
    rgb = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256  # every value on every channel
    rgb = rgb.astype(np.uint8)
    out = np.full((2, 3, 16, 16), np.nan, np.float32)
    normalise(rgb, cfg, out[1])
    expected = (rgb.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(out[1], expected.transpose(2, 0, 1))
    assert np.isnan(out[0]).all()


def test_preprocess_into_fills_a_batch_row_and_returns_the_placement():
    image = load_image(_pixels((40, 20, 3)))
    batch = np.zeros((3, 3, 32, 32), np.float32)
    placement = preprocess_into(image, _cfg(32, "shortest"), batch[2])
    x, expected_placement = preprocess(image, _cfg(32, "shortest"))
    np.testing.assert_array_equal(batch[2], x)
    assert placement == expected_placement and not batch[:2].any()


def test_preprocess_batch_keeps_its_errors_in_input_order():
    good = load_image(_pixels((8, 8, 3)))
    for workers in (1, 4):
        with pytest.raises(TypeError, match="got ndarray"):
            preprocess_batch([good, _pixels((8, 8, 3)), "x"], _cfg(8), workers=workers)  # type: ignore[list-item]
        with pytest.raises(InputError, match="got no images"):
            preprocess_batch([], _cfg(8), workers=workers)
    for bad in (0, -1, True, 1.5, None):
        with pytest.raises(InputError, match="image_workers"):
            preprocess_batch([good], _cfg(8), workers=bad)  # type: ignore[arg-type]


def test_run_each_keeps_order_and_stops_serially_at_the_first_fatal_failure():
    ran: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> int:
        with lock:
            ran.append(i)
        if i in (2, 4):
            raise ValueError(i)
        return i * 10

    threaded = run_each(task, 6, 3)
    assert [r if isinstance(r, int) else str(r) for r in threaded] == [0, 10, "2", 30, "4", 50]
    assert sorted(ran) == list(range(6))
    ran.clear()
    serial = run_each(task, 6, 1, stop=lambda exc: True)
    assert ran == [0, 1, 2] and len(serial) == 3 and isinstance(serial[2], ValueError)
    ran.clear()
    assert len(run_each(task, 6, 1, stop=lambda exc: False)) == 6


# ---------------------------------------------------------------- explain()


@pytest.fixture(scope="module")
def models(model_folders):
    """Per resize mode: the same folder loaded single-threaded and with 3 image workers."""
    return {
        mode: (
            load(model_folders[mode], device="cpu", image_workers=1),
            load(model_folders[mode], device="cpu", image_workers=3),
        )
        for mode in ("squash", "shortest", "longest")
    }


def _inputs(size: tuple[int, int]) -> list:
    h, w = size
    return [
        _pixels((h, w, 3), 20),  # already at the model's size: no resize
        _pixels((h + 7, w * 2 + 1, 3), 21),
        _pixels((h, w), 22),
        _pixels((h * 2, w, 4), 23),
        _pil("RGB", (w, h), 24),
        _pil("P", (w + 9, h + 3), 25),
        _pil("LA", (w * 3, h), 26),
        _pil("CMYK", (w, h), 27),
    ]


@pytest.mark.parametrize("mode", ["squash", "shortest", "longest"])
def test_explain_feeds_the_graph_the_reference_pixels_and_keeps_rgb_originals(models, mode):
    single, threaded = models[mode]
    cfg = single.metadata.preprocess
    images = _inputs(cfg.size)
    emb = np.random.default_rng(0).standard_normal((2, single.metadata.embed_dim))
    got = single.explain(images, text_embeds=emb, batch_size=len(images))
    again = threaded.explain(images, text_embeds=emb, batch_size=3)  # threaded, and other batches
    decoded = [load_image(im) for im in images]
    pixels = np.stack([reference_pixels(im, cfg) for im in decoded])
    feeds = {"pixel_values": pixels, "text_embeds": got.text_embeds}
    heat, maps, embeds = single._image.run(None, feeds)
    np.testing.assert_array_equal(got.heatmaps, heat)
    np.testing.assert_array_equal(got.layer_maps, maps)
    np.testing.assert_array_equal(got.image_embeds, embeds)
    np.testing.assert_allclose(again.heatmaps, heat, rtol=0, atol=1e-6)  # other batch shapes: float32 noise
    np.testing.assert_allclose(again.image_embeds, embeds, rtol=0, atol=1e-6)
    for result in (got, again):
        assert result.placements == [preprocess(im, cfg)[1] for im in decoded]
        assert [im.mode for im in result.images] == ["RGB"] * len(images)
        for original, im in zip(result.images, decoded):
            np.testing.assert_array_equal(np.asarray(original), np.asarray(im.convert("RGB")))


def test_threaded_and_single_threaded_explain_give_identical_arrays(models):
    single, threaded = models["squash"]
    images = _inputs(single.metadata.preprocess.size) * 3
    a = single.explain(images, ["a cat", "a dog"], batch_size=8)
    b = threaded.explain(images, ["a cat", "a dog"], batch_size=8)
    for name in ("heatmaps", "layer_maps", "image_embeds", "text_embeds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.placements == b.placements and a.sources == b.sources


def test_an_rgb_original_is_not_the_callers_image(models):
    model = models["squash"][1]
    image, array = _pil("RGB", (32, 32), 3), _pixels((32, 32, 3), 4)
    originals = model.explain([image, array], text_embeds=np.ones((1, model.metadata.embed_dim))).images
    assert originals[0] is not image
    image.paste((1, 2, 3), (0, 0, 32, 32))
    array[:] = 9
    assert np.asarray(originals[0]).max() > 3 and np.asarray(originals[1]).min() != 9


@pytest.mark.parametrize("workers", [1, 3])
def test_skip_records_failures_in_order_and_keeps_the_good_rows(models, tmp_path, workers):
    model = models["squash"][0 if workers == 1 else 1]
    cfg = model.metadata.preprocess
    missing = tmp_path / "missing.png"
    images = [
        _pixels((20, 30, 3), 1),
        str(missing),
        _pixels((32, 32, 3), 2),
        np.zeros((5, 5), np.float32),
        _pil("L", (17, 9), 3),
    ]
    emb = np.ones((1, model.metadata.embed_dim))
    got = model.explain(images, text_embeds=emb, on_error="skip", batch_size=5)
    assert [f.index for f in got.failures] == [1, 3]
    assert got.sources == ["image #0", "image #2", "image #4"]
    good = [load_image(images[i]) for i in (0, 2, 4)]
    feeds = {
        "pixel_values": np.stack([reference_pixels(im, cfg) for im in good]),
        "text_embeds": got.text_embeds,
    }
    np.testing.assert_array_equal(got.heatmaps, model._image.run(None, feeds)[0])
    with pytest.raises(ImageInputError, match="missing.png"):  # 'raise': the first bad one, in order
        model.explain(images, text_embeds=emb, batch_size=5)
    with pytest.raises(TypeError, match="load_image takes"):  # never skipped
        model.explain([images[0], 3.5, images[1]], text_embeds=emb, on_error="skip")  # type: ignore[list-item]
    every_bad = model.explain([images[1], images[3]], text_embeds=emb, on_error="skip")
    assert every_bad.heatmaps.shape == (0, 1, *cfg.size) and len(every_bad.failures) == 2


def test_image_workers_is_checked_and_defaults_to_a_few_threads(model_folders):
    for bad in (0, -2, True, 2.0, "4"):
        with pytest.raises(InputError, match="image_workers"):
            load(model_folders["squash"], device="cpu", image_workers=bad)  # type: ignore[arg-type]
    model = load(model_folders["squash"], device="cpu")
    assert model.image_workers == max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------- decoding on threads


def _tiff(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels((16, 8, 3), seed)).save(buffer, format="TIFF")
    return buffer.getvalue()


def test_threads_reading_at_once_still_turn_truncated_reads_into_errors_and_restore_the_filters(tmp_path):
    data = _tiff(0)
    truncated = []  # cuts PIL's TIFF reader only warns about ("Truncated File Read"): errors here
    for cut in range(1, len(data)):
        path = tmp_path / f"cut{cut}.tif"
        path.write_bytes(data[:cut])
        try:
            load_image(path)
        except ImageInputError as exc:
            if "Truncated File Read" in str(exc):
                truncated.append(path)
    assert truncated, "no cut of this TIFF makes PIL warn; the test needs one"
    good = tmp_path / "good.tif"
    good.write_bytes(data)
    paths = [p for _ in range(6) for p in (*truncated[:4], good)]
    before = list(warnings.filters)

    def read(path):
        try:
            return load_image(path).size
        except ImageInputError as exc:
            return str(exc)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, paths))
    for path, outcome in zip(paths, got):
        if path == good:
            assert outcome == (8, 16)
        else:
            assert "Truncated File Read" in outcome, (path, outcome)
    assert warnings.filters == before


def test_explain_on_files_threaded_equals_single_threaded_and_the_reference(models, tmp_path):
    single, threaded = models["shortest"]
    cfg = single.metadata.preprocess
    paths = []
    for i, (mode, fmt) in enumerate(
        [("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "GIF"), ("RGB", "WEBP")] * 2
    ):
        path = tmp_path / f"im{i}.{fmt.lower()}"
        _pil(mode, (30 + 7 * i, 41 - 2 * i), i).save(path, format=fmt)
        paths.append(str(path))
    a = single.explain(paths, text_embeds=np.ones((1, single.metadata.embed_dim)), batch_size=len(paths))
    b = threaded.explain(paths, text_embeds=np.ones((1, single.metadata.embed_dim)), batch_size=len(paths))
    np.testing.assert_array_equal(a.heatmaps, b.heatmaps)
    np.testing.assert_array_equal(a.image_embeds, b.image_embeds)
    assert a.sources == b.sources == paths and a.placements == b.placements
    pixels = np.stack([reference_pixels(load_image(p), cfg) for p in paths])
    heat = single._image.run(None, {"pixel_values": pixels, "text_embeds": a.text_embeds})[0]
    np.testing.assert_array_equal(a.heatmaps, heat)
    for original, path in zip(b.images, paths):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(load_image(path).convert("RGB")))
