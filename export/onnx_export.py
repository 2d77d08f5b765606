"""Write a self-describing model folder: image graph, text graph, tokenizer files, metadata.

Everything is written into a hidden temporary folder next to the target and renamed into place at
the end, so a failed export never leaves a half-written model folder behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from legrad_runtime import __version__
from legrad_runtime.errors import ExportError
from legrad_runtime.files import ensure_output_folder
from legrad_runtime.metadata import (
    CLASSIFIER_GRAPH,
    IMAGE_GRAPH,
    METADATA_FILE,
    ONNX_METADATA_KEY,
    TEXT_GRAPH,
    CorrectionCfg,
    FileEntry,
    GraphSpec,
    ModelMetadata,
    Size,
    TowerCfg,
    as_size,
    format_size,
    sha256_file,
)
from legrad_runtime.session import PROMPT_LOOP_KEY

from .arguments import PROMPT_MODES
from .fp16_export import DTYPES, FP16_SUFFIX, convert_image_graph, verification_feeds
from .graphs import (
    DEFAULT_THRESHOLD,
    EMPTY_PROMPT,
    TextGraph,
    build_image_graph,
    example_classifier_inputs,
    example_image_inputs,
)
from .layers import resolve_layers
from .load import OPEN_CLIP_VERSION, default_layer_spec
from .load_classifier import AnyLoaded
from .memory import check_fits
from .text_tokenizer import write_tokenizer
from .verify import VERIFY_PROMPTS, verify_classifier_export, verify_export

__all__ = ["ExportSettings", "export_model", "check_output_root", "model_folder_name"]

_TWO_GB = 2**31 - 2**24  # protobuf's limit, with room for the graph itself


@dataclass(frozen=True)
class ExportSettings:
    image_size: int | Size | None = None  # (height, width) or a square's side; None: the model's native size
    layers: int | str | tuple[int, ...] | None = None  # None: the model's recommendation, else DEFAULT_LAYERS
    resize_mode: str | None = None  # how the runtime fits images; None: 'squash' for CLIP-style models
    #   (LeGrad's demos), a classifier's own preprocessing ('shortest' with its crop) for classifiers
    verify: bool = True
    overwrite: bool = False
    correction: bool = True  # MAP-head towers: the authors' empty-prompt correction
    correction_threshold: float = DEFAULT_THRESHOLD
    dtype: str = "fp32"  # 'fp16': the image graph converted after verification (docs/fp16.md)
    prompts: str = "loop"  # 'batch': the image graph takes a call's prompts at once, no loop (PROMPT_MODES)


def model_folder_name(loaded: AnyLoaded, image_size: int | Size) -> str:
    """MODEL__PRETRAINED__SIZE, SIZE '448' for a square, 'WIDTHxHEIGHT' ('448x336') otherwise."""
    name = loaded.model_name.split(":", 1)[-1].rstrip("/").split("/")[-1]
    pretrained = Path(loaded.pretrained).stem if "." in loaded.pretrained else loaded.pretrained
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}__{pretrained}__{format_size(as_size(image_size))}")


def check_output_root(out_root: Path) -> None:
    """Fail early, before any slow work, if the output folder cannot be written."""
    try:
        ensure_output_folder(out_root)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def resolve_image_size(
    loaded: AnyLoaded, image_size: int | Size | None, batch: int = 2, runs_graph: bool = True
) -> Size:
    """The export size (height, width): the model's own when None; each side a positive multiple of
    the patch, and the whole fitting in memory.

    A MAP-head tower's (SigLIP's) own size may be no multiple of its patch (SO400M-14 at 384): it is kept, and
    the model sees the 27×27 patches that fit, as it was trained.
    """
    native = as_size(loaded.preprocess["size"])
    patch = loaded.vit.patch_size
    try:
        size = native if image_size is None else as_size(image_size)
    except ValueError:
        raise ExportError(
            f"image size {image_size!r} must be an integer or (height, width), each side a positive "
            f"multiple of the patch size {patch}"
        ) from None
    for side in size:
        if side <= 0 or side % patch and not (size == native and loaded.vit.head == "map"):
            lower, upper = max(patch, side // patch * patch), (max(side, 0) // patch + 1) * patch
            what = f"image size {format_size(size)}" + ("" if size[0] == size[1] else f": side {side}")
            raise ExportError(
                f"{what} is not a positive multiple of {loaded.model_name}'s patch size {patch}; "
                f"use e.g. {lower} or {upper}"
            )
    check_fits(loaded.vit, loaded.model_name, size, batch, runs_graph)
    return size


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints its own progress lines and warnings; ours is the progress display."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _trace(module: torch.nn.Module, args: tuple, spec: GraphSpec) -> onnx.ModelProto:
    dims = {axis: torch.export.Dim(axis) for axis in spec.dynamic_axes}
    dynamic_shapes = {t.name: {i: dims[a] for i, a in enumerate(t.shape) if a in dims} for t in spec.inputs}
    with _quiet():
        program = torch.onnx.export(
            module,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    _check_dynamic(proto, spec)
    return proto


def _check_dynamic(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """torch.onnx falls back to tracing with fixed shapes when torch.export cannot keep an axis dynamic
    (it then specialises the axis to the example's size, quietly): refuse such a graph."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    fixed = [
        f"{t.name}[{i}] ({axis})"
        for t in spec.inputs
        for i, axis in enumerate(t.shape)
        if axis in spec.dynamic_axes and t.name in dims and not dims[t.name][i].dim_param
    ]
    if fixed:
        raise ExportError(
            f"the traced graph fixed {', '.join(fixed)} to the example's size instead of keeping "
            "it dynamic; this is a bug in the exporter (some op specialises the shape under "
            "torch.export): please report it with the model name"
        )


