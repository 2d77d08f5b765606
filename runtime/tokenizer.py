"""Prompts → `input_ids`, identical to open_clip's tokenizers, without torch.

`load_tokenizer` picks the class the folder's metadata names: `Tokenizer` (kind 'clip-bpe',
open_clip's SimpleTokenizer) or `HFTextTokenizer` (kind 'hf', open_clip's HFTokenizer).

For 'clip-bpe':

The byte-level BPE runs in HF `tokenizers` (Rust) on the files the exporter wrote (`vocab.json`,
`merges.txt`). What HF would do differently from open_clip is done here in Python, exactly as
open_clip does it: the text cleaning (ftfy, html.unescape twice, whitespace collapse, lower-case),
the special tokens, and the truncation that keeps `<end_of_text>` last.

One known difference: open_clip splits words with the `regex` package, HF with Oniguruma, and each
carries its own Unicode tables. Characters assigned after Oniguruma's tables (Unicode 17, e.g. CJK
Extension J) are letters to a recent `regex` but not to HF, so they may be split differently.
"""

from __future__ import annotations

import functools
import html
import json
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import ftfy
import numpy as np
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelFolderError
from .files import UnreadableFile, inside, printable, read_regular
from .metadata import CLEAN_MODES, TokenizerCfg

__all__ = ["Tokenizer", "HFTextTokenizer", "load_tokenizer"]

SOT, EOT = "<start_of_text>", "<end_of_text>"
# open_clip's `pat` (compiled there with re.IGNORECASE), with its special tokens in front
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# U+0345 (combining ypogegrammeni) case-folds to a Greek letter, so under re.IGNORECASE open_clip's
# `pat` matches it with no alternative and drops it, like a space; Oniguruma would keep it
_DROPPED = str.maketrans({"\u0345": " "})


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split())


def _read_inside(folder: Path, relative: str) -> bytes:
    try:
        return read_regular(inside(folder, relative), MAX_TOKENIZER_BYTES)
    except ValueError as exc:
        raise ModelFolderError(f"tokenizer {exc}; re-export the model") from None
    except UnreadableFile as exc:
        reason = "is missing" if "does not exist" in exc.reason else exc.reason
        raise ModelFolderError(f"tokenizer file {folder / relative} {reason}; re-export the model") from None


def _clean_lower(text: str) -> str:
    return _whitespace_clean(_basic_clean(text)).lower()


def _clean_whitespace(text: str) -> str:
    return _whitespace_clean(_basic_clean(text))


def _clean_canonicalize(text: str) -> str:  # open_clip's canonicalize_text, after basic_clean
    text = _basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return _whitespace_clean(text)


CLEAN_FNS = {"lower": _clean_lower, "whitespace": _clean_whitespace, "canonicalize": _clean_canonicalize}
assert tuple(CLEAN_FNS) == CLEAN_MODES  # the schema names exactly these
MAX_TOKENIZER_BYTES = 64 * 1024**2


class Tokenizer:
    """open_clip's CLIP BPE tokenizer: `tok(texts)` → int64 ids of shape (len(texts), context_length)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], cfg: TokenizerCfg):
        if cfg.clean not in CLEAN_FNS:
            raise ModelFolderError(
                f"unsupported tokenizer clean {cfg.clean!r}; expected one of {tuple(CLEAN_FNS)}"
            )
        if SOT not in vocab or EOT not in vocab:
            raise ModelFolderError(f"tokenizer vocab has no {SOT!r}/{EOT!r}; not a CLIP BPE vocab")
        self.context_length = cfg.context_length
        self.clean_fn = CLEAN_FNS[cfg.clean]
        self.sot_token_id, self.eot_token_id = vocab[SOT], vocab[EOT]
        # open_clip appends its special tokens after the merges, SOT first: every id from SOT on
        self.special_ids = {t: i for t, i in vocab.items() if i >= self.sot_token_id}
        specials = "|".join(re.escape(t) for t in sorted(self.special_ids, key=self.special_ids.__getitem__))
        self._split = pre_tokenizers.Split(Regex(f"(?i){specials}|{_WORDS}"), "removed", invert=True)
        try:
            bpe = models.BPE(vocab, merges, end_of_word_suffix="</w>")
        except Exception as exc:  # tokenizers raises a bare Exception on merges outside the vocab
            raise ModelFolderError(f"malformed tokenizer files ({exc}); re-export the model") from None
        self._bpe = HFTokenizer(bpe)
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [self._split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    @classmethod
    def from_folder(
        cls, folder: str | Path, cfg: TokenizerCfg, read: Callable[[str], bytes] | None = None
    ) -> Tokenizer:
        """Load the tokenizer files listed in `cfg` from an exported model folder.

        `read(relative_path) -> bytes` reads a file of the folder; the runtime passes its
        `ModelFolder.read_bytes`, which checks each file against its checksum. By default a file is
        read only if it lies inside `folder` and is a regular file.
        """
        folder = Path(folder)
        _check_kind(folder, cfg, "clip-bpe")
        if cfg.clean not in CLEAN_FNS:
            raise ModelFolderError(
                f"unsupported tokenizer clean {printable(cfg.clean)!r}; expected one of {tuple(CLEAN_FNS)}"
            )
        paths = {PurePosixPath(f).name: f for f in cfg.files}
        missing = [name for name in ("vocab.json", "merges.txt") if name not in paths]
        if missing:
            raise ModelFolderError(
                f"tokenizer files {', '.join(missing)} are not listed in {folder}'s metadata; "
                "re-export the model"
            )
        read = read or functools.partial(_read_inside, folder)
        try:
            vocab = json.loads(read(paths["vocab.json"]).decode("utf-8"))
            lines = read(paths["merges.txt"]).decode("utf-8").splitlines()
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8
            raise ModelFolderError(f"unreadable tokenizer file in {folder} ({exc}); re-export") from None
        pairs = [line.split() for line in lines if line and not line.startswith("#version")]
        ok_vocab = isinstance(vocab, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in vocab.items()
        )
        if not ok_vocab or any(len(m) != 2 for m in pairs):
            raise ModelFolderError(f"malformed tokenizer files in {folder}; re-export the model")
        return cls(vocab, [(a, b) for a, b in pairs], cfg)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without SOT/EOT and untruncated (open_clip's `encode`)."""
        cleaned = [self.clean_fn(t).translate(_DROPPED) for t in texts]
        ids = [e.ids for e in self._bpe.encode_batch(cleaned)]
        for i, text in enumerate(cleaned):
            if any(s in text for s in self.special_ids):
                ids[i] = self._encode_with_specials(text)
        return ids

    def _encode_with_specials(self, text: str) -> list[int]:
        """A prompt that spells out a special token: open_clip maps such a word to its id, not to BPE."""
        ids: list[int] = []
        for word, _ in self._split.pre_tokenize_str(text):
            special = self.special_ids.get(word)
            ids.extend(
                [special] if special is not None else self._bpe.encode([word], is_pretokenized=True).ids
            )
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 (len(texts), context_length): SOT, ids, EOT, zero padding; long texts keep EOT last."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, ids in zip(out, self.encode(texts)):
            tokens = [self.sot_token_id, *ids, self.eot_token_id][: self.context_length]
            tokens[-1] = self.eot_token_id
            row[: len(tokens)] = tokens
        return out


