"""A second artifact: the image graph as a PT2 package (torch.export + AOTInductor), for LibTorch apps.

The module exported is the one the ONNX path traces (`graphs.build_image_graph`), with the same
inputs and outputs and the same dynamic axes (batch and prompts). The package holds a compiled
shared library and the weights; `torch._inductor.aoti_load_package` (Python) or
`torch::inductor::AOTIModelPackageLoader` (C++) runs it without Python code of ours. See docs/pt2.md.

The folder is the ONNX export's (`onnx_export.export_model`, in a private staging folder), with
`legrad_image.pt2` added (and, for `--format pt2` alone, `legrad_image.onnx` removed), its facts in
the metadata's `extra["pt2"]`, and the checksums rewritten; then it is renamed into place as a whole.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from legrad_runtime.errors import ExportError, VerificationError
from legrad_runtime.metadata import (
    METADATA_FILE,
    FileEntry,
    GraphSpec,
    ModelMetadata,
    image_graph_spec,
    read_metadata,
    sha256_file,
)

from .arguments import FORMATS, ONNX, PT2
from .graphs import build_image_graph, example_classifier_inputs, example_image_inputs
from .load_classifier import AnyLoaded
from .onnx_export import (
    ExportSettings,
    _quiet,
    _replace,
    check_output_root,
    export_model,
    model_folder_name,
    resolve_image_size,
)
from .verify import _compare, reference

__all__ = ["PT2_FILE", "PT2_KEY", "export_folder", "export_pt2_package", "load_pt2", "verify_pt2"]

PT2_FILE = "legrad_image.pt2"
PT2_KEY = "pt2"  # metadata extra["pt2"]: what the package is and how it was checked
_MIN_SIDE = 1  # the dynamic axes' lower bound (0 images or 0 prompts is no call)


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def export_pt2_package(
    graph: nn.Module, example: tuple[torch.Tensor, torch.Tensor], path: Path
) -> dict[str, float]:
    """torch.export `graph` with dynamic batch and prompts, AOTInductor-compile it for the CPU into
    the package `path`; returns the seconds each step took."""
    batch = torch.export.Dim("batch", min=_MIN_SIDE)
    prompts = torch.export.Dim("prompts", min=_MIN_SIDE)
    started = time.perf_counter()
    try:
        with _quiet():
            program = torch.export.export(
                graph, example, dynamic_shapes=({0: batch}, {0: prompts}), strict=False
            )
    except Exception as exc:  # torch.export's own errors are many types; name what failed, once
        raise ExportError(f"torch.export of the image graph failed: {type(exc).__name__}: {exc}") from exc
    exported = time.perf_counter()
    try:
        with _quiet(), _logger_level("torch.utils.cpp_extension", logging.ERROR):  # "No CUDA runtime"
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"AOTInductor could not compile the image graph: {type(exc).__name__}: {first}"
        ) from exc
    return {"export_s": exported - started, "compile_s": time.perf_counter() - exported}


def load_pt2(path: str | Path):
    """The compiled package as a callable: (pixel_values, text_embeds or class_ids) → list of outputs."""
    return torch._inductor.aoti_load_package(str(path))


# ---------------------------------------------------------------- verification


def verify_pt2(
    path: Path,
    loaded: AnyLoaded,
    meta: ModelMetadata,
    empty_embed: torch.Tensor | None,
    threshold: float,
    batch: int = 2,
    prompts: int = 3,
) -> dict[str, float]:
    """Max abs difference of every output of the loaded package against the autograd reference,
    with the ONNX verification's inputs and tolerances; one VerificationError listing every miss."""
    spec = image_graph_spec(meta)
    runner = load_pt2(path)
    if meta.is_classifier:
        from .reference_classifier import legrad_reference_classifier

        pixels, ids = example_classifier_inputs(meta.image_size, meta.embed_dim, batch, prompts, seed=1234)
        ref = legrad_reference_classifier(loaded.model, pixels, ids, meta.layers)
        expected = {"heatmaps": ref.heatmaps, "layer_maps": ref.layer_maps, "logits": ref.logits}
        got = runner(pixels, ids)
    else:
        pixels, text = example_image_inputs(meta.image_size, meta.embed_dim, batch, prompts, seed=1234)
        ref = reference(loaded, pixels, text, meta.layers, empty_embed, threshold)
        expected = {"heatmaps": ref.heatmaps, "layer_maps": ref.layer_maps, "image_embeds": ref.image_embeds}
        got = runner(pixels, text)
    outputs = {name: t.detach().numpy() for name, t in zip(spec.output_names, got)}
    try:
        return _compare(spec.outputs, outputs, expected)
    except VerificationError as exc:
        raise VerificationError(f"{PT2_FILE}: {exc}") from None


