"""Prompts → input_ids on an exported folder's tokenizer files. Torch-free (runs in the lean venv too).

Parity with open_clip's own tokenizer is tested on the torch side: tests/export/test_tokenizer_parity.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest

from legrad_runtime.errors import ModelFolderError
from legrad_runtime.metadata import read_metadata
from legrad_runtime.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def cfg(model_folder):
    return read_metadata(model_folder).tokenizer


@pytest.fixture(scope="module")
def tok(model_folder, cfg) -> Tokenizer:
    return Tokenizer.from_folder(model_folder, cfg)


def _ids(row: np.ndarray) -> list[int]:
    return [int(i) for i in row if i != 0]


def test_ids_are_int64_with_one_row_of_context_length_per_prompt(tok, cfg):
    ids = tok(["a photo of a cat", "a dog", ""])
    assert ids.dtype == np.int64
    assert ids.shape == (3, cfg.context_length)
    assert tok([]).shape == (0, cfg.context_length)


def test_each_row_is_sot_then_words_then_eot_then_zero_padding(tok):
    row = tok(["a photo of a cat"])[0]
    n = len(_ids(row))
    assert row[0] == tok.sot_token_id
    assert row[n - 1] == tok.eot_token_id and tok.eot_token_id not in row[1 : n - 1]
    assert n == 7  # sot, a, photo, of, a, cat, eot: each is one token in CLIP's vocabulary
    assert not row[n:].any()


def test_an_empty_or_blank_prompt_is_just_sot_and_eot(tok):
    for row in tok(["", "  \t\n "]):
        assert _ids(row) == [tok.sot_token_id, tok.eot_token_id]


def test_a_long_prompt_is_truncated_to_context_length_with_eot_last(tok, cfg):
    row = tok([" ".join(["photo"] * 500)])[0]
    assert row[0] == tok.sot_token_id and row[-1] == tok.eot_token_id
    assert (row[1:-1] == row[1]).all() and row[1] != 0  # every other slot is the word 'photo'


def test_cleaning_lower_cases_collapses_whitespace_and_unescapes_html(tok, cfg):
    assert cfg.clean == "lower"
    ids = tok(["a photo of a cat", "  A\tPHOTO\n\nof a  CAT ", "a photo &amp;lt; of a cat"])
    np.testing.assert_array_equal(ids[0], ids[1])
    assert _ids(ids[2]) == _ids(tok(["a photo < of a cat"])[0])


def test_a_spelled_out_special_token_maps_to_its_id_as_in_open_clip(tok):
    assert _ids(tok(["a <end_of_text> b"])[0])[2] == tok.eot_token_id


def test_batch_encoding_equals_one_by_one_encoding(tok):
    prompts = ["a photo of a cat", "", "it's 3.14 &amp; café", "东京の夜 🌃", " ".join(["long"] * 200)]
    batch = tok(prompts)
    for prompt, row in zip(prompts, batch):
        np.testing.assert_array_equal(tok([prompt])[0], row)
    np.testing.assert_array_equal(tok(prompts[0]), batch[:1])  # a bare str is one prompt


def test_a_prompt_that_is_not_a_str_is_a_type_error(tok):
    with pytest.raises(TypeError, match="#1: int"):
        tok(["a cat", 3])


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_a_missing_tokenizer_file_is_a_model_folder_error_naming_it(model_folder, cfg, tmp_path, missing):
    shutil.copytree(model_folder / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / missing).unlink()
    with pytest.raises(ModelFolderError, match=missing):
        Tokenizer.from_folder(tmp_path, cfg)


def test_a_corrupt_vocab_is_a_model_folder_error(model_folder, cfg, tmp_path):
    shutil.copytree(model_folder / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFolderError, match="re-export"):
        Tokenizer.from_folder(tmp_path, cfg)


def test_unknown_kinds_and_cleaning_are_refused_with_a_model_folder_error(model_folder, cfg):
    with pytest.raises(ModelFolderError, match="'sentencepiece'.*not supported.*'clip-bpe', 'hf'"):
        load_tokenizer(model_folder, dataclasses.replace(cfg, kind="sentencepiece"))
    with pytest.raises(ModelFolderError, match="'shout'"):
        Tokenizer.from_folder(model_folder, dataclasses.replace(cfg, clean="shout"))


def test_importing_the_tokenizer_does_not_import_torch():
    code = "import sys, legrad_runtime.tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
