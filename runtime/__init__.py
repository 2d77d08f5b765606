"""legrad_runtime: torch-free LeGrad heatmaps from an exported model folder."""

from .errors import LegradError, ModelFolderError, SchemaVersionError
from .metadata import SCHEMA_VERSION, ModelMetadata, read_metadata, verify_files

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "SCHEMA_VERSION",
    "LegradError",
    "ModelFolderError",
    "SchemaVersionError",
    "ModelMetadata",
    "read_metadata",
    "verify_files",
]
