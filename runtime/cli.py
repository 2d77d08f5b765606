"""`legrad`: heatmaps from an exported model folder, torch-free.

    legrad explain MODEL_DIR photos/*.jpg -p "a cat" -p "a remote control" --out out/
    legrad explain CLASSIFIER_DIR photos/*.jpg -c "tabby cat" -c 285    # or --top-k 3
    legrad explain MODEL_DIR photo.jpg -p "a cat" --style contour        # or side-by-side
    legrad info MODEL_DIR

Every output lands inside --out: OUT/<image>/<prompt>.png (names made safe and unique),
OUT/scores.csv, and OUT/prompts.csv mapping each file name back to its prompt. A classifier's files
are named by class (its first synonym: OUT/<image>/tabby.png), and OUT/scores.csv names each file's
class id, class and probability. Exit codes: 0 done,
1 some images skipped (each named on stderr), 2 bad input (one line on stderr), 3 internal error,
130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .classes import short_name
from .cli_runner import EXIT_OK, EXIT_PARTIAL, add_max_pixels_option, max_pixels_from, run_main, say
from .errors import LegradError
from .files import ensure_output_folder, printable, safe_name
from .metadata import ModelMetadata, default_tower, read_metadata
from .providers import DEVICE_FORMS, parse_device
from .serve import cli as serve_cli
from .session import Explanation, LeGradModel, load
from .visualize import COLORMAPS, STYLES, save_png

__all__ = ["main", "build_parser", "find_images"]

PROG = "legrad"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SCORES_FILE, PROMPTS_FILE = "scores.csv", "prompts.csv"
_RESERVED = {SCORES_FILE, PROMPTS_FILE}
_SHOWN_CLASSES = 5  # class names `legrad info` shows


class UsageError(LegradError):
    """Bad command-line arguments."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="legrad", description="LeGrad heatmaps from an exported model folder.")
    sub = p.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("explain", help="heatmaps for images × prompts, written as PNG overlays")
    ex.add_argument("model_dir", help="an exported model folder (legrad-export writes them)")
    ex.add_argument("images", nargs="+", help="image files, globs or folders")
    ex.add_argument("-p", "--prompt", action="append", dest="prompts", help="a text prompt (repeat for more)")
    ex.add_argument(
        "--vocabulary",
        action="store_true",
        help="also explain every prompt formed from the model's vocabulary (see `legrad info`)",
    )
    ex.add_argument(
        "-c",
        "--class",
        action="append",
        dest="classes",
        metavar="NAME|ID",
        help="a classifier's class, by name or synonym ('tabby cat') or id (281); repeat for more",
    )
    ex.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="a classifier: each image's K most likely classes",
    )
    ex.add_argument("--out", default="legrad_out", help="output folder (default: legrad_out)")
    ex.add_argument(
        "--device",
        type=_device,
        default="auto",
        metavar="|".join(DEVICE_FORMS),
        help="auto picks CUDA when available; cuda:N the N-th GPU (default: auto)",
    )
    ex.add_argument(
        "--gpu-mem-limit",
        type=float,
        default=None,
        metavar="GIB",
        help="most GiB the CUDA provider's memory arena may hold (default: no limit)",
    )
    ex.add_argument("--batch-size", type=int, default=None, help="images per call (default: from memory)")
    ex.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GIB",
        help="GiB of graph intermediates per onnxruntime call; smaller splits the work into more, "
        "smaller calls with the same maps (default: 2 on the CPU, half the GPU's free memory on CUDA)",
    )
    ex.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU cores each onnxruntime call may use (default: all physical cores)",
    )
    ex.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the model folder's checksums and its check for unlisted files (a folder you trust); "
        "paths are still kept inside the folder",
    )
    ex.add_argument("--layers-figure", action="store_true", help="also write the per-layer figure")
    ex.add_argument(
        "--save-npy", action="store_true", help="also save heatmaps on the original images (.npy)"
    )
    ex.add_argument("--cmap", choices=sorted(COLORMAPS), default="jet", help="colormap (default: jet)")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1] (default: 0.5)")
    ex.add_argument(
        "--style",
        choices=STYLES,
        default="overlay",
        help="overlay: the map blended over the image; contour: the image untouched under the map's "
        "iso-lines (0.5, 0.75) and a ring at its peak; side-by-side: the image, then the overlay, "
        "captioned (default: overlay)",
    )
    add_max_pixels_option(ex, "skipped")
    ex.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: Ray Data actors, each loading the model once (the `ray` extra; "
        "joins RAY_ADDRESS's cluster or starts a local one; CLIP models) (default: local)",
    )
    ex.add_argument("--actors", type=int, default=1, metavar="N", help="--engine ray: actors (default: 1)")

    info = sub.add_parser("info", help="print a model folder's metadata")
    info.add_argument("model_dir")
    info.add_argument("--json", action="store_true", help="print the raw metadata JSON")
    info.add_argument("--classes", action="store_true", help="a classifier: list every class, 'id<TAB>name'")
    serve_cli.add_parser(sub)
    return p


