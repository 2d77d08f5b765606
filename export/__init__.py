"""legrad_export: a ViT image tower + LeGrad → one ONNX graph, and the autograd reference (torch side).

Importing the package is light: torch and open_clip load on first use of a name below, so the CLIs
check their arguments (and answer Ctrl-C) before paying for the torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

from legrad_runtime import __version__

__all__ = [
    "__version__",
    "DEFAULT_LAYERS",
    "resolve_layers",
    "LeGradOutput",
    "legrad_reference",
    "legrad_reference_siglip",
    "legrad_reference_coca",
    "legrad_reference_torchvision",
    "legrad_reference_classifier",
    "load_openclip",
    "load_classifier",
    "wrap_classifier",
    "export_model",
    "ExportSettings",
]

_WHERE = {
    "DEFAULT_LAYERS": ".layers",
    "resolve_layers": ".layers",
    "LeGradOutput": ".reference",
    "legrad_reference": ".reference",
    "legrad_reference_siglip": ".reference_siglip",
    "legrad_reference_coca": ".reference_coca",
    "legrad_reference_torchvision": ".reference_classifier",
    "legrad_reference_classifier": ".reference_classifier",
    "load_classifier": ".load_classifier",
    "wrap_classifier": ".load_classifier",
    "load_openclip": ".load",
    "export_model": ".onnx_export",
    "ExportSettings": ".onnx_export",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'legrad_export' has no attribute {name!r}")
