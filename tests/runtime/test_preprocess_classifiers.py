"""`preprocess` with a classifier's crop_pct against timm's and torchvision's own eval transforms.

timm's `create_transform(**resolve_data_config({}, model=m))` for a ViT whose pretrained_cfg has
crop_pct 0.9, bicubic (Resize(floor(224 / 0.9)) → CenterCrop(224)), and torchvision's
`ViT_B_16_Weights.IMAGENET1K_V1.transforms()` (bilinear, resize 256, crop 224: crop_pct 0.875), on
the same image files. Both expect RGB: their users open a file and `.convert("RGB")` it (timm's
dataset does; a 1-channel or 4-channel tensor fails their Normalize), so that is the oracle's input.
For RGB and grayscale files the order of that conversion does not matter; for RGBA, palette and
CMYK files the runtime resizes in the file's own mode first, as open_clip does (see preprocess.py),
and is not compared here. The oracle tests need torch (marked `torch`); the geometry tests do not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import load_image, model_view, preprocess, to_original


def _noise(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: exercises the filters' ringing and the clamping at 0 and 255."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    return np.clip(ramp * 0.5 + rng.integers(0, 128, (h, w, c)), 0, 255).astype(np.uint8)


IMAGES = {  # file name → image: landscape, portrait, tiny, at the size, at the resize size, a strip, gray
    "landscape.jpg": lambda: Image.fromarray(_noise(240, 320, 3, 0)),
    "portrait.png": lambda: Image.fromarray(_noise(301, 150, 3, 1)),
    "tiny_7x5.png": lambda: Image.fromarray(_noise(5, 7, 3, 2)),
    "exact_224.png": lambda: Image.fromarray(_noise(224, 224, 3, 3)),
    "exact_256.png": lambda: Image.fromarray(_noise(256, 256, 3, 4)),
    "odd_square_249.png": lambda: Image.fromarray(_noise(249, 249, 3, 5)),
    "thin_strip.png": lambda: Image.fromarray(_noise(3, 400, 3, 6)),
    "large.jpg": lambda: Image.fromarray(_noise(613, 947, 3, 7)),
    "gray.jpg": lambda: Image.fromarray(_noise(180, 250, 1, 8)[..., 0], mode="L"),
    "gray.png": lambda: Image.fromarray(_noise(97, 61, 1, 9)[..., 0], mode="L"),
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier_parity_images")
    paths = {}
    for filename, make in IMAGES.items():
        paths[filename] = folder / filename
        make().save(paths[filename])
    return paths


def _max_diffs(oracle, cfg: PreprocessCfg, image_files) -> dict[str, float]:
    diffs = {}
    for filename, path in image_files.items():
        with Image.open(path) as opened:
            expected = oracle(opened.convert("RGB")).numpy()
        ours, _ = preprocess(load_image(path), cfg)
        assert ours.shape == expected.shape == (3, *cfg.size) and ours.dtype == np.float32, filename
        diffs[filename] = float(np.abs(ours - expected).max())
    return diffs


@pytest.mark.torch
def test_preprocess_matches_timms_eval_transform_with_its_crop_pct(image_files):
    timm = pytest.importorskip("timm", reason="timm is the oracle")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    config = timm.data.resolve_data_config({}, model=model)
    assert (
        config["crop_pct"] == 0.9 and config["interpolation"] == "bicubic" and config["crop_mode"] == "center"
    )
    assert config["input_size"] == (3, 224, 224)
    transform = timm.data.create_transform(**config)
    cfg = PreprocessCfg(
        224, config["mean"], config["std"], "bicubic", "shortest", crop_pct=config["crop_pct"]
    )
    diffs = _max_diffs(transform, cfg, image_files)
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.mark.torch
@pytest.mark.parametrize(
    "crop_pct, interpolation", [(0.875, "bilinear"), (0.95, "bicubic"), (1.0, "bicubic")]
)
def test_preprocess_matches_timms_eval_transform_at_any_crop_pct(image_files, crop_pct, interpolation):
    timm_data = pytest.importorskip("timm.data", reason="timm is the oracle")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = timm_data.create_transform(
        (3, 96, 96), crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std, crop_mode="center"
    )
    cfg = PreprocessCfg(96, mean, std, interpolation, "shortest", crop_pct=crop_pct)
    diffs = _max_diffs(transform, cfg, image_files)
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.mark.torch
def test_preprocess_matches_torchvisions_vit_b_16_transforms(image_files):
    models = pytest.importorskip("torchvision.models", reason="torchvision is the oracle")
    transform = models.ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    assert (transform.resize_size, transform.crop_size) == ([256], [224])
    assert transform.interpolation.value == "bilinear"
    cfg = PreprocessCfg(224, transform.mean, transform.std, "bilinear", "shortest", crop_pct=224 / 256)
    assert math.floor(224 / cfg.crop_pct) == 256
    diffs = _max_diffs(transform, cfg, image_files)
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (224, 224), (5, 7), (3, 400)])
@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 1.0])
def test_the_input_maps_back_onto_the_central_crop_pct_of_the_shorter_side(hw, crop_pct):
    """The input covers a centred square of the image whose side is crop_pct of the shorter side (to
    the resize's rounding): a map of ones goes back as ones inside it and zeros outside."""
    h, w = hw
    cfg = PreprocessCfg(224, (0.5,) * 3, (0.5,) * 3, "bilinear", "shortest", crop_pct=crop_pct)
    _, placement = preprocess(Image.new("RGB", (w, h)), cfg)
    left, top, right, bottom = placement.box
    side = crop_pct * min(h, w)
    pixel = max(h, w) / 224  # an input pixel, in original pixels, at most
    assert right - left == pytest.approx(side, rel=0.01, abs=pixel)
    assert bottom - top == pytest.approx(side, rel=0.01, abs=pixel)
    assert (left + right) / 2 == pytest.approx(w / 2, abs=pixel)
    assert (top + bottom) / 2 == pytest.approx(h / 2, abs=pixel)
    back = to_original(np.ones((224, 224), np.float32), placement)
    inside = back[math.ceil(top) : math.floor(bottom), math.ceil(left) : math.floor(right)]
    assert np.all(inside == 1)
    outside = np.ones_like(back, bool)
    outside[math.floor(top) : math.ceil(bottom), math.floor(left) : math.ceil(right)] = False
    assert np.all(back[outside] == 0)


def test_the_model_view_is_the_centre_crop_of_the_larger_resize():
    image = Image.fromarray(_noise(200, 300, 3, 11))
    cfg = PreprocessCfg(64, (0.5,) * 3, (0.5,) * 3, "bilinear", "shortest", crop_pct=0.875)
    seen = model_view(image, cfg)
    resized = image.resize((109, 73), Image.Resampling.BILINEAR)  # shorter side floor(64 / 0.875) = 73
    left, top = round((109 - 64) / 2), round((73 - 64) / 2)
    expected = resized.crop((left, top, left + 64, top + 64))
    assert seen.size == (64, 64) and np.array_equal(np.asarray(seen), np.asarray(expected))


@pytest.mark.parametrize(
    "kwargs", [{"resize_mode": "squash"}, {"resize_mode": "longest"}, {"size": (64, 48)}, {"crop_pct": 0}]
)
def test_crop_pct_below_1_is_only_for_shortest_at_a_square_size(kwargs):
    fields = {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "shortest", "crop_pct": 0.9}
    with pytest.raises(ValueError, match="crop_pct"):
        PreprocessCfg(**(fields | kwargs))
