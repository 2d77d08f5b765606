"""A non-square folder end to end, torch-free: the tiny OpenCLIP model at 80 wide, 48 high (a 3×5
grid of 16 px patches), letterboxed ('longest': aspect kept, padded with black).

The geometry is worked out by hand for a 300 x 200 landscape and a 120 x 200 portrait: both are
scaled by 48/200 to 72 x 48 and 29 x 48 (28.8 rounded), then padded to 80 wide, (4, 4) and (25, 26)
columns left and right.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from legrad_runtime import load, session
from legrad_runtime.cli import main as cli_main
from legrad_runtime.visualize import overlay

PROMPTS = ["a red circle", "a blue square"]
HEIGHT, WIDTH = 48, 80
LANDSCAPE, PORTRAIT = (200, 300), (200, 120)  # (height, width)
CONTENT = {LANDSCAPE: (4, 76), PORTRAIT: (25, 54)}  # the image's columns on the model input


@pytest.fixture(scope="module")
def model(model_folders):
    return load(model_folders["longest"], device="cpu")


def _image(hw: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, hw[1])[None, :, None]
    return Image.fromarray(np.clip(ramp * 0.6 + rng.integers(0, 100, (*hw, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(LANDSCAPE, 0), _image(PORTRAIT, 1)]


@pytest.fixture(scope="module")
def result(model, images):
    return model.explain(images, PROMPTS)


def test_the_folder_is_non_square_and_letterboxed(model):
    meta = model.metadata
    assert (meta.image_size, meta.grid_size, meta.patch_size) == ((HEIGHT, WIDTH), (3, 5), 16)
    assert meta.preprocess.size == (HEIGHT, WIDTH) and meta.preprocess.resize_mode == "longest"
    assert meta.tower.grid == (3, 5) and meta.schema_version >= 4
    assert "size=80x48" in repr(model)


def test_explain_gives_height_by_width_maps_and_grid_h_by_grid_w_layer_maps(model, result):
    assert result.heatmaps.shape == (2, 2, HEIGHT, WIDTH) and result.heatmaps.dtype == np.float32
    assert result.layer_maps.shape == (2, 2, len(model.metadata.layers), 3, 5)
    assert np.isfinite(result.heatmaps).all() and result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1
    np.testing.assert_allclose(result.heatmaps.reshape(4, -1).max(-1), 1, atol=1e-6)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1, rtol=1e-6)


def test_each_image_and_prompt_equals_its_single_result(model, images, result):
    for b, image in enumerate(images):
        for p, prompt in enumerate(PROMPTS):
            alone = model.explain(image, [prompt])
            np.testing.assert_allclose(result.heatmaps[b, p], alone.heatmaps[0, 0], atol=1e-5)
            np.testing.assert_allclose(result.layer_maps[b, p], alone.layer_maps[0, 0], atol=1e-6)


@pytest.mark.parametrize("b, hw", [(0, LANDSCAPE), (1, PORTRAIT)])
def test_the_model_sees_the_image_letterboxed_by_hand(model, images, result, b, hw):
    """The same image scaled and pasted on black by hand (80 x 48 already: nothing left to resize
    or pad) gets the same heatmaps."""
    left, right = CONTENT[hw]
    boxed = Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    boxed.paste(images[b].resize((right - left, HEIGHT), Image.Resampling.BICUBIC), (left, 0))
    by_hand = model.explain(boxed, PROMPTS)
    np.testing.assert_allclose(by_hand.heatmaps[0], result.heatmaps[b], atol=1e-5)
    np.testing.assert_allclose(by_hand.image_embeds[0], result.image_embeds[b], atol=1e-5)


@pytest.mark.parametrize("b, hw", [(0, LANDSCAPE), (1, PORTRAIT)])
def test_heatmaps_on_the_original_drop_the_padding(images, result, b, hw):
    left, right = CONTENT[hw]
    for p in range(len(PROMPTS)):
        content = Image.fromarray(np.ascontiguousarray(result.heatmaps[b, p][:, left:right]), mode="F")
        expected = np.asarray(content.resize(hw[::-1], Image.Resampling.BILINEAR))
        on_original = result.heatmap_on_original(b, p)
        assert on_original.shape == hw
        np.testing.assert_allclose(on_original, expected, atol=1e-6)
        shown = result.overlay(b, p)
        assert shown.size == images[b].size
        assert np.array_equal(np.asarray(shown), np.asarray(overlay(images[b], expected)))


def test_the_layer_figure_shows_the_letterboxed_picture(result, images, monkeypatch):
    assert result.layer_figure(1, 0).width > WIDTH
    seen = {}
    monkeypatch.setattr(
        session, "layer_figure", lambda picture, maps, *a, **k: seen.update(picture=picture, maps=maps)
    )
    result.layer_figure(1, 0)
    picture = np.asarray(seen["picture"].convert("RGB"))
    assert picture.shape == (HEIGHT, WIDTH, 3) and seen["maps"].shape[1:] == (3, 5)
    left, right = CONTENT[PORTRAIT]
    assert not picture[:, :left].any() and not picture[:, right:].any()  # black padding
    expected = images[1].resize((right - left, HEIGHT), Image.Resampling.BICUBIC)
    assert np.array_equal(picture[:, left:right], np.asarray(expected))


def test_a_batch_where_every_image_fails_keeps_the_non_square_shapes(model, tmp_path):
    (failed,) = model.explain_batches([tmp_path / "missing.png"], PROMPTS, on_error="skip")
    assert failed.heatmaps.shape == (0, 2, HEIGHT, WIDTH)
    assert failed.layer_maps.shape == (0, 2, len(model.metadata.layers), 3, 5)
    assert len(failed.failures) == 1


def test_legrad_explain_writes_overlays_at_each_original_size(model_folders, images, tmp_path, capsys):
    paths = []
    for name, image in zip(("landscape", "portrait"), images):
        paths.append(tmp_path / "in" / f"{name}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        image.save(paths[-1])
    out = tmp_path / "out"
    argv = ["explain", str(model_folders["longest"]), *map(str, paths), "--out", str(out)]
    argv += ["-p", PROMPTS[0], "-p", PROMPTS[1], "--save-npy", "--layers-figure"]
    assert cli_main(argv) == 0
    for path, image in zip(paths, images):
        folder = out / path.stem
        overlays = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("__layers"))
        figures = sorted(folder.glob("*__layers.png"))
        assert len(overlays) == len(figures) == len(PROMPTS)
        for png in overlays:
            with Image.open(png) as written:
                assert written.size == image.size
        assert np.load(folder / "heatmaps.npy").shape == (len(PROMPTS), image.height, image.width)
    assert "wrote 4 overlays for 2 image(s)" in capsys.readouterr().out


def test_legrad_info_prints_width_by_height(model_folders, capsys):
    assert cli_main(["info", str(model_folders["longest"])]) == 0
    text = capsys.readouterr().out
    assert "80×48 px" in text and "grid 5×3" in text and "longest" in text
