"""Model folders as a stranger may hand them over: paths that leave, swapped files, wrong types.

Every case must end in one ModelFolderError naming the problem, read nothing outside the folder,
and never reveal whether a file outside exists. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile import copy_folder, edit_metadata
from legrad_runtime import ModelFolderError, SchemaVersionError, load
from legrad_runtime.metadata import METADATA_FILE, read_metadata, verify_files

VOCAB = "tokenizer/vocab.json"


@pytest.fixture
def folder(model_folder, tmp_path) -> Path:
    return copy_folder(model_folder, tmp_path / "model")


def _refused(folder: Path, match: str, **kwargs) -> str:
    with pytest.raises(ModelFolderError, match=match) as info:
        load(folder, device="cpu", **kwargs)
    return str(info.value)


def test_the_untouched_copy_loads(folder):
    assert min(load(folder, device="cpu").metadata.image_size) > 0


def test_tokenizer_files_outside_the_folder_are_refused(folder, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(folder / "tokenizer", evil)
    edit_metadata(
        folder, lambda d: d["tokenizer"].update(files=[str(evil / "vocab.json"), "tokenizer/merges.txt"])
    )
    _refused(folder, "not a relative '/'-separated path")
    _refused(folder, "not a relative", verify=False)  # containment holds without checksums too


def test_a_swapped_vocabulary_is_caught_by_its_checksum(folder):
    vocab = json.loads((folder / VOCAB).read_text())
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    (folder / VOCAB).write_text(json.dumps(vocab))
    _refused(folder, f"{VOCAB} was altered")


def test_a_tokenizer_file_missing_from_the_checksums_is_refused(folder):
    edit_metadata(folder, lambda d: d["files"].pop(VOCAB))
    _refused(folder, f"{VOCAB} is not checksummed")


@pytest.mark.parametrize(
    "path", ["../../../../etc/passwd", "/etc/passwd", "tokenizer/../../x", "a\\b", "C:/x"]
)
def test_file_entries_that_leave_the_folder_are_refused_without_touching_them(folder, path):
    messages = []
    for name in (path, path + "-nowhere"):  # /etc/passwd exists, /etc/passwd-nowhere does not
        entry = {name: {"path": name, "sha256": "0" * 64, "size_bytes": 1}}
        edit_metadata(folder, lambda d, entry=entry: d.update(files=entry))
        messages.append(_refused(folder, "must stay in the folder|not a relative").replace(repr(name), "P"))
    assert messages[0] == messages[1]  # the same words whether the target exists or not


def test_an_empty_files_list_does_not_turn_verification_off(folder):
    edit_metadata(folder, lambda d: d.update(files={}))
    message = _refused(folder, "legrad_image.onnx is not checksummed")
    assert "text.onnx is not checksummed" in message


def test_a_symlink_that_leaves_the_folder_is_refused_even_with_matching_bytes(folder, tmp_path):
    outside = tmp_path / "outside-vocab.json"
    shutil.copy(folder / VOCAB, outside)
    (folder / VOCAB).unlink()
    os.symlink(outside, folder / VOCAB)
    _refused(folder, "symlink that leads outside")
    _refused(folder, "symlink that leads outside", verify=False)


def test_a_symlink_inside_the_folder_is_fine(folder):
    shutil.move(folder / VOCAB, folder / "tokenizer" / "real-vocab.json")
    os.symlink("real-vocab.json", folder / VOCAB)
    edit_metadata(folder, lambda d: d["files"].__setitem__("tokenizer/real-vocab.json", {
        **d["files"][VOCAB], "path": "tokenizer/real-vocab.json"}))  # fmt: skip
    assert load(folder, device="cpu").tokenizer(["a cat"]).shape[0] == 1


def test_files_the_list_does_not_name_are_refused_unless_verification_is_off(folder):
    (folder / "legrad_image.onnx.data").write_bytes(b"\0" * 64)  # external data a graph could point at
    _refused(folder, "legrad_image.onnx.data is not listed")
    assert min(load(folder, device="cpu", verify=False).metadata.image_size) > 0


def test_metadata_that_is_a_fifo_or_a_symlink_outside_is_refused_without_blocking(folder, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(folder / METADATA_FILE, outside)
    os.symlink(outside, folder / METADATA_FILE)
    with pytest.raises(ModelFolderError, match="not valid JSON.*symlink that leads outside"):
        read_metadata(folder)
    (folder / METADATA_FILE).unlink()
    os.mkfifo(folder / METADATA_FILE)
    with pytest.raises(ModelFolderError, match="is a FIFO"):
        read_metadata(folder)


BAD_VALUES = [
    ("files", ["a"], "'files' must be a JSON object"),
    ("extra", [1], "'extra' must be a JSON object"),
    ("image_size", "64", r"'image_size' must be an integer or \[height, width\]"),
    ("image_size", 0, r"'image_size' must be an integer or \[height, width\], each in"),
    ("image_size", [64], r"'image_size' must be an integer or \[height, width\]"),
    ("image_size", [64, 64, 64], r"'image_size' must be an integer or \[height, width\]"),
    ("image_size", [64, "64"], r"'image_size' must be an integer or \[height, width\]"),
    ("image_size", [64, True], r"'image_size' must be an integer or \[height, width\]"),
    ("grid_size", [4, 5], "'grid_size' must be image_size // patch_size per side"),
    ("preprocess.size", [64, 80], "'preprocess.size' must equal image_size"),
    ("preprocess.resize_mode", "crop", "'preprocess.resize_mode' must be one of shortest, squash, longest"),
    ("preprocess.std", [0, 0, 0], "'preprocess.std' must be a list of 3 positive"),
    ("preprocess.mean", [0.5, 0.5], "'preprocess.mean' must be a list of 3"),
    ("tokenizer.context_length", 0, "'tokenizer.context_length' must be an integer in"),
    ("tokenizer.context_length", 1, "'tokenizer.context_length' must be an integer in"),
    ("tokenizer.context_length", 1000, "'tokenizer.context_length' = 1000 disagrees with text.onnx"),
    ("schema_version", True, "'schema_version' must be a positive integer"),
    ("schema_version", 0, "'schema_version' must be a positive integer"),
    ("schema_version", -5, "'schema_version' must be a positive integer"),
    ("logit_scale", math.nan, "'logit_scale' must be a positive finite number"),
    ("logit_scale", "100", "'logit_scale' must be a positive finite number"),
    ("embed_dim", 33, "'embed_dim' = 33 disagrees with legrad_image.onnx"),
    ("layers", [0, 0], "'layers' must not repeat"),
    ("layers", [99], "'layers' must be a list of 1 to"),
    ("heads", 3, "'heads' must divide width"),
    ("activation", "relu", "'activation' must be one of gelu, quick_gelu"),
    ("model_name", 7, "'model_name' must be a string"),
    ("tokenizer.files", "vocab.json", "'tokenizer.files' must be a list"),
    ("surprise", 1, "'surprise' is not a known field"),
]


def _set(data: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for part in parents:
        data = data[part]
    data[key] = value


@pytest.mark.parametrize("field, value, match", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_wrongly_typed_or_disagreeing_metadata_is_one_error_naming_the_field(folder, field, value, match):
    edit_metadata(folder, lambda d: _set(d, field, value))
    _refused(folder, match)


def test_a_grid_that_disagrees_with_the_graph_is_named(folder):
    meta = read_metadata(folder)
    patch = meta.patch_size // 2  # still patch × grid = size, but not what the graph computes
    grid = [side // patch for side in meta.image_size]

    def edit(d):
        d.update(patch_size=patch, grid_size=grid)
        if d.get("tower") is not None:  # v3: the tower's grid agrees with grid_size, or is refused first
            d["tower"]["grid"] = grid

    edit_metadata(folder, edit)
    _refused(folder, "'grid_size' = .* disagrees with legrad_image.onnx")


def test_a_non_square_size_that_disagrees_with_the_graph_is_named(folder):
    meta = read_metadata(folder)
    height, width = meta.image_size[0], meta.image_size[1] + meta.patch_size  # a column of patches more
    grid = [height // meta.patch_size, width // meta.patch_size]

    def edit(d):
        d.update(image_size=[height, width], grid_size=grid)
        d["preprocess"]["size"] = [height, width]
        if d.get("tower") is not None:
            d["tower"]["grid"] = grid

    edit_metadata(folder, edit)
    _refused(folder, rf"'image_size' = \[{height}, {width}\] disagrees with legrad_image.onnx")


def test_a_tower_grid_that_disagrees_with_grid_size_is_named(folder):
    tower = read_metadata(folder).tower
    wrong = {"family": tower.family, "head": tower.head, "prefix_tokens": tower.prefix_tokens, "grid": [4, 5]}
    edit_metadata(folder, lambda d: d.update(tower=wrong))
    _refused(folder, "field 'tower.grid' must equal")


def test_newer_schema_stays_a_schema_version_error(folder):
    edit_metadata(folder, lambda d: d.update(schema_version=99))
    with pytest.raises(SchemaVersionError):
        load(folder)


def test_verify_files_checks_the_layout_too(folder):
    (folder / "stray.bin").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="stray.bin is not listed"):
        verify_files(folder, read_metadata(folder))


def test_loading_and_explaining_read_nothing_outside_the_model_folder_and_the_image(folder, tmp_path):
    """Python's audit hook sees every file Python opens; onnxruntime gets the graphs as bytes."""
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(image)
    script = textwrap.dedent(
        """
        import json, os, sys
        from legrad_runtime import load
        folder, image = sys.argv[1], sys.argv[2]
        load(folder).explain([image], ["a cat"]).overlay(0, 0)  # warm-up: lazy imports happen here
        opened = []

        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                opened.append(os.path.realpath(os.fsdecode(args[0])))

        sys.addaudithook(hook)
        result = load(folder).explain([image], ["a cat", "a dog"])
        result.overlay(0, 1), result.layer_figure(0, 0), result.grid()
        print(json.dumps(opened))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(image)], capture_output=True, text=True, timeout=120
    )
    opened = json.loads(run.stdout)
    root = os.path.realpath(folder)
    assert os.path.join(root, "legrad_image.onnx") in opened  # the hook does see our reads
    stray = [p for p in opened if not (p.startswith(root + os.sep) or p == os.path.realpath(image))]
    assert stray == []
