"""open_clip's tokenizers on the export side: loaded (with `--tokenizer` offline), written for the runtime.

Two kinds reach the runtime (legrad_runtime.tokenizer):

- open_clip's CLIP BPE `SimpleTokenizer` → `tokenizer/vocab.json` + `merges.txt` (kind 'clip-bpe');
- open_clip's `HFTokenizer` (SigLIP, multilingual and BERT-style text towers) → the fast tokenizer's
  own `tokenizer/tokenizer.json`, plus what transformers applies around it when open_clip calls it
  (pad id, padding and truncation sides, the SEP id open_clip strips) in the metadata (kind 'hf').

A Hugging Face tokenizer lives on the Hub; offline, `--tokenizer PATH` names a saved tokenizer folder
(what `save_pretrained` writes, or a Hub snapshot) or its `tokenizer.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import open_clip
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from legrad_runtime.errors import ExportError, UnsupportedModelError
from legrad_runtime.metadata import HFSettings, TokenizerCfg

__all__ = ["load_tokenizer", "write_tokenizer"]

_CLEAN_NAMES = {
    "_clean_lower": "lower",
    "_clean_whitespace": "whitespace",
    "_clean_canonicalize": "canonicalize",
}
_TOKENIZER_HINT = (
    "pass --tokenizer PATH: the tokenizer folder saved with save_pretrained, or its tokenizer.json"
)


def text_cfg(model_name: str) -> dict[str, Any]:
    """The model config's `text_cfg` (built-in names and local-dir: folders; {} when unknown)."""
    if model_name.startswith("local-dir:"):
        path = Path(model_name[len("local-dir:") :]) / "open_clip_config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg", {})
        except (OSError, ValueError, AttributeError):
            return {}
    return (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})


def load_tokenizer(model_name: str, tokenizer: str | None = None, cache_dir: str | None = None) -> Any:
    """open_clip's tokenizer for `model_name`, from `tokenizer` (a path) when given; ExportError else."""
    cfg = text_cfg(model_name)
    hub_name = cfg.get("hf_tokenizer_name")
    if tokenizer is None:
        try:
            return open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except Exception as exc:  # transformers and the Hub raise OSError, ValueError, ImportError, ...
            if not hub_name:
                raise ExportError(f"cannot build {model_name}'s tokenizer ({_short(exc)})") from exc
            raise ExportError(
                f"{model_name} uses the Hugging Face tokenizer {hub_name!r}, which could not be loaded "
                f"(no network? {_short(exc)}); {_TOKENIZER_HINT}"
            ) from exc
    if not hub_name:
        raise ExportError(
            f"--tokenizer is for models with a Hugging Face tokenizer; {model_name} uses open_clip's "
            "CLIP BPE tokenizer, which ships with open_clip: drop --tokenizer"
        )
    path = Path(tokenizer).expanduser()
    if not (path.is_dir() or (path.is_file() and path.name == "tokenizer.json")):
        raise ExportError(f"--tokenizer {tokenizer} is neither a folder nor a tokenizer.json file")
    with tempfile.TemporaryDirectory(prefix="legrad-tokenizer-") as tmp:
        if path.is_file():  # transformers reads folders: give it one holding just this file
            shutil.copyfile(path, Path(tmp) / "tokenizer.json")
            path = Path(tmp)
        try:
            loaded = HFTokenizer(
                str(path),
                context_length=cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
                tokenizer_mode=cfg.get("tokenizer_mode"),
                **cfg.get("tokenizer_kwargs", {}),
            )
        except Exception as exc:
            raise ExportError(
                f"--tokenizer {tokenizer} is not a Hugging Face tokenizer ({_short(exc)})"
            ) from exc
    if getattr(loaded.tokenizer, "pad_token_id", None) is None:
        raise ExportError(
            f"--tokenizer {tokenizer} names no pad token, which open_clip pads with; pass the saved "
            "tokenizer folder (its tokenizer_config.json names the pad token)"
        )
    return loaded


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:240]}"


def write_tokenizer(loaded: Any, folder: Path) -> TokenizerCfg:
    """Write the tokenizer's files under folder/tokenizer/ so prompts can be embedded without torch.

    `loaded` needs `.tokenizer` (open_clip's) and `.context_length`.
    """
    tok = loaded.tokenizer
    out = folder / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    clean = _CLEAN_NAMES.get(getattr(getattr(tok, "clean_fn", None), "__name__", ""))
    if isinstance(tok, SimpleTokenizer):
        (out / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
        merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        files = ("tokenizer/vocab.json", "tokenizer/merges.txt")
        return TokenizerCfg("clip-bpe", loaded.context_length, files, clean or "lower")
    if isinstance(tok, HFTokenizer):
        settings = _hf_settings(tok)
        if clean is None:
            raise UnsupportedModelError(f"unknown text cleaning {tok.clean_fn!r} of the HF tokenizer")
        (out / "tokenizer.json").write_text(tok.tokenizer.backend_tokenizer.to_str(), encoding="utf-8")
        return TokenizerCfg("hf", loaded.context_length, ("tokenizer/tokenizer.json",), clean, settings)
    raise UnsupportedModelError(f"cannot export tokenizer of type {type(tok).__name__}")


def _hf_settings(tok: HFTokenizer) -> HFSettings:
    hf = tok.tokenizer
    if tok.tokenizer_mode:
        raise UnsupportedModelError(
            f"open_clip's tokenizer_mode {tok.tokenizer_mode!r} is not supported yet; only the standard mode"
        )
    if getattr(hf, "backend_tokenizer", None) is None:
        raise UnsupportedModelError(
            f"{type(hf).__name__} is a slow (Python) tokenizer; the runtime needs a fast one (tokenizer.json)"
        )
    if hf.pad_token_id is None:
        raise ExportError("the Hugging Face tokenizer names no pad token, which open_clip pads with")
    strip = hf.sep_token_id if tok.strip_sep_token and hf.sep_token_id is not None else None
    return HFSettings(int(hf.pad_token_id), hf.padding_side, hf.truncation_side, strip)
