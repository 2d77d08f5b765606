"""THE metadata schema of an exported model folder, and the ONNX graphs' IO contract.

Stdlib only: the exporter writes it, the runtime reads it, and both import it from here. The schema
is versioned; a reader refuses metadata from a newer schema instead of guessing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ModelFolderError, SchemaVersionError

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_FILE",
    "ONNX_METADATA_KEY",
    "TensorSpec",
    "GraphSpec",
    "IMAGE_GRAPH",
    "TEXT_GRAPH",
    "PreprocessCfg",
    "TokenizerCfg",
    "FileEntry",
    "Vocabulary",
    "ModelMetadata",
    "sha256_file",
    "read_metadata",
    "verify_files",
]

SCHEMA_VERSION = 2  # v2: optional `vocabulary`; v1 folders are still read
METADATA_FILE = "legrad.json"
ONNX_METADATA_KEY = "legrad.metadata"  # the same JSON inside each ONNX file, minus `files` and `extra`

RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


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
        TensorSpec("pixel_values", "float32", ("batch", 3, "size", "size")),
        TensorSpec("text_embeds", "float32", ("prompts", "embed_dim")),
    ),
    outputs=(
        TensorSpec("heatmaps", "float32", ("batch", "prompts", "size", "size"), atol=1e-4),
        TensorSpec("layer_maps", "float32", ("batch", "prompts", "layers", "grid", "grid"), atol=1e-4),
        TensorSpec("image_embeds", "float32", ("batch", "embed_dim"), atol=1e-4),
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
    """How images become `pixel_values`; field names follow open_clip's PreprocessCfg."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r}; expected one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unsupported interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}"
            )


@dataclass(frozen=True)
class TokenizerCfg:
    """How prompts become `input_ids`. kind 'clip-bpe': open_clip's SimpleTokenizer files."""

    kind: str
    context_length: int
    files: tuple[str, ...]
    clean: str = "lower"


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
    word after it.
    """

    slots: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.slots or not all(self.slots.values()):
            raise ValueError("a vocabulary needs at least one slot, each with at least one value")
        if not self.templates:
            raise ValueError("a vocabulary needs at least one template")
        for template in self.templates:
            unknown = set(re.findall(r"{(\w+)}", template)) - set(self.slots) - {"a"}
            if unknown:
                raise ValueError(f"template {template!r} names unknown slot(s) {sorted(unknown)}")

    def prompts(self, template: int = 0) -> list[str]:
        """Every combination of slot values in one template, the first slot varying slowest (no repeats)."""
        names = list(self.slots)
        out = []
        for values in itertools.product(*self.slots.values()):
            text = self.templates[template].format(a="\0", **dict(zip(names, values)))
            out.append(
                re.sub(r"\0(\s+)(\w)", lambda m: ("an" if m[2] in "aeiouAEIOU" else "a") + m[1] + m[2], text)
            )
        return list(dict.fromkeys(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(
            slots={str(k): tuple(str(v) for v in vals) for k, vals in dict(data["slots"]).items()},
            templates=tuple(str(t) for t in data["templates"]),
        )


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
    image_size: int
    patch_size: int
    grid_size: int
    num_layers: int  # blocks in the image tower
    layers: tuple[int, ...]  # blocks whose maps are summed (0-based)
    width: int
    heads: int
    embed_dim: int
    logit_scale: float
    activation: str
    preprocess: PreprocessCfg
    tokenizer: TokenizerCfg
    files: dict[str, FileEntry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    vocabulary: Vocabulary | None = None  # what the model knows, when its trainer said so (v2)
    schema_version: int = SCHEMA_VERSION

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
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> ModelMetadata:
        """Parse and validate; raise ModelFolderError naming every missing or malformed field."""
        if not isinstance(data, dict):
            raise ModelFolderError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ModelFolderError(f"{source}: no integer 'schema_version'; not a legrad model folder?")
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
            values = dict(data)
            values["layers"] = tuple(values["layers"])
            pre = dict(values["preprocess"])
            pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
            values["preprocess"] = PreprocessCfg(**pre)
            tok = dict(values["tokenizer"])
            tok["files"] = tuple(tok["files"])
            values["tokenizer"] = TokenizerCfg(**tok)
            values["files"] = {k: FileEntry(**v) for k, v in values.get("files", {}).items()}
            if values.get("vocabulary") is not None:
                values["vocabulary"] = Vocabulary.from_dict(values["vocabulary"])
            return cls(**values)
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFolderError(f"{source}: malformed metadata ({exc}); re-export the model") from exc


# ---------------------------------------------------------------- folder helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(folder: str | Path) -> ModelMetadata:
    """Read and validate `legrad.json` of an exported model folder."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; export one with legrad-export")
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing; {folder} is not an exported legrad model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    return ModelMetadata.from_dict(data, source=str(path))


def verify_files(folder: str | Path, meta: ModelMetadata) -> None:
    """Check every listed file exists with its recorded size and sha256; list all problems at once."""
    folder = Path(folder)
    problems = []
    for role, entry in meta.files.items():
        path = folder / entry.path
        if not path.is_file():
            problems.append(f"{entry.path} ({role}) is missing")
        elif path.stat().st_size != entry.size_bytes or sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path} ({role}) was altered (sha256 differs from {METADATA_FILE})")
    if problems:
        raise ModelFolderError(f"model folder {folder}: " + "; ".join(problems) + "; re-export the model")