def _device(text: str) -> str:
    """--device's value, checked as load() checks it (argparse turns the error into usage)."""
    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _gib_bytes(value: float | None, flag: str) -> int | None:
    """A GiB option in bytes, checked: (0, 16384] GiB."""
    if value is None:
        return None
    if not 0 < value <= 16384:
        raise UsageError(f"{flag} must be in (0, 16384] GiB, not {value:g}")
    return max(1, int(value * 1024**3))


def find_images(patterns: Sequence[str]) -> list[Path]:
    """Files as given, glob matches, and the image files of folders (sorted), without duplicates."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(pattern):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            if not matches:
                raise UsageError(f"no file matches {pattern!r}")
            found += [m for m in matches if m.is_file()]
        else:
            found.append(path)  # a missing file is reported by the model, with the rest still run
    return list(dict.fromkeys(found))


def _unique(name: str, used: set[str]) -> str:
    """photos/a/cat.jpg and photos/b/cat.jpg (or "a cat!" and "a cat?") must not share a file."""
    candidate, k = name, 1
    while candidate in used or candidate in _RESERVED:
        k += 1
        candidate = f"{name}-{k}"
    used.add(candidate)
    return candidate


def _check_args(args: argparse.Namespace) -> None:
    asked_classes = bool(args.classes) or args.top_k is not None
    if asked_classes and (args.prompts or args.vocabulary):
        raise UsageError(
            "-p/--vocabulary are for CLIP models, -c/--top-k for classifiers; pass one kind, not both"
        )
    if args.classes and args.top_k is not None:
        raise UsageError("pass classes with -c or ask for each image's most likely with --top-k, not both")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, not {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, not {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, not {args.threads}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], not {args.alpha}")
    max_pixels_from(args)
    _gib_bytes(args.gpu_mem_limit, "--gpu-mem-limit")
    _gib_bytes(args.memory_budget, "--memory-budget")


def _load_model(args: argparse.Namespace) -> LeGradModel:
    """Load the model; a warning (CUDA asked for, CPU given) becomes one line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(
            args.model_dir,
            device=args.device,
            max_pixels=max_pixels_from(args),
            gpu_mem_limit=_gib_bytes(args.gpu_mem_limit, "--gpu-mem-limit"),
            memory_budget=_gib_bytes(args.memory_budget, "--memory-budget"),
            threads=args.threads,
            verify=not args.no_verify,
        )
    for warning in caught:
        say(PROG, "warning", warning.message)
    return model


def _classifier_usage(model_dir: str, asked: str) -> UsageError:
    return UsageError(
        f"{printable(model_dir)} is a classifier: it is explained for classes, not {asked}; pass "
        '-c NAME|ID (repeatable, e.g. -c "tabby cat" -c 281) or --top-k K'
    )


