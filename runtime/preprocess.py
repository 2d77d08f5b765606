"""Images → `pixel_values`, equal to open_clip's inference transform, and heatmaps back onto the image.

open_clip (3.x) runs, on a PIL image in whatever mode it has: torchvision `Resize` (squash: to S×S;
shortest: shorter side to S) → `CenterCrop(S)` (shortest only) → `convert('RGB')` → `ToTensor` →
`Normalize`. `preprocess` does the same steps with PIL and numpy, in the same order, so it matches to
float32 rounding. The order matters: RGBA and LA are resized with premultiplied alpha, palette and
1-bit images with nearest neighbour (PIL's rules), and only then is the alpha dropped.

`load_image` therefore keeps the modes open_clip handles itself and converts only those it would
mangle; see its docstring for the two deliberate deviations (EXIF orientation, 16-bit images).
"""

from __future__ import annotations

import contextlib
import math
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageInputError, InputError
from .files import UnreadableFile, open_regular
from .metadata import PreprocessCfg

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Placement",
    "open_image_file",
    "load_image",
    "preprocess",
    "preprocess_batch",
    "to_original",
]

# open_clip resizes these in their own mode and then converts to RGB; `preprocess` does the same
NATIVE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK")
_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit (and 32-bit int) grayscale
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_ARRAY_SHAPES = "(H, W), (H, W, 3) or (H, W, 4)"


@dataclass(frozen=True)
class Placement:
    """Where the model's S×S input lies on the original image.

    `box` is (left, top, right, bottom) in original pixel coordinates (edges, not centres): the
    whole image for 'squash', the centre crop mapped back for 'shortest'.
    """

    width: int
    height: int
    box: tuple[float, float, float, float]


DEFAULT_MAX_PIXELS = 64_000_000  # decoded pixels an image may have (64 MP: a 9248x6936 photo fits)
_DRAFT_SCALES = (2, 4, 8)  # the DCT scalings a JPEG decoder offers
# what PIL raises on bad data; MemoryError too: a small file can still declare a costly decode
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError)


@contextlib.contextmanager
def open_image_file(
    path: str | Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Image.Image]:
    """`with open_image_file(...) as img`: the image opened lazily (header only), file closed after.

    Refuses non-files (FIFOs, devices, folders) and images over `max_pixels`. A JPEG over the limit
    is set to decode at 1/2, 1/4 or 1/8 scale (PIL's `draft`, the DCT scaling of libjpeg), the least
    reduction that fits; any other format over the limit is refused before a pixel is decoded.
    PIL's own DecompressionBombWarning is never shown: this is the limit.
    """
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive integer, not {max_pixels!r}")
    try:
        fh = open_regular(path)
    except UnreadableFile as exc:
        hint = "check the path" if "exist" in exc.reason else "pass an image file"
        raise ImageInputError(f"{name} {exc.reason}; {hint}", source=name) from None
    with fh, _reading(name):
        try:
            img = Image.open(fh)
        except UnidentifiedImageError:
            msg = f"{name} is not an image PIL can read; pass a JPEG, PNG, WebP, BMP or TIFF file"
            raise ImageInputError(msg, source=name) from None
        except Image.DecompressionBombError:
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            msg = f"{name} declares more than {limit / 1e6:.0f} MP, too many pixels to decode safely"
            raise ImageInputError(msg, source=name) from None
        except _DECODE_ERRORS as exc:
            raise _corrupt(name, exc) from None
        with img:
            _fit_pixel_limit(img, name, max_pixels)
            yield img


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
    """PIL's warnings while it reads an untrusted image never reach the user as they are.

    A truncated read (PIL's TIFF reader only warns) is corruption: ImageInputError. Other notes on
    damaged metadata are dropped, as PIL recovers from them (a bad EXIF tag is skipped, so the image
    stays as stored). DecompressionBombWarning gives way to our own pixel limit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("error", message="Truncated File Read", category=UserWarning)
        try:
            yield
        except UserWarning as exc:
            raise _corrupt(name, exc) from None


def _corrupt(name: str, exc: BaseException) -> ImageInputError:
    return ImageInputError(
        f"{name} is corrupt or truncated ({exc}); re-save or re-download the image", source=name
    )


def _fit_pixel_limit(img: Image.Image, name: str, max_pixels: int) -> None:
    width, height = img.size
    if width * height <= max_pixels:
        return
    if img.format == "JPEG":
        for k in _DRAFT_SCALES:
            if math.ceil(width / k) * math.ceil(height / k) <= max_pixels:
                img.draft(img.mode, (math.ceil(width / k), math.ceil(height / k)))
                if img.size[0] * img.size[1] <= max_pixels:
                    return
                break
    raise ImageInputError(
        f"{name} has {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
        f"{max_pixels / 1e6:.1f} MP; shrink the image or raise the limit (max_pixels=, --max-pixels)",
        source=name,
    )


def load_image(
    source: str | Path | Image.Image | np.ndarray,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `source` (a path, a PIL image, or a uint8 array (H, W), (H, W, 3), (H, W, 4)).

    Returns a fully decoded image, upright per its EXIF orientation (open_clip ignores EXIF). Modes
    open_clip handles itself are kept (RGB, RGBA, L, LA, P, 1, CMYK) so that `preprocess` matches it;
    call `.convert('RGB')` for display (it drops alpha, it does not composite). 16-bit and 32-bit
    integer grayscale are scaled to 8 bit (v / 257, rounded) instead of PIL's clipping to 255; other
    modes are converted to RGB. Files over `max_pixels` are refused before decoding, except JPEGs,
    which are decoded at the least DCT reduction (1/2, 1/4, 1/8) that fits: the "original" of such
    an image is then the reduced one. Every unusable image raises `ImageInputError` naming `name`
    (and the path, for files).
    """
    if isinstance(source, (str, Path)):
        name = f"{name} ({source})" if name else (str(source) or "''")
        with open_image_file(source, name, max_pixels) as opened:
            try:
                img = _decode(opened)
            except _DECODE_ERRORS as exc:
                raise _corrupt(name, exc) from None
    elif isinstance(source, Image.Image):
        name = name or "in-memory image"
        if source.width * source.height > max_pixels:
            msg = f"{name} has {source.width}x{source.height} pixels, over the limit of {max_pixels:,}"
            raise ImageInputError(msg, source=name)
        try:
            with _reading(name):
                img = _decode(source)
        except _DECODE_ERRORS as exc:
            raise ImageInputError(f"{name} cannot be decoded ({exc})", source=name) from None
    elif isinstance(source, np.ndarray):
        name = name or "in-memory array"
        img = _from_array(source, name)
    else:
        raise TypeError(
            f"load_image takes a path, a PIL image or a uint8 numpy array, got {type(source).__name__}"
        )
    if img.width == 0 or img.height == 0:
        raise ImageInputError(f"{name} is empty ({img.width}x{img.height} pixels)", source=name)
    return _normalise_mode(img, name)


