"""Hugging Face tokenizers in the torch-free runtime: open_clip's ids, and a model folder that uses one.

The expected ids were computed by open_clip's HFTokenizer when the cases were written (in the lean
CI venv: earlier in the same run, by `tests/tiny_models.py`), so this runs without torch or
transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from legrad_runtime import load
from legrad_runtime.errors import ModelFolderError
from legrad_runtime.metadata import HFSettings, TokenizerCfg
from legrad_runtime.tokenizer import HFTextTokenizer, load_tokenizer
from prompt_corpus import mismatches


def _cfg(folder) -> TokenizerCfg:
    data = json.loads((folder / "cfg.json").read_text())
    data["files"], data["hf"] = tuple(data["files"]), HFSettings(**data["hf"])
    return TokenizerCfg(**data)


@pytest.mark.parametrize("kind", ["unigram", "wordpiece", "bpe"])
def test_ids_equal_open_clips_hf_tokenizer(hf_tokenizer_cases, kind):
    folder = hf_tokenizer_cases / kind
    expected = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(folder, _cfg(folder))
    assert isinstance(tok, HFTextTokenizer)
    got, ref = tok(expected["prompts"]), np.array(expected["ids"], dtype=np.int64)
    assert np.array_equal(got, ref), mismatches(expected["prompts"], got, ref)


def test_a_model_folder_with_an_hf_tokenizer_explains_prompts(model_folders):
    model = load(model_folders["hf"])
    assert model.metadata.tokenizer.kind == "hf"
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    both = model.explain(image, ["a red circle", "a blue square"])
    alone = model.explain(image, ["a blue square"])
    assert both.heatmaps.shape[-3] == 2
    np.testing.assert_allclose(both.heatmaps[..., 1, :, :], alone.heatmaps[..., 0, :, :], atol=1e-5)
    assert np.isfinite(both.heatmaps).all() and both.heatmaps.max() > 0


def test_a_corrupt_tokenizer_json_is_a_model_folder_error(hf_tokenizer_cases, tmp_path):
    cfg = _cfg(hf_tokenizer_cases / "unigram")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(ModelFolderError, match="unreadable tokenizer.json"):
        load_tokenizer(tmp_path, cfg)


def test_a_pad_id_outside_the_vocabulary_is_a_model_folder_error(hf_tokenizer_cases):
    folder = hf_tokenizer_cases / "unigram"
    cfg = _cfg(folder)
    bad = TokenizerCfg(cfg.kind, cfg.context_length, cfg.files, cfg.clean, HFSettings(pad_id=10**6))
    with pytest.raises(ModelFolderError, match="pad id 1000000 is outside its vocabulary"):
        load_tokenizer(folder, bad)
