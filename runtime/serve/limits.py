"""What one request may ask for, and how a request's fields become a `Job` and its `Options`.

Every refusal is an `HTTPProblem`: a status and one message naming the problem and the fix, which
the app answers as `{"error": message}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..classes import parse_top_k
from ..errors import PromptError
from ..session import LeGradModel, _check_prompts
from ..visualize import COLORMAPS, STYLES
from .batcher import Job

__all__ = [
    "Limits",
    "Options",
    "HTTPProblem",
    "MAPS",
    "parse_bool",
    "parse_options",
    "make_job",
    "open_upload",
]

MAPS = ("none", "json", "npy")  # raw maps in the response: none, nested lists, or base64 .npy files


class HTTPProblem(Exception):
    """A request the server refuses: `status` and a message naming the problem and the fix."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for (the `legrad serve` options of the same names)."""

    max_body_bytes: int = 32 * 1024**2
    max_images: int = 16
    max_pixels: int = 16_000_000
    max_prompts: int = 16
    max_prompt_chars: int = 300
    timeout_s: float = 30.0
    max_queue_images: int = 64


@dataclass(frozen=True)
class Options:
    """How a request wants its results drawn and returned."""

    overlays: bool = True
    layers_figure: bool = False
    cmap: str = "jet"
    alpha: float = 0.5
    style: str = "overlay"
    maps: str = "none"


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise HTTPProblem(422, f"option {name}={value!r} is not a boolean; pass true or false")


def parse_options(get: dict[str, object]) -> Options:
    """Options from a request's fields (form values are strings, JSON values typed)."""
    o = Options()
    overlays = parse_bool("overlays", get.get("overlays", o.overlays))
    figure = parse_bool("layers_figure", get.get("layers_figure", o.layers_figure))
    cmap, style, maps = (str(get.get(k, getattr(o, k))) for k in ("cmap", "style", "maps"))
    if cmap not in COLORMAPS:
        raise HTTPProblem(422, f"unknown cmap {cmap!r}; pass one of {', '.join(COLORMAPS)}")
    if style not in STYLES:
        raise HTTPProblem(422, f"unknown style {style!r}; pass one of {', '.join(STYLES)}")
    if maps not in MAPS:
        raise HTTPProblem(422, f"unknown maps {maps!r}; pass one of {', '.join(MAPS)}")
    raw = get.get("alpha", o.alpha)
    try:
        alpha = float(raw) if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else -1.0
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise HTTPProblem(422, f"alpha={raw!r} is not a number in [0, 1]; pass e.g. alpha=0.5")
    return Options(overlays, figure, cmap, alpha, style, maps)


def open_upload(data: bytes, name: str, limits: Limits) -> Image.Image:
    """An uploaded file opened lazily (header only, nothing decoded): refused here when it is not an
    image or has more pixels than allowed; decoding happens in the batch, where a corrupt body fails
    only its own request."""
    if not data:
        raise HTTPProblem(422, f"image {name!r} is empty; upload an image file (PNG, JPEG, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise HTTPProblem(
            415, f"image {name!r} is not an image this server can read ({exc}); upload PNG, JPEG, ..."
        ) from None
    if img.width * img.height > limits.max_pixels:
        raise HTTPProblem(
            413,
            f"image {name!r} has {img.width}x{img.height} pixels, over this server's limit of "
            f"{limits.max_pixels:,}; downscale it",
        )
    return img


def decode_base64(text: object, name: str) -> bytes:
    if not isinstance(text, str):
        raise HTTPProblem(422, f"image {name!r}: 'data' must be a base64 string")
    if "," in text[:100] and text.startswith("data:"):  # a data: URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPProblem(422, f"image {name!r} is not valid base64; encode the file's bytes") from None


def make_job(
    model: LeGradModel,
    images: list[Image.Image],
    names: list[str],
    prompts: Sequence[str],
    classes: Sequence[str | int],
    options: Options,
    limits: Limits,
) -> Job:
    """The job for a request's images and prompts (or classes), checked before it is queued, so
    that nothing in a batch can fail for one request's words."""
    if not images:
        raise HTTPProblem(422, "no images given; send one or more files in the 'images' field")
    if len(images) > limits.max_images:
        raise HTTPProblem(
            413, f"{len(images)} images in one request; this server takes at most {limits.max_images}"
        )
    layer_maps = options.layers_figure
    if model.class_index is None:
        if classes:
            raise HTTPProblem(422, "this model is a CLIP model: send 'prompts', not 'classes'")
        _check_counts("prompts", prompts, limits)
        try:
            checked = _check_prompts(list(prompts))
        except (PromptError, TypeError) as exc:
            raise HTTPProblem(422, str(exc)) from None
        return Job(images, names, prompts=tuple(checked), layer_maps=layer_maps)
    if prompts:
        raise HTTPProblem(
            422, "this model is a classifier: send 'classes' (names, ids or top-K), not 'prompts'"
        )
    _check_counts("classes", classes, limits)
    index = model.class_index
    try:
        if len(classes) == 1 and (k := parse_top_k(classes[0], len(index))) is not None:
            if k > limits.max_prompts:
                raise HTTPProblem(
                    422, f"top-{k} asks for {k} classes; this server takes at most {limits.max_prompts}"
                )
            return Job(images, names, top_k=k, layer_maps=layer_maps)
        wanted = [int(c) if isinstance(c, str) and _is_id(c) and not index.lookup(c) else c for c in classes]
        ids = index.resolve(wanted)
    except (PromptError, TypeError) as exc:
        raise HTTPProblem(422, str(exc)) from None
    return Job(images, names, class_ids=tuple(ids), layer_maps=layer_maps)


def _is_id(text: str) -> bool:
    return text.strip().isdecimal() and text.strip().isascii()


def _check_counts(field: str, values: Sequence[object], limits: Limits) -> None:
    if not values:
        raise HTTPProblem(422, f"no {field} given; send at least one '{field}' field")
    if len(values) > limits.max_prompts:
        raise HTTPProblem(
            422, f"{len(values)} {field} in one request; this server takes at most {limits.max_prompts}"
        )
    for i, v in enumerate(values):
        if isinstance(v, str) and len(v) > limits.max_prompt_chars:
            raise HTTPProblem(
                422,
                f"{field} #{i} is {len(v):,} characters long; this server takes at most "
                f"{limits.max_prompt_chars} (CLIP reads 77 tokens)",
            )
