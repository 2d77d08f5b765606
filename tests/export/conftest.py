"""Torch-side fixtures: tiny models saved as open_clip local-dir folders."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from tiny_models import TINY_VARIANTS, save_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: save_tiny_model_dir(root, v) for v in TINY_VARIANTS}
