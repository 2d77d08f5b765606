"""Colormaps, overlays, the per-layer figure and grids. Torch-free (numpy + PIL only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from legrad_runtime.visualize import (
    COLORMAPS,
    STYLES,
    colorize,
    contour,
    grid,
    layer_figure,
    overlay,
    save_png,
)


def _image(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def _blob(n: int = 14) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    return np.exp(-((xx - 0.4) ** 2 + (yy - 0.6) ** 2) / 0.05)


@pytest.mark.parametrize("cmap", COLORMAPS)
def test_colorize_gives_uint8_rgb_of_the_map_shape(cmap):
    out = colorize(np.random.default_rng(0).random((5, 7)), cmap)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_the_required_colormaps_are_available():
    assert {"jet", "turbo", "viridis", "inferno", "magma", "gray"} <= set(COLORMAPS)


def test_gray_runs_from_black_to_white():
    out = colorize(np.array([[0.0, 1.0]]), "gray")
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_jet_is_blue_when_low_and_red_when_high():
    low, high = colorize(np.array([[0.0, 1.0]]), "jet")[0].astype(int)
    assert low[2] > 100 and low[0] == 0 and low[1] == 0
    assert high[0] > 100 and high[1] == 0 and high[2] == 0


def test_jet_equals_opencv_colormap_jet():
    cv2 = pytest.importorskip("cv2")
    ramp = np.arange(256, dtype=np.uint8)[None, :]
    expected = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[..., ::-1]
    np.testing.assert_array_equal(colorize(ramp / 255.0, "jet"), expected)


def test_values_outside_unit_range_are_clipped():
    out = colorize(np.array([[-3.0, 0.0, 1.0, 7.0]]), "gray")[0, :, 0]
    assert out.tolist() == [0, 0, 255, 255]


def test_unknown_colormap_raises_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="viridis") as info:
        colorize(np.zeros((2, 2)), "rainbow-unicorn")
    assert "rainbow-unicorn" in str(info.value) and "jet" in str(info.value)
    with pytest.raises(ValueError, match="jet"):
        overlay(_image(), np.zeros((2, 2)), cmap="nope")


def test_overlay_with_alpha_zero_returns_the_image_unchanged():
    image = _image()
    out = overlay(image, _blob(), alpha=0.0)
    assert out.mode == "RGB" and out.size == image.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_overlay_with_alpha_one_returns_the_colormap():
    heat = np.random.default_rng(1).random((48, 64))
    out = overlay(_image(), heat, cmap="viridis", alpha=1.0)
    np.testing.assert_array_equal(np.asarray(out), colorize(heat, "viridis"))


def test_overlay_blends_half_and_half():
    image = Image.new("RGB", (4, 4), (100, 50, 0))
    out = np.asarray(overlay(image, np.ones((4, 4)), cmap="gray", alpha=0.5))
    assert out[0, 0].tolist() == [178, 152, 128]  # rint((x + 255) / 2)


def test_overlay_resizes_a_smaller_map_to_the_image():
    image = _image(80, 60)
    out = overlay(image, _blob(7), alpha=1.0, cmap="gray")
    assert out.size == (80, 60)
    gray = np.asarray(out)[..., 0].astype(int)
    row, col = np.unravel_index(gray.argmax(), gray.shape)
    assert abs(col / 80 - 0.45) < 0.15 and abs(row / 60 - 0.6) < 0.15  # the blob stays where it was


def test_overlay_accepts_non_rgb_images():
    assert overlay(_image().convert("L"), _blob()).mode == "RGB"
    assert overlay(_image().convert("RGBA"), _blob()).mode == "RGB"


def test_nan_heatmap_raises_a_clear_value_error():
    heat = _blob()
    heat[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        overlay(_image(), heat)
    with pytest.raises(ValueError, match="NaN"):
        colorize(heat)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.zeros(5), np.zeros((0, 4))])
def test_heatmap_must_be_a_non_empty_2d_array(bad):
    with pytest.raises(ValueError, match="2-D"):
        overlay(_image(), bad)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_range_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        overlay(_image(), _blob(), alpha=alpha)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="PIL"):
        overlay(np.zeros((4, 4, 3)), _blob())
    with pytest.raises(TypeError, match="alpha"):
        overlay(_image(), _blob(), alpha="0.5")
    with pytest.raises(TypeError, match="dtype"):
        colorize(np.array([["a", "b"]]))


# ---------------------------------------------------------------- styles: contour, side-by-side


def _texture(width: int = 300, height: int = 200) -> Image.Image:
    """Random pixels: any pixel a style paints over differs from the original."""
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _radial(width: int = 300, height: int = 200, cx: float = 130, cy: float = 95, sigma: float = 30):
    """A Gaussian bump at (cx, cy): its iso-line at level L is the circle of radius
    sigma * sqrt(-2 ln L), and every pixel's distance to the centre is known."""
    yy, xx = np.mgrid[0:height, 0:width]
    r = np.hypot(xx - cx, yy - cy)
    return np.exp(-(r**2) / (2 * sigma**2)), r


