"""`legrad-evaluate`'s command line: arguments and output paths checked before torch is imported.

    legrad-evaluate CASES_DIR --model local-dir:models/shapes --layers -2 --json scores.json
    legrad-evaluate CASES_DIR --model models/shapes-clip__open_clip_model__224   # an exported folder

The work itself is `legrad_export.evaluate` (torch) for a model to export, `evaluate_folder` (the
runtime, no torch) for an exported model folder. Exit codes as for every command of the project
(legrad_runtime.cli_runner): 0, 2 bad input (one line on stderr), 3 internal error, 130, 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from legrad_runtime.cli_runner import EXIT_OK, add_max_pixels_option, max_pixels_from, run_main, say
from legrad_runtime.errors import ExportError, InputError
from legrad_runtime.evaluation import (
    format_table,
    load_cases,
    load_saved_heatmaps,
    save_heatmaps,
    score_cases,
)
from legrad_runtime.files import ensure_output_folder
from legrad_runtime.metadata import RESIZE_MODES, Size, format_size

from .arguments import EXPORTED, model_kind
from .cli import (
    IMAGE_SIZE_HELP,
    PRETRAINED_HELP,
    add_loading_options,
    check_loading_options,
    image_size_option,
    load_from_args,
)

__all__ = ["build_parser", "main"]

PROG = "legrad-evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legrad-evaluate",
        description="Score LeGrad and baselines (CLS attention, rollout, centre prior) on masked cases: "
        "from a torch model, or from an exported model folder (its ONNX graph, through the runtime).",
        epilog="An exported model folder is scored as exported, through the runtime (methods legrad and "
        "centre-prior): the options marked [torch] are refused, since the folder fixes its weights, image "
        "size, layers and preprocessing.",
    )
    p.add_argument("cases_dir", help="folder with cases.csv (columns image,prompt,mask[,group])")
    p.add_argument(
        "--model",
        required=True,
        help="open_clip model name, local-dir:PATH, a torch model folder (open_clip_config.json), or an "
        "exported model folder (legrad.json: its ONNX graph is scored, through the runtime)",
    )
    p.add_argument("--pretrained", default=None, help="[torch] " + PRETRAINED_HELP)
    p.add_argument("--image-size", default=None, metavar="SIZE", help="[torch] " + IMAGE_SIZE_HELP)
    p.add_argument(
        "--layers",
        default=None,
        help="[torch] blocks LeGrad sums: -2 = last two, k = blocks k..L-1, 'all', or '8,10,11' "
        "(default: as the exporter: the model folder's legrad_defaults.json, else -2)",
    )
    p.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default=None,
        help="[torch] how images are fitted to the input: squash (the default, as the exporter), shortest "
        "or longest",
    )
    p.add_argument(
        "--heatmaps",
        default=None,
        metavar="NPY_DIR",
        help="also score saved heatmaps: NPY_DIR/<i>.npy for case i (0-based row of cases.csv)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="IoU threshold on min-max maps (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    p.add_argument(
        "--json", default=None, metavar="OUT", help="write the scores (table and per case) as JSON"
    )
    p.add_argument(
        "--save-heatmaps",
        default=None,
        metavar="DIR",
        help="write every method's maps on the original images as DIR/<method>/<i>.npy",
    )
    add_max_pixels_option(p, "refused")
    add_loading_options(p, note="[torch] ")
    return p


_TORCH_ONLY = ("pretrained", "image_size", "layers", "resize_mode", "tokenizer", "cache_dir")


def _check_folder_options(args: argparse.Namespace) -> None:
    """An exported folder's graph fixes its weights, size, layers and preprocessing: refuse the
    options that would change them on the torch side, rather than ignore them."""
    given = ["--" + name.replace("_", "-") for name in _TORCH_ONLY if getattr(args, name) is not None]
    if given:
        raise InputError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to an exported folder: "
            f"{args.model} is scored as exported (its legrad.json fixes the weights, image size, layers and "
            "resize mode); drop them, or pass the model it was exported from to score other settings"
        )


def _check_options(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model: values, and that outputs can be written."""
    if not 0 <= args.threshold <= 1:
        raise InputError(f"--threshold {args.threshold} is outside [0, 1]")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be at least 1")
    try:
        image_size_option(args.image_size)
    except ValueError as exc:
        raise InputError(f"--image-size {args.image_size}: {exc}") from None
    try:
        if args.json is not None:
            target = Path(args.json).expanduser()
            if target.is_dir():
                raise InputError(f"--json {args.json} is a folder; pass a file name such as scores.json")
            if not target.parent.is_dir():
                raise InputError(f"--json {args.json}: folder {target.parent} does not exist")
            ensure_output_folder(target.parent)  # exists: only proves it writable
        if args.save_heatmaps is not None:
            ensure_output_folder(Path(args.save_heatmaps).expanduser())
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _resolve(loaded: Any, args: argparse.Namespace) -> tuple[Size, tuple[int, ...]]:
    from .layers import resolve_layers
    from .load import default_layer_spec
    from .onnx_export import resolve_image_size

    size = resolve_image_size(loaded, image_size_option(args.image_size), batch=args.batch_size)
    spec = default_layer_spec(loaded) if args.layers is None else args.layers
    try:
        return size, resolve_layers(spec, loaded.vit.num_layers)
    except ValueError as exc:
        raise ExportError(f"--layers: {exc}") from exc


