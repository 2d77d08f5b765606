"""Loading and preprocessing images, and mapping heatmaps back. Torch-free (runs in the lean venv too).

Parity with open_clip's own transform is tested where torch is installed: square sizes on image files in
tests/export/test_preprocess_parity.py, non-square sizes and 'longest' in test_preprocess_open_clip.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from legrad_runtime.errors import ImageInputError, InputError
from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import (
    NATIVE_MODES,
    Placement,
    load_image,
    model_view,
    preprocess,
    preprocess_batch,
    to_original,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _cfg(
    size: int | tuple[int, int] = 32, resize_mode: str = "squash", interpolation: str = "bicubic"
) -> PreprocessCfg:
    return PreprocessCfg(size, MEAN, STD, interpolation, resize_mode)


def _pixels(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------- bad inputs


def _truncated_jpeg(path):
    Image.fromarray(_pixels(120, 160)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _png_with_broken_crc(path):
    Image.fromarray(_pixels(40, 50)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    path.write_bytes(bytes(data))


BAD_FILES = {
    "missing.jpg": (lambda path: None, "does not exist"),
    "a_folder.jpg": (lambda path: path.mkdir(), "directory"),
    "notes.jpg": (lambda path: path.write_text("not a picture\n"), "not an image"),
    "truncated.jpg": (_truncated_jpeg, "corrupt or truncated"),
    "broken.png": (_png_with_broken_crc, "corrupt or truncated"),
}


@pytest.mark.parametrize("filename", list(BAD_FILES))
def test_bad_files_raise_image_input_error_naming_the_file(tmp_path, filename):
    make, reason = BAD_FILES[filename]
    path = tmp_path / filename
    make(path)
    with pytest.raises(ImageInputError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.source == str(path)


def test_a_named_path_is_reported_with_its_name_and_path(tmp_path):
    with pytest.raises(ImageInputError, match="nope.png") as info:
        load_image(str(tmp_path / "nope.png"), name="image #3")
    assert info.value.source == f"image #3 ({tmp_path / 'nope.png'})"


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((5, 0), np.uint8), "empty"),
        (np.zeros((8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((8, 8, 3), np.uint16), "dtype uint16"),
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(2, 8, 8, 3\)"),
        (np.zeros(8, np.uint8), r"shape \(8,\)"),
    ],
)
def test_unusable_arrays_raise_image_input_error_naming_the_image(array, reason):
    with pytest.raises(ImageInputError, match=reason) as info:
        load_image(array, name="image #0")
    assert "image #0" in str(info.value) and info.value.source == "image #0"


def test_an_empty_pil_image_is_refused():
    with pytest.raises(ImageInputError, match="empty"):
        load_image(Image.new("RGB", (0, 4)), name="image #1")
    with pytest.raises(ImageInputError, match="empty"):
        preprocess(Image.new("RGB", (4, 0)), _cfg())


def test_a_float_image_is_refused_instead_of_clipped_to_black():
    with pytest.raises(ImageInputError, match="float"):
        load_image(Image.new("F", (4, 4), 0.5), name="image #2")


@pytest.mark.parametrize("source", [b"\x89PNG", 42, None, [[0, 1], [2, 3]]])
def test_wrong_python_types_raise_type_error(source):
    with pytest.raises(TypeError, match="path, a PIL image or a uint8 numpy array"):
        load_image(source)


def test_preprocess_takes_only_pil_images_and_batches_are_not_empty():
    with pytest.raises(TypeError, match="PIL image"):
        preprocess(_pixels(8, 8), _cfg())
    with pytest.raises(InputError, match="no images"):
        preprocess_batch([], _cfg())


# ---------------------------------------------------------------- accepted inputs


def _image_in_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(_pixels(21, 34))
    if mode == "P+transparency":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 0
        return img
    if mode in ("I;16", "I;16B", "I"):
        values = np.random.default_rng(1).integers(0, 65536, (21, 34))
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
        img = Image.fromarray(values.astype(dtype))
        assert img.mode == mode
        return img
    if mode == "RGBA":
        return Image.fromarray(_pixels(21, 34, 4), mode="RGBA")
    return rgb.convert(mode)


ACCEPTED_MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK", "YCbCr", "I;16", "I;16B", "I"]


@pytest.mark.parametrize("size", [32, (24, 40)])
@pytest.mark.parametrize("resize_mode", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("mode", ACCEPTED_MODES)
def test_every_accepted_mode_gives_finite_float32_pixel_values(tmp_path, mode, resize_mode, size):
    img = load_image(_image_in_mode(mode))
    assert img.mode in NATIVE_MODES and img.size == (34, 21)
    x, placement = preprocess(img, _cfg(size, resize_mode))
    height, width = (size, size) if isinstance(size, int) else size
    assert x.shape == (3, height, width) and x.dtype == np.float32 and np.isfinite(x).all()
    assert (placement.width, placement.height) == (34, 21)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_uint8_arrays_are_accepted(channels, mode):
    pixels = _pixels(9, 13, channels)
    img = load_image(pixels[:, ::-1])  # a strided view works too
    assert img.size == (13, 9) and img.mode == mode
    np.testing.assert_array_equal(np.asarray(img), pixels[:, ::-1])
    x, _ = preprocess(img, _cfg(16, "shortest"))
    assert x.shape == (3, 16, 16) and np.isfinite(x).all()


def test_files_of_every_common_format_load(tmp_path):
    for suffix in ("jpg", "png", "webp", "bmp", "tif", "gif"):
        path = tmp_path / f"img.{suffix}"
        Image.fromarray(_pixels(12, 17)).save(path)
        assert load_image(path).size == (17, 12)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(_pixels(40, 60)).save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (40, 60)  # (width, height): transposed from the stored 60 x 40
    with Image.open(path) as stored:
        assert stored.size == (60, 40)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(ImageOps.exif_transpose(stored)))


def test_16_bit_grayscale_is_scaled_to_8_bit_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # really saved as a 16-bit PNG
    loaded = np.asarray(load_image(path))
    assert loaded.min() == 0 and loaded.max() == 255 and len(np.unique(loaded)) == 256
    np.testing.assert_array_equal(loaded, np.rint(values / 257.0).astype(np.uint8))


def test_an_input_already_at_size_is_only_normalised():
    pixels = _pixels(32, 32)
    x, placement = preprocess(Image.fromarray(pixels), _cfg(32, "squash"))
    expected = (pixels.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), atol=1e-6)
    assert placement == Placement(32, 32, (0.0, 0.0, 32.0, 32.0))


def test_batches_are_single_images_stacked():
    images = [Image.fromarray(_pixels(h, w, seed=h)) for h, w in [(20, 30), (45, 16), (32, 32)]]
    batch, placements = preprocess_batch(images, _cfg(24, "shortest"))
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == np.float32
    for image, row, placement in zip(images, batch, placements):
        single, single_placement = preprocess(image, _cfg(24, "shortest"))
        np.testing.assert_array_equal(row, single)
        assert placement == single_placement


# ---------------------------------------------------------------- placement and to_original


def test_placement_is_the_whole_image_for_squash_and_the_centre_crop_for_shortest():
    img = Image.fromarray(_pixels(200, 300))  # resized to 150 x 100, crop x 25..125 → x 50..250
    _, squash = preprocess(img, _cfg(100, "squash"))
    _, shortest = preprocess(img, _cfg(100, "shortest"))
    assert squash == Placement(300, 200, (0.0, 0.0, 300.0, 200.0))
    assert shortest == Placement(300, 200, (50.0, 0.0, 250.0, 200.0))
    _, portrait = preprocess(Image.fromarray(_pixels(300, 200)), _cfg(100, "shortest"))
    assert portrait.box == (0.0, 50.0, 200.0, 250.0)


def test_to_original_places_the_map_on_the_crop_and_zero_elsewhere():
    heatmap = np.random.default_rng(3).random((100, 100), dtype=np.float32)
    placement = Placement(300, 200, (50.0, 0.0, 250.0, 200.0))
    full = to_original(heatmap, placement)
    assert full.shape == (200, 300) and full.dtype == np.float32
    assert not full[:, :50].any() and not full[:, 250:].any()
    inside = Image.fromarray(heatmap, mode="F").resize((200, 200), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(full[:, 50:250], np.asarray(inside), atol=1e-6)


def test_to_original_keeps_the_map_when_the_image_is_already_at_size():
    heatmap = np.random.default_rng(4).random((32, 32), dtype=np.float32)
    _, placement = preprocess(Image.fromarray(_pixels(32, 32)), _cfg(32, "squash"))
    np.testing.assert_allclose(to_original(heatmap, placement), heatmap, atol=1e-6)


@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
@pytest.mark.parametrize("hw", [(5, 7), (240, 320), (333, 101), (3, 400)])
def test_to_original_covers_the_original_pixel_grid(resize_mode, hw):
    _, placement = preprocess(Image.fromarray(_pixels(*hw)), _cfg(32, resize_mode))
    full = to_original(np.ones((32, 32), np.float32), placement)
    assert full.shape == hw and full.min() >= 0 and full.max() <= 1 + 1e-6
    if resize_mode == "squash":
        np.testing.assert_allclose(full, 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(4,), (2, 4, 5), (0, 5), (4, 0)])
def test_to_original_refuses_a_map_that_is_not_a_2d_map(shape):
    with pytest.raises(InputError, match="2-D"):
        to_original(np.zeros(shape, np.float32), Placement(5, 4, (0.0, 0.0, 5.0, 4.0)))


# ---------------------------------------------------------------- non-square sizes, 'longest'

# Hand computations for a 300 x 200 landscape and a 120 x 200 portrait at 80 wide, 48 high:
# longest  landscape: ratio max(200/48, 300/80) = 25/6, resized 72 x 48, padded 4 left, 4 right
# longest  portrait:  ratio max(200/48, 120/80) = 25/6, resized 29 x 48 (28.8), padded 25 left, 26 right
# shortest landscape: ratio min(200/48, 300/80) = 3.75, resized 80 x 53 (53.3), crop top round(2.5) = 2
# squash: 80 x 48 whatever the image
NON_SQUARE = (48, 80)  # (height, width)


def test_longest_placement_reaches_into_the_padding():
    _, landscape = preprocess(Image.fromarray(_pixels(200, 300)), _cfg(NON_SQUARE, "longest"))
    np.testing.assert_allclose(landscape.box, (-4 * 300 / 72, 0, 76 * 300 / 72, 200))
    _, portrait = preprocess(Image.fromarray(_pixels(200, 120)), _cfg(NON_SQUARE, "longest"))
    np.testing.assert_allclose(portrait.box, (-25 * 120 / 29, 0, 55 * 120 / 29, 200))
    _, shortest = preprocess(Image.fromarray(_pixels(200, 300)), _cfg(NON_SQUARE, "shortest"))
    np.testing.assert_allclose(shortest.box, (0, 2 * 200 / 53, 300, 50 * 200 / 53))
    _, squash = preprocess(Image.fromarray(_pixels(200, 300)), _cfg(NON_SQUARE, "squash"))
    assert squash.box == (0.0, 0.0, 300.0, 200.0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "1"])
def test_longest_pads_with_black_before_normalising(mode):
    img = Image.fromarray(np.full((200, 120, 4), 255, np.uint8), mode="RGBA").convert(mode)
    x, _ = preprocess(img, _cfg(NON_SQUARE, "longest"))  # 29 columns of image, 25 left and 26 right of black
    black = (0 - np.float32(MEAN)) / np.float32(STD)
    white = (1 - np.float32(MEAN)) / np.float32(STD)
    assert x.shape == (3, 48, 80)
    np.testing.assert_allclose(x[:, :, :25], np.broadcast_to(black[:, None, None], (3, 48, 25)), atol=1e-6)
    np.testing.assert_allclose(x[:, :, 54:], np.broadcast_to(black[:, None, None], (3, 48, 26)), atol=1e-6)
    np.testing.assert_allclose(x[:, :, 25:54], np.broadcast_to(white[:, None, None], (3, 48, 29)), atol=1e-6)


@pytest.mark.parametrize("hw, pad", [((200, 300), (4, 4)), ((200, 120), (25, 26))])
def test_to_original_drops_the_padding_of_longest(hw, pad):
    _, placement = preprocess(Image.fromarray(_pixels(*hw)), _cfg(NON_SQUARE, "longest"))
    content = np.zeros(NON_SQUARE, np.float32)
    content[:, pad[0] : 80 - pad[1]] = 1
    np.testing.assert_allclose(to_original(content, placement), 1.0, atol=1e-6)  # no padding bleeds in
    np.testing.assert_allclose(to_original(1 - content, placement), 0.0, atol=1e-6)
    heatmap = np.random.default_rng(5).random(NON_SQUARE, dtype=np.float32)
    inside = Image.fromarray(np.ascontiguousarray(heatmap[:, pad[0] : 80 - pad[1]]), mode="F")
    expected = np.asarray(inside.resize(hw[::-1], Image.Resampling.BILINEAR))
    np.testing.assert_allclose(to_original(heatmap, placement), expected, atol=1e-6)


def _ramp(shape: tuple[int, int], axis: int) -> np.ndarray:
    """Each cell holds its centre's coordinate along `axis`: bilinear resampling keeps it exact."""
    centres = np.arange(shape[axis], dtype=np.float32) + 0.5
    return np.ascontiguousarray(np.broadcast_to(centres[:, None] if axis == 0 else centres, shape))


