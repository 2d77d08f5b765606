"""A local model folder's legrad_defaults.json: its layer set and vocabulary reach the export."""

from __future__ import annotations

import json

import pytest

from legrad_export.load import DEFAULTS_FILE, default_layer_spec, load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import read_metadata
from tiny_models import save_tiny_model_dir

VOCAB = {"slots": {"color": ["red", "orange"], "shape": ["circle"]}, "templates": ["{a} {color} {shape}"]}


def test_recommended_layers_and_vocabulary_reach_the_model_folder(tmp_path):
    source = save_tiny_model_dir(tmp_path, "b16_like")
    (source / DEFAULTS_FILE).write_text(json.dumps({"layers": "all", "vocabulary": VOCAB}))
    loaded = load_openclip(str(source))
    assert default_layer_spec(loaded) == "all"

    meta = read_metadata(export_model(loaded, tmp_path / "out", ExportSettings(verify=False)))
    assert meta.layers == tuple(range(loaded.vit.num_layers))
    assert meta.vocabulary.prompts() == ["a red circle", "an orange circle"]

    explicit = export_model(loaded, tmp_path / "out2", ExportSettings(layers="-1", verify=False))
    assert read_metadata(explicit).layers == (loaded.vit.num_layers - 1,)


def test_without_defaults_the_last_two_layers_and_no_vocabulary(tmp_path):
    loaded = load_openclip(str(save_tiny_model_dir(tmp_path, "b16_like")))
    assert default_layer_spec(loaded) == "-2"
    meta = read_metadata(export_model(loaded, tmp_path / "out", ExportSettings(verify=False)))
    assert meta.layers == (loaded.vit.num_layers - 2, loaded.vit.num_layers - 1)
    assert meta.vocabulary is None


def test_a_malformed_defaults_file_is_named_in_the_error(tmp_path):
    source = save_tiny_model_dir(tmp_path, "b16_like")
    (source / DEFAULTS_FILE).write_text('{"vocabulary": {"slots": {}}}')
    with pytest.raises(ExportError, match=DEFAULTS_FILE):
        load_openclip(str(source))
