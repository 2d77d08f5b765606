"""Loading supervised ViT classifiers: `torchvision:NAME` and `timm:NAME` (torchvision and timm are
imported only here and in the towers' adapters).

    torchvision:vit_b_16 --pretrained none | IMAGENET1K_V1 (a weights name) | PATH (a state dict file)
    timm:vit_base_patch16_224.augreg_in21k_ft_in1k --pretrained none | hub | PATH

The model is built here, put in eval mode and never modified afterwards; its preprocessing is read
from the library's own description (torchvision's weights transforms, timm's `pretrained_cfg`), so
nothing is downloaded for it. A 1,000-class head gets the ImageNet-1k names shipped with the
runtime; any other head gets "class 0", "class 1", ...
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from legrad_runtime.classes import IMAGENET1K_SIZE, imagenet1k_classes
from legrad_runtime.errors import ExportError, UnsupportedModelError
from legrad_runtime.metadata import PreprocessCfg, Size, sha256_file

from .load import LoadedModel, ModelDefaults
from .towers import TowerSpec, timm_token_vit, torchvision_vit

__all__ = [
    "CLASSIFIER_SCHEMES",
    "AnyLoaded",
    "LoadedClassifier",
    "is_classifier_name",
    "load_classifier",
    "wrap_classifier",
]

CLASSIFIER_SCHEMES = ("torchvision:", "timm:")
_RANDOM = ("", "none", "random")


class TimmVisual(nn.Module):
    """A bare timm ViT seen as an open_clip `TimmModel` (`trunk`, an empty `head`), so that the timm
    adapter reads it unchanged. Holds a reference to the model, never a modified copy."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential()


