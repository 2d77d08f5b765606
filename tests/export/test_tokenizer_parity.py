"""The torch-free `Tokenizer` against open_clip's own tokenizer: identical ids, prompt by prompt.

The files come from `write_tokenizer` (what an export writes), the oracle is `open_clip.get_tokenizer`.
Characters assigned in Unicode 17 are left out of the random prompts: open_clip's `regex` and HF's
Oniguruma disagree on them (see runtime/tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import random
import unicodedata
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest

from legrad_export.load import write_tokenizer
from legrad_runtime.metadata import read_metadata
from legrad_runtime.tokenizer import Tokenizer

LONG = " ".join(f"word{i % 37} and the {['cat', 'dog', 'tree'][i % 3]}" for i in range(125))  # 500 words

CORPUS = [
    # plain captions
    "a photo of a cat",
    "a photo of a dog",
    "A Photo Of A Golden Retriever Playing In The Snow",
    "an aerial view of a city at night",
    "a close-up photo of a red apple on a wooden table",
    "two people riding bicycles along the beach at sunset",
    "a diagram",
    "cat",
    "the quick brown fox jumps over the lazy dog",
    "a blurry photo of the Eiffel Tower",
    # punctuation-heavy
    "Hello, world!!! What's up???",
    "a cat... or a dog?! (maybe both); [unclear] {really}",
    "email@example.com, https://example.com/path?q=1&r=2#frag",
    "--==**##@@$$%%^^&&~~``||\\\\//<<>>",
    "C++ vs. C# vs. F#: which is best?",
    "snake_case_name and kebab-case-name and CamelCaseName",
    "\"quoted\" 'single' `backtick`",
    # contractions, in both cases
    "it's a cat",
    "they'll come, we've seen, I'm here, you're there, he'd go, don't stop",
    "IT'S LOUD, THEY'LL SEE, WE'VE GOT IT",
    "rock 'n' roll, 'tis the season, o'clock",
    # numbers
    "3.14",
    "1,000,000 people",
    "the year 2024 and the 21st century",
    "-273.15°C is absolute zero; 1e-9 s = 1 ns",
    "½ cup, ¾ inch, ² and ³, Ⅻ o'clock",
    "٣ ٤ ٥ Arabic-Indic digits and ４５６ fullwidth digits",
    # unicode: accents, CJK, emoji, Cyrillic, Arabic, combining marks
    "café naïve résumé coöperate Ångström",
    "cafe\u0301 with a combining acute accent",
    "Zürich, São Paulo, Kraków, Reykjavík",
    "东京的夜景",
    "東京タワーの写真",
    "서울의 야경 사진",
    "a photo of 🐱 and 🐶 🎉🎉",
    "family emoji 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and skin tones 👍🏽",
    "фотография кошки",
    "صورة قطة",
    "תמונה של חתול",
    "Ελληνικά γράμματα: αβγ ΑΒΓ ᾳ",
    "हिन्दी में एक वाक्य",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ text",
    "\u0345 alone and after a letter: a\u0345b",
    "ﬁ ligature, ß eszett, İstanbul, ǅ digraph, K kelvin, ſ long s",
    # HTML entities
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "double &amp;amp; escaped &amp;lt;tag&amp;gt;",
    "&quot;quoted&quot; &#39;apostrophe&#39; &#x263A; &copy; &nbsp;nbsp",
    # mojibake that ftfy fixes
    "cafÃ©",
    "Ã¼ber schÃ¶n",
    "The Mona Lisa doesnâ€™t have eyebrows.",
    "â€œsmart quotesâ€\x9d",
    # curly quotes
    "“smart” ‘quotes’ it’s",
    "„German“ «French» ‹single›",
    # tabs, newlines, multiple spaces
    "a\tphoto\tof\ta\tcat",
    "a photo\nof a cat\r\nand a dog",
    "   lots    of     spaces   ",
    "non\u00a0breaking\u2003em\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\u200cjoiners\u200d and \ufeffBOM",
    # fullwidth
    "ｆｕｌｌｗｉｄｔｈ ＬＥＴＴＥＲＳ！",
    "ＡＢＣ　１２３",
    # empty and whitespace only
    "",
    " ",
    "\t\n  \r\n",
    # special tokens spelled out
    "a <start_of_text> b",
    "x<end_of_text>y",
    "!<end_of_text> and <END_OF_TEXT>",
    # long texts that need truncation
    LONG,
    LONG.upper(),
    "a " * 200,
    "🐱" * 100,
    "东京" * 80,
]


def _random_prompts(n: int, seed: int) -> list[str]:
    """Random mixtures of ASCII, BMP and astral characters, captions and tricky fragments."""
    rng = random.Random(seed)
    fragments = ["'s", "'LL", " ", "\t", "\n", "&amp;", "Ã©", "“", "3.14", "cat", "Dog", "\u0345", "_"]
    prompts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.3:
                chars.append(chr(rng.randint(0x20, 0x7E)))
            elif r < 0.7:
                chars.append(chr(rng.choice([rng.randint(0xA0, 0xFFFF), rng.randint(0x10000, 0x1FAFF)])))
            else:
                chars.append(rng.choice(fragments))
        prompts.append("".join(c for c in chars if len(c) > 1 or unicodedata.category(c) not in ("Cn", "Cs")))
    return prompts


def _mismatches(prompts: list[str], ours: np.ndarray, ref: np.ndarray) -> str:
    rows = np.nonzero((ours != ref).any(axis=1))[0]
    lines = [f"{len(rows)} of {len(prompts)} prompts differ:"]
    for i in rows[:20]:
        lines.append(f"  {prompts[i][:80]!r}\n    ours {ours[i][ours[i] > 0]}\n    ref  {ref[i][ref[i] > 0]}")
    return "\n".join(lines)


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
    assert np.array_equal(ours, ref), _mismatches(CORPUS, ours, ref)


def test_ids_equal_open_clip_on_random_unicode_prompts(vit_b16):
    folder, cfg, oracle = vit_b16
    prompts = _random_prompts(2000, seed=0)
    ours, ref = Tokenizer.from_folder(folder, cfg)(prompts), oracle(prompts).numpy()
    assert np.array_equal(ours, ref), _mismatches(prompts, ours, ref)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_ids_equal_open_clip_with_its_other_cleaning_functions(vit_b16, clean):
    folder, cfg, _ = vit_b16
    oracle = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length, clean=clean)
    prompts = CORPUS + _random_prompts(500, seed=1)
    ours = Tokenizer.from_folder(folder, dataclasses.replace(cfg, clean=clean))(prompts)
    ref = oracle(prompts).numpy()
    assert np.array_equal(ours, ref), _mismatches(prompts, ours, ref)


def test_ids_equal_open_clip_with_the_exported_model_folders_files(model_folder):
    cfg = read_metadata(model_folder).tokenizer
    oracle = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length, clean=cfg.clean)
    ours, ref = Tokenizer.from_folder(model_folder, cfg)(CORPUS), oracle(CORPUS).numpy()
    assert np.array_equal(ours, ref), _mismatches(CORPUS, ours, ref)
