"""The metadata schema: round trip, validation, checksums. Torch-free (runs in the lean venv too)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest

from legrad_runtime.errors import ModelFolderError, SchemaVersionError
from legrad_runtime.metadata import (
    METADATA_FILE,
    SCHEMA_VERSION,
    CorrectionCfg,
    FileEntry,
    HFSettings,
    ModelMetadata,
    PreprocessCfg,
    TokenizerCfg,
    TowerCfg,
    Vocabulary,
    as_size,
    format_size,
    parse_size,
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
    with pytest.raises(ValueError, match="'crop'.*shortest.*longest"):
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


# ---------------------------------------------------------------- v3: the tower, the correction, the bias


def _siglip(meta: ModelMetadata) -> ModelMetadata:
    """A SigLIP-like model (224 px, patch 16: a 14×14 grid) made from the fake folder's metadata."""
    return dataclasses.replace(
        meta,
        model_name="ViT-B-16-SigLIP",
        image_size=224,
        grid_size=14,
        activation="gelu_tanh",
        preprocess=PreprocessCfg(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        tower=TowerCfg(family="timm_vit", head="map", prefix_tokens=0, grid=(14, 14)),
        correction=CorrectionCfg(enabled=True, prompt="a photo of a", threshold=0.8),
        logit_bias=-10.0,
    )


CLIP_TOWER_28 = TowerCfg("openclip_vit", "token_mean", 1, (28, 28))  # the fake folder's grid is 28


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_folder_without_the_tower_fields_reads_as_an_openclip_vit(tmp_path, version):
    data = json.loads(_folder(tmp_path).to_json())
    for name in ("tower", "correction", "logit_bias"):
        data.pop(name)
    if version < 3:
        data["tokenizer"].pop("hf")
    if version < 2:
        data.pop("vocabulary")
    data["schema_version"] = version
    data["image_size"], data["grid_size"], data["preprocess"]["size"] = 448, 28, 448  # before v4: squares
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    meta = read_metadata(tmp_path)
    assert meta.tower == CLIP_TOWER_28
    assert meta.correction is None and meta.logit_bias is None and meta.schema_version == version


def test_metadata_built_without_a_tower_gets_the_openclip_default(tmp_path):
    meta = _folder(tmp_path)  # built without tower=
    assert meta.tower == CLIP_TOWER_28
    assert json.loads(meta.to_json())["tower"] == {
        "family": "openclip_vit",
        "head": "token_mean",
        "prefix_tokens": 1,
        "grid": [28, 28],
    }


def test_a_siglip_tower_round_trips_through_json(tmp_path):
    meta = _siglip(_folder(tmp_path))
    text = meta.to_json()
    data = json.loads(text)
    assert data["tower"] == {"family": "timm_vit", "head": "map", "prefix_tokens": 0, "grid": [14, 14]}
    assert data["correction"] == {"enabled": True, "prompt": "a photo of a", "threshold": 0.8}
    assert data["logit_bias"] == -10.0 and data["activation"] == "gelu_tanh"
    assert ModelMetadata.from_dict(data) == meta
    (tmp_path / METADATA_FILE).write_text(text)
    read = read_metadata(tmp_path)
    assert read == meta and read.tower.grid == (14, 14) and read.correction.threshold == 0.8
    assert "correction" in json.loads(meta.to_json(embedded=True))  # in the ONNX files' copy too


def test_correction_defaults_and_a_threshold_of_one(tmp_path):
    data = json.loads(_siglip(_folder(tmp_path)).to_json())
    data["correction"] = {"enabled": False}
    assert ModelMetadata.from_dict(data).correction == CorrectionCfg(False, "a photo of a", 0.8)
    data["correction"] = {"enabled": True, "threshold": 1}
    assert ModelMetadata.from_dict(data).correction.threshold == 1.0


def _set(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("tower.family", "vit_huge", "tower.family"),
        ("tower.family", 1, "tower.family"),
        ("tower.head", "cls", "tower.head"),
        ("tower.prefix_tokens", 2, "tower.prefix_tokens"),
        ("tower.prefix_tokens", -1, "tower.prefix_tokens"),
        ("tower.prefix_tokens", True, "tower.prefix_tokens"),
        ("tower.grid", [14, 15], "tower.grid"),
        ("tower.grid", [28, 28], "tower.grid"),
        ("tower.grid", [14], "tower.grid"),
        ("tower.grid", [14, 14, 14], "tower.grid"),
        ("tower.grid", "14x14", "tower.grid"),
        ("tower.pool", "avg", "tower.pool"),
        ("tower", [], "tower"),
        ("correction.threshold", 0, "correction.threshold"),
        ("correction.threshold", 1.5, "correction.threshold"),
        ("correction.threshold", -0.5, "correction.threshold"),
        ("correction.threshold", "0.8", "correction.threshold"),
        ("correction.enabled", "yes", "correction.enabled"),
        ("correction.enabled", 1, "correction.enabled"),
        ("correction.prompt", "", "correction.prompt"),
        ("correction.prompt", 3, "correction.prompt"),
        ("correction", True, "correction"),
        ("logit_bias", math.nan, "logit_bias"),
        ("logit_bias", math.inf, "logit_bias"),
        ("logit_bias", -math.inf, "logit_bias"),
        ("logit_bias", "-10", "logit_bias"),
        ("logit_bias", False, "logit_bias"),
        ("activation", "gelu_fast", "activation"),
    ],
)
def test_bad_tower_fields_are_model_folder_errors_naming_the_field(tmp_path, path, value, field):
    data = json.loads(_siglip(_folder(tmp_path)).to_json())
    _set(data, path, value)
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ModelFolderError, match=f"field {re.escape(repr(field))}"):
        read_metadata(tmp_path)


