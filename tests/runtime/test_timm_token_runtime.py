"""A timm token-mean tower's folder in the torch-free runtime: ViTamin (conv stem, no class token)."""

from __future__ import annotations

import numpy as np

from legrad_runtime import load
from legrad_runtime.cli import main


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, (40 + 9 * k, 60 - 5 * k, 3), dtype=np.uint8) for k in range(count)]


def test_a_vitamin_folder_explains_every_patch_and_scores_by_softmax(model_folders):
    model = load(model_folders["vitamin"])
    meta = model.metadata
    assert (meta.tower.family, meta.tower.head, meta.tower.prefix_tokens) == ("timm_vit", "token_mean", 0)
    assert meta.grid_size == tuple(side // meta.patch_size for side in meta.image_size)
    assert meta.logit_bias is None
    prompts = ["a red circle", "a blue square", "two green triangles, at night!"]
    images = _images(3)
    both = model.explain(images, prompts)
    assert both.layer_maps.shape == (
        3,
        3,
        len(meta.layers),
        *meta.grid_size,
    )  # no class token: every cell a patch
    assert both.heatmaps.shape == (3, 3, *meta.image_size)
    for b, image in enumerate(images):
        for p, prompt in enumerate(prompts):
            alone = model.explain(image, [prompt])
            np.testing.assert_allclose(both.heatmaps[b, p], alone.heatmaps[0, 0], atol=1e-5)
            np.testing.assert_allclose(both.layer_maps[b, p], alone.layer_maps[0, 0], atol=1e-6)
    assert np.isfinite(both.heatmaps).all() and both.heatmaps.max() > 0.5
    np.testing.assert_allclose(both.probabilities.sum(axis=1), 1, rtol=1e-6)


def test_legrad_info_names_the_tower(model_folders, capsys):
    assert main(["info", str(model_folders["vitamin"])]) == 0
    info = capsys.readouterr().out
    assert "timm_vit" in info and "token_mean" in info