@pytest.mark.parametrize(
    "hw, resize_mode, along_x, along_y",
    [  # the model coordinate of original pixel centre x (or y) + 0.5, by hand (see above)
        ((200, 300), "longest", lambda x: 4 + x * 72 / 300, lambda y: y * 48 / 200),
        ((200, 120), "longest", lambda x: 25 + x * 29 / 120, lambda y: y * 48 / 200),
        ((200, 300), "shortest", lambda x: x * 80 / 300, lambda y: y * 53 / 200 - 2),
        ((200, 300), "squash", lambda x: x * 80 / 300, lambda y: y * 48 / 200),
        ((120, 100), "squash", lambda x: x * 80 / 100, lambda y: y * 48 / 120),
    ],
)
def test_to_original_puts_each_model_coordinate_where_the_preprocessing_took_it(
    hw, resize_mode, along_x, along_y
):
    _, placement = preprocess(Image.fromarray(_pixels(*hw)), _cfg(NON_SQUARE, resize_mode))
    along = {0: along_y, 1: along_x}
    u = {axis: along[axis](np.arange(hw[axis]) + 0.5) for axis in (0, 1)}  # of each pixel centre
    covered = {axis: (u[axis] > 0) & (u[axis] < NON_SQUARE[axis]) for axis in (0, 1)}
    for axis in (0, 1):
        back = to_original(_ramp(NON_SQUARE, axis), placement)
        back = (back if axis == 1 else back.T)[covered[1 - axis]]  # (other side, this side)
        inside = (u[axis] >= 0.5) & (u[axis] <= NON_SQUARE[axis] - 0.5)  # away from where filters clamp
        if resize_mode == "longest":  # ... and from the content's edges: the padding is cut off
            inside &= (u[axis] >= along[axis](0.0) + 0.5) & (u[axis] <= along[axis](hw[axis]) - 0.5)
        assert inside.sum() > hw[axis] // 2
        expected = np.broadcast_to(u[axis][inside], back[:, inside].shape)
        # a crop's edges inside the image are rounded to whole pixels: off by up to half a pixel
        rounded = resize_mode == "shortest" and covered[axis].sum() < hw[axis]
        per_pixel = along[axis](1.0) - along[axis](0.0)  # model cells per original pixel
        np.testing.assert_allclose(back[:, inside], expected, atol=0.5 * per_pixel if rounded else 2e-4)
        assert not back[:, ~covered[axis]].any()  # what 'shortest' cropped away is 0


