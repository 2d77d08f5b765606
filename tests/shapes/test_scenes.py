"""The scene generator: deterministic, masks that match the drawn objects, the captions' grammar."""

from __future__ import annotations

import numpy as np
import pytest

from legrad_shapes.scenes import COLORS, SHAPES, class_captions, make_scene, scenes


def test_a_scene_is_a_pure_function_of_seed_and_index():
    a, b = make_scene(7, 3), make_scene(7, 3)
    assert np.array_equal(a.image, b.image)
    assert [(o.color, o.shape) for o in a.objects] == [(o.color, o.shape) for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, make_scene(7, 4).image)
    assert not np.array_equal(a.image, make_scene(8, 3).image)


@pytest.mark.parametrize("size", [64, 96])
def test_masks_are_disjoint_and_cover_pixels_of_the_objects_colour(size):
    for scene in scenes(seed=1, count=40, size=size):
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 3
        total = np.zeros((size, size), int)
        for obj in scene.objects:
            assert obj.mask.shape == (size, size) and obj.mask.sum() >= 20
            total += obj.mask
            # inside the mask the pixels are the object's colour (jitter ≤ 18, antialiased rim aside)
            inner = np.median(scene.image[obj.mask].astype(int), axis=0)
            assert np.abs(inner - np.array(COLORS[obj.color])).max() <= 20
        assert total.max() == 1  # objects never overlap
        classes = [(o.color, o.shape) for o in scene.objects]
        assert len(set(classes)) == len(classes)


def test_same_colour_scenes_share_a_colour_and_differ_in_shape():
    for i in range(30):
        scene = make_scene(2, i, n_objects=2, same_color=True)
        a, b = scene.objects
        assert a.color == b.color and a.shape != b.shape
        assert scene.shares_color(0) and scene.shares_color(1)
    lone = make_scene(2, 0, n_objects=1)
    assert not lone.shares_color(0)


@pytest.mark.parametrize("patch", [8, 16])
def test_patch_labels_name_the_object_covering_at_least_half_of_each_patch(patch):
    for scene in scenes(seed=5, count=20, size=64):
        labels = scene.patch_labels(patch)
        assert labels.shape == (64 // patch, 64 // patch)
        for row in range(labels.shape[0]):
            for col in range(labels.shape[1]):
                window = (slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch))
                counts = [int(obj.mask[window].sum()) for obj in scene.objects]
                best = int(np.argmax(counts))
                expected = scene.objects[best].label if 2 * counts[best] >= patch * patch else -1
                assert labels[row, col] == expected
    big = make_scene(5, 0, n_objects=1)  # radius ≥ 11 px: its centre patch at least is covered
    assert (big.patch_labels(8) == big.objects[0].label).any()


def test_the_object_count_can_be_fixed_and_is_checked():
    assert {len(make_scene(3, i, n_objects=3).objects) for i in range(10)} == {3}
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(3, 0, n_objects=4)


def test_captions_name_colour_and_shape_with_the_right_article():
    captions = class_captions()
    assert len(captions) == len(COLORS) * len(SHAPES) == len(set(captions))
    assert "a red circle" in captions and "an orange cross" in captions
    obj = make_scene(4, 0, n_objects=1).objects[0]
    assert captions[obj.label] == obj.caption()
    assert obj.color in obj.caption(2) and obj.shape in obj.caption(3)
