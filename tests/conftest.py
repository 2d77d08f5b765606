"""Shared fixtures, torch-free: the runtime tests run in a venv without torch too.

`model_folders` are exported tiny models, one per resize mode ("longest" is non-square: 80x48 px,
a 3×5 grid), one ("hf") whose tokenizer is a
Hugging Face one, a tiny SigLIP ("siglip": MAP head, no class token, sigmoid scores) and
a tiny PE-Core ("pe_core": MAP head after a class token and RoPE, softmax scores) and a tiny
ViTamin ("vitamin": a conv stem, no class token, token mean, GeGLU MLPs) and a tiny CoCa ("coca": an
attentional pooler's first latent explained) and a tiny torchvision ViT classifier ("classifier":
1,000 ImageNet classes, class ids instead of prompts). In the
lean CI venv they come from LEGRAD_TEST_MODEL_DIR (exported earlier in the same CI run by
`python tests/tiny_models.py DIR`); elsewhere they are exported here, which needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:  # every test under tests/export/ needs torch
        if "tests/export/" in item.nodeid or item.nodeid.startswith("export/"):
            item.add_marker(pytest.mark.torch)


# the keys of `model_folders`, each a subfolder of LEGRAD_TEST_MODEL_DIR
MODEL_FOLDERS = (
    "squash",
    "shortest",
    "longest",
    "hf",
    "siglip",
    "pe_core",
    "vitamin",
    "eva02",
    "coca",
    "classifier",
)


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    env = os.environ.get("LEGRAD_TEST_MODEL_DIR")
    if env:
        root = Path(env)
        return {mode: next((root / mode).iterdir()) for mode in MODEL_FOLDERS}
    pytest.importorskip("torch", reason="set LEGRAD_TEST_MODEL_DIR or install the export extra")
    from tiny_models import export_runtime_folders

    return export_runtime_folders(tmp_path_factory.mktemp("runtime_models"))


@pytest.fixture(scope="session")
def model_folder(model_folders) -> Path:
    return model_folders["squash"]


@pytest.fixture(scope="session")
def hf_tokenizer_cases(model_folders) -> Path:
    """Folder of per-kind HF tokenizer files and open_clip's ids (tiny_models.write_hf_tokenizer_cases)."""
    return model_folders["hf"].parent.parent / "hf-tokenizer-cases"
