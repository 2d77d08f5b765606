"""`legrad-evaluate`: LeGrad and baselines from the same model, scored on a folder of masked cases.

    legrad-evaluate CASES_DIR --model local-dir:models/shapes --layers -2 --json scores.json

Each image is preprocessed as the runtime does (`legrad_runtime.preprocess`), explained by the
analytic LeGrad module for all of its prompts in one forward, and every method's map is put back
onto the original image (`to_original`) before `legrad_runtime.evaluation` scores it. Methods:
LeGrad, the last block's CLS attention, attention rollout (both from the same ViT, text-agnostic),
a centre prior (model-free), and optionally a folder of saved heatmaps.

Bad input ends in one line on stderr and exit code 2; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from legrad_runtime.errors import ExportError, InputError, LegradError
from legrad_runtime.evaluation import (
    Case,
    Evaluation,
    centre_prior,
    format_table,
    load_cases,
    load_saved_heatmaps,
    save_heatmaps,
    score_cases,
)
from legrad_runtime.preprocess import load_image, preprocess_batch, to_original

from .baselines import attention_rollout, cls_attention
from .graphs import TextGraph, build_image_graph
from .layers import resolve_layers
from .legrad import upsample
from .load import LoadedModel, default_layer_spec

__all__ = ["METHODS", "build_parser", "compute_heatmaps", "evaluate_cases", "main"]

LEGRAD, CLS_ATTENTION, ROLLOUT, CENTRE_PRIOR = "legrad", "cls-attention", "rollout", "centre-prior"
METHODS = (LEGRAD, CLS_ATTENTION, ROLLOUT, CENTRE_PRIOR)
_PAIR_BUDGET_BYTES = 2**30  # per call: images × prompts × heads × N² float32 of LeGrad intermediates
_TEXT_CHUNK = 256
# a call runs its images against the union of their prompts: it may do up to this many times the
# (image, prompt) maps its cases need, since fewer, larger calls beat many small ones on CPU
_MAX_WASTE = 4


def _embed_prompts(loaded: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """(P, E) L2-normalised text embeddings from open_clip's text tower."""
    text = TextGraph(loaded)
    with torch.no_grad():
        chunks = [
            text(loaded.tokenizer(list(prompts[i : i + _TEXT_CHUNK])))
            for i in range(0, len(prompts), _TEXT_CHUNK)
        ]
    return torch.cat(chunks)


def _plan(
    by_image: dict[Path, list[str]], batch_size: int, max_pairs: int
) -> list[list[tuple[Path, list[str]]]]:
    """Calls of (image, its prompts) pairs, at most `batch_size` images and `max_pairs` maps each.
    Images join a call while it computes at most _MAX_WASTE times the maps its cases need."""
    pieces = [
        (path, prompts[i : i + max_pairs])
        for path, prompts in by_image.items()
        for i in range(0, len(prompts), max_pairs)
    ]
    calls: list[list[tuple[Path, list[str]]]] = []
    union: set[str] = set()
    needed = 0
    for path, prompts in pieces:
        if calls and len(calls[-1]) < batch_size:
            new_union = union | set(prompts)
            work = (len(calls[-1]) + 1) * len(new_union)
            if work <= max_pairs and work <= _MAX_WASTE * (needed + len(prompts)):
                calls[-1].append((path, prompts))
                union, needed = new_union, needed + len(prompts)
                continue
        calls.append([(path, prompts)])
        union, needed = set(prompts), len(prompts)
    return calls


def _to_square(maps: torch.Tensor, size: int) -> np.ndarray:
    """(B, g, g) grid maps → (B, S, S) numpy, upsampled exactly as LeGrad's own maps."""
    return upsample(maps.unsqueeze(1), size)[:, 0].numpy()


