"""A CoCa folder in the torch-free runtime: the attentional pooler's first latent explained."""

from __future__ import annotations

import numpy as np

from legrad_runtime import load
from legrad_runtime.cli import main


def test_a_coca_folder_explains_each_image_and_prompt_on_its_own(model_folders):
    model = load(model_folders["coca"])
    meta = model.metadata
    assert (meta.tower.family, meta.tower.head, meta.tower.prefix_tokens) == ("openclip_vit", "attn_pool", 1)
    assert meta.correction is None and meta.logit_bias is None
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (50 + 7 * k, 70 - 6 * k, 3), dtype=np.uint8) for k in range(3)]
    prompts = ["a red circle", "a blue square", "two green triangles, at night!"]
    both = model.explain(images, prompts)
    assert both.layer_maps.shape == (3, 3, len(meta.layers), *meta.grid_size)
    for b, image in enumerate(images):
        for p, prompt in enumerate(prompts):
            alone = model.explain(image, [prompt])
            np.testing.assert_allclose(both.heatmaps[b, p], alone.heatmaps[0, 0], atol=1e-5)
            np.testing.assert_allclose(both.layer_maps[b, p], alone.layer_maps[0, 0], atol=1e-6)
    flat = both.heatmaps.reshape(3, 3, -1)
    np.testing.assert_allclose(flat.max(-1), 1, atol=1e-6)  # min-max per (image, prompt), none blank
    np.testing.assert_allclose(flat.min(-1), 0, atol=1e-6)
    np.testing.assert_allclose(both.probabilities.sum(axis=1), 1, rtol=1e-6)


def test_legrad_info_names_the_pooler(model_folders, capsys):
    assert main(["info", str(model_folders["coca"])]) == 0
    assert "attn_pool" in capsys.readouterr().out
