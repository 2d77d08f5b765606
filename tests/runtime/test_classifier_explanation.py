"""A classifier's Explanation on hand-made arrays: scores, labels, joining batches, pictures.

Torch-free and model-free: the numbers are made here and checked against numpy written out anew.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from legrad_runtime.metadata import PreprocessCfg
from legrad_runtime.preprocess import preprocess
from legrad_runtime.session import Explanation, _concat
from legrad_runtime.visualize import grid

NAMES = ("tabby, tabby cat", "tiger cat", "Egyptian cat", "goldfish, Carassius auratus", "crane")
CFG = PreprocessCfg(16, (0.5,) * 3, (0.5,) * 3, "bilinear", "shortest", crop_pct=0.875)


def _explanation(logits, class_ids, prompts=None) -> Explanation:
    logits, class_ids = np.asarray(logits, np.float32), np.asarray(class_ids, np.int64)
    b, p = class_ids.shape
    images = [Image.fromarray(np.full((20 + i, 24, 3), 40 * i, np.uint8)) for i in range(b)]
    rng = np.random.default_rng(0)
    return Explanation(
        heatmaps=rng.random((b, p, 16, 16), dtype=np.float32),
        layer_maps=rng.random((b, p, 2, 1, 1), dtype=np.float32),
        image_embeds=None,
        text_embeds=None,
        images=images,
        placements=[preprocess(im, CFG)[1] for im in images],
        sources=[f"image #{i}" for i in range(b)],
        prompts=prompts or [NAMES[int(i)] for i in class_ids[0]],
        layers=(0, 1),
        logit_scale=1.0,
        failures=[],
        preprocess=CFG,
        logits=logits,
        class_ids=class_ids,
        class_names=NAMES,
    )


def _softmax(row: list[float]) -> list[float]:
    e = [np.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def test_probabilities_are_the_softmax_over_every_class_at_each_maps_class():
    logits = [[2.0, 1.0, 0.5, -3.0, 0.0], [-1.0, 4.0, 4.0, 0.0, 1000.0]]
    ex = _explanation(logits, [[1, 0, 4], [1, 0, 4]])
    expected = [[_softmax(row)[c] for c in (1, 0, 4)] for row in logits]
    np.testing.assert_allclose(ex.probabilities, expected, rtol=1e-6, atol=1e-30)
    assert ex.probabilities.dtype == np.float32 and np.isfinite(ex.probabilities).all()
    np.testing.assert_array_equal(ex.similarities, [[1.0, 2.0, 0.0], [4.0, -1.0, 1000.0]])


def test_probabilities_of_every_class_sum_to_one():
    logits = np.random.default_rng(1).normal(size=(3, 5)) * 10
    ex = _explanation(logits, np.tile(np.arange(5), (3, 1)))
    np.testing.assert_allclose(ex.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_each_map_is_labelled_by_its_own_class():
    ex = _explanation(np.zeros((2, 5)), [[0, 3], [2, 1]], prompts=["top-1", "top-2"])
    assert [[ex.label(b, p) for p in range(2)] for b in range(2)] == [
        ["tabby, tabby cat", "goldfish, Carassius auratus"],
        ["Egyptian cat", "tiger cat"],
    ]
    assert ex.is_classifier and ex.prompts == ["top-1", "top-2"]


def test_a_clip_explanation_keeps_its_prompts_as_labels_and_cosine_scores():
    clip = Explanation(
        heatmaps=np.zeros((1, 2, 2, 2), np.float32),
        layer_maps=np.zeros((1, 2, 1, 1, 1), np.float32),
        image_embeds=np.array([[1.0, 0.0]], np.float32),
        text_embeds=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
        images=[],
        placements=[],
        sources=["image #0"],
        prompts=["a cat", "a dog"],
        layers=(0,),
        logit_scale=1.0,
        failures=[],
        preprocess=CFG,
    )
    assert not clip.is_classifier and clip.label(0, 1) == "a dog" and clip.logits is None
    np.testing.assert_array_equal(clip.similarities, [[1.0, 0.0]])


def test_batches_join_row_by_row():
    a = _explanation(np.arange(10).reshape(2, 5), [[0, 3], [2, 1]], prompts=["top-1", "top-2"])
    b = _explanation(np.ones((1, 5)), [[4, 0]], prompts=["top-1", "top-2"])
    joined = _concat([a, b])
    np.testing.assert_array_equal(joined.logits, np.concatenate([a.logits, b.logits]))
    np.testing.assert_array_equal(joined.class_ids, [[0, 3], [2, 1], [4, 0]])
    np.testing.assert_array_equal(joined.heatmaps, np.concatenate([a.heatmaps, b.heatmaps]))
    assert joined.image_embeds is None and joined.text_embeds is None and joined.class_names == NAMES
    assert joined.label(2, 0) == "crane" and joined.sources == ["image #0", "image #1", "image #0"]


def test_an_explanation_without_rows_has_empty_scores():
    ex = _explanation(np.zeros((0, 5)), np.zeros((0, 3)), prompts=["top-1", "top-2", "top-3"])
    assert ex.probabilities.shape == ex.similarities.shape == (0, 3)


@pytest.mark.parametrize("class_ids", [[[1, 0], [1, 0]], [[1, 0], [3, 4]]], ids=["named", "top-k"])
def test_grids_and_layer_figures_draw_for_either_kind(class_ids):
    ex = _explanation(np.random.default_rng(2).normal(size=(2, 5)), class_ids, prompts=["a", "b"])
    picture = ex.grid(cell=48)
    assert picture.mode == "RGB" and picture.width > 2 * 48 and picture.height > 2 * 48
    assert ex.layer_figure(1, 1).mode == "RGB"
    assert ex.overlay(1, 0).size == ex.images[1].size


def test_grid_takes_a_caption_per_cell_instead_of_scores():
    image = Image.new("RGB", (10, 10))
    maps = [[np.zeros((10, 10), np.float32)]]
    with_captions = grid([image], maps, ["top-1"], captions=[["tabby 0.870"]], cell=32)
    plain = grid([image], maps, ["top-1"], cell=32)
    assert with_captions.height > plain.height  # a line under each cell
    with pytest.raises(ValueError, match="captions must be 1 rows"):
        grid([image], maps, ["top-1"], captions=[["a", "b"]], cell=32)
    with pytest.raises(ValueError, match="not both"):
        grid([image], maps, ["top-1"], scores=np.zeros((1, 1)), captions=[["a"]], cell=32)
