"""Loading OpenCLIP models (open_clip is imported only here, in text_tokenizer.py and in support.py).

It turns a model name (built-in, `local-dir:PATH`, `hf-hub:ID`) and a pretrained spec (open_clip
tag, local checkpoint path, or 'none') into a `LoadedModel`: the untouched open_clip model plus the
facts the rest of the exporter needs (architecture, preprocessing, tokenizer), each failure turned
into one clear `ExportError`.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.model import get_model_preprocess_cfg
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from safetensors import SafetensorError

from legrad_runtime.errors import ExportError, UnsupportedModelError
from legrad_runtime.metadata import PreprocessCfg, Size, Vocabulary, as_size, sha256_file

from .arguments import unknown_model_message, unknown_tag_message
from .layers import DEFAULT_LAYERS
from .support import model_support
from .text_tokenizer import load_tokenizer
from .towers import TowerSpec, canonical_state_dict, describe_tower

__all__ = [
    "DEFAULTS_FILE",
    "ModelDefaults",
    "LoadedModel",
    "default_layer_spec",
    "load_openclip",
    "wrap_openclip",
    "visual_state_dict",
]

OPEN_CLIP_VERSION = open_clip.__version__
_SCHEMAS = ("local-dir:", "hf-hub:")
# what open_clip's create_model raises on a bad or mismatched checkpoint (its resize helpers assert)
_CHECKPOINT_ERRORS = (
    RuntimeError,
    AssertionError,
    KeyError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    OSError,
    SafetensorError,  # a .safetensors file that is not one
)


DEFAULTS_FILE = "legrad_defaults.json"  # optional, in a local model folder: what its trainer recommends


@dataclass(frozen=True)
class ModelDefaults:
    """A local model folder's recommendations to the exporter (`legrad_defaults.json`)."""

    layers: str | None = None  # a layer spec such as "-2" or "3,4,5"
    vocabulary: Vocabulary | None = None


