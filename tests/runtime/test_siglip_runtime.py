"""MAP-head model folders in the torch-free runtime: SigLIP (no class token, sigmoid scores) and PE-Core."""

from __future__ import annotations

import numpy as np
import pytest

from legrad_runtime import load
from legrad_runtime.cli import main


@pytest.fixture(scope="module")
def siglip(model_folders):
    return load(model_folders["siglip"])


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, (30 + 7 * k, 50 - 3 * k, 3), dtype=np.uint8) for k in range(count)]


def test_the_folder_describes_a_map_head_tower(siglip):
    meta = siglip.metadata
    assert (meta.tower.family, meta.tower.head, meta.tower.prefix_tokens) == ("timm_vit", "map", 0)
    assert meta.tower.grid == meta.grid_size
    assert meta.correction is not None and meta.correction.enabled and meta.logit_bias is not None
    assert meta.tokenizer.kind == "hf"


def test_each_image_and_prompt_equals_its_single_result(siglip):
    prompts = ["a red circle", "a blue square", "a shape", "two green triangles, at night!"]
    images = _images(3)
    both = siglip.explain(images, prompts)
    assert both.heatmaps.shape == (3, 4, *siglip.metadata.image_size)
    for b, image in enumerate(images):
        for p, prompt in enumerate(prompts):
            alone = siglip.explain(image, [prompt])
            np.testing.assert_allclose(both.heatmaps[b, p], alone.heatmaps[0, 0], atol=1e-5)
            np.testing.assert_allclose(both.layer_maps[b, p], alone.layer_maps[0, 0], atol=1e-6)
    assert np.isfinite(both.heatmaps).all() and both.heatmaps.max() > 0.5
    assert both.heatmaps.min() >= 0 and both.heatmaps.max() <= 1


def test_probabilities_are_per_pair_sigmoids(siglip):
    explained = siglip.explain(_images(2), ["a red circle", "a blue square", "a cat"])
    cos = explained.image_embeds.astype(np.float64) @ explained.text_embeds.astype(np.float64).T
    meta = siglip.metadata
    expected = 1 / (1 + np.exp(-(meta.logit_scale * cos + meta.logit_bias)))
    np.testing.assert_allclose(explained.probabilities, expected, rtol=1e-5)
    assert not np.allclose(explained.probabilities.sum(axis=1), 1)  # not a softmax over prompts


def test_the_cli_explains_and_describes_a_siglip_folder(model_folders, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(_images(1)[0]).save(tmp_path / "shapes.png")
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(model_folders["siglip"]),
            str(tmp_path / "shapes.png"),
            "-p",
            "a red circle",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(list(out.rglob("*.png"))) == 1
    capsys.readouterr()
    assert main(["info", str(model_folders["siglip"])]) == 0
    info = capsys.readouterr().out
    assert "timm_vit" in info and "map" in info and "a photo of a" in info and "sigmoid" in info


def test_a_pe_core_folder_drops_the_class_token_and_scores_by_softmax(model_folders):
    model = load(model_folders["pe_core"])
    meta = model.metadata
    assert (meta.tower.family, meta.tower.prefix_tokens, meta.logit_bias) == ("timm_eva", 1, None)
    images = _images(2)
    both = model.explain(images, ["a red circle", "a blue square"])
    assert both.layer_maps.shape == (2, 2, len(meta.layers), *meta.grid_size)  # patches only
    alone = model.explain(images[1], ["a blue square"])
    np.testing.assert_allclose(both.heatmaps[1, 1], alone.heatmaps[0, 0], atol=1e-5)
    np.testing.assert_allclose(both.probabilities.sum(axis=1), 1, rtol=1e-6)
