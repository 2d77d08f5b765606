"""Ray Data: LeGrad heatmaps over a Ray Dataset of images, the model loaded once per actor.

Needs the `ray` extra (`pip install "legrad-onnx[ray]"`); importing `legrad_runtime` never imports ray.

    from legrad_runtime.ray import explain_dataset, read_image_folder

    ds = read_image_folder("photos/")             # ray.data.read_images(..., include_paths=True)
    out = explain_dataset(ds, "models/shapes-clip__open_clip_model__64", ["a red circle"], concurrency=2)
    for row in out.iter_rows():
        row["path"], row["similarity"], row["top_region"]

One output row per input image, each per-prompt value an array over the P prompts (see docs/ray.md):

    label        (P,) str      the prompt (a classifier: the class name)
    similarity   (P,) float32  cosine similarity (a classifier: the class's logit)
    probability  (P,) float32  Explanation.probabilities
    heatmap      (P, H, W) float32, the map on the ORIGINAL image (output 'heatmap' or 'both')
    png          P PNG overlays on the original image, bytes (output 'png' or 'both')
    peak         (P, 2) int32  [x, y] of the map's maximum (the first, in row-major order)
    top_region   (P, 4) int32  [x0, y0, x1, y1], see `top_region`

plus every input column as it came (`path`, your ids), except an image column of pixels or bytes. Rows
come in the order Ray finishes them; join on `path` (or a column of yours), or `.sort(...)` them.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageInputError, InputError
from .metadata import read_metadata
from .preprocess import DEFAULT_MAX_PIXELS, load_image
from .visualize import STYLES

if TYPE_CHECKING:
    from ray.data import Dataset

    from .session import ClassRequest, ImageSource, LeGradModel

__all__ = [
    "explain_dataset",
    "read_image_folder",
    "read_parquet_images",
    "top_region",
    "RAY_EXTRA",
]

RAY_EXTRA = 'pip install "legrad-onnx[ray]"'
OUTPUTS = ("heatmap", "png", "both")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError)
log = logging.getLogger("legrad_runtime")


def _ray() -> Any:
    """The ray package, or an ImportError naming the extra that installs it."""
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as exc:
        raise ImportError(f"legrad_runtime.ray needs Ray Data ({exc}); install it with {RAY_EXTRA}") from None
    return ray


def read_image_folder(folder: str | Path, **kwargs: Any) -> Dataset:
    """`ray.data.read_images(folder, include_paths=True)`: uint8 arrays in `image`, the file in `path`.

    Keyword arguments go to `read_images` (e.g. `mode="RGB"`, `file_extensions=[...]`)."""
    kwargs.setdefault("include_paths", True)
    dataset: Dataset = _ray().data.read_images(str(folder), **kwargs)
    return dataset


def read_parquet_images(paths: str | Path | Sequence[str | Path], **kwargs: Any) -> Dataset:
    """`ray.data.read_parquet(paths)`: a column of encoded image files (bytes, or Hugging Face's
    `{"bytes": ..., "path": ...}` structs) that `explain_dataset(..., image_column=...)` decodes."""
    where = (
        [str(p) for p in paths] if isinstance(paths, Sequence) and not isinstance(paths, str) else str(paths)
    )
    dataset: Dataset = _ray().data.read_parquet(where, **kwargs)
    return dataset


def top_region(
    heatmap: np.ndarray, threshold: float = 0.5
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The peak [x, y] of a 2-D map and its top region's box [x0, y0, x1, y1].

    The peak is the map's maximum (the first in row-major order). The top region is the set of
    pixels ≥ threshold × the peak's value that are 4-connected to the peak; its box is in pixels of
    the map, x1 and y1 exclusive (PIL's crop box), so it always holds the peak. Computed on runs of
    each row, not pixel by pixel.
    """
    h, w = heatmap.shape
    y, x = divmod(int(np.argmax(heatmap)), w)
    mask = np.zeros((h, w + 2), np.int8)
    mask[:, 1:-1] = heatmap >= threshold * heatmap[y, x]
    edges = np.diff(mask, axis=1)  # (H, W+1): +1 where a run starts, -1 just past where it ends
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # the same order: row by row, left to right
    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row r: first[r] .. first[r + 1]
    seed = int(np.nonzero((rows == y) & (starts <= x) & (ends > x))[0][0])
    seen, todo = {seed}, [seed]
    while todo:
        k = todo.pop()
        for r in (rows[k] - 1, rows[k] + 1):
            if 0 <= r < h:
                lo, hi = first[r], first[r + 1]
                touching = np.nonzero((starts[lo:hi] < ends[k]) & (ends[lo:hi] > starts[k]))[0] + lo
                new = [int(j) for j in touching if int(j) not in seen]
                seen.update(new)
                todo += new
    runs = np.fromiter(seen, np.int64)
    box = (int(starts[runs].min()), int(rows[runs].min()), int(ends[runs].max()), int(rows[runs].max()) + 1)
    return (x, y), box


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_bytes(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An encoded image file held in memory, decoded as `load_image` decodes a file (pixel limit
    checked before decoding, EXIF orientation applied); ImageInputError naming `name` if unusable."""
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageInputError(f"{name} is not an image PIL can read", source=name) from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name} declares too many pixels to decode safely", source=name) from None
    except _DECODE_ERRORS as exc:
        raise ImageInputError(f"{name} is corrupt or truncated ({exc})", source=name) from None
    return load_image(opened, name=name, max_pixels=max_pixels)


def _rows(values: list[np.ndarray]) -> np.ndarray:
    """One array per row: stacked when their shapes agree, else an object array (Ray's ragged tensors)."""
    if values and all(v.shape == values[0].shape for v in values):
        return np.stack(values)
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class _Explainer:
    """The map_batches callable: loads the model once per actor, explains each batch it is handed."""

    def __init__(
        self,
        model_dir: str,
        prompts: list[str] | None,
        classes: ClassRequest | None,
        image_column: str,
        output: str,
        picture: dict[str, Any],
        region_threshold: float,
        on_error: str,
        batch_size: int,
        concurrency: int,
        load_options: dict[str, Any],
    ) -> None:
        from .session import load

        if load_options.get("threads") is None:  # this node's cores, shared among the actors
            load_options = {**load_options, "threads": max(1, (os.cpu_count() or 1) // concurrency)}
        self.model: LeGradModel = load(model_dir, **load_options)
        self.prompts, self.classes = prompts, classes
        self.image_column, self.output, self.picture = image_column, output, picture
        self.region_threshold, self.on_error, self.batch_size = region_threshold, on_error, batch_size
        self.max_pixels = int(load_options.get("max_pixels", DEFAULT_MAX_PIXELS))

    def _image(self, value: Any, name: str) -> ImageSource:
        if isinstance(value, dict):  # a Hugging Face image struct
            value = value.get("bytes")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _decode_bytes(bytes(value), name, self.max_pixels)
        if isinstance(value, str):
            return value  # a path: the runtime opens it, as the local engine does
        if isinstance(value, np.ndarray):
            return value
        raise ImageInputError(
            f"{name}: column {self.image_column!r} holds {type(value).__name__}; expected uint8 arrays, "
            "encoded image bytes or file paths",
            source=name,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        names = batch["path"] if "path" in batch else batch.get("__key__")
        images: list[ImageSource] = []
        keep: list[int] = []
        for i, value in enumerate(batch[self.image_column]):
            name = str(names[i]) if names is not None else f"row {i} of a batch"
            try:
                images.append(self._image(value, name))
                keep.append(i)
            except ImageInputError as exc:
                if self.on_error == "raise":
                    raise
                log.warning("skipped: %s", exc)
        paths = all(isinstance(v, str) for v in batch[self.image_column])  # kept: the rows' names
        out: dict[str, Any] = {k: v[keep] for k, v in batch.items() if paths or k != self.image_column}
        if not images:
            return out
        result = self.model.explain(
            images, self.prompts, classes=self.classes, batch_size=self.batch_size,
            on_error=self.on_error, layer_maps=False,
        )  # fmt: skip
        if result.failures:  # images the runtime could not read (on_error='skip'): their rows go
            failed = {f.index for f in result.failures}
            for f in result.failures:
                log.warning("skipped: %s", f.error)
            keep = [k for j, k in enumerate(keep) if j not in failed]
            out = {k: v[keep] for k, v in batch.items() if paths or k != self.image_column}
        n, p = len(result.sources), len(result.prompts)
        out["label"] = np.array([[result.label(b, q) for q in range(p)] for b in range(n)], dtype=str)
        out["similarity"] = result.similarities.astype(np.float32)
        out["probability"] = result.probabilities.astype(np.float32)
        maps = [np.stack([result.heatmap_on_original(b, q) for q in range(p)]) for b in range(n)]
        regions = [[top_region(m, self.region_threshold) for m in row] for row in maps]
        out["peak"] = np.array([[peak for peak, _ in row] for row in regions], np.int32).reshape(n, p, 2)
        out["top_region"] = np.array([[box for _, box in row] for row in regions], np.int32).reshape(n, p, 4)
        if self.output in ("heatmap", "both"):
            out["heatmap"] = _rows(maps)
        if self.output in ("png", "both"):
            pngs = np.empty(n, dtype=object)
            pngs[:] = [[_png(self._picture(result, b, q)) for q in range(p)] for b in range(n)]
            out["png"] = pngs
        return out

    def _picture(self, result: Any, b: int, q: int) -> Image.Image:
        options = dict(self.picture)
        if options.pop("caption"):  # the captions `legrad explain` writes
            label, score = result.label(b, q), result.similarities[b, q]
            if result.is_classifier:
                from .classes import short_name

                caption = f"{short_name(label)}  (probability {result.probabilities[b, q]:.3f})"
            else:
                caption = f"{label}  (cosine {score:.3f})"
            options["caption"] = caption
        picture: Image.Image = result.overlay(b, q, **options)
        return picture


def explain_dataset(
    ds: Dataset,
    model_dir: str | Path,
    prompts: str | Sequence[str] | None = None,
    *,
    classes: ClassRequest | None = None,
    output: str = "heatmap",
    image_column: str = "image",
    batch_size: int = 8,
    concurrency: int = 1,
    num_cpus: float = 0.5,
    num_gpus: float = 0,
    threads: int | None = None,
    region_threshold: float = 0.5,
    cmap: str = "jet",
    alpha: float = 0.5,
    style: str = "overlay",
    caption: bool = False,
    on_error: str = "raise",
    **load_options: Any,
) -> Dataset:
    """A lazy Dataset of LeGrad results, one row per image of `ds` (columns: the module's docstring).

    `image_column` holds uint8 arrays (H, W[, C]) as `ray.data.read_images` gives them (all of one
    size, or ragged), encoded image files (bytes: Parquet, `read_webdataset(..., decoder=None)`) or
    file paths (str). `prompts` for a CLIP model, `classes` for a classifier (as `LeGradModel.explain`
    takes them). Each of `concurrency` actors loads the model once (`load_options` go to
    `legrad_runtime.load`: device, verify, max_pixels, gpu_mem_limit, memory_budget) and explains
    batches of `batch_size` rows. Ray reserves `num_cpus` and `num_gpus` per actor (a fraction of a
    CPU by default, so the read tasks still find one); onnxruntime uses `threads` cores per actor
    (None: the node's cores shared among the actors). `output`: 'heatmap' (float32 maps on the
    original image), 'png' (overlays drawn with `cmap`, `alpha`, `style`; `caption` adds the line
    `legrad explain` writes) or 'both'. `on_error='skip'` drops rows whose image cannot be read
    (each logged by its actor); 'raise' fails the dataset.
    """
    ray = _ray()
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, not {output!r}")
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if style not in STYLES:
        raise InputError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, not {value!r}")
    if image_column not in ds.columns():
        raise InputError(f"the dataset has no column {image_column!r} (it has {', '.join(ds.columns())})")
    meta = read_metadata(model_dir)  # a bad folder fails here, not in every actor
    if meta.is_classifier and (prompts is not None or classes is None):
        raise InputError(f"{model_dir} is a classifier: pass classes= (names, ids or 'top-K'), not prompts")
    if not meta.is_classifier and (prompts is None or classes is not None):
        raise InputError(f"{model_dir} is a CLIP model: pass prompts (texts), not classes")
    prompt_list = [prompts] if isinstance(prompts, str) else None if prompts is None else list(prompts)
    picture = {"cmap": cmap, "alpha": alpha, "style": style, "caption": caption}
    args = (str(model_dir), prompt_list, classes, image_column, output, picture, region_threshold, on_error)
    explained: Dataset = ds.map_batches(
        _Explainer,
        fn_constructor_args=(*args, batch_size, concurrency, {"threads": threads, **load_options}),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    return explained
