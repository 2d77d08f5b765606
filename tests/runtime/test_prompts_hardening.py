"""Prompts and embeddings that used to pass and give wrong or blank maps, and the layer figure's crop.
Torch-free."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import legrad_runtime.session as session
from legrad_runtime import ImageInputError, PromptError, load


@pytest.fixture(scope="module")
def model(model_folder):
    return load(model_folder, device="cpu")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(2).random((40, 56, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("prompt", ["\0\0\0", "   ", "\t\n", "\u200b\u200b", "\x1b\x07"])
def test_prompts_of_nothing_but_spaces_or_control_characters_are_empty(model, image, prompt):
    with pytest.raises(PromptError, match="prompt #0 is empty"):
        model.explain(image, [prompt])


def test_a_megabyte_prompt_is_refused(model, image):
    with pytest.raises(PromptError, match="1,000,000 characters long"):
        model.explain(image, ["x" * 1_000_000])


def test_neither_prompts_nor_embeddings_says_so(model, image):
    with pytest.raises(PromptError, match="no prompts given"):
        model.explain(image, None)
    with pytest.raises(PromptError, match="not both"):
        model.explain(image, ["a cat"], text_embeds=np.ones((1, model.metadata.embed_dim)))


@pytest.mark.parametrize("scale", [1e30, 1e39, 1e300, 1e-30])
def test_huge_or_tiny_embeddings_give_the_maps_of_their_direction(model, image, scale):
    rng = np.random.default_rng(3)
    direction = rng.normal(size=(2, model.metadata.embed_dim))
    unit = (direction / np.linalg.norm(direction, axis=1, keepdims=True)).astype(np.float32)
    want = model.explain(image, text_embeds=unit)
    got = model.explain(image, text_embeds=direction * scale)
    assert got.heatmaps.max() > 0  # not blank
    np.testing.assert_allclose(got.heatmaps, want.heatmaps, atol=1e-5)
    np.testing.assert_allclose(got.text_embeds, unit, atol=1e-6)


def test_non_numeric_embeddings_are_a_prompt_error(model, image):
    with pytest.raises(PromptError, match="not a numeric array"):
        model.explain(image, text_embeds=[["a"] * model.metadata.embed_dim])


@pytest.mark.parametrize("source, match", [("", "is an empty path"), (".", "is a directory")])
def test_empty_and_dot_paths_get_their_own_words(model, source, match):
    with pytest.raises(ImageInputError, match=match):
        model.explain(source, ["a cat"])


def test_the_layer_figure_of_a_centre_cropped_model_shows_the_crop(model_folders, monkeypatch):
    """A 2:1 image with red outer quarters and a blue middle: 'shortest' sees only the blue."""
    model = load(model_folders["shortest"], device="cpu")
    size = model.metadata.image_size[0]  # a square: (size, size)
    assert model.metadata.image_size == (size, size)
    array = np.zeros((100, 200, 3), np.uint8)
    array[:, :50], array[:, 150:], array[:, 50:150] = (255, 0, 0), (255, 0, 0), (0, 0, 255)
    picture = Image.fromarray(array)
    seen = {}
    monkeypatch.setattr(session, "layer_figure", lambda square, *a, **k: seen.setdefault("square", square))
    model.explain(picture, ["a cat"]).layer_figure(0, 0)
    square = np.asarray(seen["square"].convert("RGB")).astype(int)
    assert square.shape == (size, size, 3)
    # open_clip's steps by hand: shorter side to `size` (200x100 -> 2·size x size), then the centre
    expected = picture.resize((2 * size, size), Image.Resampling.BICUBIC).crop(
        (size // 2, 0, 3 * size // 2, size)
    )
    assert np.array_equal(square, np.asarray(expected).astype(int))
    assert (square[..., 0] > 128).sum() == 0  # no red: nothing outside the crop was squashed in
