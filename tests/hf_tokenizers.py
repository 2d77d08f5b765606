"""Small Hugging Face tokenizers trained with `tokenizers`, saved as folders open_clip's HFTokenizer loads.

Hub tokenizers cannot be downloaded here, so each family the exporter meets is rebuilt in miniature
on a few hundred captions, with its real pipeline (normalizer, pre-tokenizer, special tokens):

- `unigram`: SigLIP's (T5 sentencepiece): NFKC, Metaspace, `</s>` appended, pad `<pad>`;
- `wordpiece`: BERT's (bert-base-uncased): lower-casing normalizer, [CLS] … [SEP], pad [PAD];
- `bpe`: RoBERTa's byte-level BPE: <s> … </s>, pad <pad> (id 1).

Saving needs transformers (the export extra); the tokenizers themselves are plain `tokenizers`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["CAPTIONS", "KINDS", "build_hf_tokenizer", "save_hf_tokenizer"]

_COLOURS = "red green blue purple orange yellow grey".split()
_SHAPES = "circle square triangle cross star ring".split()
_PLACES = "left right top bottom centre corner".split()
CAPTIONS = [
    f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c} {s} in the {p}"
    for c, s, p in itertools.product(_COLOURS, _SHAPES, _PLACES)
] + ["Hello, world! It's 3.14 o'clock; café, naïve, Zürich.", "東京 の 写真", "🐱 and 🐶"]

KINDS = ("unigram", "wordpiece", "bpe")


def build_hf_tokenizer(kind: str) -> tuple[Tokenizer, dict[str, str]]:
    """(tokenizer, its special tokens by role) for one of KINDS, trained on CAPTIONS."""
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" +", " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        trainer = trainers.UnigramTrainer(
            vocab_size=160, special_tokens=list(specials.values()), unk_token="<unk>"
        )
        tok.train_from_iterator(CAPTIONS, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        specials = {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
        tok.train_from_iterator(
            CAPTIONS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=list(specials.values()))
        )
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=list(specials.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(CAPTIONS, trainer)
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    return tok, specials


def save_hf_tokenizer(kind: str, folder: Path) -> int:
    """Save KIND as a transformers tokenizer folder (tokenizer.json and its config); its vocab size."""
    from transformers import PreTrainedTokenizerFast

    tok, specials = build_hf_tokenizer(kind)
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(folder))
    return tok.get_vocab_size()
