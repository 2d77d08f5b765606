"""Typed errors raised by both the exporter and the runtime.

Every error says what is wrong and how to fix it; callers catch these, never bare exceptions.
"""

from __future__ import annotations

__all__ = [
    "LegradError",
    "ModelFolderError",
    "SchemaVersionError",
    "ExportError",
    "UnsupportedModelError",
    "VerificationError",
    "InputError",
    "ImageInputError",
    "PromptError",
    "CaseFolderError",
    "DeviceFallbackWarning",
]


class LegradError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelFolderError(LegradError, ValueError):
    """An exported model folder is missing, incomplete, altered or has unreadable metadata."""


class SchemaVersionError(ModelFolderError):
    """The folder's metadata was written by a newer schema than this runtime understands."""


class ExportError(LegradError):
    """The exporter cannot do what was asked (bad model name, weights, size, output folder...)."""


class UnsupportedModelError(ExportError, ValueError):
    """The model exists but its image tower is not a plain OpenCLIP ViT that LeGrad supports."""


class VerificationError(ExportError):
    """Exported graphs disagree with the autograd reference beyond tolerance."""


class InputError(LegradError, ValueError):
    """Bad input to the runtime (images, prompts, embeddings, options)."""


class ImageInputError(InputError):
    """An image cannot be used: missing, unreadable, corrupt, not an image, or empty.

    `source` names the offending input (a path, or 'image #i' for in-memory images).
    """

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source


class PromptError(InputError):
    """Prompts or text embeddings cannot be used (empty list, empty string, wrong width...)."""


class CaseFolderError(InputError):
    """An evaluation cases folder cannot be used: bad cases.csv, missing file, mask that does not fit."""


class DeviceFallbackWarning(UserWarning):
    """device='cuda' was asked for but the CUDA provider is unavailable: running on CPU."""