class HFTextTokenizer:
    """open_clip's HFTokenizer on a fast (Rust) Hugging Face tokenizer, without transformers or torch.

    As open_clip calls it: its text cleaning, then transformers' `padding="max_length",
    truncation=True` (the tokenizer's own special tokens added, longest-first truncation that keeps
    them), then with `strip_sep_id` that id replaced by 0.
    """

    def __init__(self, tokenizer_json: bytes, cfg: TokenizerCfg):
        if cfg.hf is None:
            raise ModelFolderError("tokenizer kind 'hf' without its 'hf' settings; re-export the model")
        try:
            self._tok = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad tokenizer.json
            raise ModelFolderError(f"unreadable tokenizer.json ({exc}); re-export the model") from None
        hf = cfg.hf
        pad_token = self._tok.id_to_token(hf.pad_id)
        if pad_token is None:
            raise ModelFolderError(
                f"tokenizer pad id {hf.pad_id} is outside its vocabulary of {self._tok.get_vocab_size()}"
            )
        self.context_length = cfg.context_length
        self.clean_fn = CLEAN_FNS[cfg.clean]
        self.strip_sep_id = hf.strip_sep_id
        self._tok.enable_truncation(cfg.context_length, direction=hf.truncation_side)
        self._tok.enable_padding(
            direction=hf.padding_side, pad_id=hf.pad_id, pad_token=pad_token, length=cfg.context_length
        )

    @classmethod
    def from_folder(
        cls, folder: str | Path, cfg: TokenizerCfg, read: Callable[[str], bytes] | None = None
    ) -> HFTextTokenizer:
        """Load the `tokenizer.json` listed in `cfg` (`read` as for `Tokenizer.from_folder`)."""
        folder = Path(folder)
        _check_kind(folder, cfg, "hf")
        paths = [f for f in cfg.files if PurePosixPath(f).name == "tokenizer.json"]
        if len(paths) != 1:
            raise ModelFolderError(
                f"{folder}'s metadata must list one tokenizer.json among its tokenizer files; re-export"
            )
        return cls((read or functools.partial(_read_inside, folder))(paths[0]), cfg)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 (len(texts), context_length), as open_clip's `HFTokenizer(texts)`."""
        texts = _check_texts(texts)
        encoded = self._tok.encode_batch([self.clean_fn(t) for t in texts])
        out = np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), self.context_length)
        if self.strip_sep_id is not None:
            out[out == self.strip_sep_id] = 0
        return out


def _check_kind(folder: Path, cfg: TokenizerCfg, kind: str) -> None:
    if cfg.kind != kind:
        raise _unsupported(folder, cfg.kind)


def _unsupported(folder: Path, kind: str) -> ModelFolderError:
    return ModelFolderError(
        f"tokenizer kind {printable(kind)!r} in {folder} is not supported by this legrad-onnx; "
        f"it reads {', '.join(repr(k) for k in TOKENIZER_CLASSES)}; upgrade legrad-onnx"
    )


def _check_texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):  # as open_clip does
        texts = [texts]
    bad = [f"#{i}: {type(t).__name__}" for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"prompts must be str; got {', '.join(bad)}")
    return list(texts)


TOKENIZER_CLASSES: dict[str, type[Tokenizer] | type[HFTextTokenizer]] = {
    "clip-bpe": Tokenizer,
    "hf": HFTextTokenizer,
}


def load_tokenizer(
    folder: str | Path, cfg: TokenizerCfg, read: Callable[[str], bytes] | None = None
) -> Tokenizer | HFTextTokenizer:
    """The tokenizer a model folder's metadata names, its files read through `read` (checksummed)."""
    cls = TOKENIZER_CLASSES.get(cfg.kind)
    if cls is None:
        raise _unsupported(Path(folder), cfg.kind)
    return cls.from_folder(folder, cfg, read)
