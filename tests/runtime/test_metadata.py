"""The metadata schema: round trip, validation, checksums. Torch-free (runs in the lean venv too)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from legrad_runtime.errors import ModelFolderError, SchemaVersionError
from legrad_runtime.metadata import (
    METADATA_FILE,
    SCHEMA_VERSION,
    FileEntry,
    HFSettings,
    ModelMetadata,
    PreprocessCfg,
    TokenizerCfg,
    Vocabulary,
    read_metadata,
    sha256_file,
    verify_files,
)


def _folder(tmp_path):
    """A fake folder: the files a model folder lists, with made-up bytes (the schema does not parse them)."""
    files = {}
    for rel, data in [
        ("legrad_image.onnx", b"\x08\x01graph"),
        ("text.onnx", b"\x08\x01text"),
        ("tokenizer/vocab.json", b"{}"),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        files[rel] = FileEntry(rel, sha256_file(tmp_path / rel), len(data))
    meta = ModelMetadata(
        model_name="ViT-B-16",
        pretrained="none",
        checkpoint_sha256=None,
        open_clip_version="3.3.0",
        exporter_version="0.1.0",
        torch_version="2.14.1",
        opset=20,
        image_size=448,
        patch_size=16,
        grid_size=28,
        num_layers=12,
        layers=(10, 11),
        width=768,
        heads=12,
        embed_dim=512,
        logit_scale=100.0,
        activation="gelu",
        preprocess=PreprocessCfg(448, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)),
        tokenizer=TokenizerCfg("clip-bpe", 77, ("tokenizer/vocab.json",)),
        files=files,
    )
    (tmp_path / METADATA_FILE).write_text(meta.to_json())
    return meta


def test_metadata_round_trips_through_json(tmp_path):
    meta = _folder(tmp_path)
    assert read_metadata(tmp_path) == meta
    verify_files(tmp_path, meta)
    assert "files" not in json.loads(meta.to_json(embedded=True))


def test_newer_schema_is_refused_with_upgrade_hint(tmp_path):
    _folder(tmp_path)
    data = json.loads((tmp_path / METADATA_FILE).read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match="upgrade legrad-onnx"):
        read_metadata(tmp_path)


def test_missing_fields_and_bad_json_are_named(tmp_path):
    _folder(tmp_path)
    data = json.loads((tmp_path / METADATA_FILE).read_text())
    del data["layers"], data["embed_dim"]
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="layers, embed_dim"):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        read_metadata(tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist"):
        read_metadata(tmp_path / "nowhere")


def test_altered_or_missing_files_are_reported_together(tmp_path):
    meta = _folder(tmp_path)
    (tmp_path / "legrad_image.onnx").write_bytes(b"\x08\x01graph!")
    (tmp_path / "text.onnx").unlink()
    with pytest.raises(ModelFolderError, match="legrad_image.onnx was altered.*text.onnx is missing"):
        verify_files(tmp_path, meta)


def test_bad_resize_mode_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="'crop'.*shortest"):
        PreprocessCfg(224, (0.5,) * 3, (0.5,) * 3, resize_mode="crop")


def test_importing_the_runtime_never_imports_torch():
    code = "import sys, legrad_runtime, legrad_runtime.metadata; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_vocabulary_forms_every_prompt_with_the_right_article():
    vocab = Vocabulary({"color": ("red", "orange"), "shape": ("circle", "cross")}, ("{a} {color} {shape}",))
    assert vocab.prompts() == ["a red circle", "a red cross", "an orange circle", "an orange cross"]


def test_vocabulary_rejects_a_template_with_an_unknown_slot():
    with pytest.raises(ValueError, match="size"):
        Vocabulary({"color": ("red",)}, ("{a} {size} {color} thing",))


def test_vocabulary_round_trips_and_v1_metadata_without_it_still_reads(tmp_path):
    meta = _folder(tmp_path)
    vocab = Vocabulary({"color": ("red",), "shape": ("circle", "square")}, ("{a} {color} {shape}", "{shape}"))
    with_vocab = dataclasses.replace(meta, vocabulary=vocab)
    (tmp_path / METADATA_FILE).write_text(with_vocab.to_json())
    assert read_metadata(tmp_path).vocabulary == vocab

    v1 = json.loads(meta.to_json())
    v1.pop("vocabulary")
    v1["schema_version"] = 1
    (tmp_path / METADATA_FILE).write_text(json.dumps(v1))
    assert read_metadata(tmp_path).vocabulary is None


def test_malformed_vocabulary_is_a_model_folder_error(tmp_path):
    data = json.loads(_folder(tmp_path).to_json())
    data["vocabulary"] = {"slots": {"color": []}, "templates": ["{color}"]}
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="vocabulary needs"):
        read_metadata(tmp_path)


def test_v2_metadata_without_hf_settings_still_reads(tmp_path):
    data = json.loads(_folder(tmp_path).to_json())
    data["schema_version"] = 2
    data["tokenizer"].pop("hf")
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    meta = read_metadata(tmp_path)
    assert meta.schema_version == 2 and meta.tokenizer.hf is None and meta.tokenizer.kind == "clip-bpe"


@pytest.mark.parametrize(
    "kind, hf, match",
    [
        ("hf", None, "tokenizer.hf' is required for kind 'hf'"),
        ("clip-bpe", {"pad_id": 0}, "tokenizer.hf' is for kind 'hf' only"),
        ("hf", {"pad_id": -1}, "tokenizer.hf.pad_id"),
        ("hf", {"pad_id": 0, "padding_side": "middle"}, "tokenizer.hf.padding_side"),
        ("hf", {"pad_id": 0, "strip_sep_id": "3"}, "tokenizer.hf.strip_sep_id"),
        ("hf", {"pad_id": 0, "pad_token": "<pad>"}, "pad_token"),
    ],
)
def test_hf_tokenizer_settings_are_validated(tmp_path, kind, hf, match):
    data = json.loads(_folder(tmp_path).to_json())
    data["tokenizer"] |= {"kind": kind, "hf": hf}
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match=match):
        read_metadata(tmp_path)


def test_hf_tokenizer_settings_round_trip(tmp_path):
    meta = _folder(tmp_path)
    hf = HFSettings(pad_id=1, padding_side="left", truncation_side="right", strip_sep_id=102)
    tok = dataclasses.replace(meta.tokenizer, kind="hf", files=("tokenizer/tokenizer.json",), hf=hf)
    (tmp_path / METADATA_FILE).write_text(dataclasses.replace(meta, tokenizer=tok).to_json())
    assert read_metadata(tmp_path).tokenizer == tok
