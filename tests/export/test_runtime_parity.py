"""Image files → runtime heatmaps against the PyTorch reference on open_clip's own preprocessing."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from legrad_export.load import load_openclip
from legrad_export.reference import legrad_reference
from legrad_runtime import load
from legrad_runtime.metadata import read_metadata

PROMPTS = ["a photo of a cat", "a remote control", "two dogs"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("parity_photos")
    paths = []
    for i, (w, h) in enumerate([(64, 64), (150, 90), (70, 130), (40, 41)]):
        path = folder / f"p{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("mode", ["squash", "shortest", "longest"])  # longest: the 80x48 folder
def test_runtime_heatmaps_equal_the_reference_on_the_same_files(model_folders, photos, mode):
    folder = model_folders[mode]
    meta = read_metadata(folder)
    loaded = load_openclip(meta.model_name)  # the local-dir tiny model the folder was exported from
    pre = meta.preprocess
    transform = open_clip.image_transform(
        pre.size,
        is_train=False,
        mean=pre.mean,
        std=pre.std,
        resize_mode=mode,
        interpolation=pre.interpolation,
    )
    pixels = torch.stack([transform(Image.open(p)) for p in photos])
    tokenizer = open_clip.get_tokenizer(meta.model_name)
    with torch.no_grad():
        text = loaded.model.encode_text(tokenizer(PROMPTS), normalize=True)
    ref = legrad_reference(loaded.model, pixels, text, list(meta.layers))

    result = load(folder, device="cpu").explain(photos, PROMPTS)
    assert result.heatmaps.shape == (4, 3, *pre.size)
    assert np.abs(result.heatmaps - ref.heatmaps.numpy()).max() <= 1e-4
    assert np.abs(result.layer_maps - ref.layer_maps.numpy()).max() <= 1e-4
    assert np.abs(result.image_embeds - ref.image_embeds.numpy()).max() <= 1e-4
    assert np.abs(result.text_embeds - text.numpy()).max() <= 1e-5