# ---------------------------------------------------------------- the folder


def _pt2_facts(spec: GraphSpec, meta: ModelMetadata, times: dict[str, float]) -> dict[str, Any]:
    sizes = {
        "height": meta.image_size[0],
        "width": meta.image_size[1],
        "embed_dim": meta.embed_dim,
        "layers": len(meta.layers),
        "grid_h": meta.grid_size[0],
        "grid_w": meta.grid_size[1],
    }

    def shape(axes):  # every axis a number but the dynamic ones
        return [sizes.get(a, a) if isinstance(a, str) else a for a in axes]

    return {
        "file": PT2_FILE,
        "format": "torch.export + AOTInductor package (aoti_compile_and_package)",
        "device": "cpu",
        "torch": torch.__version__,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": shape(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": shape(t.shape)} for t in spec.outputs],
        "dynamic": {"batch": [_MIN_SIDE, None], "prompts": [_MIN_SIDE, None]},
        "prompts": "batch",  # every prompt of a call at once: memory grows with their number
        **{k: round(v, 1) for k, v in times.items()},
    }


def export_folder(
    loaded: AnyLoaded,
    out_root: str | Path,
    settings: ExportSettings | None = None,
    formats: tuple[str, ...] = (ONNX, PT2),
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Export `loaded` into out_root/MODEL__PRETRAINED__SIZE/ with the image graph in each of
    `formats` ('onnx', 'pt2'); the text graph, tokenizer and metadata as an ONNX export's."""
    settings = settings or ExportSettings()
    stage = on_stage or (lambda name: None)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unsupported format(s) {unknown or formats!r}; expected some of {FORMATS}")
    if PT2 not in formats:
        return export_model(loaded, out_root, settings, on_stage)
    if settings.dtype != "fp32":
        raise ExportError(f"--format pt2 writes an fp32 package; --dtype {settings.dtype} is for ONNX only")
    out_root = Path(out_root)
    check_output_root(out_root)
    size = resolve_image_size(loaded, settings.image_size, runs_graph=settings.verify)
    target = out_root / model_folder_name(loaded, size)
    if target.exists() and not settings.overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it")

    staging = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{target.name}.pt2-"))
    try:
        folder = export_model(loaded, staging, replace(settings, image_size=size, overwrite=True), on_stage)
        meta = read_metadata(folder)
        stage("pt2")
        graph = build_image_graph(
            loaded,
            meta.image_size,
            meta.layers,
            settings.correction,
            settings.correction_threshold,
            # every prompt at once: torch 2.14's AOTInductor cannot compile the prompt scan with a
            # dynamic batch (KeyError: s<N> in decompose_scan_to_while_loop; docs/pt2.md)
            prompts="batch",
        )
        spec = image_graph_spec(meta)
        if meta.is_classifier:
            example = example_classifier_inputs(meta.image_size, meta.embed_dim, 2, 2)
        else:
            example = example_image_inputs(meta.image_size, meta.embed_dim, 2, 2)
        times = export_pt2_package(graph, example, folder / PT2_FILE)
        facts = _pt2_facts(spec, meta, times)
        if settings.verify:
            empty = getattr(graph, "empty_embed", None)
            empty = None if empty is None else empty[0]
            facts["verification_max_abs_diff"] = verify_pt2(
                folder / PT2_FILE, loaded, meta, empty, settings.correction_threshold
            )
        if ONNX not in formats:
            for onnx_file in folder.glob(spec.filename + "*"):  # the graph, and its .data side file if any
                onnx_file.unlink()
            facts["onnx_image_graph"] = "traced and verified, then left out (--format pt2)"
        rel = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        rel = [r for r in rel if r != METADATA_FILE]
        files = {r: FileEntry(r, sha256_file(folder / r), (folder / r).stat().st_size) for r in rel}
        meta = replace(meta, files=files, extra={**meta.extra, PT2_KEY: facts})
        (folder / METADATA_FILE).write_text(meta.to_json(), encoding="utf-8")
        _replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
