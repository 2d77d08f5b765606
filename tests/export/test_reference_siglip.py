"""The SigLIP (MAP-head) autograd reference on a random-init ViT-B-16-SigLIP: its pieces checked alone.

Parity with the authors' `compute_legrad_siglip` is in test_authors_parity.py; here, the re-written
MAP head against timm's own module, and that each setting changes what it should.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from legrad_export.reference_siglip import legrad_reference_siglip, map_head_with_attention
from tiny_models import random_inputs

pytestmark = pytest.mark.slow  # a real-size ViT-B-16-SigLIP


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(1)
    return open_clip.create_model("ViT-B-16-SigLIP").eval()


def test_the_written_out_map_head_equals_timms_and_the_models_embedding(siglip):
    pixels, _ = random_inputs(2, 1, 224, 768, seed=3)
    trunk = siglip.visual.trunk
    with torch.no_grad():
        tokens = trunk.forward_features(pixels)
        ours, attn = map_head_with_attention(trunk.attn_pool, tokens)
        assert (ours - trunk.attn_pool(tokens)).abs().max() <= 1e-5
        assert (ours - siglip.encode_image(pixels)).abs().max() <= 1e-5
    assert attn.shape == (2, trunk.attn_pool.num_heads, 1, 196)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, trunk.attn_pool.num_heads, 1))


def test_maps_per_prompt_and_the_correction(siglip):
    pixels, text = random_inputs(2, 3, 224, 768, seed=4)
    empty = F.normalize(torch.randn(768, generator=torch.Generator().manual_seed(5)), dim=0)
    plain = legrad_reference_siglip(siglip, pixels, text, -2)
    corrected = legrad_reference_siglip(siglip, pixels, text, -2, empty_embed=empty)
    alone = legrad_reference_siglip(siglip, pixels, text[1:2], -2, empty_embed=empty)
    assert plain.layers == (10, 11) and plain.layer_maps.shape == (2, 3, 2, 14, 14)
    torch.testing.assert_close(alone.heatmaps[:, 0], corrected.heatmaps[:, 1])  # prompts are independent
    torch.testing.assert_close(plain.layer_maps, corrected.layer_maps)  # the correction acts on the sum
    assert (plain.heatmaps != corrected.heatmaps).any()
    assert (plain.layer_maps >= 0).all() and plain.layer_maps.amax() > 0


def test_image_embeds_equal_the_models_and_other_sizes_resample_positions(siglip):
    pixels, text = random_inputs(1, 2, 224, 768, seed=6)
    with torch.no_grad():
        expected = F.normalize(siglip.encode_image(pixels), dim=-1)
    assert (legrad_reference_siglip(siglip, pixels, text).image_embeds - expected).abs().max() <= 1e-5
    big, _ = random_inputs(1, 2, 384, 768, seed=6)
    out = legrad_reference_siglip(siglip, big, text)
    assert out.heatmaps.shape == (1, 2, 384, 384) and out.layer_maps.shape == (1, 2, 2, 24, 24)
