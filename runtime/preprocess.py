"""Images → `pixel_values`, equal to open_clip's inference transform, and heatmaps back onto the image.

open_clip (3.x) runs, on a PIL image in whatever mode it has, for a size (H, W):

- squash: torchvision `Resize((H, W))`;
- shortest, square: `Resize(S)` (shorter side to S) → `CenterCrop(S)`; with `crop_pct` below 1 (a
  classifier's), `Resize(floor(S / crop_pct))` → `CenterCrop(S)`, timm's eval transform and
  torchvision's `ImageClassification` (resize 256, crop 224: crop_pct 0.875);
- shortest, not square: `ResizeKeepRatio((H, W))` (scaled by the smaller ratio, so the image covers
  the box) → `CenterCrop((H, W))`;
- longest: `ResizeKeepRatio((H, W), longest=1)` (scaled to fit inside) → `CenterCropOrPad((H, W))`,
  which pads with 0 in the image's own mode (black for RGB, RGBA, L, LA, 1);

then `convert('RGB')` → `ToTensor` → `Normalize`. `preprocess` does the same steps with PIL and
numpy, in the same order, so it matches to float32 rounding. The order matters: RGBA and LA are
resized with premultiplied alpha, palette and 1-bit images with nearest neighbour (PIL's rules), and
only then is the alpha dropped. Two deviations: for 'shortest' at a non-square size open_clip's
`ResizeKeepRatio` always resamples bicubic, whatever the configured interpolation; here the
configured one is used (they agree for bicubic, open_clip's default). And a side `ResizeKeepRatio`
would round to 0 px (a 1 × 400 strip) is kept at 1 px instead of failing.

`load_image` therefore keeps the modes open_clip handles itself and converts only those it would
mangle; see its docstring for the two deliberate deviations (EXIF orientation, 16-bit images).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
    "preprocess_into",
    "to_original",
]

T = TypeVar("T")

# open_clip resizes these in their own mode and then converts to RGB; `preprocess` does the same
NATIVE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK")
_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit (and 32-bit int) grayscale
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_ARRAY_SHAPES = "(H, W), (H, W, 3) or (H, W, 4)"


@dataclass(frozen=True)
class Placement:
    """Where the model's (H, W) input lies on the original image.

    `box` is (left, top, right, bottom) of the model input's full extent in original pixel
    coordinates (edges, not centres): the whole image for 'squash', the centre crop mapped back for
    'shortest'. For 'longest' it reaches beyond the image (negative, or past width or height) on the
    padded sides.
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

    The filters are process-wide (unless Python's warnings are context-aware), so threads reading
    at once share one set: the first to start reading installs it, the last to finish restores
    what was there before (nested `catch_warnings` per thread would undo each other's).
    """
    with _reading_filters():
        try:
            yield
        except UserWarning as exc:
            raise _corrupt(name, exc) from None


_FILTERS_LOCK = threading.Lock()
_filters_users = 0  # threads inside _reading_filters() now
_filters_saved: contextlib.ExitStack | None = None  # what restores the filters from before


@contextlib.contextmanager
def _reading_filters() -> Iterator[None]:
    global _filters_users, _filters_saved
    if getattr(sys.flags, "context_aware_warnings", False):  # each thread's own filters (3.14+)
        with warnings.catch_warnings():
            _install_reading_filters()
            yield
        return
    with _FILTERS_LOCK:
        if _filters_users == 0:
            saved = contextlib.ExitStack()
            saved.enter_context(warnings.catch_warnings())
            _install_reading_filters()
            _filters_saved = saved
        _filters_users += 1
    try:
        yield
    finally:
        with _FILTERS_LOCK:
            _filters_users -= 1
            if _filters_users == 0 and _filters_saved is not None:
                _filters_saved.close()
                _filters_saved = None


def _install_reading_filters() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.filterwarnings("error", message="Truncated File Read", category=UserWarning)


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
    """open_clip's inference resize (+ centre crop or pad) on a PIL image, step for step."""
    w, h = img.size
    out_h, out_w = cfg.size
    if cfg.resize_mode == "squash":  # torchvision Resize((h, w))
        new_w, new_h = out_w, out_h
    elif cfg.resize_mode == "shortest" and out_h == out_w:  # torchvision Resize(int): int() truncates
        short, long = (w, h) if w <= h else (h, w)
        scaled = out_h if cfg.crop_pct == 1 else math.floor(out_h / cfg.crop_pct)  # timm's scale_size
        new_short, new_long = scaled, int(scaled * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:  # open_clip's ResizeKeepRatio: shortest (non-square) fills the box, longest fits inside it
        ratios = (h / out_h, w / out_w)
        ratio = max(ratios) if cfg.resize_mode == "longest" else min(ratios)
        new_h, new_w = (max(1, round(v / ratio)) for v in (h, w))  # round() as theirs; ≥ 1 px (see above)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _FILTERS[cfg.interpolation])
    pad_left, pad_top = max(0, (out_w - new_w) // 2), max(0, (out_h - new_h) // 2)
    if new_w < out_w or new_h < out_h:  # torchvision's pad, as CenterCrop and CenterCropOrPad do it
        img = _pad(img, (pad_left, pad_top, max(0, out_w - new_w + 1) // 2, max(0, out_h - new_h + 1) // 2))
    left = int(round((img.width - out_w) / 2.0))  # torchvision CenterCrop's offsets; 0 when padded
    top = int(round((img.height - out_h) / 2.0))
    if img.size != (out_w, out_h):
        img = img.crop((left, top, left + out_w, top + out_h))
    x0, y0 = left - pad_left, top - pad_top  # the model input's corner on the resized image
    box = (x0 * w / new_w, y0 * h / new_h, (x0 + out_w) * w / new_w, (y0 + out_h) * h / new_h)
    return img, Placement(w, h, box)


def _pad(img: Image.Image, border: tuple[int, int, int, int]) -> Image.Image:
    """torchvision's F.pad on a PIL image with fill 0: zeros in the image's own mode (palette index 0
    for 'P', white for CMYK), the palette kept. open_clip pads before converting to RGB."""
    fill = 0 if len(img.getbands()) == 1 else (0,) * len(img.getbands())
    padded = ImageOps.expand(img, border=border, fill=fill)
    palette = img.getpalette() if img.mode == "P" else None
    if palette is not None:
        padded.putpalette(palette)
    return padded


def model_view(image: Image.Image, cfg: PreprocessCfg) -> Image.Image:
    """The (H, W) picture the model sees: `image` resized, centre-cropped or padded as `preprocess` does."""
    return _resize_and_crop(image, cfg)[0]


def preprocess(image: Image.Image, cfg: PreprocessCfg) -> tuple[np.ndarray, Placement]:
    """One image → float32 (3, H, W) `pixel_values`, as open_clip's inference transform gives."""
    out = np.empty((3, *cfg.size), np.float32)
    return out, preprocess_into(image, cfg, out)


def preprocess_into(image: Image.Image, cfg: PreprocessCfg, out: np.ndarray) -> Placement:
    """`preprocess` writing the (3, H, W) pixel values into `out` (a float32 array of that shape, e.g.
    one row of a batch) instead of a new array; returns the image's Placement."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess takes a PIL image (see load_image), got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"image is empty ({image.width}x{image.height} pixels)")
    img, placement = _resize_and_crop(image, cfg)
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert('RGB') of an RGB image: a copy
    normalise(np.asarray(rgb, dtype=np.uint8), cfg, out)
    return placement


def normalise(rgb: np.ndarray, cfg: PreprocessCfg, out: np.ndarray) -> None:
    """uint8 (H, W, 3) → `out`, float32 (3, H, W): (v / 255 - mean) / std per channel.

    Each step is the same float32 operation on the same value as in the (H, W, 3) form open_clip's
    ToTensor + Normalize amount to, so the result is bit-equal to it; only the layout differs: the
    channels are split first, so every operation runs over H·W contiguous values (broadcasting a
    3-long mean over (H, W, 3) costs numpy about ten times more).
    """
    for c in range(3):
        np.divide(rgb[:, :, c], np.float32(255), out=out[c], dtype=np.float32)
    np.subtract(out, np.asarray(cfg.mean, np.float32)[:, None, None], out=out)
    np.divide(out, np.asarray(cfg.std, np.float32)[:, None, None], out=out)


def default_workers() -> int:
    """Threads that decode and preprocess a batch's images by default: min(8, CPU count)."""
    return max(1, min(8, os.cpu_count() or 1))


def check_workers(workers: object) -> int:
    """`workers` if it is a positive integer; InputError otherwise."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"image_workers must be a positive integer, not {workers!r}")
    return workers


def run_each(
    task: Callable[[int], T], count: int, workers: int, stop: Callable[[BaseException], bool] | None = None
) -> list[T | Exception]:
    """task(0) ... task(count - 1), each one's result or the Exception it raised, in order.

    With `workers` above 1 they run in a thread pool of that many threads (PIL's decoders and
    resampling and numpy's arithmetic release the GIL) and every task runs; with 1 they run here,
    one after the other, and the first failure for which `stop` says True ends the list (the rest
    are not run).
    """

    def attempt(i: int) -> T | Exception:
        try:
            return task(i)
        except Exception as exc:  # handed back in order, for the caller to raise or record
            return exc

    if workers > 1 and count > 1:
        with ThreadPoolExecutor(max_workers=min(workers, count), thread_name_prefix="legrad-images") as pool:
            return list(pool.map(attempt, range(count)))
    outcomes: list[T | Exception] = []
    for i in range(count):
        outcomes.append(attempt(i))
        if isinstance(outcomes[-1], Exception) and (stop is None or stop(outcomes[-1])):
            break
    return outcomes


def preprocess_batch(
    images: Sequence[Image.Image], cfg: PreprocessCfg, workers: int = 1
) -> tuple[np.ndarray, list[Placement]]:
    """Several images → float32 (B, 3, H, W) and one Placement each; `workers` threads (the same
    arrays for any number)."""
    check_workers(workers)
    if len(images) == 0:
        raise InputError("preprocess_batch got no images; pass at least one")
    pixels = np.empty((len(images), 3, *cfg.size), np.float32)
    outcomes = run_each(lambda i: preprocess_into(images[i], cfg, pixels[i]), len(images), workers)
    placements = []
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
        placements.append(outcome)
    return pixels, placements


def to_original(heatmap: np.ndarray, placement: Placement) -> np.ndarray:
    """A 2-D map over the model input (any resolution: (H, W) heatmaps, (gh, gw) layer maps) →
    float32 (height, width) on the original image.

    The map spans `placement.box`. Where the box lies inside the image (squash; shortest's crop), the
    map is resized bilinearly onto the box rounded to whole pixels, and the image outside it (what
    'shortest' cropped away) is 0. Where the box reaches beyond the image ('longest' padding), the
    map's part over the padding is dropped first (whole cells; a cell the image's edge cuts is kept)
    so that no padding value bleeds in, and the rest is resized onto the image.
    """
    heatmap = np.ascontiguousarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise InputError(f"to_original takes a non-empty 2-D (H, W) map, got shape {heatmap.shape}")
    left, top, right, bottom = placement.box
    x0, x1, u0, u1 = _span(left, right, placement.width, heatmap.shape[1])
    y0, y1, v0, v1 = _span(top, bottom, placement.height, heatmap.shape[0])
    canvas = np.zeros((placement.height, placement.width), np.float32)
    if x1 > x0 and y1 > y0 and u1 > u0 and v1 > v0:
        cols, rows = (math.floor(u0), math.ceil(u1)), (math.floor(v0), math.ceil(v1))  # cells kept
        kept = Image.fromarray(np.ascontiguousarray(heatmap[slice(*rows), slice(*cols)]), mode="F")
        box = (u0 - cols[0], v0 - rows[0], u1 - cols[0], v1 - rows[0])  # on the kept cells
        canvas[y0:y1, x0:x1] = np.asarray(kept.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box))
    return canvas


def _span(lo: float, hi: float, extent: int, cells: int) -> tuple[int, int, float, float]:
    """Along one axis: the image pixels [p0, p1) the map covers, and the map's part [c0, c1) over them.

    An edge inside the image is rounded to a pixel and takes the map's own edge; an edge beyond the
    image (padding) becomes the image's edge and cuts the map where the image ends (snapped to a cell
    edge within 1e-6 cell, so that float error neither keeps a padding cell nor drops an image one).
    """
    scale = cells / (hi - lo)  # map cells per original pixel
    p0, c0 = (0, _snap(-lo * scale)) if lo < 0 else (min(_round_half_up(lo), extent), 0.0)
    if hi > extent:
        p1, c1 = extent, _snap((extent - lo) * scale)
    else:
        p1, c1 = max(min(_round_half_up(hi), extent), 0), float(cells)
    return p0, p1, min(max(c0, 0.0), float(cells)), min(max(c1, 0.0), float(cells))


def _snap(v: float) -> float:
    return float(round(v)) if abs(v - round(v)) < 1e-6 else v


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)