def _save(proto: onnx.ModelProto, path: Path, metadata_json: str, param_bytes: int) -> None:
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, metadata_json
    if param_bytes < _TWO_GB:
        onnx.save_model(proto, str(path))
    else:  # over protobuf's 2 GB limit: weights in one side file
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    onnx.checker.check_model(str(path), full_check=True)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_model(
    loaded: AnyLoaded,
    out_root: str | Path,
    settings: ExportSettings = ExportSettings(),
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Export `loaded` into out_root/MODEL__PRETRAINED__SIZE/ and return that folder."""
    stage = on_stage or (lambda name: None)
    out_root = Path(out_root)
    check_output_root(out_root)
    if settings.dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {settings.dtype!r}; expected one of {DTYPES}")
    if settings.prompts not in PROMPT_MODES:
        raise ExportError(f"unsupported prompts mode {settings.prompts!r}; expected one of {PROMPT_MODES}")
    fp16 = settings.dtype == "fp16"
    size = resolve_image_size(loaded, settings.image_size, runs_graph=settings.verify or fp16)
    try:
        spec = default_layer_spec(loaded) if settings.layers is None else settings.layers
        layers = resolve_layers(spec, loaded.vit.num_layers)
        preprocess = loaded.preprocess_cfg(size, settings.resize_mode)
        if loaded.vit.has_correction and not 0 < settings.correction_threshold <= 1:
            raise ValueError(f"correction threshold {settings.correction_threshold} must be in (0, 1]")
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    target = out_root / (model_folder_name(loaded, size) + (FP16_SUFFIX if fp16 else ""))
    if target.exists() and not settings.overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it")

    tmp = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is meant to be shared
    try:
        stage("build")
        image_graph = build_image_graph(
            loaded, size, layers, settings.correction, settings.correction_threshold, settings.prompts
        )
        classifier = loaded.vit.is_classifier
        text_graph = None if classifier else TextGraph(loaded)
        grid = (size[0] // loaded.vit.patch_size, size[1] // loaded.vit.patch_size)
        tower = loaded.vit
        correction = (
            CorrectionCfg(settings.correction, EMPTY_PROMPT, settings.correction_threshold)
            if tower.has_correction
            else None
        )

        stage("trace")
        if classifier:
            example = example_classifier_inputs(size, loaded.vit.embed_dim, 2, 2)
            image_proto, text_proto = _trace(image_graph, example, CLASSIFIER_GRAPH), None
        else:
            example = example_image_inputs(size, loaded.vit.embed_dim, 2, 2)
            image_proto = _trace(image_graph, example, IMAGE_GRAPH)
            text_proto = _trace(text_graph, (loaded.tokenizer(list(VERIFY_PROMPTS[:2])),), TEXT_GRAPH)
        opset = next(o.version for o in image_proto.opset_import if o.domain in ("", "ai.onnx"))

        meta = ModelMetadata(
            model_name=loaded.model_name,
            pretrained=loaded.pretrained,
            checkpoint_sha256=loaded.checkpoint_sha256,
            open_clip_version=loaded.library_version if classifier else OPEN_CLIP_VERSION,
            exporter_version=__version__,
            torch_version=torch.__version__,
            opset=opset,
            image_size=size,
            patch_size=loaded.vit.patch_size,
            grid_size=grid,
            num_layers=loaded.vit.num_layers,
            layers=layers,
            width=loaded.vit.width,
            heads=loaded.vit.heads,
            embed_dim=loaded.vit.embed_dim,
            logit_scale=loaded.logit_scale,
            logit_bias=loaded.logit_bias,
            activation=loaded.vit.activation,
            tower=TowerCfg(tower.family, tower.head, tower.prefix_tokens, grid),
            correction=correction,
            preprocess=preprocess,
            tokenizer=None if classifier else write_tokenizer(loaded, tmp),
            vocabulary=loaded.defaults.vocabulary,
            classes=loaded.classes if classifier else None,
            extra={
                "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                # per-prompt memory is flat in P (a scan; MAP heads: tiny per prompt), or grows with it
                PROMPT_LOOP_KEY: settings.prompts == "loop" or tower.explains_head,
            },
        )

        stage("check")
        embedded = meta.to_json(embedded=True)
        _save(image_proto, tmp / IMAGE_GRAPH.filename, embedded, _param_bytes(image_graph))
        if text_proto is not None:
            _save(text_proto, tmp / TEXT_GRAPH.filename, embedded, _param_bytes(text_graph))
        if settings.verify and classifier:
            diffs = verify_classifier_export(tmp, loaded, size, layers)
            meta = replace(meta, extra={**meta.extra, "verification_max_abs_diff": diffs})
        elif settings.verify:
            empty = getattr(image_graph, "empty_embed", None)
            diffs = verify_export(
                tmp,
                loaded,
                size,
                layers,
                empty_embed=None if empty is None else empty[0],
                threshold=settings.correction_threshold,
            )
            meta = replace(meta, extra={**meta.extra, "verification_max_abs_diff": diffs})
        if fp16:  # the verified fp32 image graph → fp16, checked against it (the text graph stays fp32)
            feeds = verification_feeds(size, loaded.vit.embed_dim, classifier)
            meta = replace(meta, extra={**meta.extra, **convert_image_graph(tmp, feeds)})

        stage("write")
        rel = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
        entries = {r: FileEntry(r, sha256_file(tmp / r), (tmp / r).stat().st_size) for r in rel}
        meta = replace(meta, files=entries)
        (tmp / METADATA_FILE).write_text(meta.to_json(), encoding="utf-8")
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replace(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target is moved aside first and removed only after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name[-8:]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