def test_contour_leaves_every_pixel_away_from_the_iso_lines_and_the_peak_untouched():
    image = _texture()
    heat, r = _radial()
    out = np.asarray(overlay(image, heat, style="contour"))
    original = np.asarray(image)
    radii = {level: 30 * np.sqrt(-2 * np.log(level)) for level in (0.5, 0.75)}  # 35.3 and 22.8 px
    near_a_line = np.logical_or.reduce([np.abs(r - radius) <= 4 for radius in radii.values()])
    far = ~near_a_line & (r > 12)  # 12 px: room for the ring around the peak
    assert far.mean() > 0.9  # the check below covers nearly the whole picture
    np.testing.assert_array_equal(out[far], original[far])
    assert (out != original).any()  # and the lines are there


def test_contour_draws_each_level_in_its_colormap_color_all_around_its_iso_line():
    heat, _ = _radial()
    out = np.asarray(contour(_texture(), heat, cmap="jet"))
    for level in (0.5, 0.75):
        radius, color = 30 * np.sqrt(-2 * np.log(level)), colorize(np.array([[level]]), "jet")[0, 0]
        hits = 0
        for angle in np.radians(np.arange(0, 360, 5)):
            ray = [
                (round(95 + d * np.sin(angle)), round(130 + d * np.cos(angle)))
                for d in radius + np.arange(-3, 1.5, 0.5)
            ]
            hits += any((out[y, x] == color).all() for y, x in ray)
        assert hits >= 0.9 * 72, (level, hits)  # the line goes all the way round


def test_contour_rings_the_peak_in_white_unless_asked_not_to():
    heat, r = _radial()
    white = (np.asarray(contour(_texture(), heat)) == 255).all(axis=-1)
    assert white[r <= 12].sum() > 10 and not white[(r > 12) & (r < 20)].any()
    unringed = (np.asarray(contour(_texture(), heat, peak=False)) == 255).all(axis=-1)
    assert not unringed[r <= 12].any()


def test_contour_of_a_flat_map_is_the_image_itself():
    image = _texture(64, 48)
    np.testing.assert_array_equal(np.asarray(contour(image, np.zeros((7, 7)))), np.asarray(image))


def test_contour_resizes_the_map_and_accepts_any_image_mode():
    out = overlay(_image(80, 60).convert("L"), _blob(7), style="contour")
    assert out.mode == "RGB" and out.size == (80, 60)


def test_side_by_side_is_the_image_then_its_overlay_at_the_same_height():
    image, heat = _image(64, 48), _blob()
    out = np.asarray(overlay(image, heat, alpha=0.4, style="side-by-side"))
    assert out.shape == (48, 128, 3)
    np.testing.assert_array_equal(out[:, :64], np.asarray(image))
    np.testing.assert_array_equal(out[:, 64:], np.asarray(overlay(image, heat, alpha=0.4)))


@pytest.mark.parametrize("style", STYLES)
def test_a_caption_goes_under_the_picture_in_every_style(style):
    image, heat = _image(200, 120), _blob()
    plain = np.asarray(overlay(image, heat, style=style))
    captioned = np.asarray(overlay(image, heat, style=style, caption="a photo of a cat (0.283)"))
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    np.testing.assert_array_equal(captioned[: plain.shape[0]], plain)
    assert (captioned[plain.shape[0] :] < 100).any()  # dark text on the white strip


def test_bad_styles_captions_and_levels_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="overlay, contour, side-by-side"):
        overlay(_image(), _blob(), style="heatmap")
    with pytest.raises(TypeError, match="caption"):
        overlay(_image(), _blob(), caption=3)
    with pytest.raises(ValueError, match="levels"):
        contour(_image(), _blob(), levels=(0.5, 1.5))
    with pytest.raises(ValueError, match="NaN"):
        overlay(_image(), np.full((4, 4), np.nan), style="contour")


def test_layer_figure_grows_by_one_panel_per_layer():
    maps = np.random.default_rng(2).random((4, 7, 7))
    widths = [layer_figure(_image(), maps[:n], list(range(n)), "a cat").width for n in (1, 2, 3, 4)]
    steps = np.diff(widths)
    assert (steps > 0).all() and len(set(steps.tolist())) == 1  # every panel has the same width
    assert widths[0] >= 3 * steps[0]  # image + 1 layer + sum


