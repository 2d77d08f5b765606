"""The checks of --model, --pretrained, --tokenizer and --layers that need no torch (both CLIs).

open_clip imports torch (5 s and more), so each typo would cost that before its one-line answer.
Model names and pretrained tags come from `openclip_names.py`, a snapshot of the pinned open_clip's
(a test keeps the two equal); with any other open_clip version installed, open_clip itself is asked,
which is slower but still right. Rewrite the snapshot after an open_clip upgrade:

    python -m legrad_export.arguments    # rewrites export/openclip_names.py from the installed open_clip
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import json
import sys
from pathlib import Path

from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import METADATA_FILE

from . import openclip_names

__all__ = [
    "EXPORTED",
    "LOCAL_DIR",
    "HF_HUB",
    "CLASSIFIER",
    "OPEN_CLIP",
    "model_kind",
    "is_random",
    "check_model_arguments",
    "random_weights_note",
    "openclip_catalogue",
    "unknown_model_message",
    "unknown_tag_message",
    "FORMATS",
    "ONNX",
    "PT2",
    "PROMPT_MODES",
    "format_option",
]

EXPORTED, LOCAL_DIR, HF_HUB = "exported", "local-dir", "hf-hub"
CLASSIFIER, OPEN_CLIP = "classifier", "open_clip"
_RANDOM = ("", "none", "random")
_SHOWN_TAGS = 5
ONNX, PT2 = "onnx", "pt2"  # the image graph's artifacts: ONNX (the runtime's), a PT2 package (docs/pt2.md)
FORMATS = (ONNX, PT2)
PROMPT_MODES = ("loop", "batch")  # how the image graph runs a call's prompts (legrad.LeGrad.layer_maps)
RANDOM_HINT = "--pretrained none for random weights (their heatmaps mean nothing)"
_MEANINGLESS = "its heatmaps mean nothing (fine for tests and timing only)"


def model_kind(model: str) -> str:
    """What --model names: an exported model folder (legrad.json), a local open_clip folder
    (local-dir:PATH, or a folder holding open_clip_config.json), an hf-hub: model, a torchvision: or
    timm: classifier, or else an open_clip model name."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / METADATA_FILE).is_file():
        return EXPORTED
    if model.startswith("local-dir:") or (path.is_dir() and (path / "open_clip_config.json").is_file()):
        return LOCAL_DIR
    if model.startswith("hf-hub:"):
        return HF_HUB
    if model.startswith(("torchvision:", "timm:")):
        return CLASSIFIER
    return OPEN_CLIP


def is_random(pretrained: str | None) -> bool:
    """Whether --pretrained asks for random weights ('none'; None is 'not given')."""
    return pretrained is not None and pretrained.strip().lower() in _RANDOM


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # as open_clip.pretrained reads a tag


def openclip_catalogue() -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(model names, {name: pretrained tags}) of the installed open_clip: the snapshot when its version
    is the snapshot's, else open_clip's own lists (which imports torch)."""
    try:
        installed = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == openclip_names.OPEN_CLIP_VERSION:
        models, pairs = openclip_names.MODELS, openclip_names.PRETRAINED
    else:
        import open_clip

        models, pairs = tuple(open_clip.list_models()), tuple(open_clip.list_pretrained())
    tags: dict[str, tuple[str, ...]] = {}
    for name, tag in pairs:
        tags[name] = (*tags.get(name, ()), tag)
    return models, tags


def unknown_model_message(name: str, models: tuple[str, ...] | list[str]) -> str:
    """'unknown model', with the close names open_clip has (same case first)."""
    close = [m for m in models if m.lower() == name.lower()]
    close += [m for m in difflib.get_close_matches(name, models, n=5, cutoff=0.6) if m not in close]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    folder = "no such folder either; " if "/" in name or name.startswith(".") else ""
    return f"unknown model {name!r}; {folder}{hint}see `legrad-export --list-models` for all names"


def _tag_list(model: str, tags: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(tags[:_SHOWN_TAGS])
    more = f", and {len(tags) - _SHOWN_TAGS} more: legrad-export --list-models --pretrained all"
    return shown + (more if len(tags) > _SHOWN_TAGS else "")


def unknown_tag_message(model: str, pretrained: str, tags: tuple[str, ...] | list[str]) -> str:
    """An unknown --pretrained, with the model's tags."""
    known = f"known tags for {model}: {', '.join(tags)}" if tags else f"{model} has no open_clip tags"
    return (
        f"--pretrained {pretrained!r} is neither an open_clip tag nor an existing file ({known}); "
        "pass a tag, a local checkpoint path, or 'none' for random weights"
    )


def _missing_pretrained_message(model: str, kind: str, tags: tuple[str, ...]) -> str:
    if kind == CLASSIFIER and model.startswith("timm:"):
        choices = "hub (timm's own weights, downloaded), a state dict file"
    elif kind == CLASSIFIER:
        choices = "a torchvision weights name such as IMAGENET1K_V1, a state dict file"
    elif tags:
        choices = f"an open_clip tag ({_tag_list(model, tags)}), a local checkpoint path"
    else:
        choices = f"a local checkpoint path (open_clip has no pretrained tags for {model})"
    return f"--model {model} needs --pretrained: {choices}, or {RANDOM_HINT}"