def _write_outputs(args: argparse.Namespace, report: dict, maps: dict[str, list[Any]]) -> None:
    try:
        if args.save_heatmaps is not None:
            for method, method_maps in maps.items():
                save_heatmaps(Path(args.save_heatmaps) / method, method_maps)
        if args.json is not None:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write output ({exc.strerror or exc}: {exc.filename})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False)
    for name in ("", "huggingface_hub"):  # open_clip and the hub log retries and notes; we report errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _check_options(args)
    max_pixels = max_pixels_from(args)
    cases = load_cases(args.cases_dir, max_pixels=max_pixels)
    exported = model_kind(args.model) == EXPORTED  # checked after the cases, still before any import
    if exported:
        _check_folder_options(args)
    else:
        check_loading_options(PROG, args)
    extra = {}
    if args.heatmaps is not None:
        extra[f"saved:{Path(args.heatmaps).resolve().name}"] = load_saved_heatmaps(args.heatmaps, len(cases))
    run = _run_folder if exported else _run_torch
    report, maps, header = run(args, cases, console, max_pixels)
    methods = list(maps)
    evaluation = score_cases(cases, maps | extra, args.threshold, max_pixels=max_pixels)
    report |= {
        "cases_dir": str(Path(args.cases_dir).resolve()),
        "cases": [
            {"image": str(c.image), "prompt": c.prompt, "mask": str(c.mask), "group": c.group} for c in cases
        ],
        **evaluation.to_dict(),
    }
    _write_outputs(args, report, {m: maps[m] for m in methods})
    print(f"{header}, {len(cases)} cases\n{format_table(evaluation)}")
    return EXIT_OK


def _progress(console: Console) -> Progress:
    columns = (TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True)


def _run_torch(
    args: argparse.Namespace, cases: list[Any], console: Console, max_pixels: int
) -> tuple[dict[str, Any], dict[str, list[Any]], str]:
    """LeGrad and the baselines from the torch model: (report fields, maps, header line)."""
    with console.status("loading the model ..."):
        from .evaluate import compute_heatmaps  # the torch import: Ctrl-C may come here

        loaded = load_from_args(args)
    size, layers = _resolve(loaded, args)
    resize_mode = args.resize_mode or "squash"
    with _progress(console) as progress:
        task = progress.add_task("explain", total=len({c.image for c in cases}))
        maps = compute_heatmaps(
            loaded,
            cases,
            size,
            layers,
            resize_mode,
            args.batch_size,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            max_pixels=max_pixels,
        )
    report = {
        "model": loaded.model_name,
        "pretrained": loaded.pretrained,
        "scored": "torch model",
        "image_size": list(size),
        "layers": list(layers),
        "resize_mode": resize_mode,
    }
    layer_list = ",".join(map(str, layers))
    header = f"{loaded.model_name} ({loaded.pretrained}), {format_size(size)} px, layers {layer_list}"
    return report, maps, f"{header}, {resize_mode}"


def _run_folder(
    args: argparse.Namespace, cases: list[Any], console: Console, max_pixels: int
) -> tuple[dict[str, Any], dict[str, list[Any]], str]:
    """LeGrad from the exported graph, through the runtime (no torch): (report fields, maps, header)."""
    from legrad_runtime import load

    from .evaluate_folder import folder_heatmaps

    with console.status("loading the model folder ..."):
        model = load(args.model, max_pixels=max_pixels)
    meta = model.metadata
    if meta.pretrained == "none":
        say(
            PROG,
            "warning",
            f"{args.model} was exported with random weights (pretrained none): scores mean nothing",
        )
    with _progress(console) as progress:
        task = progress.add_task("explain", total=len({c.image for c in cases}))
        maps = folder_heatmaps(
            model,
            cases,
            args.batch_size,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    report = {
        "model": meta.model_name,
        "pretrained": meta.pretrained,
        "scored": "exported graph",
        "model_folder": str(Path(model.folder).resolve()),
        "device": model.devices["image"],
        "image_size": list(meta.image_size),
        "layers": list(meta.layers),
        "resize_mode": meta.preprocess.resize_mode,
    }
    layer_list = ",".join(map(str, meta.layers))
    header = (
        f"{model.folder.name}: the exported ONNX graph (onnxruntime, {model.devices['image']}) of "
        f"{meta.model_name} ({meta.pretrained}), {format_size(meta.image_size)} px, layers {layer_list}, "
        f"{meta.preprocess.resize_mode}"
    )
    return report, maps, header


if __name__ == "__main__":
    sys.exit(main())
