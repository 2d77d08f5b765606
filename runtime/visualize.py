"""Pictures of LeGrad heatmaps: colormaps, overlays, the per-layer figure and prompt grids.

numpy and PIL only. Heatmaps are float arrays in [0, 1] (values outside are clipped); pictures are
PIL images. The default 'jet' table is OpenCV's COLORMAP_JET, the look of the LeGrad authors' demo,
and a map is quantised as they do it: `uint8(map * 255)` indexes the table.

A map is drawn on its image in one of three STYLES: 'overlay' blends the colored map over the
image (the authors' look); 'contour' leaves the image untouched and draws the map's iso-lines
(CONTOUR_LEVELS) and a ring around its peak, so the objects under the map stay visible;
'side-by-side' puts the image and its overlay next to each other.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ._colormaps import TABLES

__all__ = [
    "COLORMAPS",
    "CONTOUR_LEVELS",
    "STYLES",
    "colorize",
    "contour",
    "overlay",
    "layer_figure",
    "grid",
    "save_png",
    "min_max",
    "resize_map",
]

COLORMAPS: tuple[str, ...] = (*TABLES, "gray")
STYLES: tuple[str, ...] = ("overlay", "contour", "side-by-side")
CONTOUR_LEVELS: tuple[float, ...] = (0.5, 0.75)  # iso-lines of a [0, 1] map that 'contour' draws
_LUTS: dict[str, np.ndarray] = {}
_PAD = 6  # px between panels and around text
_WHITE, _BLACK, _LETTERBOX = (255, 255, 255), (0, 0, 0), (232, 232, 232)
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _lut(cmap: str) -> np.ndarray:
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colormap {cmap!r}; expected one of {', '.join(COLORMAPS)}")
    if cmap not in _LUTS:
        if cmap == "gray":
            table = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        else:
            table = np.frombuffer(bytes.fromhex(TABLES[cmap]), dtype=np.uint8).reshape(256, 3)
        _LUTS[cmap] = table
    return _LUTS[cmap]


def _as_maps(maps: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """`maps` as float32 with `ndim` dims, checked finite (not yet clipped)."""
    arr = np.asarray(maps)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} has {bad} NaN/inf values; heatmaps must be finite (check the model output)")
    return arr


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to `size` = (width, height); upsampling equals torch's align_corners=False."""
    if heatmap.shape == (size[1], size[0]):
        return heatmap
    as_image = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))  # mode 'F'
    resized = as_image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def min_max(heatmap: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes zeros."""
    lo, hi = float(heatmap.min()), float(heatmap.max())
    if not hi > lo:
        return np.zeros_like(heatmap, dtype=np.float32)
    return ((heatmap - lo) / (hi - lo)).astype(np.float32)


def colorize(heatmap: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Map a (H, W) heatmap in [0, 1] to a (H, W, 3) uint8 RGB picture."""
    lut = _lut(cmap)
    heatmap = np.clip(_as_maps(heatmap, 2, "heatmap"), 0.0, 1.0)
    return lut[(heatmap * 255).astype(np.uint8)]


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    cmap: str = "jet",
    alpha: float = 0.5,
    style: str = "overlay",
    caption: str | None = None,
) -> Image.Image:
    """`heatmap` drawn on `image` (the map resized to it) in `style`, one of STYLES:

    'overlay': the RGB blend `(1 - alpha) * image + alpha * colormap(heatmap)`;
    'contour': the image untouched but for the map's iso-lines and peak ring (see `contour`);
    'side-by-side': the image, then its overlay, at the same height (twice the width).
    `caption`, when given, is written under the picture (wrapped to two lines at most).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if caption is not None and not isinstance(caption, str):
        raise TypeError(f"caption must be a string or None, got {type(caption).__name__}")
    if style == "contour":
        picture = contour(image, heatmap, cmap)
    else:
        lut = _lut(cmap)
        rgb = image.convert("RGB")
        heat = resize_map(_as_maps(heatmap, 2, "heatmap"), rgb.size)
        color = lut[(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)].astype(np.float32)
        blend = (1.0 - alpha) * np.asarray(rgb, dtype=np.float32) + alpha * color
        picture = Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8), "RGB")
        if style == "side-by-side":
            pair = Image.new("RGB", (2 * rgb.width, rgb.height))
            pair.paste(rgb, (0, 0))
            pair.paste(picture, (rgb.width, 0))
            picture = pair
    return picture if caption is None else _captioned(picture, caption)


def contour(
    image: Image.Image,
    heatmap: np.ndarray,
    cmap: str = "jet",
    levels: Sequence[float] = CONTOUR_LEVELS,
    peak: bool = True,
) -> Image.Image:
    """The image untouched but for the iso-lines of `heatmap` (resized to it) at `levels`, each in
    its level's colormap color, and (with `peak`) a white ring around the map's maximum.

    A level's line is the edge of the region where the map reaches it (the region minus its erosion,
    just inside it), about 0.6% of the image's shorter side thick, outlined in black so it reads
    on any background. Pixels away from every line and the ring keep their exact values.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    lut = _lut(cmap)
    if not all(isinstance(v, numbers.Real) and 0.0 < v < 1.0 for v in levels):
        raise ValueError(f"contour levels must be numbers in (0, 1), got {list(levels)!r}")
    rgb = image.convert("RGB")
    heat = np.clip(resize_map(_as_maps(heatmap, 2, "heatmap"), rgb.size), 0.0, 1.0)
    width = max(1, round(min(rgb.size) / 160))  # line thickness, px
    halo = max(1, width // 2)  # black outline on each side, px
    lines = [(_edge(heat >= level, width), tuple(lut[int(level * 255)])) for level in sorted(levels)]
    pixels = np.array(rgb)
    if lines:
        drawn = np.logical_or.reduce([edge for edge, _ in lines])
        pixels[_dilate(drawn, halo)] = _BLACK
        for edge, color in lines:
            pixels[edge] = color
    out = Image.fromarray(pixels, "RGB")
    if peak and heat.max() > heat.min():
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        r = 4 * width + 3
        box = (int(x) - r, int(y) - r, int(x) + r, int(y) + r)
        draw = ImageDraw.Draw(out)
        draw.ellipse(box, outline=_BLACK, width=width + 2 * halo)
        inner = (box[0] + halo, box[1] + halo, box[2] - halo, box[3] - halo)
        draw.ellipse(inner, outline=_WHITE, width=width)
    return out


def _edge(region: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: the pixels of `region` within `width` px of its border (not of the image's)."""
    mask = Image.fromarray(region.astype(np.uint8) * 255, "L")
    eroded = mask.filter(ImageFilter.MinFilter(2 * width + 1))
    edge: np.ndarray = np.asarray(mask) > np.asarray(eroded)
    return edge


def _dilate(region: np.ndarray, by: int) -> np.ndarray:
    """(H, W) bool: `region` grown by `by` px (a square neighbourhood)."""
    mask = Image.fromarray(region.astype(np.uint8) * 255, "L")
    grown: np.ndarray = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * by + 1))) > 0
    return grown


