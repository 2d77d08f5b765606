"""Which open_clip models LeGrad can be exported for, and why not the others, from their configs alone.

No model is built (ViT-bigG would take minutes), so `legrad-export --list-models` is instant and a
refusal comes before any download. The README's "Supported models" section is `markdown()`:

    python -m legrad_export.support    # prints the section; a test checks the README holds it
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import open_clip

__all__ = ["Support", "model_support", "pair_support", "all_models", "all_pairs", "markdown"]

_NO_PATCH_ATTENTION = "it has no self-attention over patch tokens, which LeGrad explains"
_PLANNED = "not supported yet"


@dataclass(frozen=True)
class Support:
    family: str  # e.g. "OpenCLIP ViT", "ResNet", "timm ConvNeXt"
    supported: bool
    reason: str = ""  # why not, or what to know (an HF tokenizer, ...)

    def line(self, name: str) -> str:
        status = "supported" if self.supported else f"not supported: {self.reason}"
        note = f" ({self.reason})" if self.supported and self.reason else ""
        return f"{name}\t{self.family}\t{status}{note}"


def _timm_family(timm_name: str, pool: str | None) -> Support:
    if timm_name.startswith("convnext"):
        return Support("timm ConvNeXt", False, f"a convolutional tower: {_NO_PATCH_ATTENTION}")
    if timm_name.startswith("fastvit"):
        return Support(
            "timm FastViT",
            False,
            f"convolutional token mixing (RepMixer) in most stages: {_NO_PATCH_ATTENTION}",
        )
    if timm_name.startswith("swin"):
        return Support("timm Swin", False, f"windowed attention over shifted windows; {_PLANNED}")
    if timm_name.startswith("vitamin"):
        return Support("timm ViTamin", True)
    if timm_name.startswith(("eva_giant", "eva02")) and pool == "token":
        return Support("timm EVA-CLIP", True)  # EVA01-g, EVA02-B/L/E: the CLIP rule (docs/towers.md)
    if timm_name.startswith("eva"):
        return Support("timm EVA", False, f"EVA blocks other than EVA-CLIP's; {_PLANNED}")
    if timm_name.startswith("vit_pe_core"):
        return Support("timm PE-Core", True)
    if pool == "map":
        return Support("timm SigLIP ViT", True)
    if timm_name.startswith("vit_relpos"):
        return Support(
            "timm ViT, relative positions", False, f"a relative position bias in its attention; {_PLANNED}"
        )
    return Support("timm ViT", True)  # pooled by a class token or the token mean: MobileCLIP, GAP


def model_support(model_name: str) -> Support:
    """Whether `model_name` (an open_clip built-in name) can be exported, from its config."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(model_name)
    vision = cfg.get("vision_cfg", {})
    text = cfg.get("text_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)):
        return Support("ResNet", False, f"a convolutional (ModifiedResNet) tower: {_NO_PATCH_ATTENTION}")
    if vision.get("timm_model_name"):
        support = _timm_family(vision["timm_model_name"], vision.get("timm_pool"))
        if not support.supported:
            return support
        return Support(support.family, True, "; ".join(n for n in (support.reason, _text_note(text)) if n))
    if vision.get("attentional_pool") not in (None, False, True):  # 'parallel' / 'cascade': two poolers
        return Support("CoCa", False, f"a second, contrastive attentional pooler; {_PLANNED}")
    family = "CoCa" if "multimodal_cfg" in cfg else "OpenCLIP ViT"
    custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_attn") if vision.get(k)]
    if custom:
        return Support(family, False, f"{', '.join(custom)} attention blocks; {_PLANNED}")
    return Support(family, True, _text_note(text))


def _text_note(text: dict) -> str:
    """What exporting needs to know about the text side: a Hugging Face tower or tokenizer."""
    if text.get("hf_model_name"):
        return "Hugging Face text tower: its config comes from the Hub"
    if text.get("hf_tokenizer_name"):
        return "Hugging Face tokenizer: offline, pass --tokenizer"
    return ""


def pair_support(model_name: str, tag: str) -> Support:
    """The status of one pretrained (model, tag) pair: its model's, plus what the tag needs."""
    support = model_support(model_name)
    if support.supported and open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu"):
        note = "; ".join(n for n in (support.reason, "QuickGELU weights (built as such)") if n)
        return Support(support.family, True, note)
    return support


def all_models() -> Iterator[tuple[str, Support]]:
    for name in open_clip.list_models():
        yield name, model_support(name)


def all_pairs() -> Iterator[tuple[str, str, Support]]:
    for name, tag in open_clip.list_pretrained():
        yield name, tag, pair_support(name, tag)


def markdown() -> str:
    """The README's "Supported models" tables: families with counts, then the supported names."""
    models = list(all_models())
    pairs = list(all_pairs())
    families: dict[tuple[str, bool, str], list[str]] = {}
    for name, s in models:
        reason = s.reason if not s.supported else ""
        families.setdefault((s.family, s.supported, reason), []).append(name)
    lines = [
        f"open_clip {open_clip.__version__}: {sum(s.supported for _, s in models)} of {len(models)} models "
        f"and {sum(s.supported for *_, s in pairs)} of {len(pairs)} pretrained (model, tag) pairs export.",
        "",
        "| family | models | pairs | status |",
        "| --- | ---: | ---: | --- |",
    ]
    for (family, ok, reason), names in sorted(families.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
        n_pairs = sum(1 for name, _, _ in pairs if name in names)
        lines.append(f"| {family} | {len(names)} | {n_pairs} | {'supported' if ok else reason} |")
    supported = [name for name, s in models if s.supported]
    lines += ["", "Supported names: " + ", ".join(f"`{n}`" for n in supported) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
