"""`legrad`: heatmaps from an exported model folder, torch-free.

    legrad explain MODEL_DIR photos/*.jpg -p "a cat" -p "a remote control" --out out/
    legrad info MODEL_DIR

Bad arguments end in one line on stderr and exit code 2. Images that cannot be read are reported
one line each and skipped; the others are still written, and the exit code is then 1.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import LegradError
from .metadata import ModelMetadata, read_metadata
from .session import DEVICES, load
from .visualize import COLORMAPS, save_png

__all__ = ["main", "build_parser", "find_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
    ex.add_argument("--out", default="legrad_out", help="output folder (default: legrad_out)")
    ex.add_argument("--device", choices=DEVICES, default="auto", help="auto picks CUDA when available")
    ex.add_argument("--batch-size", type=int, default=None, help="images per call (default: from memory)")
    ex.add_argument("--layers-figure", action="store_true", help="also write the per-layer figure")
    ex.add_argument(
        "--save-npy", action="store_true", help="also save heatmaps on the original images (.npy)"
    )
    ex.add_argument("--cmap", choices=sorted(COLORMAPS), default="jet", help="colormap (default: jet)")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1] (default: 0.5)")

    info = sub.add_parser("info", help="print a model folder's metadata")
    info.add_argument("model_dir")
    info.add_argument("--json", action="store_true", help="print the raw metadata JSON")
    return p


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "prompt"


def _unique(name: str, used: set[str]) -> str:
    """photos/a/cat.jpg and photos/b/cat.jpg must not overwrite each other's outputs."""
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}-{k}"
    used.add(candidate)
    return candidate


def _explain(args: argparse.Namespace) -> int:
    args.prompts = list(args.prompts or [])
    if args.vocabulary:
        vocabulary = read_metadata(args.model_dir).vocabulary
        if vocabulary is None:
            raise UsageError(f"{args.model_dir} has no vocabulary (see `legrad info`); give prompts with -p")
        args.prompts = list(dict.fromkeys(args.prompts + vocabulary.prompts()))
    if not args.prompts:
        raise UsageError('give at least one prompt with -p, e.g. -p "a photo of a cat"')
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, not {args.batch_size}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], not {args.alpha}")
    images = find_images(args.images)
    if not images:
        raise UsageError(f"no image files found in {' '.join(args.images)}")
    model = load(args.model_dir, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [_slug(p) for p in args.prompts]
    failed = 0
    rows = []
    used: set[str] = set()
    with tqdm(total=len(images), unit="image", desc="explain", disable=None, file=sys.stderr) as bar:
        for batch in model.explain_batches(images, args.prompts, batch_size=args.batch_size, on_error="skip"):
            for failure in batch.failures:
                tqdm.write(f"legrad: skipped: {failure.error}", file=sys.stderr)
            failed += len(batch.failures)
            for b, source in enumerate(batch.sources):
                stem = out / _unique(Path(source).stem, used)
                stem.mkdir(exist_ok=True)
                for p, name in enumerate(names):
                    save_png(batch.overlay(b, p, cmap=args.cmap, alpha=args.alpha), stem / f"{name}.png")
                    if args.layers_figure:
                        save_png(batch.layer_figure(b, p, cmap=args.cmap), stem / f"{name}__layers.png")
                    rows.append((source, args.prompts[p], float(batch.similarities[b, p])))
                if args.save_npy:
                    maps = np.stack([batch.heatmap_on_original(b, p) for p in range(len(names))])
                    np.save(stem / "heatmaps.npy", maps)  # (P, H, W) on the original image
            bar.update(len(batch.sources) + len(batch.failures))
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "prompt", "cosine_similarity"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} overlays for {len(images) - failed} image(s) to {out}")
    if failed:
        print(f"legrad: {failed} image(s) could not be read (listed above)", file=sys.stderr)
        return 1
    return 0


def _summary(m: ModelMetadata) -> str:
    pre = m.preprocess
    lines = [
        f"model        {m.model_name}  (pretrained: {m.pretrained})",
        f"input        {m.image_size}×{m.image_size} px, patch {m.patch_size}, "
        f"grid {m.grid_size}×{m.grid_size}, resize {pre.resize_mode}/{pre.interpolation}",
        f"layers       {', '.join(map(str, m.layers))} of {m.num_layers}  (width {m.width}, {m.heads} heads, "
        f"{m.activation})",
        f"embeddings   {m.embed_dim}-d, logit scale {m.logit_scale:.2f}; tokenizer {m.tokenizer.kind}, "
        f"context {m.tokenizer.context_length}",
        f"exported by  legrad-onnx {m.exporter_version}, open_clip {m.open_clip_version}, torch "
        f"{m.torch_version}, opset {m.opset}; schema v{m.schema_version}",
    ]
    if m.vocabulary is not None:
        slots = "; ".join(f"{name}: {', '.join(values)}" for name, values in m.vocabulary.slots.items())
        example = m.vocabulary.prompts()[0]
        lines += [
            f"vocabulary   {slots}",
            f"  templates  {' | '.join(m.vocabulary.templates)}  (e.g. {example!r}; --vocabulary uses all)",
        ]
    lines.append("files")
    lines += [
        f"  {e.path:<28} {e.size_bytes / 1e6:9.1f} MB  sha256 {e.sha256[:16]}…" for e in m.files.values()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            meta = read_metadata(args.model_dir)
            print(json.dumps(meta.to_dict(), indent=2) if args.json else _summary(meta))
            return 0
        return _explain(args)
    except LegradError as exc:
        print(f"legrad: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