def read_model_defaults(folder: Path) -> ModelDefaults:
    """`legrad_defaults.json` of a local model folder; no file means no recommendations."""
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocabulary = data.get("vocabulary")
        return ModelDefaults(
            layers=None if data.get("layers") is None else str(data["layers"]),
            vocabulary=None if vocabulary is None else Vocabulary.from_dict(vocabulary),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ExportError(
            f"{path} is malformed ({exc}); expected {{'layers': '-2', 'vocabulary': {{'slots': {{...}}, "
            "'templates': [...]}}}}, or delete the file"
        ) from exc


@dataclass(frozen=True)
class LoadedModel:
    """An open_clip CLIP model (eval, fp32, CPU) and what the exporter needs to know about it."""

    model: Any
    model_name: str
    pretrained: str  # tag, checkpoint file name, or 'none'
    checkpoint_sha256: str | None
    vit: TowerSpec  # the image tower, described by its family's adapter (towers/)
    preprocess: dict[str, Any]  # open_clip's preprocess cfg: size, mean, std, interpolation, resize_mode
    tokenizer: Any  # open_clip tokenizer (callable: list[str] -> LongTensor)
    context_length: int
    defaults: ModelDefaults = ModelDefaults()

    def preprocess_cfg(self, size: int | Size, resize_mode: str | None = None) -> PreprocessCfg:
        """The runtime's preprocessing for this model at `size` (ValueError on a bad resize_mode);
        None: 'squash', as LeGrad's demos fit images."""
        pre = self.preprocess
        return PreprocessCfg(size, pre["mean"], pre["std"], pre["interpolation"], resize_mode or "squash")

    @property
    def owner(self) -> nn.Module:
        """What the tower adapters read: a module whose `.visual` is the image tower."""
        return self.model

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learnt bias of the per-pair sigmoid; None for softmax (CLIP) models."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.item())


def _check_download_possible(model_name: str, tag: str, tag_cfg: dict, cache_dir: str | None) -> None:
    """Fail in seconds, not after a minute of retries, when uncached weights cannot be fetched."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return  # huggingface_hub then fails fast by itself
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names):
            return
        host = urlparse(hf_constants.ENDPOINT).hostname
    else:
        url = tag_cfg.get("url", "")
        cached = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if not url or cached.is_file():
            return
        host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise ExportError(_no_network_message(model_name, tag)) from None


def _no_network_message(model_name: str, tag: str) -> str:
    quick = bool(get_pretrained_cfg(model_name, tag).get("quick_gelu")) and not model_name.endswith(
        "-quickgelu"
    )
    name = f"{model_name}-quickgelu" if quick else model_name  # a file alone cannot tell it needs QuickGELU
    return (
        f"could not download pretrained weights {tag!r} for {model_name} (no network?). "
        f"Download the checkpoint where you have network and pass its path: "
        f"legrad-export --model {name} --pretrained /path/to/open_clip_model.safetensors"
    )


def _resolve_pretrained(
    model_name: str, pretrained: str, cache_dir: str | None
) -> tuple[str | None, str, str | None, bool]:
    """(value for open_clip, label for metadata, checkpoint sha256, needs QuickGELU)."""
    if pretrained.lower() in ("", "none", "random"):
        return None, "none", None, False
    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        _check_download_possible(model_name, pretrained, tag_cfg, cache_dir)
        return pretrained, pretrained, None, bool(tag_cfg.get("quick_gelu", False))
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), path.name, sha256_file(path), False
    tags = list_pretrained_tags_by_model(model_name)
    raise ExportError(unknown_tag_message(model_name, pretrained, tags))


def _local_dir_checkpoint(model_name: str) -> tuple[str, str | None]:
    folder = Path(model_name[len("local-dir:") :])
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
    return (found[0].name, sha256_file(found[0])) if found else ("none", None)


def load_openclip(
    model_name: str, pretrained: str = "none", *, cache_dir: str | None = None, tokenizer: str | None = None
) -> LoadedModel:
    """Build an open_clip model by name and load its weights; raise ExportError on any bad input.

    `tokenizer`: a path to a Hugging Face tokenizer (folder or tokenizer.json) for models whose
    tokenizer would otherwise be downloaded (see text_tokenizer.py).
    """
    if Path(model_name).is_dir() and (Path(model_name) / "open_clip_config.json").is_file():
        model_name = f"local-dir:{model_name}"
    schema = next((s for s in _SCHEMAS if model_name.startswith(s)), None)
    if schema is None and model_name not in open_clip.list_models():
        raise ExportError(unknown_model_message(model_name, open_clip.list_models()))

    force_quick_gelu = False
    if schema is not None and pretrained.lower() not in ("", "none", "random"):
        raise ExportError(
            f"--pretrained {pretrained!r} cannot be used with {model_name}: a {schema} model carries its own "
            "weights; drop --pretrained"
        )
    if schema == "local-dir:":
        value, (label, sha) = None, _local_dir_checkpoint(model_name)
    elif schema == "hf-hub:":
        value, label, sha = None, model_name[len("hf-hub:") :], None
    else:
        support = model_support(model_name)
        if not support.supported:
            raise UnsupportedModelError(
                f"{model_name}'s image tower is {support.family}: LeGrad export does not support it, "
                f"{support.reason}; see `legrad-export --list-models`"
            )
        value, label, sha, force_quick_gelu = _resolve_pretrained(model_name, pretrained, cache_dir)

    try:
        model = open_clip.create_model(
            model_name,
            pretrained=value,
            force_quick_gelu=force_quick_gelu,
            cache_dir=cache_dir,
            pretrained_hf=False,  # an HF text tower's own weights: the CLIP checkpoint replaces them anyway
        )
    except _CHECKPOINT_ERRORS as exc:
        raise _explain_load_failure(model_name, pretrained, value, exc) from exc
    model.eval()
    text_tokenizer = load_tokenizer(model_name, tokenizer, cache_dir)
    defaults = (
        read_model_defaults(Path(model_name[len(schema) :])) if schema == "local-dir:" else ModelDefaults()
    )
    return wrap_openclip(
        model, model_name, label, tokenizer=text_tokenizer, checkpoint_sha256=sha, defaults=defaults
    )


def _explain_load_failure(model_name: str, pretrained: str, value: str | None, exc: Exception) -> ExportError:
    text = str(exc)
    if value is not None and Path(value).is_file():
        if "Error(s) in loading state_dict" in text or isinstance(exc, (AssertionError, KeyError)):
            lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()] or [text or type(exc).__name__]
            detail = "; ".join(lines)[:600]
            return ExportError(
                f"checkpoint {value} does not fit model {model_name} ({detail}); "
                "pass the model name the checkpoint was trained with"
            )
        return ExportError(f"cannot read checkpoint {value} ({type(exc).__name__}: {text[:300]})")
    if value is not None or model_name.startswith("hf-hub:"):
        return ExportError(_no_network_message(model_name, pretrained))
    return ExportError(f"could not build {model_name}: {type(exc).__name__}: {text[:300]}")


def wrap_openclip(
    model: nn.Module,
    model_name: str,
    pretrained: str = "custom",
    *,
    tokenizer: Any = None,
    checkpoint_sha256: str | None = None,
    defaults: ModelDefaults = ModelDefaults(),
) -> LoadedModel:
    """Describe an already-built open_clip model (not copied, never modified) for export."""
    vit = describe_tower(model, model_name)
    if tokenizer is None:
        tokenizer = open_clip.get_tokenizer(model_name)
    pre = dict(get_model_preprocess_cfg(model))
    preprocess = {
        "size": int(model.visual.image_size[0]),
        "mean": tuple(float(m) for m in pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(float(s) for s in pre.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": pre.get("interpolation", "bicubic"),
        "resize_mode": pre.get("resize_mode", "shortest"),
    }
    return LoadedModel(
        model=model,
        model_name=model_name,
        pretrained=pretrained,
        checkpoint_sha256=checkpoint_sha256,
        vit=vit,
        preprocess=preprocess,
        tokenizer=tokenizer,
        context_length=int(getattr(tokenizer, "context_length", None) or model.context_length),
        defaults=defaults,
    )


def default_layer_spec(loaded: LoadedModel) -> str:
    """The layer set to use when none is given: the model folder's recommendation, else the last two."""
    return loaded.defaults.layers or str(DEFAULT_LAYERS)


def visual_state_dict(loaded: LoadedModel, image_size: int | Size | None = None) -> dict[str, torch.Tensor]:
    """The image tower's tensors under the canonical names (views; the exporter copies what it keeps),
    for input of `image_size` px ((height, width) or a square's side; default: the model's own)."""
    patch = loaded.vit.patch_size
    grid = None if image_size is None else tuple(side // patch for side in as_size(image_size))
    return canonical_state_dict(loaded.owner, loaded.vit, grid)