def _exported_folder_message(model: str) -> str:
    try:
        source = json.loads((Path(model).expanduser() / METADATA_FILE).read_text(encoding="utf-8"))
        name = f" ({source['model_name']})" if isinstance(source.get("model_name"), str) else ""
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError):
        name = ""
    return (
        f"--model {model} is an exported model folder (it holds {METADATA_FILE}); pass the model it was "
        f"exported from{name}, or give the folder to `legrad` / legrad_runtime.load"
    )


def _local_path(model: str) -> Path:
    return Path(model.removeprefix("local-dir:")).expanduser()


def _check_local_dir(model: str) -> None:
    path = _local_path(model)
    if not path.is_dir():
        raise ExportError(f"--model {model}: folder {path} does not exist")
    if not (path / "open_clip_config.json").is_file():
        raise ExportError(
            f"--model {model}: {path} holds no open_clip_config.json; a local model folder needs it "
            "and its checkpoint (what open_clip's push_to_hf_hub / save writes)"
        )


def check_model_arguments(model: str, pretrained: str | None, tokenizer: str | None = None) -> str:
    """Refuse what the arguments alone show to be wrong, without importing torch; return the kind.

    --pretrained is required where weights are chosen (open_clip names, classifiers): a tag or
    weights name, a checkpoint file, or 'none'. local-dir: and hf-hub: models carry their own.
    """
    kind = model_kind(model)
    if kind == EXPORTED:
        raise ExportError(_exported_folder_message(model))
    if tokenizer is not None:
        if kind == CLASSIFIER:
            raise ExportError(f"--tokenizer is for CLIP-style models; {model} is a classifier: drop it")
        path = Path(tokenizer).expanduser()
        if not (path.is_dir() or (path.is_file() and path.name == "tokenizer.json")):
            raise ExportError(f"--tokenizer {tokenizer} is neither a folder nor a tokenizer.json file")
    if kind in (LOCAL_DIR, HF_HUB):
        if kind == LOCAL_DIR:
            _check_local_dir(model)
        if pretrained is not None and not is_random(pretrained):
            raise ExportError(
                f"--pretrained {pretrained!r} cannot be used with {model}: a {kind}: model carries its "
                "own weights; drop --pretrained"
            )
        return kind
    if kind == CLASSIFIER:
        if not model.partition(":")[2]:
            raise ExportError(f"{model!r} names no classifier; use torchvision:NAME or timm:NAME")
        if pretrained is None:
            raise ExportError(_missing_pretrained_message(model, kind, ()))
        return kind
    models, tags = openclip_catalogue()
    if model not in models:
        if Path(model).expanduser().is_dir():
            raise ExportError(
                f"--model {model} is a folder holding neither open_clip_config.json (a model to export, "
                f"with its checkpoint) nor {METADATA_FILE} (an exported model)"
            )
        raise ExportError(unknown_model_message(model, models))
    known = tags.get(model, ())
    if pretrained is None:
        raise ExportError(_missing_pretrained_message(model, kind, known))
    if not is_random(pretrained) and _clean_tag(pretrained) not in known:
        if not Path(pretrained).expanduser().is_file():
            raise ExportError(unknown_tag_message(model, pretrained, known))
    return kind


def random_weights_note(model: str, pretrained: str | None) -> str | None:
    """The warning for an export (or evaluation) with random weights: --pretrained none, or a local
    model folder without a checkpoint (open_clip then builds random weights and only logs it)."""
    kind = model_kind(model)
    if is_random(pretrained) and kind in (OPEN_CLIP, CLASSIFIER):
        return f"--pretrained {pretrained}: {model} gets random weights; " + _MEANINGLESS
    if kind == LOCAL_DIR:
        path = _local_path(model)
        if not any(any(path.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
            return f"{path} holds no checkpoint (.safetensors, .bin, .pth): random weights; " + _MEANINGLESS
    return None


def format_option(text: str) -> tuple[str, ...]:
    """--format 'onnx', 'pt2' or both ('onnx,pt2') → the formats, in FORMATS' order (argparse type)."""
    names = [name.strip().lower() for name in text.split(",")]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not text.strip():
        raise argparse.ArgumentTypeError(
            f"unknown format {', '.join(map(repr, unknown)) or repr(text)}; use onnx, pt2 or onnx,pt2"
        )
    return tuple(f for f in FORMATS if f in names)


def render_openclip_names() -> str:
    """The source of `openclip_names.py` from the installed open_clip (imports it)."""
    import open_clip

    lines = [
        '"""open_clip\'s model names and pretrained tags, for checking arguments without importing it.',
        "",
        "Generated by `python -m legrad_export.arguments` from the installed open_clip; do not edit.",
        '"""',
        "",
        f"OPEN_CLIP_VERSION = {json.dumps(open_clip.__version__)}",
        "",
        "MODELS = (",
        *(f"    {json.dumps(name)}," for name in open_clip.list_models()),
        ")",
        "",
        "PRETRAINED = (  # (model, tag) in open_clip's order",
        *(f"    ({json.dumps(name)}, {json.dumps(tag)})," for name, tag in open_clip.list_pretrained()),
        ")",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(openclip_names.__file__)
    target.write_text(render_openclip_names(), encoding="utf-8")
    print(target, file=sys.stderr)