def _decode(img: Image.Image) -> Image.Image:
    img.load()  # force decoding here, so corrupt data fails now and not inside preprocess
    return ImageOps.exif_transpose(img)  # a copy, independent of the file


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        msg = f"{name} has dtype {array.dtype}; expected uint8 0..255 (np.clip(a, 0, 255).astype(np.uint8))"
        raise ImageInputError(msg, source=name)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(f"{name} has shape {array.shape}; expected {_ARRAY_SHAPES}", source=name)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageInputError(f"{name} is empty (shape {array.shape})", source=name)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _normalise_mode(img: Image.Image, name: str) -> Image.Image:
    if img.mode in NATIVE_MODES:
        return img
    if img.mode in _INT_MODES:
        values = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8), mode="L")
    if img.mode == "F":
        msg = f"{name} is a 32-bit float image; save it as 8-bit RGB or grayscale (0..255)"
        raise ImageInputError(msg, source=name)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        msg = f"{name} has unsupported mode {img.mode} ({exc}); save it as RGB"
        raise ImageInputError(msg, source=name) from exc


def _resize_and_crop(img: Image.Image, cfg: PreprocessCfg) -> tuple[Image.Image, Placement]:
    """torchvision Resize (+ CenterCrop for 'shortest') on a PIL image, step for step."""
    w, h, s = img.width, img.height, cfg.size
    if cfg.resize_mode == "squash":
        new_w, new_h = s, s
    else:  # torchvision's _compute_resized_output_size for an int size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _FILTERS[cfg.interpolation])
    top = int(round((new_h - s) / 2.0))  # torchvision CenterCrop's offsets; 0 for squash
    left = int(round((new_w - s) / 2.0))
    if (new_w, new_h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    sx, sy = w / new_w, h / new_h
    return img, Placement(w, h, (left * sx, top * sy, (left + s) * sx, (top + s) * sy))


def model_view(image: Image.Image, cfg: PreprocessCfg) -> Image.Image:
    """The S×S picture the model sees: `image` resized (and centre-cropped) as `preprocess` does."""
    return _resize_and_crop(image, cfg)[0]


def preprocess(image: Image.Image, cfg: PreprocessCfg) -> tuple[np.ndarray, Placement]:
    """One image → float32 (3, S, S) `pixel_values`, as open_clip's inference transform gives."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess takes a PIL image (see load_image), got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"image is empty ({image.width}x{image.height} pixels)")
    img, placement = _resize_and_crop(image, cfg)
    x = np.asarray(img.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)  # (S, S, 3)
    return np.ascontiguousarray(x.transpose(2, 0, 1)), placement  # (3, S, S)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessCfg) -> tuple[np.ndarray, list[Placement]]:
    """Several images → float32 (B, 3, S, S) and one Placement each."""
    if len(images) == 0:
        raise InputError("preprocess_batch got no images; pass at least one")
    results = [preprocess(image, cfg) for image in images]
    return np.stack([x for x, _ in results]), [p for _, p in results]


def to_original(heatmap: np.ndarray, placement: Placement) -> np.ndarray:
    """An (S, S) map on the model input → float32 (height, width) on the original image.

    Bilinear resize onto the crop box; outside it (the part 'shortest' cropped away) the map is 0.
    """
    heatmap = np.ascontiguousarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or heatmap.shape[0] != heatmap.shape[1]:
        raise InputError(f"to_original takes an (S, S) map, got shape {heatmap.shape}")
    left, top, right, bottom = placement.box
    x0, x1 = (min(max(_round_half_up(v), 0), placement.width) for v in (left, right))
    y0, y1 = (min(max(_round_half_up(v), 0), placement.height) for v in (top, bottom))
    resized = Image.fromarray(heatmap, mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    canvas = np.zeros((placement.height, placement.width), np.float32)
    canvas[y0:y1, x0:x1] = np.asarray(resized, dtype=np.float32)
    return canvas


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)