def test_a_tower_grid_error_names_the_grid_size_it_must_equal(tmp_path):
    data = json.loads(_siglip(_folder(tmp_path)).to_json())
    data["tower"]["grid"] = [14, 16]
    with pytest.raises(
        ModelFolderError, match=r"'tower.grid' must equal grid_size \[14, 14\], got \[14, 16\]"
    ):
        ModelMetadata.from_dict(data)


def test_a_correction_on_a_token_mean_tower_is_refused(tmp_path):
    data = json.loads(_siglip(_folder(tmp_path)).to_json())
    data["tower"] |= {"head": "token_mean", "prefix_tokens": 1}
    with pytest.raises(ModelFolderError, match="field 'correction' is for towers with head 'map'"):
        ModelMetadata.from_dict(data)
    data["correction"] = None
    assert ModelMetadata.from_dict(data).tower.head == "token_mean"


def test_tower_and_correction_check_their_own_values():
    with pytest.raises(ValueError, match="'vit_huge'"):
        TowerCfg("vit_huge", "map", 0, (14, 14))
    with pytest.raises(ValueError, match="prefix_tokens"):
        TowerCfg("timm_vit", "map", 2, (14, 14))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        CorrectionCfg(True, "a photo of a", 0.0)


# ---------------------------------------------------------------- v4: (height, width) sizes


def _non_square(meta: ModelMetadata) -> ModelMetadata:
    """The fake folder's model at 448 wide, 336 high (patch 16: 21 rows × 28 columns), letterboxed."""
    return dataclasses.replace(
        meta,
        image_size=(336, 448),
        grid_size=(21, 28),
        preprocess=PreprocessCfg((336, 448), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), resize_mode="longest"),
        tower=TowerCfg("openclip_vit", "token_mean", 1, (21, 28)),
    )


def test_a_non_square_size_round_trips_as_height_width_lists(tmp_path):
    meta = _non_square(_folder(tmp_path))
    data = json.loads(meta.to_json())
    assert data["schema_version"] == SCHEMA_VERSION == 4
    assert data["image_size"] == data["preprocess"]["size"] == [336, 448]
    assert data["grid_size"] == data["tower"]["grid"] == [21, 28]
    assert data["preprocess"]["resize_mode"] == "longest"
    (tmp_path / METADATA_FILE).write_text(meta.to_json())
    read = read_metadata(tmp_path)
    assert read == meta and read.image_size == (336, 448) and read.grid_size == (21, 28)


