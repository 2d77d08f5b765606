"""The torch-free `Tokenizer` against open_clip's own tokenizer: identical ids, prompt by prompt.

The files come from `write_tokenizer` (what an export writes), the oracle is `open_clip.get_tokenizer`.
Characters assigned in Unicode 17 are left out of the random prompts: open_clip's `regex` and HF's
Oniguruma disagree on them (see runtime/tokenizer.py).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest

from legrad_export.text_tokenizer import write_tokenizer
from legrad_runtime.metadata import read_metadata
from legrad_runtime.tokenizer import Tokenizer
from prompt_corpus import CORPUS, mismatches, random_prompts


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    """ViT-B-16's tokenizer files as an export writes them (the model itself is not needed)."""
    oracle = open_clip.get_tokenizer("ViT-B-16")
    folder = tmp_path_factory.mktemp("vit_b16")
    cfg = write_tokenizer(SimpleNamespace(tokenizer=oracle, context_length=oracle.context_length), folder)
    return folder, cfg, oracle


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 60 and len(set(CORPUS)) == len(CORPUS)


def test_ids_equal_open_clip_on_the_corpus(vit_b16):
    folder, cfg, oracle = vit_b16
    ours, ref = Tokenizer.from_folder(folder, cfg)(CORPUS), oracle(CORPUS).numpy()
    assert ours.dtype == np.int64 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), mismatches(CORPUS, ours, ref)


def test_ids_equal_open_clip_on_random_unicode_prompts(vit_b16):
    folder, cfg, oracle = vit_b16
    prompts = random_prompts(2000, seed=0)
    ours, ref = Tokenizer.from_folder(folder, cfg)(prompts), oracle(prompts).numpy()
    assert np.array_equal(ours, ref), mismatches(prompts, ours, ref)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_ids_equal_open_clip_with_its_other_cleaning_functions(vit_b16, clean):
    folder, cfg, _ = vit_b16
    oracle = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length, clean=clean)
    prompts = CORPUS + random_prompts(500, seed=1)
    ours = Tokenizer.from_folder(folder, dataclasses.replace(cfg, clean=clean))(prompts)
    ref = oracle(prompts).numpy()
    assert np.array_equal(ours, ref), mismatches(prompts, ours, ref)


def test_ids_equal_open_clip_with_the_exported_model_folders_files(model_folder):
    cfg = read_metadata(model_folder).tokenizer
    oracle = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length, clean=cfg.clean)
    ours, ref = Tokenizer.from_folder(model_folder, cfg)(CORPUS), oracle(CORPUS).numpy()
    assert np.array_equal(ours, ref), mismatches(CORPUS, ours, ref)
