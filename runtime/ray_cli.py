"""`legrad explain --engine ray [--actors N]`: the local engine's files, computed by Ray Data actors.

The images go to `explain_dataset` as a column of paths (each actor opens them as the local engine
does: same decoding, EXIF and pixel limit), the overlays come back as PNG bytes, and the driver
writes them in the input order: OUT/<image>/<prompt>.png, OUT/scores.csv, OUT/prompts.csv (and
heatmaps.npy with --save-npy), the same files as `--engine local`. A running cluster is joined
(RAY_ADDRESS, or `ray.init` earlier in the process); otherwise a local one is started and stopped.
CLIP models only; --layers-figure is not offered.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .cli import PROG, UsageError, _gib_bytes, _unique, finish_explain
from .cli_runner import max_pixels_from, say
from .errors import ImageInputError
from .files import safe_name
from .metadata import read_metadata
from .preprocess import load_image
from .ray import _ray, explain_dataset

__all__ = ["explain_with_ray"]


def explain_with_ray(args: argparse.Namespace, images: list[Path], out: Path) -> int:
    """`legrad explain`'s CLIP branch through Ray; the exit codes of the local engine."""
    if read_metadata(args.model_dir).is_classifier:
        raise UsageError("--engine ray explains CLIP models (-p); explain a classifier with --engine local")
    if args.layers_figure:
        raise UsageError("--layers-figure is not offered with --engine ray; use --engine local")
    if args.actors < 1:
        raise UsageError(f"--actors must be a positive integer, not {args.actors}")
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        return _run(args, images, out, ray)
    finally:
        if started:
            ray.shutdown()


def _run(args: argparse.Namespace, images: list[Path], out: Path, ray: Any) -> int:
    items = [{"path": str(p), "index": i} for i, p in enumerate(images)]
    explained = explain_dataset(
        ray.data.from_items(items),
        args.model_dir,
        args.prompts,
        output="both" if args.save_npy else "png",
        image_column="path",
        batch_size=args.batch_size or 8,
        concurrency=args.actors,
        threads=args.threads,
        cmap=args.cmap,
        alpha=args.alpha,
        style=args.style,
        caption=args.style == "side-by-side",
        on_error="skip",
        device=args.device,
        max_pixels=max_pixels_from(args),
        gpu_mem_limit=_gib_bytes(args.gpu_mem_limit, "--gpu-mem-limit"),
        memory_budget=_gib_bytes(args.memory_budget, "--memory-budget"),
        verify=not args.no_verify,
    ).sort("index")
    used: set[str] = set()
    names = [_unique(safe_name(p, "prompt"), used) for p in args.prompts]
    image_dirs: set[str] = set()
    rows: list[tuple[object, ...]] = []
    done: set[int] = set()
    for row in explained.iter_rows():
        done.add(int(row["index"]))
        source = str(row["path"])
        folder = out / _unique(safe_name(Path(source).stem, "image"), image_dirs)
        folder.mkdir(exist_ok=True)
        for p, name in enumerate(names):
            (folder / f"{name}.png").write_bytes(row["png"][p])
            rows.append((source, folder.name, args.prompts[p], float(row["similarity"][p])))
        if args.save_npy:
            np.save(folder / "heatmaps.npy", np.asarray(row["heatmap"], np.float32))
    failed = [p for i, p in enumerate(images) if i not in done]
    for path in failed:  # the actors logged why; the driver says it again, one line each
        say(PROG, "skipped", _why(path, max_pixels_from(args)))
    return finish_explain(out, rows, names, args.prompts, len(done), len(images))


def _why(path: Path, max_pixels: int) -> object:
    """Why an image was skipped: the runtime's own message, read again here."""
    try:
        load_image(path, max_pixels=max_pixels)
    except ImageInputError as exc:
        return exc
    return f"{path} could not be explained"