def test_to_original_takes_a_layer_map_at_grid_resolution():
    """A (3, 5) map over the landscape: 0.25 of a cell is padding on each side (4 of 16 px)."""
    _, placement = preprocess(Image.fromarray(_pixels(200, 300)), _cfg(NON_SQUARE, "longest"))
    layer = np.random.default_rng(6).random((3, 5), dtype=np.float32)
    full = to_original(layer, placement)
    expected = Image.fromarray(layer, mode="F").resize(
        (300, 200), Image.Resampling.BILINEAR, box=(0.25, 0, 4.75, 3)
    )
    assert full.shape == (200, 300)
    np.testing.assert_allclose(full, np.asarray(expected), atol=1e-6)


@pytest.mark.parametrize("resize_mode", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("hw", [(5, 7), (240, 320), (333, 101), (3, 400), (1, 400), (400, 1), (1, 1)])
def test_every_mode_maps_a_non_square_map_onto_the_whole_original(resize_mode, hw):
    x, placement = preprocess(Image.fromarray(_pixels(*hw)), _cfg(NON_SQUARE, resize_mode))
    assert x.shape == (3, 48, 80) and np.isfinite(x).all()
    full = to_original(np.ones(NON_SQUARE, np.float32), placement)
    assert full.shape == hw and full.min() >= 0 and full.max() <= 1 + 1e-6
    if resize_mode != "shortest":  # squash and longest see the whole image
        np.testing.assert_allclose(full, 1.0, atol=1e-6)


def test_model_view_is_the_picture_preprocess_normalises():
    img = Image.fromarray(_pixels(200, 120, 4), mode="RGBA")
    for resize_mode in ("squash", "shortest", "longest"):
        cfg = _cfg(NON_SQUARE, resize_mode)
        seen = model_view(img, cfg)
        assert seen.size == (80, 48)
        expected = (np.asarray(seen.convert("RGB"), np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
        np.testing.assert_allclose(preprocess(img, cfg)[0], expected.transpose(2, 0, 1), atol=1e-6)


def test_preprocess_module_imports_without_torch():
    code = (
        "import sys, legrad_runtime.preprocess; print('torch' in sys.modules or 'open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
