"""THE metadata schema of an exported model folder, and the ONNX graphs' IO contract.

Stdlib only: the exporter writes it, the runtime reads it, and both import it from here. The schema
is versioned; a reader refuses metadata from a newer schema instead of guessing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import string
import threading
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelFolderError, PromptError, SchemaVersionError
from .files import UnreadableFile, inside, open_regular, printable, read_limited, read_regular
from .validate import FieldError, Fields, show

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_FILE",
    "ONNX_METADATA_KEY",
    "TensorSpec",
    "GraphSpec",
    "IMAGE_GRAPH",
    "CLASSIFIER_GRAPH",
    "TEXT_GRAPH",
    "image_graph_spec",
    "PreprocessCfg",
    "TokenizerCfg",
    "HFSettings",
    "TowerCfg",
    "CorrectionCfg",
    "TOWER_FAMILIES",
    "TOWER_HEADS",
    "RESIZE_MODES",
    "Size",
    "as_size",
    "format_size",
    "parse_size",
    "default_tower",
    "FileEntry",
    "Vocabulary",
    "ModelMetadata",
    "ModelFolder",
    "sha256_file",
    "read_metadata",
    "required_files",
    "check_layout",
    "verify_files",
]

# v4: [height, width] sizes, resize_mode 'longest', classifiers (classes, crop_pct); v3: tokenizer.hf,
# tower, correction, logit_bias; v2: vocabulary; v1 to v3 (square sizes as integers) still read
SCHEMA_VERSION = 4
METADATA_FILE = "legrad.json"
ONNX_METADATA_KEY = "legrad.metadata"  # the same JSON inside each ONNX file, minus `files` and `extra`

RESIZE_MODES = ("shortest", "squash", "longest")  # longest (v4): aspect kept, padded with black
INTERPOLATIONS = ("bicubic", "bilinear")
CLEAN_MODES = ("lower", "whitespace", "canonicalize")  # open_clip's text cleaning, by name
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")  # gelu_tanh: the tanh approximation (SigLIP's MLP)
SIDES = ("right", "left")  # padding and truncation sides of a Hugging Face tokenizer
# which exporter adapter read the image tower (torchvision_vit: a torchvision ImageNet classifier, v4)
TOWER_FAMILIES = ("openclip_vit", "timm_vit", "timm_eva", "torchvision_vit")
TOWER_HEADS = ("token_mean", "map", "attn_pool")  # how the tower pools; see TowerCfg
PREFIX_TOKENS = (0, 1)  # a class token or none
DEFAULT_CORRECTION_PROMPT = "a photo of a"
DEFAULT_CORRECTION_THRESHOLD = 0.8

# limits on what a model folder may declare: far above any real model, low enough to be harmless
MAX_METADATA_BYTES = 16 * 1024**2
MAX_IMAGE_SIZE = 8192
MAX_CONTEXT_LENGTH = 4096
MAX_FILES = 64
MAX_VOCABULARY_SLOTS = 8
MAX_VOCABULARY_PROMPTS = 4096  # prompts `--vocabulary` may form: each is a heatmap per image
MAX_CLASSES = 100_000  # a classifier's classes (ImageNet-21k has 21,843)


Size = tuple[int, int]  # (height, width) in pixels or grid cells, as open_clip and torch order them


def as_size(size: int | Sequence[int]) -> Size:
    """An int (a square) or (height, width) → (height, width); ValueError for anything else."""
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if (
        isinstance(size, Sequence)
        and not isinstance(size, str)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        return (size[0], size[1])
    raise ValueError(f"a size is an integer or (height, width), not {size!r}")


def format_size(size: Size) -> str:
    """(height, width) → '448' for a square, '448x336' (width x height, as image sizes are written)."""
    height, width = size
    return str(width) if height == width else f"{width}x{height}"


def parse_size(text: str) -> Size:
    """'448' (a square) or 'WIDTHxHEIGHT' ('448x336': 448 wide, 336 high) → (height, width)."""
    parts = text.strip().lower().replace("×", "x").split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        width, height = int(parts[0]), int(parts[-1])
        return (height, width)
    raise ValueError(f"image size {text!r} must be a positive integer (448) or WIDTHxHEIGHT (448x336)")


# ---------------------------------------------------------------- the graphs' IO contract


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type, shape (ints or symbolic axis names)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    atol: float | None = None  # verification tolerance against the torch reference (outputs only)


@dataclass(frozen=True)
class GraphSpec:
    """What one ONNX file takes and gives. Axis names shared by inputs are the same size."""

    role: str
    filename: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_axes: tuple[str, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


IMAGE_GRAPH = GraphSpec(
    role="image_graph",
    filename="legrad_image.onnx",
    inputs=(
        TensorSpec("pixel_values", "float32", ("batch", 3, "height", "width")),
        TensorSpec("text_embeds", "float32", ("prompts", "embed_dim")),
    ),
    outputs=(
        TensorSpec("heatmaps", "float32", ("batch", "prompts", "height", "width"), atol=1e-4),
        TensorSpec("layer_maps", "float32", ("batch", "prompts", "layers", "grid_h", "grid_w"), atol=1e-4),
        TensorSpec("image_embeds", "float32", ("batch", "embed_dim"), atol=1e-4),
    ),
    dynamic_axes=("batch", "prompts"),
)

CLASSIFIER_GRAPH = GraphSpec(  # a supervised classifier's image graph: class ids instead of text (v4)
    role="classifier_graph",
    filename="legrad_image.onnx",
    inputs=(
        TensorSpec("pixel_values", "float32", ("batch", 3, "height", "width")),
        TensorSpec("class_ids", "int64", ("prompts",)),
    ),
    outputs=(
        TensorSpec("heatmaps", "float32", ("batch", "prompts", "height", "width"), atol=1e-4),
        TensorSpec("layer_maps", "float32", ("batch", "prompts", "layers", "grid_h", "grid_w"), atol=1e-4),
        TensorSpec("logits", "float32", ("batch", "embed_dim"), atol=1e-4),
    ),
    dynamic_axes=("batch", "prompts"),
)

TEXT_GRAPH = GraphSpec(
    role="text_graph",
    filename="text.onnx",
    inputs=(TensorSpec("input_ids", "int64", ("prompts", "context_length")),),
    outputs=(TensorSpec("text_embeds", "float32", ("prompts", "embed_dim"), atol=1e-5),),
    dynamic_axes=("prompts",),
)


# ---------------------------------------------------------------- the metadata itself


@dataclass(frozen=True)
class PreprocessCfg:
    """How images become `pixel_values`; field names follow open_clip's PreprocessCfg.

    `size` is (height, width), as open_clip's; an int means a square and is stored as (s, s).
    resize_mode 'squash': resized to size, aspect not kept (LeGrad's demos); 'shortest': open_clip's
    resize of the shorter side, then a centre crop; 'longest' (v4, open_clip's name): scaled to fit
    inside size with its aspect kept, centred, the rest padded with black (open_clip's fill_color 0).
    """

    size: Size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "squash"
    crop_pct: float = 1.0  # v4, 'shortest' at a square size only: the shorter side goes to
    #   floor(size / crop_pct), then the centre crop (timm's crop_pct; torchvision's resize 256, crop 224)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", as_size(self.size))
        if min(self.size) < 1:
            raise ValueError(f"preprocess size must be positive, not {self.size!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"preprocess crop_pct must be in (0, 1], not {self.crop_pct!r}")
        if self.crop_pct != 1 and (self.resize_mode != "shortest" or self.size[0] != self.size[1]):
            raise ValueError(
                "preprocess crop_pct below 1 is for resize_mode 'shortest' at a square size only"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r}; expected one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unsupported interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}"
            )


@dataclass(frozen=True)
class HFSettings:
    """What transformers applies around a `tokenizer.json` when open_clip's HFTokenizer calls it."""

    pad_id: int
    padding_side: str = "right"
    truncation_side: str = "right"
    strip_sep_id: int | None = None  # open_clip's `strip_sep_token`: this id (the SEP token) becomes 0


@dataclass(frozen=True)
class TokenizerCfg:
    """How prompts become `input_ids`.

    kind 'clip-bpe': open_clip's SimpleTokenizer files (vocab.json, merges.txt). kind 'hf': a
    Hugging Face `tokenizer.json` run by the `tokenizers` library, with `hf` (v3) saying how.
    """

    kind: str
    context_length: int
    files: tuple[str, ...]
    clean: str = "lower"
    hf: HFSettings | None = None


@dataclass(frozen=True)
class TowerCfg:
    """The image tower's family and pooling (v3; older folders are OpenCLIP ViTs with a class token).

    head 'token_mean': CLIP's pooling, LeGrad explains each block's self-attention. head 'map': a
    MAP attention-pool head (SigLIP), LeGrad explains the head's attention (one query over the
    tokens). head 'attn_pool': CoCa's attentional pooler, its first latent's attention explained.
    `prefix_tokens`: 1 with a class token, 0 without. `grid`: (gh, gw) patches, rows then columns.
    """

    family: str
    head: str
    prefix_tokens: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        if self.family not in TOWER_FAMILIES:
            raise ValueError(f"unsupported tower family {self.family!r}; expected one of {TOWER_FAMILIES}")
        if self.head not in TOWER_HEADS:
            raise ValueError(f"unsupported tower head {self.head!r}; expected one of {TOWER_HEADS}")
        if self.prefix_tokens not in PREFIX_TOKENS:
            raise ValueError(f"tower prefix_tokens must be 0 or 1, not {self.prefix_tokens!r}")
        if len(self.grid) != 2:
            raise ValueError(f"tower grid must be (gh, gw), not {self.grid!r}")


@dataclass(frozen=True)
class CorrectionCfg:
    """SigLIP LeGrad's empty-prompt correction (v3, head 'map' only): grid cells where the min-max
    map of `prompt` (embedded at export) exceeds `threshold`, in (0, 1], are zeroed."""

    enabled: bool
    prompt: str = DEFAULT_CORRECTION_PROMPT
    threshold: float = DEFAULT_CORRECTION_THRESHOLD

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"correction threshold must be in (0, 1], not {self.threshold!r}")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the model folder, '/'-separated
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Vocabulary:
    """The concepts a model was trained on, so tools can form prompts without guessing.

    A prompt fills one value per slot into a template: with slots {"color": ("red",), "shape":
    ("circle",)}, "{a} {color} {shape}" gives "a red circle". `{a}` becomes "a" or "an" to suit the
    word after it. Templates hold plain `{name}` slots only (no attributes, indexes, conversions or
    format specs), since they come from a model folder: `str.format` is never given more.
    """

    slots: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.slots or not all(self.slots.values()):
            raise ValueError("a vocabulary needs at least one slot, each with at least one value")
        if not self.templates:
            raise ValueError("a vocabulary needs at least one template")
        if len(self.slots) > MAX_VOCABULARY_SLOTS:
            raise ValueError(f"a vocabulary has at most {MAX_VOCABULARY_SLOTS} slots, not {len(self.slots)}")
        for template in self.templates:
            unknown = set(_template_slots(template)) - set(self.slots) - {"a"}
            if unknown:
                raise ValueError(f"template {template!r} names unknown slot(s) {sorted(unknown)}")

    @property
    def count(self) -> int:
        """How many combinations one template forms (before duplicates are dropped)."""
        return math.prod(len(values) for values in self.slots.values())

    def _fill(self, template: int, values: Sequence[str]) -> str:
        text = self.templates[template].format(a="\0", **dict(zip(self.slots, values)))
        return re.sub(r"\0(\s+)(\w)", lambda m: ("an" if m[2] in "aeiouAEIOU" else "a") + m[1] + m[2], text)

    def example(self, template: int = 0) -> str:
        """The first prompt of a template, without forming the others."""
        return self._fill(template, [values[0] for values in self.slots.values()])

    def prompts(self, template: int = 0, limit: int = MAX_VOCABULARY_PROMPTS) -> list[str]:
        """Every combination of slot values in one template, the first slot varying slowest (no repeats).

        Raises PromptError when there would be more than `limit` prompts: each one is a heatmap.
        """
        if self.count > limit:
            raise PromptError(
                f"the vocabulary forms {self.count:,} prompts, more than the {limit:,} allowed; "
                "pass prompts with -p instead"
            )
        out = [self._fill(template, values) for values in itertools.product(*self.slots.values())]
        return list(dict.fromkeys(out))

    @classmethod
    def from_dict(cls, data: Any) -> Vocabulary:
        f = Fields(data, "vocabulary", ("slots", "templates"))
        slots = f.object("slots", MAX_VOCABULARY_SLOTS)
        checked = {}
        for name in slots:
            if not (isinstance(name, str) and name.isidentifier() and len(name) <= 40) or name == "a":
                raise FieldError("vocabulary.slots", f"has a bad slot name {show(name)}; use identifiers")
            checked[name] = Fields(slots, "vocabulary.slots", tuple(slots)).strs(name, 1000, 100)
        templates = f.strs("templates", 100, 300)
        for template in templates:
            _template_slots(template)
        return cls(slots=checked, templates=templates)


def _template_slots(template: str) -> list[str]:
    """The slot names of a template; ValueError for anything but literal text and plain `{name}`."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise FieldError(
            "vocabulary.templates", f"has a malformed template {show(template)} ({exc})"
        ) from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise FieldError(
                "vocabulary.templates",
                f"template {show(template)} has {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}; only plain {{name}} slots are allowed",
            )
        names.append(name)
    return names


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a runtime needs to use an exported folder, and where it came from."""

    model_name: str
    pretrained: str  # open_clip tag, checkpoint file name, or 'none' (random weights)
    checkpoint_sha256: str | None
    open_clip_version: str
    exporter_version: str
    torch_version: str
    opset: int
    image_size: Size  # (height, width) of pixel_values; JSON: an integer (v1-v3, square) or [h, w] (v4)
    patch_size: int
    grid_size: Size  # (gh, gw) = image_size // patch_size per side (the patch embedding floors)
    num_layers: int  # blocks in the image tower
    layers: tuple[int, ...]  # blocks whose maps are summed (0-based)
    width: int
    heads: int
    embed_dim: int
    logit_scale: float
    activation: str
    preprocess: PreprocessCfg
    tokenizer: TokenizerCfg | None  # None for a classifier: it has no text graph
    files: dict[str, FileEntry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    vocabulary: Vocabulary | None = None  # what the model knows, when its trainer said so (v2)
    tower: TowerCfg | None = None  # v3; None becomes the OpenCLIP ViT default (see __post_init__)
    correction: CorrectionCfg | None = None  # v3, head 'map' only: the empty-prompt correction
    logit_bias: float | None = None  # v3: SigLIP's; probabilities are then per-pair sigmoids
    # v4: a supervised classifier's class names, one per logit (embed_dim of them); its image graph is
    # CLASSIFIER_GRAPH (class ids in, logits out), it has no text graph and no tokenizer
    classes: tuple[str, ...] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def is_classifier(self) -> bool:
        return self.classes is not None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_size(self.image_size))
        object.__setattr__(self, "grid_size", as_size(self.grid_size))
        if self.tower is None:  # from before v3's `tower`: an OpenCLIP ViT, class token, CLIP pooling
            object.__setattr__(self, "tower", default_tower(self.grid_size))

    def to_dict(self, *, embedded: bool = False) -> dict[str, Any]:
        """As JSON-ready dict; `embedded` drops what depends on the written files (files, extra)."""
        data = asdict(self)
        if embedded:
            data.pop("files")
            data.pop("extra")
        return data

    def to_json(self, *, embedded: bool = False) -> str:
        return json.dumps(self.to_dict(embedded=embedded), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "metadata") -> ModelMetadata:
        """Parse and validate every field (types, ranges, agreement); ModelFolderError names the field."""
        if not isinstance(data, dict):
            raise ModelFolderError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelFolderError(
                f"{source}: 'schema_version' must be a positive integer, got {show(version)}; "
                "not a legrad model folder?"
            )
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{source} uses metadata schema v{version}, but this legrad-onnx reads up to "
                f"v{SCHEMA_VERSION}; upgrade legrad-onnx or re-export the model with this version"
            )
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ModelFolderError(f"{source}: missing field(s) {', '.join(missing)}; re-export the model")
        try:
            return _parse(data, version)
        except ValueError as exc:  # FieldError, and the dataclasses' own checks
            raise ModelFolderError(f"{source}: {exc}; re-export the model") from None


def default_tower(grid_size: int | Size) -> TowerCfg:
    """The tower of a folder that does not name one: an OpenCLIP ViT with a class token."""
    return TowerCfg("openclip_vit", "token_mean", 1, as_size(grid_size))


def _parse_tower(data: Any, grid_size: Size) -> TowerCfg:
    if data is None:
        return default_tower(grid_size)
    t = Fields(data, "tower", [x.name for x in fields(TowerCfg)])
    family = t.str("family", 40, choices=TOWER_FAMILIES)
    head = t.str("head", 40, choices=TOWER_HEADS)
    prefix = t.int("prefix_tokens", 0, 1)
    grid = t.ints("grid", 1, MAX_IMAGE_SIZE, 2)
    if len(grid) != 2:
        raise FieldError("tower.grid", f"must be a list of 2 integers [gh, gw], got {show(list(grid))}")
    if grid != grid_size:
        raise FieldError("tower.grid", f"must equal grid_size {list(grid_size)}, got {show(list(grid))}")
    return TowerCfg(family, head, prefix, (grid[0], grid[1]))


def _parse_correction(data: Any, tower: TowerCfg) -> CorrectionCfg | None:
    if data is None:
        return None
    c = Fields(data, "correction", [x.name for x in fields(CorrectionCfg)])
    enabled = c.bool("enabled")
    prompt = c.str("prompt", 300) if c.has("prompt") else DEFAULT_CORRECTION_PROMPT
    if not prompt.strip():
        raise FieldError("correction.prompt", "must not be empty")
    threshold = c.number("threshold") if c.has("threshold") else DEFAULT_CORRECTION_THRESHOLD
    if not 0 < threshold <= 1:
        raise FieldError("correction.threshold", f"must be in (0, 1], got {show(threshold)}")
    if enabled and tower.head != "map":
        raise FieldError(
            "correction", f"is for towers with head 'map' only, not {show(tower.head)}; set it to null"
        )
    return CorrectionCfg(enabled, prompt, threshold)


def _parse_tokenizer(tok: Fields) -> TokenizerCfg:
    kind = tok.str("kind", 40)
    hf = None
    if tok.has("hf") and tok.raw("hf") is not None:
        if kind != "hf":
            raise FieldError("tokenizer.hf", f"is for kind 'hf' only, not {show(kind)}")
        h = Fields(tok.raw("hf"), "tokenizer.hf", [x.name for x in fields(HFSettings)])
        strip = (
            None
            if not h.has("strip_sep_id") or h.raw("strip_sep_id") is None
            else h.int("strip_sep_id", 0, 1 << 31)
        )
        hf = HFSettings(
            h.int("pad_id", 0, 1 << 31),
            h.str("padding_side", choices=SIDES) if h.has("padding_side") else "right",
            h.str("truncation_side", choices=SIDES) if h.has("truncation_side") else "right",
            strip,
        )
    elif kind == "hf":
        raise FieldError("tokenizer.hf", "is required for kind 'hf' (the pad id and sides)")
    return TokenizerCfg(
        kind,
        tok.int("context_length", 2, MAX_CONTEXT_LENGTH),
        tok.strs("files", 16, 300),
        tok.str("clean", choices=CLEAN_MODES) if tok.has("clean") else "lower",
        hf,
    )


def _parse_classes(data: Any, embed_dim: int) -> tuple[str, ...] | None:
    if data is None:
        return None
    if not isinstance(data, list) or not 0 < len(data) <= MAX_CLASSES:
        raise FieldError("classes", f"must be null or a list of 1 to {MAX_CLASSES:,} class names")
    if len(data) != embed_dim:
        raise FieldError("classes", f"must name every logit: {len(data):,} names for embed_dim {embed_dim:,}")
    if not all(isinstance(c, str) and 0 < len(c) <= 300 for c in data):
        raise FieldError("classes", "must be non-empty strings of at most 300 characters")
    return tuple(data)


def _parse(data: dict[str, Any], version: int) -> ModelMetadata:
    f = Fields(data, "", [x.name for x in fields(ModelMetadata)])
    image_size = f.size("image_size", 1, MAX_IMAGE_SIZE)
    patch_size = f.int("patch_size", 1, min(image_size))
    grid_size = f.size("grid_size", 1, MAX_IMAGE_SIZE)
    if grid_size != (image_size[0] // patch_size, image_size[1] // patch_size):  # the patch embedding
        raise FieldError(  # floors (SO400M-14 at 384: 27)
            "grid_size",
            f"must be image_size // patch_size per side "
            f"({list(image_size)} // {patch_size} ≠ {list(grid_size)})",
        )
    num_layers = f.int("num_layers", 1, 1000)
    layers = f.ints("layers", 0, num_layers - 1, num_layers)
    if len(set(layers)) != len(layers):
        raise FieldError("layers", f"must not repeat a block, got {show(list(layers))}")
    width = f.int("width", 1, 1 << 20)
    heads = f.int("heads", 1, width)
    if width % heads:
        raise FieldError("heads", f"must divide width ({width} % {heads} ≠ 0)")

    pre = Fields(f.raw("preprocess"), "preprocess", [x.name for x in fields(PreprocessCfg)])
    size = pre.size("size", 1, MAX_IMAGE_SIZE)
    if size != image_size:
        raise FieldError("preprocess.size", f"must equal image_size {list(image_size)}, got {list(size)}")
    preprocess = PreprocessCfg(
        size,
        pre.numbers("mean", 3),  # type: ignore[arg-type]
        pre.numbers("std", 3, positive=True),  # type: ignore[arg-type]
        pre.str("interpolation", choices=INTERPOLATIONS) if pre.has("interpolation") else "bicubic",
        pre.str("resize_mode", choices=RESIZE_MODES) if pre.has("resize_mode") else "squash",
        pre.number("crop_pct", positive=True) if pre.has("crop_pct") else 1.0,
    )
    embed_dim = f.int("embed_dim", 1, 1 << 20)
    classes = _parse_classes(data.get("classes"), embed_dim)
    if classes is not None and f.raw("tokenizer") is not None:
        raise FieldError("tokenizer", "must be null for a classifier (a folder with 'classes')")
    tokenizer = (
        None
        if classes is not None
        else _parse_tokenizer(Fields(f.raw("tokenizer"), "tokenizer", [x.name for x in fields(TokenizerCfg)]))
    )
    files = {}
    for key, value in f.object("files", MAX_FILES).items() if f.has("files") else ():
        entry = Fields(value, f"files.{key}", ("path", "sha256", "size_bytes"))
        path = entry.str("path", 300)
        if path != key:
            raise FieldError(f"files.{key}", f"lists path {show(path)} under another name")
        files[key] = FileEntry(path, entry.sha256("sha256"), entry.int("size_bytes", 0, 1 << 50))
    vocabulary = data.get("vocabulary")
    tower = _parse_tower(data.get("tower"), grid_size)
    correction = _parse_correction(data.get("correction"), tower)
    logit_bias = None if data.get("logit_bias") is None else f.number("logit_bias")
    return ModelMetadata(
        model_name=f.str("model_name"),
        pretrained=f.str("pretrained"),
        checkpoint_sha256=f.optional_sha256("checkpoint_sha256"),
        open_clip_version=f.str("open_clip_version", 100),
        exporter_version=f.str("exporter_version", 100),
        torch_version=f.str("torch_version", 100),
        opset=f.int("opset", 1, 1000),
        image_size=image_size,
        patch_size=patch_size,
        grid_size=grid_size,
        num_layers=num_layers,
        layers=layers,
        width=width,
        heads=heads,
        embed_dim=embed_dim,
        logit_scale=f.number("logit_scale", positive=True),
        activation=f.str("activation", choices=ACTIVATIONS),
        preprocess=preprocess,
        tokenizer=tokenizer,
        files=files,
        extra=f.object("extra", 1000) if f.has("extra") else {},
        vocabulary=None if vocabulary is None else Vocabulary.from_dict(vocabulary),
        tower=tower,
        correction=correction,
        logit_bias=logit_bias,
        classes=classes,
        schema_version=version,
    )


# ---------------------------------------------------------------- folder helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(folder: str | Path) -> ModelMetadata:
    """Read and validate `legrad.json` of an exported model folder (a regular file inside it)."""
    folder = Path(folder)
    if not os.fspath(folder) or not folder.is_dir():
        raise ModelFolderError(
            f"model folder {printable(folder)} does not exist; export one with legrad-export"
        )
    try:
        path = inside(folder, METADATA_FILE)
        data = json.loads(read_regular(path, MAX_METADATA_BYTES).decode("utf-8"))
    except UnreadableFile as exc:
        if "does not exist" in exc.reason:
            raise ModelFolderError(
                f"{folder / METADATA_FILE} is missing; {folder} is not an exported legrad model folder"
            ) from None
        raise ModelFolderError(f"{folder / METADATA_FILE} {exc.reason}; re-export the model") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, deep nesting, a symlink leaving
        raise ModelFolderError(
            f"{folder / METADATA_FILE} is not valid JSON ({exc}); re-export the model"
        ) from None
    return ModelMetadata.from_dict(data, source=str(folder / METADATA_FILE))


def image_graph_spec(meta: ModelMetadata) -> GraphSpec:
    """The image graph's contract: CLASSIFIER_GRAPH for a classifier, else IMAGE_GRAPH."""
    return CLASSIFIER_GRAPH if meta.is_classifier else IMAGE_GRAPH


def required_files(meta: ModelMetadata) -> list[str]:
    """The files the runtime opens: the image graph, and the text graph and tokenizer files if any."""
    if meta.tokenizer is None:
        return [IMAGE_GRAPH.filename]
    return [IMAGE_GRAPH.filename, TEXT_GRAPH.filename, *meta.tokenizer.files]


def check_layout(folder: str | Path, meta: ModelMetadata, complete: bool = True) -> None:
    """Refuse file paths that leave the folder; with `complete`, also a `files` list that misses a
    file the runtime opens, or a folder holding files the list does not name (ONNX external data
    could point at them). Touches nothing outside the folder; hashes nothing."""
    folder = Path(folder)
    problems = []
    for rel in dict.fromkeys([*meta.files, *required_files(meta)]):
        try:
            inside(folder, rel)
        except ValueError as exc:
            problems.append(str(exc))
    if complete:
        problems += [
            f"{rel} is not checksummed in 'files'" for rel in required_files(meta) if rel not in meta.files
        ]
        problems += [f"{rel} is not listed in 'files'" for rel in _unlisted(folder, meta)]
    if problems:
        raise ModelFolderError(
            f"model folder {folder}: "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + "; refused: re-export the model (or pass verify=False / --no-verify for a folder you trust)"
        )


def _unlisted(folder: Path, meta: ModelMetadata) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):  # never follows symlinked folders
        dirs.sort()
        for name in sorted(names):
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != METADATA_FILE and rel not in meta.files:
                found.append(rel)
            if len(found) > MAX_FILES:
                return found
    return found


# sha256 of files hashed in this process, so loading one folder again does not hash it again:
# (real path, device, inode) → ((size, mtime_ns, ctime_ns), sha256). Memory only, never written
# anywhere (model folders may be read-only or untrusted). A file is cached only if its mtime was
# older than _SETTLED_NS when its hashing began: any later write then gets a newer mtime, even on
# file systems with coarse timestamps (FAT: 2 s), and a write that restores the mtime (utime)
# still moves the ctime. Any change of the stamp, inode or path means hashing again.
_DIGESTS: dict[tuple[str, int, int], tuple[tuple[int, int, int], str]] = {}
_DIGESTS_LOCK = threading.Lock()
_MAX_DIGESTS = 4096
_SETTLED_NS = 3 * 10**9


def _sha256(source: BinaryIO | bytes) -> str:
    """sha256 (hex) of bytes, or of an open file read from its position to its end."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    for chunk in iter(lambda: source.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _stamp(fh: BinaryIO) -> tuple[int, int, int]:
    st = os.fstat(fh.fileno())
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _digest(fh: BinaryIO, path: Path, started: int, data: bytes | None = None) -> str:
    """sha256 of the open file at `path` (of `data`, its bytes, when already read), or the digest this
    process found before for the same file (path, inode) with the same size, mtime and ctime.

    `started`: time.time_ns() before the file's bytes were first read.
    """
    st = os.fstat(fh.fileno())
    key = (os.path.realpath(path), st.st_dev, st.st_ino)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        cached = _DIGESTS.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = _sha256(fh if data is None else data)
    if st.st_mtime_ns < started - _SETTLED_NS and _stamp(fh) == stamp:  # unchanged while hashed
        with _DIGESTS_LOCK:
            _DIGESTS[key] = (stamp, digest)
            while len(_DIGESTS) > _MAX_DIGESTS:
                del _DIGESTS[next(iter(_DIGESTS))]
    return digest


def _check_entry(folder: Path, entry: FileEntry) -> str | None:
    """None if the file matches its entry, else the problem in words."""
    path = inside(folder, entry.path)
    try:
        started = time.time_ns()
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != entry.size_bytes:
                return f"{entry.path} was altered (size {size:,} bytes, not {entry.size_bytes:,})"
            digest = _digest(fh, path, started)
    except UnreadableFile as exc:
        return f"{entry.path} {'is missing' if 'does not exist' in exc.reason else exc.reason}"
    return _compare(entry, digest)


def _compare(entry: FileEntry, digest: str) -> str | None:
    if digest != entry.sha256:
        return f"{entry.path} was altered (sha256 differs from {METADATA_FILE})"
    return None


def verify_files(folder: str | Path, meta: ModelMetadata) -> None:
    """Check the layout (see `check_layout`) and every listed file's size and sha256; list all problems."""
    folder = Path(folder)
    check_layout(folder, meta)
    problems = [p for entry in meta.files.values() if (p := _check_entry(folder, entry)) is not None]
    if problems:
        raise ModelFolderError(f"model folder {folder}: " + "; ".join(problems) + "; re-export the model")


class ModelFolder:
    """An exported folder opened for reading: every file it hands out is inside it and, with
    `verify`, matches its checksum. Files are read once, and the bytes checked are the bytes used."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.path = Path(folder)
        self.metadata = read_metadata(self.path)
        self.verify = verify
        check_layout(self.path, self.metadata, complete=verify)

    def read_bytes(self, rel: str, max_bytes: int = 1 << 31) -> bytes:
        """The bytes of one file of the folder, checked against `files` when verifying: the bytes
        hashed (or found unchanged since this process hashed them) are the bytes returned."""
        entry = self.metadata.files.get(rel) if self.verify else None
        path = inside(self.path, rel)
        try:
            started = time.time_ns()
            with open_regular(path) as fh:
                data = read_limited(fh, max_bytes if entry is None else entry.size_bytes)
                digest = None if entry is None else _digest(fh, path, started, data)
        except UnreadableFile as exc:
            reason = "is missing" if "does not exist" in exc.reason else exc.reason
            if entry is not None and "allowed" in exc.reason:
                reason = f"was altered (larger than {METADATA_FILE} says)"
            raise ModelFolderError(f"model folder {self.path}: {rel} {reason}; re-export the model") from None
        if entry is not None and digest is not None:
            problem = (
                f"{entry.path} was altered (size differs from {METADATA_FILE})"
                if len(data) != entry.size_bytes
                else _compare(entry, digest)
            )
            if problem:
                raise ModelFolderError(f"model folder {self.path}: {problem}; re-export the model")
        return data

    def verify_others(self, read: Sequence[str]) -> None:
        """Check the listed files not handed out by `read_bytes` (such as ONNX external data)."""
        if not self.verify:
            return
        rest = [e for rel, e in self.metadata.files.items() if rel not in read]
        problems = [p for entry in rest if (p := _check_entry(self.path, entry)) is not None]
        if problems:
            raise ModelFolderError(
                f"model folder {self.path}: " + "; ".join(problems) + "; re-export the model"
            )
