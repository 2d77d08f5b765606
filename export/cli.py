"""`legrad-export`: an OpenCLIP ViT or SigLIP tower → a model folder the torch-free runtime loads.

    legrad-export --model ViT-B-16 --pretrained laion2b_s34b_b88k --image-size 448 --out models/

Bad input ends in one line on stderr and exit code 2; progress goes to stderr, the folder to stdout.
Exit codes as for every command of the project (legrad_runtime.cli_runner): 0, 2 bad input,
3 internal error, 130 Ctrl-C, 143 SIGTERM (the temporary folder is removed on both).

Torch and open_clip are imported only after the arguments and the output folder are checked
(`arguments.py`: model names, tags and paths, without torch), and inside the part that answers
Ctrl-C with one line. --pretrained is required for open_clip names and classifiers: random weights
only when asked for (`--pretrained none`), with a warning.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from rich.console import Console

from legrad_runtime.cli_runner import EXIT_OK, run_main, say
from legrad_runtime.errors import ExportError
from legrad_runtime.files import ensure_output_folder
from legrad_runtime.metadata import RESIZE_MODES, Size, parse_size

from .arguments import ONNX, PROMPT_MODES, PT2, check_model_arguments, format_option, random_weights_note
from .layers import DEFAULT_LAYERS, parse_layer_spec

__all__ = [
    "main",
    "build_parser",
    "IMAGE_SIZE_HELP",
    "PRETRAINED_HELP",
    "RESIZE_MODE_HELP",
    "image_size_option",
    "check_loading_options",
]

PROG = "legrad-export"

_STAGE_TEXT = {
    "load": "load the model",
    "build": "rebuild the image tower with explicit attention",
    "trace": "trace the image and text graphs to ONNX",
    "check": "check the graphs and verify them against the reference",
    "write": "write the tokenizer, metadata and checksums",
    "pt2": "torch.export + AOTInductor: compile the image graph and verify the package",
}


IMAGE_SIZE_HELP = (
    "input size: 448 (a square) or WIDTHxHEIGHT such as 448x336 (landscape 4:3), each side a multiple "
    "of the patch (default: the model's)"
)
PRETRAINED_HELP = (
    "the weights, required for open_clip names and classifiers: an open_clip tag (e.g. "
    "laion2b_s34b_b88k), a torchvision weights name (IMAGENET1K_V1), 'hub' (timm's weights), a local "
    "checkpoint path, or 'none' for random weights (maps that mean nothing); not for local-dir: or "
    "hf-hub: models, which carry their own"
)
RESIZE_MODE_HELP = (
    "how the runtime fits images to the input: squash (LeGrad's demos, the whole image, aspect not "
    "kept), shortest (open_clip's: shorter side, then a centre crop) or longest (aspect kept, the "
    "whole image, padded with black); default: squash, a classifier's own preprocessing for classifiers"
)


def image_size_option(text: str | None) -> Size | None:
    """--image-size '448' or 'WIDTHxHEIGHT' → (height, width); None stays None. ValueError names the fix."""
    return None if text is None else parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legrad-export",
        description="Export an OpenCLIP ViT or SigLIP model with LeGrad as ONNX graphs plus metadata.",
    )
    p.add_argument(
        "--model",
        help="open_clip model name (e.g. ViT-B-16), local-dir:PATH, or an ImageNet classifier: "
        "torchvision:vit_b_16, timm:vit_base_patch16_224.augreg_in21k_ft_in1k",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help=PRETRAINED_HELP + "; with --list-models (any value), list every pretrained (model, tag) pair",
    )
    p.add_argument("--image-size", default=None, metavar="SIZE", help=IMAGE_SIZE_HELP)
    p.add_argument(
        "--layers",
        default=None,
        help="blocks to explain: -2 = last two, k = blocks k..L-1, 'all', or a list '8,10,11' (default: "
        f"what a local model folder's legrad_defaults.json names, else {DEFAULT_LAYERS})",
    )
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default=None, help=RESIZE_MODE_HELP)
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: the image graph's weights and matmuls in half precision (about half the file), "
        "checked against the fp32 graph (every map's Pearson r >= 0.999); the folder gets the suffix "
        "__fp16 (default: fp32)",
    )
    p.add_argument(
        "--prompts",
        choices=PROMPT_MODES,
        default="loop",
        help="how the image graph runs a call's prompts: loop (one at a time inside the graph, so memory "
        "does not grow with their number; default) or batch (all at once, no loop in the graph; memory "
        "grows with them, and the runtime splits long prompt lists across calls)",
    )
    p.add_argument(
        "--format",
        type=format_option,
        default=(ONNX,),
        metavar="FORMATS",
        help="the image graph's artifacts: onnx (the runtime's, default), pt2 (a torch.export + "
        "AOTInductor package for LibTorch apps, docs/pt2.md), or both: onnx,pt2",
    )
    p.add_argument("--out", default="models", help="parent folder of the exported model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the autograd reference")
    p.add_argument(
        "--no-correction",
        action="store_true",
        help="SigLIP-style (MAP-head) towers: turn off the authors' empty-prompt correction (on by default)",
    )
    p.add_argument(
        "--correction-threshold",
        type=float,
        default=0.8,
        metavar="T",
        help="the correction zeroes cells where the empty prompt's map exceeds T, in (0, 1] (default 0.8)",
    )
    add_loading_options(p)
    p.add_argument(
        "--list-models",
        action="store_true",
        help="print every open_clip model (name, tower family, supported or why not) and exit",
    )
    return p


def add_loading_options(p: argparse.ArgumentParser, note: str = "") -> None:
    """--tokenizer and --cache-dir: how the model's parts are found, the same on every torch-side CLI;
    `note` starts their help."""
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help=f"{note}the Hugging Face tokenizer of SigLIP-style models, offline: its saved folder or "
        "tokenizer.json",
    )
    p.add_argument("--cache-dir", default=None, help=f"{note}open_clip / Hugging Face download cache")


def check_loading_options(prog: str, args: argparse.Namespace) -> None:
    """--model, --pretrained, --tokenizer and --layers as far as they can be checked without torch
    (ExportError); then one warning line if the weights will be random."""
    if args.layers is not None:
        try:
            parse_layer_spec(args.layers)
        except ValueError as exc:
            raise ExportError(f"--layers: {exc}") from None
    check_model_arguments(args.model, args.pretrained, args.tokenizer)
    note = random_weights_note(args.model, args.pretrained)
    if note is not None:
        say(prog, "warning", note)


def load_from_args(args: argparse.Namespace):
    """`load_openclip` (or `load_classifier` for torchvision:/timm: names) on the parsed --model,
    --pretrained, --cache-dir and --tokenizer, checked by `check_loading_options` (imports torch)."""
    from .load import load_openclip
    from .load_classifier import is_classifier_name, load_classifier

    if is_classifier_name(args.model):
        return load_classifier(args.model, args.pretrained or "none")

    return load_openclip(
        args.model, args.pretrained or "none", cache_dir=args.cache_dir, tokenizer=args.tokenizer
    )


class _Stages:
    """One status line per stage with its duration; a spinner while it runs (on a terminal)."""

    def __init__(self, console: Console):
        self.console, self.current, self.started, self.status = console, None, 0.0, None

    def __call__(self, name: str) -> None:
        self._finish()
        self.current, self.started = name, time.perf_counter()
        self.status = self.console.status(f"[bold]{name}[/]: {_STAGE_TEXT[name]} ...")
        self.status.start()

    def _finish(self) -> None:
        if self.current is not None:
            self.status.stop()
            elapsed = time.perf_counter() - self.started
            self.console.print(f"[green]✓[/] {self.current:<6} {_STAGE_TEXT[self.current]} ({elapsed:.1f} s)")
            self.current = None

    def close(self, ok: bool) -> None:
        if ok:
            self._finish()
        elif self.current is not None:
            self.status.stop()
            self.console.print(f"[red]✗[/] {self.current:<6} {_STAGE_TEXT[self.current]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    if args.list_models:
        from .support import all_models, all_pairs

        if args.pretrained is None:
            lines = [support.line(name) for name, support in all_models()]
        else:
            lines = [support.line(f"{name}\t{tag}") for name, tag, support in all_pairs()]
        print("\n".join(lines))
        return EXIT_OK
    if not args.model:
        raise ExportError("--model is required (e.g. --model ViT-B-16); see --list-models")
    if not 0 < args.correction_threshold <= 1:
        raise ExportError(f"--correction-threshold {args.correction_threshold} must be in (0, 1]")
    if PT2 in args.format and args.dtype != "fp32":
        raise ExportError(f"--format pt2 writes an fp32 package; --dtype {args.dtype} is for ONNX only")
    try:
        image_size = image_size_option(args.image_size)
    except ValueError as exc:
        raise ExportError(f"--image-size {args.image_size}: {exc}") from None
    check_loading_options(PROG, args)
    try:
        out = ensure_output_folder(args.out)  # before the slow part
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    for name in ("", "huggingface_hub"):  # open_clip and the hub log retries and notes; we report errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    stages = _Stages(Console(stderr=True, highlight=False))
    ok = False
    try:
        stages("load")
        from .onnx_export import ExportSettings  # the torch import: Ctrl-C may come here
        from .pt2 import export_folder

        loaded = load_from_args(args)
        settings = ExportSettings(
            image_size=image_size,
            layers=args.layers,
            resize_mode=args.resize_mode,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            correction=not args.no_correction,
            correction_threshold=args.correction_threshold,
            dtype=args.dtype,
            prompts=args.prompts,
        )
        folder = export_folder(loaded, out, settings, args.format, on_stage=stages)
        ok = True
    finally:
        stages.close(ok=ok)
    print(folder)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