class ClassifierHolder(nn.Module):
    """What the tower code takes: `.visual` is the image tower (a torchvision ViT is its own)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


@dataclass(frozen=True)
class LoadedClassifier:
    """A torchvision or timm ViT classifier (eval, fp32, CPU) and what the exporter needs to know."""

    model: Any  # the classifier itself
    model_name: str  # torchvision:NAME or timm:NAME
    pretrained: str  # weights name, 'hub', checkpoint file name, or 'none'
    checkpoint_sha256: str | None
    vit: TowerSpec  # score "logit"
    preprocess: dict[str, Any]  # size, mean, std, interpolation, resize_mode, crop_pct
    classes: tuple[str, ...]
    library_version: str  # e.g. "torchvision 0.29.2", recorded as the metadata's open_clip_version
    holder: nn.Module = field(repr=False)  # `.visual` for the tower adapters
    defaults: ModelDefaults = ModelDefaults()
    logit_scale: float = 1.0  # probabilities are a softmax of the logits
    logit_bias: float | None = None

    @property
    def owner(self) -> nn.Module:
        """What the tower adapters read: a module whose `.visual` is the image tower."""
        return self.holder

    def preprocess_cfg(self, size: int | Size, resize_mode: str | None = None) -> PreprocessCfg:
        """The runtime's preprocessing at `size`: the library's own at the native size ('shortest'
        with its crop_pct) unless another resize_mode is asked for; crop_pct applies to 'shortest'
        at the native square size only."""
        pre = self.preprocess
        mode = resize_mode or pre["resize_mode"]
        native = (pre["size"], pre["size"])
        keep_crop = mode == "shortest" and PreprocessCfg(size, (0, 0, 0), (1, 1, 1)).size == native
        crop = pre["crop_pct"] if keep_crop else 1.0
        return PreprocessCfg(size, pre["mean"], pre["std"], pre["interpolation"], mode, crop)


AnyLoaded = LoadedModel | LoadedClassifier  # what the exporter takes: a CLIP-style model or a classifier


def is_classifier_name(model_name: str) -> bool:
    return model_name.startswith(CLASSIFIER_SCHEMES)


def _class_names(count: int) -> tuple[str, ...]:
    return imagenet1k_classes() if count == IMAGENET1K_SIZE else tuple(f"class {i}" for i in range(count))


def _checkpoint(pretrained: str) -> Path | None:
    path = Path(pretrained).expanduser()
    return path if path.is_file() else None


def _load_state_dict(model: nn.Module, path: Path, model_name: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError) as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:500]
        raise ExportError(
            f"checkpoint {path} does not fit {model_name} ({detail}); pass the model name it was trained "
            "with, and a state dict saved with torch.save(model.state_dict(), path)"
        ) from None


def _torchvision(name: str, pretrained: str) -> tuple[nn.Module, str, str | None, dict[str, Any]]:
    import torchvision
    from torchvision.models import get_model, get_model_weights, list_models

    vits = [m for m in list_models() if m.startswith("vit_")]
    if name not in vits:
        raise ExportError(f"unknown torchvision ViT {name!r}; choose one of {', '.join(vits)}")
    enum = get_model_weights(name)
    path = _checkpoint(pretrained)
    weights = None
    if pretrained.lower() not in _RANDOM and path is None:
        if pretrained not in enum.__members__:
            raise ExportError(
                f"--pretrained {pretrained!r} is neither a weights name of torchvision's {name} "
                f"({', '.join(enum.__members__)}) nor an existing file; or pass 'none' for random weights"
            )
        weights = enum[pretrained]
        _check_network(weights.url, f"torchvision:{name}", pretrained)
    model = get_model(name, weights=weights)
    if path is not None:
        _load_state_dict(model, path, f"torchvision:{name}")
    transform = (weights or enum.DEFAULT).transforms()  # the weights' own preset (no download)
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    if crop != model.image_size:  # e.g. the SWAG weights' 384 px preset for a 224 px model
        transform = enum.IMAGENET1K_V1.transforms()
        crop, resize = transform.crop_size[0], transform.resize_size[0]
    preprocess = {
        "size": model.image_size,
        "mean": tuple(transform.mean),
        "std": tuple(transform.std),
        "interpolation": transform.interpolation.value,
        "resize_mode": "shortest",
        "crop_pct": crop / resize,
    }
    label = "none" if weights is None and path is None else (path.name if path else pretrained)
    return (
        model,
        label,
        sha256_file(path) if path else None,
        preprocess | {"version": f"torchvision {torchvision.__version__}"},
    )


def _timm(name: str, pretrained: str) -> tuple[nn.Module, str, str | None, dict[str, Any]]:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ExportError(f"unknown timm model {name!r}{hint}")
    path = _checkpoint(pretrained)
    hub = pretrained.lower() == "hub"
    if pretrained.lower() not in _RANDOM and path is None and not hub:
        raise ExportError(
            f"--pretrained {pretrained!r} for timm:{name} must be 'hub' (timm's own weights, downloaded), "
            "a checkpoint file, or 'none' for random weights"
        )
    if hub:
        _check_network("https://huggingface.co", f"timm:{name}", "hub")
    try:
        model = timm.create_model(name, pretrained=hub)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ExportError(f"could not build timm:{name} ({type(exc).__name__}: {str(exc)[:300]})") from None
    if path is not None:
        _load_state_dict(model, path, f"timm:{name}")
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    if cfg["input_size"][-2] != size or cfg.get("crop_mode", "center") != "center":
        raise UnsupportedModelError(
            f"timm:{name} preprocesses with {cfg.get('crop_mode')!r} crops; not supported"
        )
    interpolation = cfg.get("interpolation", "bicubic")
    preprocess = {
        "size": size,
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
        "resize_mode": "shortest",
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
    }
    label = "hub" if hub else (path.name if path else "none")
    return (
        model,
        label,
        sha256_file(path) if path else None,
        preprocess | {"version": f"timm {timm.__version__}"},
    )


def _check_network(url: str, model_name: str, pretrained: str) -> None:
    """Fail in seconds, not after retries, when weights cannot be downloaded."""
    from urllib.parse import urlparse

    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=5).close()
    except OSError:
        raise ExportError(
            f"could not download the {pretrained} weights of {model_name} (no network?). Save the state dict "
            f"where you have network (torch.save(model.state_dict(), 'vit.pth')) and pass "
            f"--model {model_name} --pretrained vit.pth"
        ) from None


def wrap_classifier(
    model: nn.Module,
    model_name: str,
    pretrained: str = "custom",
    preprocess: dict[str, Any] | None = None,
    checkpoint_sha256: str | None = None,
) -> LoadedClassifier:
    """Describe an already-built torchvision or timm ViT classifier (not copied, never modified)."""
    preprocess = dict(preprocess or {})
    version = preprocess.pop("version", "unknown")
    if torchvision_vit.is_torchvision_vit(model):
        holder, vit = ClassifierHolder(model), torchvision_vit.describe(model, model_name)
    elif timm_token_vit.is_timm_token_vit(TimmVisual(model)):
        holder = ClassifierHolder(TimmVisual(model))
        vit = timm_token_vit.describe(holder.visual, model_name)
        vit = type(vit)(**{**vit.__dict__, "score": "logit"})
    else:
        raise UnsupportedModelError(
            f"{model_name} is a {type(model).__name__}; LeGrad export supports torchvision ViTs and timm "
            "ViTs pooled by their class token or the token mean"
        )
    return LoadedClassifier(
        model=model,
        model_name=model_name,
        pretrained=pretrained,
        checkpoint_sha256=checkpoint_sha256,
        vit=vit,
        preprocess=preprocess,
        classes=_class_names(vit.embed_dim),
        library_version=version,
        holder=holder,
    )


def load_classifier(model_name: str, pretrained: str = "none") -> LoadedClassifier:
    """Build `torchvision:NAME` or `timm:NAME` with the asked weights; ExportError on any bad input."""
    scheme, _, name = model_name.partition(":")
    build = {"torchvision": _torchvision, "timm": _timm}.get(scheme)
    if build is None or not name:
        raise ExportError(f"{model_name!r} names no classifier; use torchvision:NAME or timm:NAME")
    model, label, sha, preprocess = build(name, pretrained)
    return wrap_classifier(model.eval(), model_name, label, preprocess, sha)
