"""`preprocess` against open_clip 3.3's own inference transform at non-square sizes, in all three modes.

Needs torch and open_clip (marked `torch`; skipped where they are missing, as in the lean CI venv).
Square sizes on image files: tests/export/test_preprocess_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import load_image, preprocess, to_original

pytestmark = pytest.mark.torch
transform = pytest.importorskip("open_clip.transform", reason="open_clip is the oracle")
constants = pytest.importorskip("open_clip.constants")
MEAN, STD = constants.OPENAI_DATASET_MEAN, constants.OPENAI_DATASET_STD


def _noise(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: exercises the filters' ringing and the clamping at 0 and 255."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    return np.clip(ramp * 0.5 + rng.integers(0, 128, (h, w, c)), 0, 255).astype(np.uint8)


def _palette(transparency: bool) -> Image.Image:
    img = Image.fromarray(_noise(90, 61, 3, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    if transparency:
        img.info["transparency"] = 0
    return img


IMAGES = {  # landscape, portrait, tiny, at the size, and every mode open_clip resizes natively
    "landscape": lambda: Image.fromarray(_noise(240, 320, 3, 0)),
    "portrait": lambda: Image.fromarray(_noise(261, 150, 3, 1)),
    "tiny_7x5": lambda: Image.fromarray(_noise(5, 7, 3, 2)),
    "exact_80x48": lambda: Image.fromarray(_noise(48, 80, 3, 3)),
    "rgba": lambda: Image.fromarray(_noise(130, 97, 4, 6), mode="RGBA"),
    "gray": lambda: Image.fromarray(_noise(180, 250, 1, 7)[..., 0], mode="L"),
    "gray_alpha": lambda: Image.fromarray(_noise(50, 70, 4, 8)).convert("LA"),
    "palette": lambda: _palette(False),
    "palette_transparent": lambda: _palette(True),
    "bilevel": lambda: Image.fromarray(_noise(64, 80, 1, 9)[..., 0]).convert("1"),
    "cmyk": lambda: Image.fromarray(_noise(100, 140, 3, 10)).convert("CMYK"),  # pads with CMYK 0: white
}
SIZES = [(48, 80), (80, 48), (37, 37)]  # (height, width): landscape, portrait, and a square


def _open_clip(size, resize_mode: str, interpolation: str):
    return transform.image_transform(
        size, is_train=False, mean=MEAN, std=STD, resize_mode=resize_mode, interpolation=interpolation
    )


def _max_diffs(oracle, cfg: PreprocessCfg) -> dict[str, float]:
    diffs = {}
    for name, make in IMAGES.items():
        image = make()
        expected = oracle(image).numpy()
        ours, _ = preprocess(load_image(image), cfg)
        assert ours.shape == expected.shape == (3, *cfg.size) and ours.dtype == np.float32, name
        diffs[name] = float(np.abs(ours - expected).max())
    return diffs


CASES = [  # open_clip resamples bicubic for 'shortest' at a non-square size whatever it is told: see below
    (mode, interpolation, size)
    for mode in ("squash", "shortest", "longest")
    for interpolation in ("bicubic", "bilinear")
    for size in SIZES
    if not (mode == "shortest" and interpolation == "bilinear" and size[0] != size[1])
]


@pytest.mark.parametrize("resize_mode, interpolation, size", CASES, ids=str)
def test_preprocess_matches_open_clip_at_every_size_and_mode(resize_mode, interpolation, size):
    cfg = PreprocessCfg(size, MEAN, STD, interpolation, resize_mode)
    diffs = _max_diffs(_open_clip(size, resize_mode, interpolation), cfg)
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.mark.parametrize("size", SIZES[:2], ids=str)
def test_shortest_at_a_non_square_size_uses_the_configured_interpolation(size):
    """The documented deviation: open_clip's ResizeKeepRatio(size) ignores `interpolation`. Ours is
    its steps with the configured filter, which are open_clip's own classes given that filter."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, ToTensor

    oracle = Compose(
        [
            transform.ResizeKeepRatio(size, interpolation=InterpolationMode.BILINEAR),
            CenterCrop(size),
            lambda img: img.convert("RGB"),
            ToTensor(),
            Normalize(MEAN, STD),
        ]
    )
    diffs = _max_diffs(oracle, PreprocessCfg(size, MEAN, STD, "bilinear", "shortest"))
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("hw", [(240, 320), (261, 150), (5, 7), (48, 80), (333, 101)])
def test_the_content_open_clip_letterboxes_maps_back_onto_the_whole_image(size, hw):
    """open_clip's output for a white image shows where the image lies: 1 there, 0 on the padding.
    Mapped back with our Placement, that mask covers the original image exactly, and its inverse
    nothing."""
    white = Image.new("RGB", hw[::-1], (255, 255, 255))
    pixels = _open_clip(size, "longest", "bicubic")(white).numpy()  # (3, H, W)
    content = (pixels[0] > 0).astype(np.float32)  # black, normalised, is negative; white positive
    assert content.any() and (content.all(axis=0).any() or content.all(axis=1).any())
    _, placement = preprocess(white, PreprocessCfg(size, MEAN, STD, "bicubic", "longest"))
    np.testing.assert_allclose(to_original(content, placement), 1.0, atol=1e-6)
    np.testing.assert_allclose(to_original(1 - content, placement), 0.0, atol=1e-6)
