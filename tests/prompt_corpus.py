"""Prompts that stress a tokenizer (punctuation, unicode, HTML, mojibake, long text, empty), torch-free.

Shared by the tokenizer parity tests and the lean runtime tests, which compare against ids that
open_clip's own tokenizers produced on these prompts.
"""

from __future__ import annotations

import random
import unicodedata

import numpy as np

__all__ = ["CORPUS", "LONG", "random_prompts", "mismatches"]

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


def random_prompts(n: int, seed: int) -> list[str]:
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


def mismatches(prompts: list[str], ours: np.ndarray, ref: np.ndarray) -> str:
    rows = np.nonzero((ours != ref).any(axis=1))[0]
    lines = [f"{len(rows)} of {len(prompts)} prompts differ:"]
    for i in rows[:20]:
        lines.append(f"  {prompts[i][:80]!r}\n    ours {ours[i][ours[i] > 0]}\n    ref  {ref[i][ref[i] > 0]}")
    return "\n".join(lines)
