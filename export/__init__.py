"""legrad_export: OpenCLIP ViT + LeGrad → one ONNX graph, and the autograd reference (torch side)."""

from legrad_runtime import __version__

from .layers import DEFAULT_LAYERS, resolve_layers
from .reference import LeGradOutput, legrad_reference

__all__ = ["__version__", "DEFAULT_LAYERS", "resolve_layers", "LeGradOutput", "legrad_reference"]
