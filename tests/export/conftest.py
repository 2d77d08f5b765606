"""Torch-side fixtures: tiny models saved as open_clip local-dir folders, and torchcam's LeGrad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from tiny_models import TINY_VARIANTS, save_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: save_tiny_model_dir(root, v) for v in TINY_VARIANTS}


TORCHCAM_SITE = Path(__file__).parent.parent.parent / ".torchcam-site"


@pytest.fixture(scope="session")
def torchcam_legrad():
    """torchcam 0.5.0's `LeGrad` class, installed with pip `--target` into `.torchcam-site/` (git-ignored,
    `--no-deps`: it runs on this suite's torch and torchvision). Skipped only if pip cannot reach PyPI."""
    done = TORCHCAM_SITE / ".installed"
    if not done.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--upgrade",
            "--target",
            str(TORCHCAM_SITE),
        ]
        result = subprocess.run([*cmd, "torchcam==0.5.0"], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot install torchcam: {result.stderr.strip()[-300:]}")
        done.touch()
    sys.path.insert(0, str(TORCHCAM_SITE))
    try:
        from torchcam.methods import LeGrad
    finally:
        sys.path.remove(str(TORCHCAM_SITE))
    return LeGrad