def test_layer_figure_wraps_many_layers_to_several_rows():
    maps = np.random.default_rng(3).random((12, 7, 7))
    one_row = layer_figure(_image(), maps[:2], [10, 11], "a cat")
    many = layer_figure(_image(), maps, list(range(12)), "a cat")
    assert many.height > 2 * one_row.height * 0.8 and many.width <= 2 * one_row.width


def test_layer_figure_renders_a_constant_layer_as_zeros_without_nan():
    maps = np.stack([np.full((7, 7), 0.3), _blob(7)])
    with np.errstate(all="raise"):  # no 0/0 on the constant map
        fig = layer_figure(_image(), maps, [0, 1], "a constant layer", cmap="gray", alpha=1.0)
    pixels = np.asarray(fig)
    assert fig.mode == "RGB" and np.isfinite(pixels).all()
    assert (pixels == 0).all(axis=-1).sum() > 0.5 * 48 * 64  # the constant panel is black in 'gray'


def test_layer_figure_keeps_a_non_square_picture_and_grid_in_shape():
    """An 80 x 48 model input with 3 x 5 layer maps: panels 224 x 134, no stretching to squares."""
    maps = np.random.default_rng(4).random((2, 3, 5))
    wide = layer_figure(_image(80, 48), maps, [0, 1], "a cat")
    square = layer_figure(_image(48, 48), np.random.default_rng(4).random((2, 3, 3)), [0, 1], "a cat")
    assert wide.width == square.width  # four panels, each 224 px wide
    assert square.height - wide.height == 224 - round(48 * 224 / 80)


def test_layer_figure_checks_layers_against_maps():
    with pytest.raises(ValueError, match="layer"):
        layer_figure(_image(), np.zeros((3, 7, 7)), [0, 1], "a cat")
    with pytest.raises(ValueError, match="3-D"):
        layer_figure(_image(), np.zeros((7, 7)), [0], "a cat")


def _grid(n_images: int, n_prompts: int, **kwargs) -> Image.Image:
    images = [_image(64, 48), _image(30, 90), _image(50, 50)][:n_images]
    heat = [[_blob(7 + p) for p in range(n_prompts)] for _ in images]
    return grid(images, heat, [f"prompt {p}" for p in range(n_prompts)], **kwargs)


def test_grid_is_one_cell_per_image_and_prompt_plus_headers():
    cell = 96
    w = {p: _grid(1, p, cell=cell).width for p in (1, 2, 3)}
    h = {b: _grid(b, 1, cell=cell).height for b in (1, 2, 3)}
    assert w[2] - w[1] == w[3] - w[2] >= cell
    assert h[2] - h[1] == h[3] - h[2] >= cell
    assert h[1] > cell + (h[2] - h[1] - cell)  # room for the column headers
    with_scores = _grid(2, 2, cell=cell, scores=np.array([[0.283, 0.1], [0.2, 0.3]]))
    assert with_scores.height > _grid(2, 2, cell=cell).height


def test_grid_letterboxes_cells_keeping_the_aspect_ratio():
    tall = Image.new("RGB", (20, 80), (0, 0, 0))
    fig = np.asarray(grid([tall], [[np.zeros((4, 4))]], ["x"], cmap="gray", alpha=0.0, cell=80))
    black_cols = np.flatnonzero((fig == 0).all(axis=-1).sum(axis=0) >= 80)
    assert 18 <= len(black_cols) <= 22  # 20 px wide, not stretched to 80


def test_grid_captions_survive_long_and_unicode_prompts():
    prompts = ["a " + "very " * 60 + "long prompt", "supercalifragilistic" * 8, "café 猫 🐱 naïve", ""]
    heat = [[_blob() for _ in prompts]]
    fig = grid([_image()], heat, prompts, scores=np.array([[0.283, -1.0, np.nan, 12.5]]), cell=64)
    assert fig.mode == "RGB" and fig.width >= 4 * 64


def test_grid_checks_its_arguments():
    with pytest.raises(ValueError, match="rows"):
        grid([_image()], [[_blob()], [_blob()]], ["a"])
    with pytest.raises(ValueError, match="scores"):
        grid([_image()], [[_blob()]], ["a"], scores=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="at least one"):
        grid([], [], ["a"])


def test_save_png_creates_folders_and_writes_a_readable_png(tmp_path):
    path = save_png(overlay(_image(), _blob()), tmp_path / "a" / "b" / "heat.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (64, 48)
