"""Scoring heatmaps against object masks: pointing game, IoU at a threshold, relevance mass inside.

Model-free and torch-free (numpy and PIL), so it scores anyone's saved heatmaps. A *case* is one
(image, prompt, mask) triple; a cases folder holds a `cases.csv`:

    image,prompt,mask,group
    img/0001.png,a red circle,masks/0001_0.png,unique colour
    img/0001.png,a blue square,masks/0001_1.png,

- `image`, `mask`: paths relative to the folder (absolute paths work too). `group` is optional (the
  column, and the value in each row); cases are reported per group and all together ("all").
- A mask is any image PIL reads (PNG is best: lossless), the size of its image. A pixel is inside
  when any of its colour channels is nonzero; an alpha channel is ignored, palette images are looked
  up first. Both image and mask are taken upright per their EXIF orientation, as the runtime does.

Metrics for one heatmap (H, W) and mask (H, W) bool, at the mask's (= the original image's) size:

- `pointing_hit`: is the map's maximum inside the mask? Ties (values within 1e-6 of the map's range
  from its maximum) are broken uniformly at random in expectation: the score is the share of the
  maximal pixels that lie inside, so a constant map scores the mask's area share, chance level.
- `pointing_other`: does a missed maximum fall on another object? The other objects are the masks of
  the other cases of the same image, so it needs cases that name several objects per image. The
  rest of the misses (1 - hit - other) fell on background.
- `iou_at`: IoU of {heatmap ≥ threshold} with the mask.
- `mass_inside`: share of the map's total (non-negative) relevance that falls inside the mask; a map
  with no relevance at all scores the mask's area share, like a uniform one.

`score_cases` min-max normalises every map over the original image before scoring (a constant map
becomes zeros), so all methods are compared on the same footing: threshold 0.5 means half way
between a map's minimum and maximum. Maps of another size are first resized to the mask's size with
PIL's bilinear filter (which antialiases when shrinking).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import CaseFolderError, ImageInputError, InputError
from .files import UnreadableFile, read_regular
from .preprocess import DEFAULT_MAX_PIXELS, open_image_file
from .visualize import min_max, resize_map

__all__ = [
    "ALL",
    "CASES_FILE",
    "Case",
    "CaseScore",
    "Evaluation",
    "MethodScore",
    "centre_prior",
    "format_table",
    "iou_at",
    "load_cases",
    "load_mask",
    "load_saved_heatmaps",
    "mass_inside",
    "min_max",
    "pointing_hit",
    "pointing_other",
    "resize_heatmap",
    "save_heatmaps",
    "score_cases",
]

CASES_FILE = "cases.csv"
ALL = "all"  # the group every case belongs to
_COLUMNS = ("image", "prompt", "mask", "group")
_REQUIRED = ("image", "prompt", "mask")
_TIE_TOLERANCE = 1e-6
_MAX_CSV_BYTES = 256 * 1024**2
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


# ---------------------------------------------------------------- per-case metrics


def _check_pair(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask)
    if heatmap.ndim != 2:
        raise InputError(f"a heatmap must be 2-D (H, W), got shape {heatmap.shape}")
    if mask.shape != heatmap.shape:
        raise InputError(f"heatmap shape {heatmap.shape} differs from mask shape {mask.shape}")
    if not np.isfinite(heatmap).all():
        raise InputError("heatmap contains NaN or infinite values")
    mask = mask.astype(bool)
    if not mask.any():
        raise InputError("mask is empty: no pixel is inside, so nothing can be scored")
    return heatmap, mask


def _unit(heatmap: np.ndarray) -> np.ndarray:
    """The map as is when it lies in [0, 1], else min-max normalised."""
    return heatmap if heatmap.min() >= 0 and heatmap.max() <= 1 else min_max(heatmap)


def _maximal(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels tied for the maximum."""
    hi, lo = float(heatmap.max()), float(heatmap.min())
    return heatmap >= hi - _TIE_TOLERANCE * (hi - lo)


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """1.0 if the map's maximum lies inside the mask, 0.0 if outside; ties give the share inside."""
    heatmap, mask = _check_pair(heatmap, mask)
    top = _maximal(heatmap)
    return float((top & mask).sum() / top.sum())


def pointing_other(heatmap: np.ndarray, mask: np.ndarray, others: np.ndarray) -> float:
    """1.0 if the map's maximum lies outside the mask but inside `others` (H, W) bool, the image's
    other objects; ties give the share. With `pointing_hit` it splits the misses: the rest fell on
    background."""
    heatmap, mask = _check_pair(heatmap, mask)
    others = np.asarray(others, dtype=bool)
    if others.shape != mask.shape:
        raise InputError(f"other objects' mask shape {others.shape} differs from mask shape {mask.shape}")
    top = _maximal(heatmap)
    return float((top & others & ~mask).sum() / top.sum())


