"""CLS attention and rollout from the explicit ViT vs open_clip's own attention weights."""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
import torch

from legrad_export.baselines import attention_rollout, cls_attention
from legrad_export.load import visual_state_dict, wrap_openclip
from legrad_export.vit import ExplicitViT
from tiny_models import build_tiny_model

pytestmark = pytest.mark.torch


def _open_clip_attention(model, pixels) -> list[np.ndarray]:
    """Each block's head-averaged attention, asked of open_clip's nn.MultiheadAttention itself."""
    visual = model.visual
    weights = []
    with torch.no_grad():
        x = visual._embeds(pixels)  # (B, N, D), batch first
        for block in visual.transformer.resblocks:
            y = block.ln_1(x)
            weights.append(
                block.attn(y, y, y, need_weights=True, average_attn_weights=True)[1].double().numpy()
            )
            x = block(x)
    return weights


@pytest.fixture(scope="module", params=["b16_like", "layerscale", "b32_like"])
def setup(request):
    model = build_tiny_model(request.param, seed=3)
    loaded = wrap_openclip(model, f"tiny-{request.param}", tokenizer=lambda texts: None)
    size = loaded.preprocess["size"]
    vit = ExplicitViT(loaded.vit, visual_state_dict(loaded, size), size)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    return vit, pixels, _open_clip_attention(model, pixels)


def test_cls_attention_is_open_clips_last_block_cls_row(setup):
    vit, pixels, weights = setup
    gh, gw = vit.grid
    expected = weights[-1][:, 0, 1:].reshape(-1, gh, gw)
    got = cls_attention(vit, pixels)
    assert got.shape == (2, gh, gw)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_rollout_is_the_product_of_residual_averaged_attention(setup):
    vit, pixels, weights = setup
    n = weights[0].shape[-1]
    expected = []
    for b in range(pixels.shape[0]):
        layers = [0.5 * w[b] + 0.5 * np.eye(n) for w in weights]
        layers = [a / a.sum(axis=1, keepdims=True) for a in layers]
        joint = reduce(lambda acc, a: a @ acc, layers)  # Â_L ⋯ Â_1
        expected.append(joint[0, 1:].reshape(vit.grid))
    got = attention_rollout(vit, pixels)
    np.testing.assert_allclose(got.double().numpy(), np.stack(expected), rtol=1e-4, atol=1e-6)
