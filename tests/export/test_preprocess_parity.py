"""The torch-free `preprocess` against open_clip's own inference transform, on image files.

open_clip opens nothing itself: users hand it `PIL.Image.open(path)`, so that is the oracle's input.
16-bit images are the documented deviation (scaled, not clipped) and are not compared here.
"""

from __future__ import annotations

import numpy as np
import pytest
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import load_image, preprocess


def _noise(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: exercises the filters' ringing and the clamping at 0 and 255."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    pixels = ramp * 0.5 + rng.integers(0, 128, (h, w, c))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(_noise(90, 61, 3, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    img.info["transparency"] = 0
    return img


IMAGES = {  # file name → image to save; sizes cover landscape, portrait, tiny, exact S, larger than S
    "landscape.jpg": lambda: Image.fromarray(_noise(240, 320, 3, 0)),
    "portrait.png": lambda: Image.fromarray(_noise(261, 150, 3, 1)),
    "tiny_7x5.png": lambda: Image.fromarray(_noise(5, 7, 3, 2)),
    "exact_s.png": lambda: Image.fromarray(_noise(224, 224, 3, 3)),
    "thin_strip.png": lambda: Image.fromarray(_noise(3, 400, 3, 4)),
    "rgba.png": lambda: Image.fromarray(_noise(130, 97, 4, 6), mode="RGBA"),
    "gray.jpg": lambda: Image.fromarray(_noise(180, 250, 1, 7)[..., 0], mode="L"),
    "gray_alpha.png": lambda: Image.fromarray(_noise(50, 70, 4, 8)).convert("LA"),
    "palette.png": _palette_with_transparency,
    "bilevel.png": lambda: Image.fromarray(_noise(64, 80, 1, 9)[..., 0]).convert("1"),
    "cmyk.jpg": lambda: Image.fromarray(_noise(100, 140, 3, 10)).convert("CMYK"),
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity_images")
    paths = {}
    for filename, make in IMAGES.items():
        paths[filename] = folder / filename
        make().save(paths[filename])
    return paths


@pytest.mark.parametrize("size", [224, 37])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
def test_preprocess_matches_open_clip_on_every_image_file(image_files, resize_mode, interpolation, size):
    cfg = PreprocessCfg(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, interpolation, resize_mode)
    transform = image_transform(
        size, is_train=False, mean=cfg.mean, std=cfg.std, resize_mode=resize_mode, interpolation=interpolation
    )
    diffs = {}
    for filename, path in image_files.items():
        with Image.open(path) as opened:
            expected = transform(opened).numpy()
        ours, _ = preprocess(load_image(path), cfg)
        assert ours.shape == expected.shape == (3, size, size) and ours.dtype == np.float32
        diffs[filename] = float(np.abs(ours - expected).max())
    assert max(diffs.values()) <= 1e-6, diffs
