"""Tiny random-init OpenCLIP models saved as open_clip `local-dir:` folders (config + checkpoint).

They load through open_clip's real loading code. LayerNorm affines and LayerScale gammas are
perturbed away from their 1/0 init, so a formula that forgot one of them cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.torch

# name → vision_cfg overrides; each mirrors a structural feature of a real config in the matrix
TINY_VARIANTS = {
    "b32_like": dict(patch_size=32, image_size=96),  # ViT-B-32: large patches
    "b16_like": dict(patch_size=16, image_size=64),  # ViT-B-16
    "quickgelu": dict(patch_size=16, image_size=64),  # OpenAI weights: QuickGELU
    "layerscale": dict(patch_size=16, image_size=64, ls_init_value=0.5),  # ViT-M-16-alt: LayerScale
}


def tiny_model_cfg(variant: str) -> dict:
    vision = dict(layers=3, width=64, head_width=16, mlp_ratio=2.0) | TINY_VARIANTS[variant]
    return {
        "embed_dim": 32,
        "quick_gelu": variant == "quickgelu",
        "vision_cfg": vision,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def build_tiny_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**tiny_model_cfg(variant)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("visual.ln", "ln_final")) or name.endswith("gamma"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_tiny_model_dir(root: Path, variant: str, seed: int = 0) -> Path:
    folder = root / f"tiny-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": tiny_model_cfg(variant), "preprocess_cfg": {"interpolation": "bicubic"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(build_tiny_model(variant, seed).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: save_tiny_model_dir(root, v) for v in TINY_VARIANTS}


def random_inputs(batch: int, prompts: int, size: int, embed_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    text = torch.nn.functional.normalize(torch.randn(prompts, embed_dim, generator=gen), dim=-1)
    return pixels, text