def test_integer_sizes_are_squares_in_every_schema_version(tmp_path):
    data = json.loads(_folder(tmp_path).to_json())
    data["image_size"], data["grid_size"], data["preprocess"]["size"] = 448, 28, 448
    data["tower"]["grid"] = [28, 28]
    for version in (3, 4):
        data["schema_version"] = version
        meta = ModelMetadata.from_dict(data)
        assert (meta.image_size, meta.grid_size, meta.preprocess.size) == ((448, 448), (28, 28), (448, 448))
    built = dataclasses.replace(_folder(tmp_path), image_size=224, grid_size=14)
    assert (built.image_size, built.grid_size) == ((224, 224), (14, 14))


def test_the_patch_embedding_floors_each_side(tmp_path):
    data = json.loads(_non_square(_folder(tmp_path)).to_json())
    data["image_size"] = data["preprocess"]["size"] = [336 + 15, 448 + 15]  # 351 // 16 = 21, 463 // 16 = 28
    assert ModelMetadata.from_dict(data).grid_size == (21, 28)


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("grid_size", [21, 27], "grid_size"),  # the width's side disagrees
        ("grid_size", [28, 21], "grid_size"),  # (width, height): the wrong order
        ("grid_size", 21, "grid_size"),  # an integer is a square
        ("grid_size", [21, 28, 1], "grid_size"),
        ("image_size", [448, 336], "grid_size"),  # rows and columns swapped: the grid no longer agrees
        ("image_size", [336, 0], "image_size"),
        ("image_size", [336.0, 448], "image_size"),
        ("image_size", {"height": 336, "width": 448}, "image_size"),
        ("preprocess.size", [448, 336], "preprocess.size"),
        ("preprocess.size", 336, "preprocess.size"),
        ("preprocess.size", [336, False], "preprocess.size"),
        ("tower.grid", [28, 21], "tower.grid"),  # must equal grid_size, rows first
        ("tower.grid", [21, 21], "tower.grid"),
    ],
)
def test_a_size_that_disagrees_per_side_is_refused_naming_the_field(tmp_path, path, value, field):
    data = json.loads(_non_square(_folder(tmp_path)).to_json())
    _set(data, path, value)
    with pytest.raises(ModelFolderError, match=f"field {re.escape(repr(field))}"):
        ModelMetadata.from_dict(data)


def test_preprocess_sizes_are_height_width_and_ints_are_squares():
    assert PreprocessCfg(224, (0.5,) * 3, (0.5,) * 3).size == (224, 224)
    assert PreprocessCfg((48, 80), (0.5,) * 3, (0.5,) * 3, resize_mode="longest").size == (48, 80)
    assert PreprocessCfg([48, 80], (0.5,) * 3, (0.5,) * 3).size == (48, 80)
    for bad in (0, (48, 0), (48,), (48, 80, 3), (48.0, 80), "48x80", True):
        with pytest.raises(ValueError):
            PreprocessCfg(bad, (0.5,) * 3, (0.5,) * 3)


def test_sizes_are_written_width_by_height_and_parsed_back():
    assert as_size(224) == (224, 224) and as_size((336, 448)) == (336, 448)
    assert format_size((448, 448)) == "448" and format_size((336, 448)) == "448x336"
    assert parse_size("448") == (448, 448) and parse_size("448x336") == (336, 448)
    assert parse_size(" 448×336 ") == (336, 448) and parse_size("80X48") == (48, 80)
    for size in [(1, 1), (48, 80), (80, 48), (336, 448)]:
        assert parse_size(format_size(size)) == size
    for bad in ("", "0", "448x", "x336", "448x336x3", "-4", "4.5", "448 x 336 px"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_size(bad)
    for bad in (True, 4.0, "448", (448,), (448, 336.0)):
        with pytest.raises(ValueError):
            as_size(bad)