def _explain(args: argparse.Namespace) -> int:
    _check_args(args)
    args.prompts = list(args.prompts or [])
    if args.vocabulary:
        meta = read_metadata(args.model_dir)
        if meta.is_classifier:
            raise _classifier_usage(args.model_dir, "--vocabulary")
        if meta.vocabulary is None:
            raise UsageError(f"{args.model_dir} has no vocabulary (see `legrad info`); give prompts with -p")
        args.prompts = list(dict.fromkeys(args.prompts + meta.vocabulary.prompts()))
    if not args.prompts and not args.classes and args.top_k is None:
        raise UsageError(
            'give at least one prompt with -p, e.g. -p "a photo of a cat" (for a classifier: -c NAME|ID '
            "or --top-k K)"
        )
    images = find_images(args.images)
    if not images:
        raise UsageError(f"no image files found in {' '.join(args.images)}")
    try:
        out = ensure_output_folder(args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.engine == "ray":
        from .ray_cli import explain_with_ray

        return explain_with_ray(args, images, out)
    model = _load_model(args)
    if model.is_classifier and args.prompts:
        raise _classifier_usage(args.model_dir, "text prompts (-p)")
    if not model.is_classifier and (args.classes or args.top_k is not None):
        raise UsageError(
            f"{printable(args.model_dir)} is a CLIP model: it is explained for text prompts, not classes; "
            'pass -p PROMPT, e.g. -p "a photo of a cat" (-c and --top-k are for classifiers)'
        )
    if model.is_classifier:
        return _explain_classes(args, model, images, out)
    used: set[str] = set()
    names = [_unique(safe_name(p, "prompt"), used) for p in args.prompts]
    failed, image_dirs = 0, set[str]()
    rows: list[tuple[object, ...]] = []
    with tqdm(total=len(images), unit="image", desc="explain", disable=None, file=sys.stderr) as bar:
        for batch in model.explain_batches(images, args.prompts, batch_size=args.batch_size, on_error="skip"):
            for failure in batch.failures:
                tqdm.write(f"{PROG}: skipped: {printable(failure.error)}", file=sys.stderr)
            failed += len(batch.failures)
            for b, source in enumerate(batch.sources):
                folder = out / _unique(safe_name(Path(source).stem, "image"), image_dirs)
                folder.mkdir(exist_ok=True)
                for p, name in enumerate(names):
                    cosine = float(batch.similarities[b, p])
                    picture = _picture(args, batch, b, p, f"{args.prompts[p]}  (cosine {cosine:.3f})")
                    save_png(picture, folder / f"{name}.png")
                    if args.layers_figure:
                        save_png(batch.layer_figure(b, p, cmap=args.cmap), folder / f"{name}__layers.png")
                    rows.append((source, folder.name, args.prompts[p], cosine))
                if args.save_npy:
                    maps = np.stack([batch.heatmap_on_original(b, p) for p in range(len(names))])
                    np.save(folder / "heatmaps.npy", maps)  # (P, H, W) on the original image
            bar.update(len(batch.sources) + len(batch.failures))
    return finish_explain(out, rows, names, args.prompts, len(images) - failed, len(images))


def finish_explain(
    out: Path,
    rows: Sequence[Sequence[object]],
    names: Sequence[str],
    prompts: Sequence[str],
    done: int,
    total: int,
) -> int:
    """Write scores.csv and prompts.csv, say what was written; the exit code (1: some images skipped).
    Shared by both engines, so their outputs and messages are the same."""
    if done == 0:
        raise UsageError(f"none of the {total} image(s) could be read (each is named above)")
    _write_csv(out / SCORES_FILE, ["image", "folder", "prompt", "cosine_similarity"], rows)
    _write_csv(out / PROMPTS_FILE, ["file", "prompt"], [(f"{n}.png", p) for n, p in zip(names, prompts)])
    print(f"wrote {len(rows)} overlays for {done} image(s) to {printable(out)}")
    if done < total:
        say(PROG, "warning", f"{total - done} of {total} image(s) could not be read and were skipped")
        return EXIT_PARTIAL
    return EXIT_OK


def _class_request(args: argparse.Namespace, model: LeGradModel) -> list[int] | str:
    """The ids -c names (a decimal number is an id), or 'top-K'; PromptError names a bad class."""
    if model.class_index is None:  # not a classifier: the caller checked
        raise UsageError("-c and --top-k are for classifiers")
    if args.top_k is not None:
        if args.top_k > len(model.class_index):
            raise UsageError(
                f"--top-k {args.top_k} is more than this model's {len(model.class_index):,} classes"
            )
        return f"top-{args.top_k}"
    wanted = [int(c) if c.strip().isdecimal() and c.strip().isascii() else c for c in args.classes]
    return model.class_index.resolve(wanted)


def _explain_classes(args: argparse.Namespace, model: LeGradModel, images: list[Path], out: Path) -> int:
    """`legrad explain` on a classifier: OUT/<image>/<class>.png per map, scores.csv per file."""
    request = _class_request(args, model)
    failed, image_dirs = 0, set[str]()
    rows: list[tuple[object, ...]] = []
    with tqdm(total=len(images), unit="image", desc="explain", disable=None, file=sys.stderr) as bar:
        for batch in model.explain_batches(
            images, classes=request, batch_size=args.batch_size, on_error="skip"
        ):
            for failure in batch.failures:
                tqdm.write(f"{PROG}: skipped: {printable(failure.error)}", file=sys.stderr)
            failed += len(batch.failures)
            rows += _write_class_maps(args, batch, out, image_dirs)
            bar.update(len(batch.sources) + len(batch.failures))
    done = len(images) - failed
    if done == 0:
        raise UsageError(f"none of the {len(images)} image(s) could be read (each is named above)")
    header = ["image", "folder", "file", "class_id", "class", "probability", "logit"]
    _write_csv(out / SCORES_FILE, header, rows)
    print(f"wrote {len(rows)} overlays for {done} image(s) to {printable(out)}")
    if failed:
        say(PROG, "warning", f"{failed} of {len(images)} image(s) could not be read and were skipped")
        return EXIT_PARTIAL
    return EXIT_OK


def _picture(args: argparse.Namespace, batch: Explanation, b: int, p: int, caption: str) -> Image.Image:
    """Map (b, p) drawn as --style asks; a side-by-side picture is captioned (what, and its score)."""
    return batch.overlay(
        b,
        p,
        cmap=args.cmap,
        alpha=args.alpha,
        style=args.style,
        caption=caption if args.style == "side-by-side" else None,
    )


def _write_class_maps(
    args: argparse.Namespace, batch: Explanation, out: Path, image_dirs: set[str]
) -> list[tuple[object, ...]]:
    """Each image's overlays (and figures, maps), one per class, named by the class; scores.csv rows."""
    class_ids = batch.class_ids if batch.class_ids is not None else np.zeros((0, 0), np.int64)
    probs, logits = batch.probabilities, batch.similarities
    rows: list[tuple[object, ...]] = []
    for b, source in enumerate(batch.sources):
        folder = out / _unique(safe_name(Path(source).stem, "image"), image_dirs)
        folder.mkdir(exist_ok=True)
        used: set[str] = set()
        for p in range(len(batch.prompts)):
            label = batch.label(b, p)
            name = _unique(safe_name(short_name(label), "class"), used)
            caption = f"{short_name(label)}  (probability {probs[b, p]:.3f})"
            save_png(_picture(args, batch, b, p, caption), folder / f"{name}.png")
            if args.layers_figure:
                save_png(batch.layer_figure(b, p, cmap=args.cmap), folder / f"{name}__layers.png")
            score = (int(class_ids[b, p]), label, float(probs[b, p]), float(logits[b, p]))
            rows.append((source, folder.name, f"{name}.png", *score))
        if args.save_npy:
            maps = np.stack([batch.heatmap_on_original(b, p) for p in range(len(batch.prompts))])
            np.save(folder / "heatmaps.npy", maps)  # (P, H, W) on the original image, in the rows' order
    return rows


def _write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _by(size: tuple[int, int]) -> str:
    """(height, width) → 'W×H', width first as image sizes are written."""
    height, width = size
    return f"{width}×{height}"


def _summary(m: ModelMetadata) -> str:
    """The metadata for people; every string from the folder printed safely (no escapes, one line)."""
    pre, q = m.preprocess, printable
    t = m.tower or default_tower(m.grid_size)  # never None: ModelMetadata fills it in
    source = "from" if m.is_classifier else "open_clip"  # a classifier's: its library and version
    lines = [
        f"model        {q(m.model_name)}  (pretrained: {q(m.pretrained)})",
        f"input        {_by(m.image_size)} px, patch {m.patch_size}, grid {_by(m.grid_size)}"
        + ("" if m.image_size[0] == m.image_size[1] else " (width×height)")
        + f", resize {pre.resize_mode}/{pre.interpolation}"
        + ("" if pre.crop_pct == 1 else f", crop_pct {pre.crop_pct:g}"),
        f"layers       {', '.join(map(str, m.layers))} of {m.num_layers}  (width {m.width}, {m.heads} heads, "
        f"{m.activation})",
        f"tower        {q(t.family)}, head {q(t.head)}, "
        f"{'a class token' if t.prefix_tokens else 'no class token'}",
        _outputs(m),
        f"exported by  legrad-onnx {q(m.exporter_version)}, {source} {q(m.open_clip_version)}, torch "
        f"{q(m.torch_version)}, opset {m.opset}; schema v{m.schema_version}",
    ]
    if (c := m.correction) is not None:  # after the tower line
        state = "on" if c.enabled else "off"
        lines.insert(4, f"  correction {state}: empty prompt {q(c.prompt)!r}, threshold {c.threshold:g}")
    if m.vocabulary is not None:
        v = m.vocabulary
        slots = "; ".join(f"{q(name)}: {', '.join(map(q, values))}" for name, values in v.slots.items())
        lines += [
            f"vocabulary   {slots}",
            f"  templates  {' | '.join(map(q, v.templates))}  (e.g. {q(v.example())!r}; "
            f"--vocabulary uses all {v.count:,})",
        ]
    lines.append("files")
    lines += [
        f"  {q(e.path):<28} {e.size_bytes / 1e6:9.1f} MB  sha256 {e.sha256[:16]}…" for e in m.files.values()
    ]
    return "\n".join(lines)


def _outputs(m: ModelMetadata) -> str:
    """The summary's line on what the model compares: embeddings and a tokenizer, or classes."""
    if m.classes is not None or m.tokenizer is None:
        classes = m.classes or ()
        shown = ", ".join(printable(short_name(c)) for c in classes[:_SHOWN_CLASSES])
        more = ", … (`legrad info --classes` lists all)" if len(classes) > _SHOWN_CLASSES else ""
        return f"classifier   {len(classes):,} classes: {shown}{more}; softmax probabilities"
    return (
        f"embeddings   {m.embed_dim}-d, logit scale {m.logit_scale:.2f}"
        + ("" if m.logit_bias is None else f", logit bias {m.logit_bias:.2f} (sigmoid scores)")
        + f"; tokenizer {printable(m.tokenizer.kind)}, context {m.tokenizer.context_length}"
    )


def _info(args: argparse.Namespace) -> int:
    meta = read_metadata(args.model_dir)
    if args.classes:
        if meta.classes is None:
            raise UsageError(
                f"{printable(args.model_dir)} is a CLIP model, not a classifier: it has no classes"
            )
        print("\n".join(f"{i}\t{printable(name)}" for i, name in enumerate(meta.classes)))
        return EXIT_OK
    # json.dumps escapes every control character (ensure_ascii), so the JSON is safe to print too
    print(json.dumps(meta.to_dict(), indent=2) if args.json else _summary(meta))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger("PIL").setLevel(logging.CRITICAL)  # its notes on bad files; each is one line of ours
    if args.command == "serve":
        return run_main(PROG, lambda: serve_cli.run(args))
    return run_main(PROG, lambda: _info(args) if args.command == "info" else _explain(args))


if __name__ == "__main__":
    sys.exit(main())