def _captioned(picture: Image.Image, caption: str) -> Image.Image:
    """`picture` above a white strip holding `caption`, centred, in at most two lines."""
    font = _font(max(10, min(24, picture.width // 30)))
    lines = _wrap(caption, font, max(1, picture.width - 2 * _PAD))
    out = Image.new("RGB", (picture.width, picture.height + len(lines) * _line_height(font) + _PAD), _WHITE)
    out.paste(picture, (0, 0))
    _text(ImageDraw.Draw(out), lines, font, _PAD, picture.height + _PAD // 2, picture.width - 2 * _PAD)
    return out


# Pillow's built-in font covers ASCII only; a system DejaVu (most Linux installs) covers accents,
# Cyrillic, Greek and more. Captions fall back to the built-in font where none is found.
_UNICODE_FONTS = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial Unicode.ttf")


@functools.lru_cache(maxsize=16)
def _font(size: int) -> _Font:
    for name in _UNICODE_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _line_height(font: _Font) -> int:
    return int(font.getbbox("Ayg|")[3]) + 2


def _wrap(text: str, font: _Font, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap to `width` px; words too long are cut; the last kept line ends with '…'."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        if font.getlength(f"{cur} {word}".strip()) <= width:
            cur = f"{cur} {word}".strip()
            continue
        if cur:
            lines.append(cur)
        cur = word
        while len(cur) > 1 and font.getlength(cur) > width:
            cut = 1
            while cut < len(cur) and font.getlength(cur[: cut + 1]) <= width:
                cut += 1
            lines.append(cur[:cut])
            cur = cur[cut:]
    lines.append(cur)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _text(draw: ImageDraw.ImageDraw, lines: list[str], font: _Font, left: int, top: int, width: int) -> None:
    for k, line in enumerate(lines):
        x = left + max(0.0, (width - font.getlength(line)) / 2)
        draw.text((x, top + k * _line_height(font)), line, fill=_BLACK, font=font)


def _fit(image: Image.Image, box: int) -> Image.Image:
    """`image` scaled (aspect kept) to fit in a box × box square."""
    scale = box / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def layer_figure(
    image: Image.Image,
    layer_maps: np.ndarray,
    layers: Sequence[int],
    prompt: str,
    cmap: str = "jet",
    alpha: float = 0.5,
    panel: int = 224,
) -> Image.Image:
    """The LeGrad paper's per-layer figure: image | one overlay per layer | the sum, titled by `prompt`.

    `layer_maps` (L, gh, gw) are raw per-layer maps over `image`'s extent, each min-max normalised on
    its own; the image (any aspect) is scaled to fit a `panel` px square and the maps are upsampled
    bilinearly to it. More than 6 panels wrap to rows.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    maps = _as_maps(layer_maps, 3, "layer_maps")
    if len(layers) != len(maps):
        raise ValueError(f"got {len(layers)} layer indices for {len(maps)} layer maps; pass one per map")
    base = _fit(image, panel)
    panels = [(base, "image")]
    panels += [(overlay(base, min_max(m), cmap, alpha), f"layer {i}") for m, i in zip(maps, layers)]
    panels.append((overlay(base, min_max(maps.sum(axis=0)), cmap, alpha), "sum"))

    rows = math.ceil(len(panels) / 6)
    cols = math.ceil(len(panels) / rows)
    font, title_font = _font(max(10, panel // 16)), _font(max(12, panel // 12))
    cell_w, cell_h = base.width + _PAD, base.height + _line_height(font) + _PAD
    width = cols * cell_w + _PAD
    title = _wrap(prompt, title_font, width - 2 * _PAD)
    title_h = len(title) * _line_height(title_font) + _PAD
    fig = Image.new("RGB", (width, _PAD + title_h + rows * cell_h), _WHITE)
    draw = ImageDraw.Draw(fig)
    _text(draw, title, title_font, _PAD, _PAD, width - 2 * _PAD)
    for k, (pic, caption) in enumerate(panels):
        left, top = _PAD + (k % cols) * cell_w, _PAD + title_h + (k // cols) * cell_h
        fig.paste(pic, (left, top))
        _text(draw, [caption], font, left, top + base.height + 2, base.width)
    return fig


def grid(
    images: Sequence[Image.Image],
    heatmaps: Sequence[Sequence[np.ndarray]],
    prompts: Sequence[str],
    scores: np.ndarray | None = None,
    cmap: str = "jet",
    cell: int = 224,
    alpha: float = 0.5,
    captions: Sequence[Sequence[str]] | None = None,
) -> Image.Image:
    """Rows = images, columns = prompts: `heatmaps[b][p]` over `images[b]`, letterboxed to `cell` px.

    Prompts head the columns (wrapped, ellipsised); `scores` (B, P), when given, go under each cell,
    or `captions[b][p]`, a text per cell (a classifier's class and probability), instead.
    """
    n_img, n_prompt = len(images), len(prompts)
    if n_img == 0 or n_prompt == 0:
        raise ValueError(f"need at least one image and one prompt, got {n_img} and {n_prompt}")
    if len(heatmaps) != n_img or any(len(row) != n_prompt for row in heatmaps):
        raise ValueError(f"heatmaps must be {n_img} rows (images) of {n_prompt} maps (prompts)")
    if scores is not None and captions is not None:
        raise ValueError("pass scores or captions, not both")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (n_img, n_prompt):
            raise ValueError(f"scores must have shape ({n_img}, {n_prompt}), got {scores.shape}")
        captions = [[f"{scores[b, p]:.3f}" for p in range(n_prompt)] for b in range(n_img)]
    if captions is not None and (len(captions) != n_img or any(len(row) != n_prompt for row in captions)):
        raise ValueError(f"captions must be {n_img} rows (images) of {n_prompt} texts (prompts)")
    font = _font(max(10, cell // 15))
    line_h = _line_height(font)
    header_h = 2 * line_h + _PAD
    score_h = line_h if captions is not None else 0
    cell_w, cell_h = cell + _PAD, cell + score_h + _PAD
    fig = Image.new("RGB", (_PAD + n_prompt * cell_w, _PAD + header_h + n_img * cell_h), _WHITE)
    draw = ImageDraw.Draw(fig)
    for p, prompt in enumerate(prompts):
        lines = _wrap(str(prompt), font, cell)
        _text(draw, lines, font, _PAD + p * cell_w, _PAD + (2 - len(lines)) * line_h, cell)
    for b, image in enumerate(images):
        for p in range(n_prompt):
            left, top = _PAD + p * cell_w, _PAD + header_h + b * cell_h
            pic = _fit(overlay(image, heatmaps[b][p], cmap, alpha), cell)
            draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=_LETTERBOX)
            fig.paste(pic, (left + (cell - pic.width) // 2, top + (cell - pic.height) // 2))
            if captions is not None:
                caption = _wrap(str(captions[b][p]), font, cell, max_lines=1)
                _text(draw, caption, font, left, top + cell + 1, cell)
    return fig


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write `img` as a PNG at `path`, creating parent folders; returns the path."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
