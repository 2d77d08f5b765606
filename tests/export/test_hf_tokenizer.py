"""Hugging Face tokenizers end to end: the torch-free runtime's ids equal open_clip's HFTokenizer.

The tokenizers are small ones trained here (tests/hf_tokenizers.py), in the three families open_clip
uses (SigLIP's Unigram, BERT's WordPiece with `strip_sep_token`, RoBERTa's byte-level BPE), saved
inside tiny `local-dir:` models, so the oracle is open_clip's own `get_tokenizer` on that folder.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_tokenizers import KINDS
from legrad_export.cli import main
from legrad_export.load import load_openclip
from legrad_export.text_tokenizer import write_tokenizer
from legrad_runtime import load
from legrad_runtime.metadata import SCHEMA_VERSION, read_metadata
from legrad_runtime.tokenizer import HFTextTokenizer, load_tokenizer
from prompt_corpus import CORPUS, mismatches, random_prompts
from tiny_models import HF_TEXT_CLEAN, save_tiny_hf_text_encoder_model, save_tiny_hf_text_model


@pytest.fixture(scope="module", params=KINDS)
def hf_model(request, tmp_path_factory):
    kind = request.param
    return kind, save_tiny_hf_text_model(tmp_path_factory.mktemp(kind), kind)


def _written(loaded, tmp_path):
    cfg = write_tokenizer(
        SimpleNamespace(tokenizer=loaded.tokenizer, context_length=loaded.context_length), tmp_path
    )
    return cfg, load_tokenizer(tmp_path, cfg)


def test_ids_equal_open_clips_hf_tokenizer_on_the_corpus_and_random_prompts(hf_model, tmp_path):
    kind, source = hf_model
    loaded = load_openclip(str(source))
    cfg, ours = _written(loaded, tmp_path)
    assert isinstance(ours, HFTextTokenizer) and cfg.kind == "hf" and cfg.clean == HF_TEXT_CLEAN[kind]
    prompts = CORPUS + random_prompts(1000, seed=2)
    got, ref = ours(prompts), loaded.tokenizer(prompts).numpy()
    assert got.dtype == np.int64 and got.shape == ref.shape == (len(prompts), 16)
    assert np.array_equal(got, ref), mismatches(prompts, got, ref)
    pad = loaded.tokenizer.tokenizer.pad_token_id
    used = (ref != pad).sum(axis=1)
    assert used.min() < 8 and used.max() >= 15  # the corpus pads and truncates (a stripped SEP is 0)


def test_strip_sep_token_is_recorded_and_applied(tmp_path):
    source = save_tiny_hf_text_model(tmp_path, "wordpiece")
    loaded = load_openclip(str(source))
    cfg, ours = _written(loaded, tmp_path / "out")
    sep = loaded.tokenizer.tokenizer.sep_token_id
    assert cfg.hf.strip_sep_id == sep
    unstripped = loaded.tokenizer.tokenizer(["a red circle"], padding="max_length", max_length=16).input_ids
    assert sep in unstripped[0] and sep not in ours(["a red circle"])[0]


def test_an_exported_folder_embeds_prompts_as_open_clip_does(hf_model, tmp_path, capsys):
    kind, source = hf_model
    assert main(["--model", str(source), "--out", str(tmp_path)]) == 0
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    meta = read_metadata(folder)
    assert meta.schema_version == SCHEMA_VERSION and meta.tokenizer.kind == "hf"
    assert meta.tokenizer.files == ("tokenizer/tokenizer.json",)
    model = load(folder)
    prompts = [p for p in CORPUS if p.strip()][:24]
    loaded = load_openclip(str(source))
    with torch.no_grad():
        ref = loaded.model.encode_text(loaded.tokenizer(prompts), normalize=True).numpy()
    np.testing.assert_allclose(model.embed_text(prompts), ref, atol=1e-5)


def test_a_model_with_a_hugging_face_text_encoder_exports_and_embeds_as_open_clip(tmp_path, capsys):
    source = save_tiny_hf_text_encoder_model(tmp_path)  # as roberta-ViT-B-32, in miniature
    loaded = load_openclip(str(source))
    assert type(loaded.model.text).__name__ == "HFTextEncoder"
    assert main(["--model", str(source), "--out", str(tmp_path / "out")]) == 0
    model = load(next((tmp_path / "out").iterdir()))
    prompts = [p for p in CORPUS if p.strip()][:24]
    with torch.no_grad():
        ref = loaded.model.encode_text(loaded.tokenizer(prompts), normalize=True).numpy()
    np.testing.assert_allclose(model.embed_text(prompts), ref, atol=1e-5)


def test_offline_without_the_tokenizer_the_export_says_to_pass_it(tmp_path, capsys):
    source = save_tiny_hf_text_model(tmp_path, "unigram", with_tokenizer=False)
    assert main(["--model", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    line = [ln for ln in err if ln.startswith("legrad-export: error:")][0]
    assert "Hugging Face tokenizer 'tiny-unigram'" in line and "pass --tokenizer PATH" in line


@pytest.mark.parametrize("given", ["folder", "tokenizer.json with a pad token"])
def test_tokenizer_path_supplies_it(tmp_path, given):
    tokenizer_home = save_tiny_hf_text_model(tmp_path / "with", "bpe")
    source = save_tiny_hf_text_model(tmp_path / "without", "bpe", with_tokenizer=False)
    if given == "folder":
        path = tmp_path / "tok"
        path.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_home / name, path / name)
    else:  # a bare tokenizer.json whose padding names the pad token (transformers takes it from there)
        data = json.loads((tokenizer_home / "tokenizer.json").read_text())
        data["padding"] = {
            "strategy": "BatchLongest",
            "direction": "Right",
            "pad_to_multiple_of": None,
            "pad_id": 1,
            "pad_type_id": 0,
            "pad_token": "<pad>",
        }
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(data))
    reference = load_openclip(str(tokenizer_home)).tokenizer
    loaded = load_openclip(str(source), tokenizer=str(path))
    prompts = CORPUS[:40]
    np.testing.assert_array_equal(loaded.tokenizer(prompts).numpy(), reference(prompts).numpy())


def test_a_tokenizer_json_without_a_pad_token_is_refused_with_the_fix(tmp_path, capsys):
    tokenizer_home = save_tiny_hf_text_model(tmp_path / "with", "unigram")
    source = save_tiny_hf_text_model(tmp_path / "without", "unigram", with_tokenizer=False)
    args = [
        "--model",
        str(source),
        "--tokenizer",
        str(tokenizer_home / "tokenizer.json"),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "names no pad token" in line and "tokenizer folder" in line


def test_tokenizer_for_a_clip_bpe_model_is_refused(tmp_path, capsys):
    from tiny_models import save_tiny_model_dir

    source = save_tiny_model_dir(tmp_path, "b16_like")
    args = ["--model", str(source), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "drop --tokenizer" in capsys.readouterr().err


def test_a_tokenizer_path_that_is_not_one_is_one_line(tmp_path, capsys):
    source = save_tiny_hf_text_model(tmp_path, "unigram", with_tokenizer=False)
    (tmp_path / "empty").mkdir()
    assert (
        main(["--model", str(source), "--tokenizer", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
        == 2
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("legrad-export: error: --tokenizer") and "not a Hugging Face tokenizer" in line