def compute_heatmaps(
    loaded: LoadedModel,
    cases: Sequence[Case],
    image_size: int,
    layers: tuple[int, ...],
    resize_mode: str = "squash",
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[np.ndarray]]:
    """{method: one float32 map per case on its original image} for every method in METHODS.

    `on_progress(done, total)` is called after each forward, counting images (an image with very
    many prompts counts once per forward it needs).
    """
    cfg = loaded.preprocess_cfg(image_size, resize_mode)
    legrad = build_image_graph(loaded, image_size, layers)
    vit = legrad.vit
    prompts = list(dict.fromkeys(c.prompt for c in cases))
    prompt_index = {p: i for i, p in enumerate(prompts)}
    text_embeds = _embed_prompts(loaded, prompts)

    by_image: dict[Path, list[str]] = {}
    for case in cases:
        listed = by_image.setdefault(case.image, [])
        if case.prompt not in listed:
            listed.append(case.prompt)
    pair_bytes = 4 * vit.cfg.heads * vit.num_tokens**2 * 3
    calls = _plan(by_image, max(1, batch_size), max(1, _PAIR_BUDGET_BYTES // pair_bytes))

    found: dict[tuple[Path, str], dict[str, np.ndarray]] = {}
    done, total = 0, sum(len(call) for call in calls)
    for call in calls:
        paths = [path for path, _ in call]
        union = list(dict.fromkeys(p for _, ps in call for p in ps))
        pixels, placements = preprocess_batch([load_image(path) for path in paths], cfg)
        pixel_values = torch.from_numpy(pixels)
        with torch.no_grad():
            heatmaps = legrad(pixel_values, text_embeds[[prompt_index[p] for p in union]])[0].numpy()
        cls_maps = _to_square(cls_attention(vit, pixel_values), image_size)
        rollout_maps = _to_square(attention_rollout(vit, pixel_values), image_size)
        for b, ((path, wanted), placement) in enumerate(zip(call, placements)):
            shared = {
                CLS_ATTENTION: to_original(cls_maps[b], placement),
                ROLLOUT: to_original(rollout_maps[b], placement),
                CENTRE_PRIOR: centre_prior(placement.height, placement.width),
            }
            for prompt in wanted:
                found[path, prompt] = {
                    LEGRAD: to_original(heatmaps[b, union.index(prompt)], placement),
                    **shared,
                }
        done += len(call)
        if on_progress is not None:
            on_progress(done, total)
    return {method: [found[c.image, c.prompt][method] for c in cases] for method in METHODS}


def evaluate_cases(
    loaded: LoadedModel,
    cases: Sequence[Case],
    image_size: int,
    layers: tuple[int, ...],
    resize_mode: str = "squash",
    threshold: float = 0.5,
    extra: dict[str, list[np.ndarray]] | None = None,
) -> Evaluation:
    """Compute every method's heatmaps for `cases` and score them (plus `extra` saved methods)."""
    maps = compute_heatmaps(loaded, cases, image_size, layers, resize_mode)
    return score_cases(cases, maps | (extra or {}), threshold)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legrad-evaluate",
        description="Score LeGrad and baselines (CLS attention, rollout, centre prior) on masked cases.",
    )
    p.add_argument("cases_dir", help="folder with cases.csv (columns image,prompt,mask[,group])")
    p.add_argument("--model", required=True, help="open_clip model name, local-dir:PATH, or a model folder")
    p.add_argument("--pretrained", default="none", help="open_clip tag, a local checkpoint path, or 'none'")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument(
        "--layers",
        default=None,
        help="blocks LeGrad sums: -2 = last two, k = blocks k..L-1, 'all', or '8,10,11' "
        "(default: as the exporter: the model folder's legrad_defaults.json, else -2)",
    )
    p.add_argument(
        "--resize-mode",
        choices=("squash", "shortest"),
        default="squash",
        help="how images are fitted to the square input (default: squash, as the exporter)",
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
    p.add_argument("--cache-dir", default=None, help="open_clip / Hugging Face download cache")
    return p


def _check_options(args: argparse.Namespace) -> None:
    if not 0 <= args.threshold <= 1:
        raise InputError(f"--threshold {args.threshold} is outside [0, 1]")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be at least 1")
    if args.json is not None and not Path(args.json).expanduser().parent.is_dir():
        raise InputError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")


def _resolve(loaded: LoadedModel, args: argparse.Namespace) -> tuple[int, tuple[int, ...]]:
    from .onnx_export import resolve_image_size

    size = resolve_image_size(loaded, args.image_size)
    spec = default_layer_spec(loaded) if args.layers is None else args.layers
    try:
        return size, resolve_layers(spec, loaded.vit.num_layers)
    except ValueError as exc:
        raise ExportError(f"--layers: {exc}") from exc


def _write_outputs(args: argparse.Namespace, report: dict, maps: dict[str, list[np.ndarray]]) -> None:
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
    console = Console(stderr=True, highlight=False)
    for name in ("", "huggingface_hub"):  # open_clip and the hub log retries and notes; we report errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        _check_options(args)
        cases = load_cases(args.cases_dir)
        extra = {}
        if args.heatmaps is not None:
            extra[f"saved:{Path(args.heatmaps).resolve().name}"] = load_saved_heatmaps(
                args.heatmaps, len(cases)
            )
        from .load import load_openclip

        with console.status("loading the model ..."):
            loaded = load_openclip(args.model, args.pretrained, cache_dir=args.cache_dir)
        size, layers = _resolve(loaded, args)
        columns = (TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("explain", total=len({c.image for c in cases}))
            maps = compute_heatmaps(
                loaded,
                cases,
                size,
                layers,
                args.resize_mode,
                args.batch_size,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        maps |= extra
        evaluation = score_cases(cases, maps, args.threshold)
        report = {
            "model": loaded.model_name,
            "pretrained": loaded.pretrained,
            "image_size": size,
            "layers": list(layers),
            "resize_mode": args.resize_mode,
            "cases_dir": str(Path(args.cases_dir).resolve()),
            "cases": [
                {"image": str(c.image), "prompt": c.prompt, "mask": str(c.mask), "group": c.group}
                for c in cases
            ],
            **evaluation.to_dict(),
        }
        _write_outputs(args, report, {m: maps[m] for m in METHODS})
    except LegradError as exc:
        console.print(f"legrad-evaluate: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("legrad-evaluate: interrupted")
        return 130
    header = f"{loaded.model_name} ({loaded.pretrained}), {size} px, layers {','.join(map(str, layers))}"
    print(f"{header}, {len(cases)} cases\n{format_table(evaluation)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