def iou_at(heatmap: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of {heatmap ≥ threshold} with the mask. A map outside [0, 1] is min-max normalised first."""
    if not 0 <= threshold <= 1:
        raise InputError(f"threshold {threshold} is outside [0, 1]")
    heatmap, mask = _check_pair(heatmap, mask)
    pred = _unit(heatmap) >= threshold
    return float((pred & mask).sum() / (pred | mask).sum())  # the mask is non-empty: union > 0


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's relevance inside the mask. A map outside [0, 1] is min-max normalised first;
    a map that sums to zero counts as uniform (the mask's area share)."""
    heatmap, mask = _check_pair(heatmap, mask)
    heatmap = _unit(heatmap)
    total = float(heatmap.sum())
    if total <= 0:
        return float(mask.mean())
    return float(heatmap[mask].sum() / total)


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (H, W) map resized to size = (height, width) with PIL's bilinear filter."""
    heatmap = np.ascontiguousarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise InputError(f"a heatmap must be 2-D (H, W), got shape {heatmap.shape}")
    height, width = size
    return resize_map(heatmap, (width, height))


def centre_prior(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """A model-free baseline: float32 (height, width) Gaussian centred on the image, peak 1.

    Its standard deviation is `sigma` times the side along each axis; pixel centres are at i + 0.5.
    """
    if height <= 0 or width <= 0 or sigma <= 0:
        raise InputError(f"centre_prior needs positive sizes and sigma, got {height}x{width}, sigma={sigma}")
    y = ((np.arange(height) + 0.5) / height - 0.5) / sigma  # in standard deviations from the centre
    x = ((np.arange(width) + 0.5) / width - 0.5) / sigma
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


# ---------------------------------------------------------------- cases folders


@dataclass(frozen=True)
class Case:
    """One (image, prompt, mask) triple; `group` labels a subset reported on its own (or None)."""

    image: Path
    prompt: str
    mask: Path
    group: str | None = None


@contextlib.contextmanager
def _open(path: Path, what: str, max_pixels: int, where: str | None = None) -> Iterator[Image.Image]:
    """The image opened lazily: a regular file, under the pixel limit (see `open_image_file`)."""
    prefix = f"{where}: " if where else ""
    try:
        with open_image_file(path, f"{prefix}{what} file {path}", max_pixels) as img:
            yield img
    except ImageInputError as exc:
        raise CaseFolderError(str(exc)) from None


def _upright_size(path: Path, row: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image after its EXIF orientation, without decoding its pixels."""
    with _open(path, "image", max_pixels, row) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return width, height


def load_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W) bool: pixels where any colour channel is nonzero (alpha ignored; palettes looked up)."""
    path = Path(path)
    with _open(path, "mask", max_pixels) as opened:
        try:
            img = ImageOps.exif_transpose(opened)
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CaseFolderError(f"mask {path} is corrupt or truncated ({exc})") from exc
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif img.mode not in ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F", "RGB", "RGBA"):
        img = img.convert("RGB")
    values: np.ndarray = np.asarray(img)
    if img.mode in ("LA", "RGBA"):
        values = values[..., :-1]  # drop alpha
    nonzero: np.ndarray = np.not_equal(values, 0)
    if nonzero.ndim == 3:
        nonzero = np.logical_or.reduce(nonzero, axis=-1)  # any channel
    return nonzero


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        text = read_regular(csv_path, _MAX_CSV_BYTES).decode("utf-8-sig")
    except UnreadableFile as exc:
        raise CaseFolderError(f"{csv_path} {exc.reason}") from None
    except UnicodeDecodeError as exc:
        raise CaseFolderError(f"{csv_path} is not UTF-8 text ({exc})") from exc
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            unknown = [h for h in header if h not in _COLUMNS]
            missing = [c for c in _REQUIRED if c not in header]
            if missing or unknown or len(set(header)) != len(header):
                raise CaseFolderError(
                    f"{csv_path} has header {','.join(header) or '(none)'}; expected image,prompt,mask "
                    "and optionally group (e.g. 'image,prompt,mask,group')"
                )
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        raise CaseFolderError(f"{csv_path} is not valid CSV ({exc})") from exc
    if not rows:
        raise CaseFolderError(f"{csv_path} lists no cases; add one row per (image, prompt, mask)")
    return rows


def load_cases(
    folder: str | Path, check_masks: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Case]:
    """Read FOLDER/cases.csv (format: see the module docstring) into Cases, checking every file.

    With `check_masks`, each mask is decoded and must be non-empty and the size of its (upright)
    image. Images and masks over `max_pixels` are refused from their headers, as by the runtime.
    Every problem raises CaseFolderError naming the CSV row (data rows count from 1).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseFolderError(f"cases folder {folder} does not exist or is not a folder")
    csv_path = folder / CASES_FILE
    if not csv_path.exists():
        raise CaseFolderError(
            f"{folder} has no {CASES_FILE}; write one with the header image,prompt,mask[,group]"
        )
    cases, sizes = [], {}
    for number, row in enumerate(_read_rows(csv_path), start=1):
        where = f"{csv_path} row {number}"
        if not row["image"] or not row["mask"] or not row["prompt"]:
            empty = [c for c in _REQUIRED if not row[c]]
            raise CaseFolderError(f"{where}: empty {', '.join(empty)}")
        group = row.get("group") or None
        if group is not None and group.lower() == ALL:
            raise CaseFolderError(f"{where}: group name {group!r} is reserved for all cases; pick another")
        case = Case(folder / row["image"], row["prompt"], folder / row["mask"], group)
        if case.image not in sizes:
            sizes[case.image] = _upright_size(case.image, where, max_pixels)
        if check_masks:
            mask = _checked_mask(case, where, max_pixels)
            width, height = sizes[case.image]
            if mask.shape != (height, width):
                raise CaseFolderError(
                    f"{where}: mask {case.mask} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{case.image} is {width}x{height}; a mask must have its image's size"
                )
            if not mask.any():
                raise CaseFolderError(f"{where}: mask {case.mask} is empty (no nonzero pixel)")
        cases.append(case)
    return cases


def _checked_mask(case: Case, where: str, max_pixels: int) -> np.ndarray:
    try:
        return load_mask(case.mask, max_pixels)
    except CaseFolderError as exc:
        raise CaseFolderError(f"{where}: {exc}") from exc


def load_saved_heatmaps(folder: str | Path, count: int) -> list[np.ndarray]:
    """Heatmaps saved one per case as FOLDER/<i>.npy, i = the case's 0-based row in cases.csv.

    Each is a 2-D float array, best on the original image; another size is resized when scored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseFolderError(f"heatmaps folder {folder} does not exist or is not a folder")
    missing = [i for i in range(count) if not (folder / f"{i}.npy").is_file()]
    if missing:
        shown = ", ".join(f"{i}.npy" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CaseFolderError(
            f"heatmaps folder {folder} lacks {len(missing)} of {count} files ({shown}); "
            "save one <case index>.npy per row of cases.csv, counting from 0"
        )
    maps = []
    for i in range(count):
        path = folder / f"{i}.npy"
        try:
            heatmap = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CaseFolderError(f"{path} is not a readable .npy array ({exc})") from exc
        heatmap = np.squeeze(heatmap)
        if heatmap.ndim != 2 or not np.issubdtype(heatmap.dtype, np.number):
            raise CaseFolderError(
                f"{path} holds a {heatmap.dtype} array of shape {heatmap.shape}; expected (H, W)"
            )
        if not np.isfinite(heatmap).all():
            raise CaseFolderError(f"{path} contains NaN or infinite values")
        maps.append(heatmap.astype(np.float32))
    return maps


def save_heatmaps(folder: str | Path, heatmaps: Sequence[np.ndarray]) -> None:
    """Write heatmaps as FOLDER/<i>.npy (float32), the layout `load_saved_heatmaps` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, heatmap in enumerate(heatmaps):
        np.save(folder / f"{i}.npy", np.asarray(heatmap, dtype=np.float32))


# ---------------------------------------------------------------- scoring many cases


@dataclass(frozen=True)
class CaseScore:
    """The metrics of one method on one case (`other`: the maximum fell on another object)."""

    hit: float
    iou: float
    mass_inside: float
    other: float


@dataclass(frozen=True)
class MethodScore:
    """One method on one group: pointing (share of hits), mIoU, mean mass inside, case count, and
    `other`: the share of cases whose maximum fell on another object of the image (1 - pointing -
    other fell on background)."""

    method: str
    group: str
    pointing: float
    miou: float
    mass_inside: float
    n: int
    other: float


@dataclass(frozen=True)
class Evaluation:
    """Scores of every method: one row per (method, group), and the per-case scores."""

    methods: tuple[str, ...]
    groups: tuple[str, ...]  # ALL first, then the cases' groups in order of first appearance
    threshold: float
    rows: tuple[MethodScore, ...]
    per_case: Mapping[str, tuple[CaseScore, ...]]

    def row(self, method: str, group: str = ALL) -> MethodScore:
        for r in self.rows:
            if r.method == method and r.group == group:
                return r
        raise KeyError(f"no scores for method {method!r} in group {group!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers: the table rows and every case's scores."""
        return {
            "threshold": self.threshold,
            "rows": [vars(r) for r in self.rows],
            "per_case": {m: [vars(s) for s in scores] for m, scores in self.per_case.items()},
        }


def score_cases(
    cases: Sequence[Case],
    heatmaps: Mapping[str, Sequence[np.ndarray]],
    threshold: float = 0.5,
    masks: Sequence[np.ndarray] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Evaluation:
    """Score each method's heatmaps (one per case, in order) against the cases' masks.

    Maps are resized to the mask's size if needed (bilinear) and min-max normalised; `masks`, when
    given, are used instead of reading each case's mask file.
    """
    if not cases:
        raise InputError("no cases to score")
    if not heatmaps:
        raise InputError("no methods to score; pass {method name: [one heatmap per case]}")
    for method, maps in heatmaps.items():
        if len(maps) != len(cases):
            raise InputError(f"method {method!r} has {len(maps)} heatmaps for {len(cases)} cases")
    if masks is not None and len(masks) != len(cases):
        raise InputError(f"{len(masks)} masks for {len(cases)} cases")

    by_image: dict[Path, list[int]] = {}
    for i, case in enumerate(cases):
        by_image.setdefault(case.image, []).append(i)
    per_case: dict[str, dict[int, CaseScore]] = {m: {} for m in heatmaps}  # case index → its score
    for members in by_image.values():  # one image's masks at a time: their union is its objects
        image_masks = {
            i: np.asarray(masks[i], dtype=bool) if masks is not None else load_mask(cases[i].mask, max_pixels)
            for i in members
        }
        shapes = {m.shape for m in image_masks.values()}
        objects = np.logical_or.reduce(list(image_masks.values())) if len(shapes) == 1 else None
        for i, mask in image_masks.items():
            case = cases[i]
            others = objects if objects is not None else mask  # masks of differing sizes: no others
            for method, maps in heatmaps.items():
                try:
                    h = min_max(resize_heatmap(maps[i], mask.shape))
                    per_case[method][i] = CaseScore(
                        pointing_hit(h, mask),
                        iou_at(h, mask, threshold),
                        mass_inside(h, mask),
                        pointing_other(h, mask, others),
                    )
                except InputError as exc:
                    raise InputError(
                        f"case {i} ({case.image.name}, {case.prompt!r}), method {method!r}: {exc}"
                    ) from exc

    groups = [ALL] + list(dict.fromkeys(c.group for c in cases if c.group is not None))
    rows = []
    for group in groups:
        members = [i for i, c in enumerate(cases) if group == ALL or c.group == group]
        for method in heatmaps:
            scores = [per_case[method][i] for i in members]
            rows.append(
                MethodScore(
                    method,
                    group,
                    pointing=_mean(s.hit for s in scores),
                    miou=_mean(s.iou for s in scores),
                    mass_inside=_mean(s.mass_inside for s in scores),
                    n=len(scores),
                    other=_mean(s.other for s in scores),
                )
            )
    return Evaluation(
        tuple(heatmaps),
        tuple(groups),
        threshold,
        tuple(rows),
        {m: tuple(s[i] for i in range(len(cases))) for m, s in per_case.items()},
    )


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return math.fsum(items) / len(items)


def format_table(evaluation: Evaluation) -> str:
    """An aligned text table: one block per group, one line per method."""
    head = (
        "group",
        "method",
        "pointing %",
        "other object %",
        f"mIoU@{evaluation.threshold:g}",
        "mass inside",
        "n",
    )
    lines = []
    for group in evaluation.groups:
        for k, method in enumerate(evaluation.methods):
            r = evaluation.row(method, group)
            lines.append(
                (
                    group if k == 0 else "",
                    method,
                    f"{100 * r.pointing:.1f}",
                    f"{100 * r.other:.1f}",
                    f"{r.miou:.3f}",
                    f"{r.mass_inside:.3f}",
                    str(r.n),
                )
            )
    widths = [max(len(row[c]) for row in [head, *lines]) for c in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        left = [row[c].ljust(widths[c]) for c in (0, 1)]
        right = [row[c].rjust(widths[c]) for c in range(2, len(head))]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *(fmt(row) for row in lines)])
