"""legrad_runtime: torch-free LeGrad heatmaps from an exported model folder.

from legrad_runtime import load
model = load("models/ViT-B-16__laion2b_s34b_b88k__448")
result = model.explain(["cat.jpg"], ["a photo of a cat", "a remote control"])
classifier = load("models/torchvision-vit_b_16__IMAGENET1K_V1__224")  # an ImageNet ViT
result = classifier.explain(["cat.jpg"], classes=["tabby cat", 281])   # or classes="top-5"
"""

from .errors import (
    DeviceFallbackWarning,
    ImageInputError,
    InputError,
    LegradError,
    ModelFolderError,
    PromptError,
    SchemaVersionError,
)
from .metadata import SCHEMA_VERSION, ModelMetadata, read_metadata, verify_files

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "SCHEMA_VERSION",
    "load",
    "LeGradModel",
    "Explanation",
    "ImageFailure",
    "LegradError",
    "ModelFolderError",
    "SchemaVersionError",
    "InputError",
    "ImageInputError",
    "PromptError",
    "DeviceFallbackWarning",
    "ModelMetadata",
    "read_metadata",
    "verify_files",
]


def __getattr__(name: str) -> object:
    # the session pulls in onnxruntime; importing the package for the schema alone stays light
    if name in ("load", "LeGradModel", "Explanation", "ImageFailure"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'legrad_runtime' has no attribute {name!r}")
