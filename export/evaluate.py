"""LeGrad and baselines from the same model, scored on a folder of masked cases (torch side).

The command `legrad-evaluate` is `evaluate_cli.py`; this module holds the work. Each image is
preprocessed as the runtime does (`legrad_runtime.preprocess`), explained by the analytic LeGrad
module for all of its prompts in one forward, and every method's map is put back onto the
original image (`to_original`) before `legrad_runtime.evaluation` scores it. Methods: LeGrad, the
last block's CLS attention, attention rollout (both from the same ViT, text-agnostic), a centre
prior (model-free), and optionally a folder of saved heatmaps. An exported model folder is scored
by `evaluate_folder.py` instead, through the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from legrad_runtime.errors import ExportError
from legrad_runtime.evaluation import (
    Case,
    Evaluation,
    centre_prior,
    score_cases,
)
from legrad_runtime.metadata import Size
from legrad_runtime.preprocess import DEFAULT_MAX_PIXELS, load_image, preprocess_batch, to_original

from .baselines import attention_rollout, cls_attention
from .evaluate_folder import CENTRE_PRIOR, CLS_ATTENTION, LEGRAD, ROLLOUT, plan_calls, prompts_by_image
from .graphs import TextGraph, build_image_graph
from .legrad import upsample
from .load import LoadedModel

__all__ = ["METHODS", "compute_heatmaps", "evaluate_cases"]

METHODS = (LEGRAD, CLS_ATTENTION, ROLLOUT, CENTRE_PRIOR)
_PAIR_BUDGET_BYTES = 2**30  # per call: images × prompts × heads × N² float32 of LeGrad intermediates
_TEXT_CHUNK = 256


def _embed_prompts(loaded: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """(P, E) L2-normalised text embeddings from open_clip's text tower."""
    text = TextGraph(loaded)
    with torch.no_grad():
        chunks = [
            text(loaded.tokenizer(list(prompts[i : i + _TEXT_CHUNK])))
            for i in range(0, len(prompts), _TEXT_CHUNK)
        ]
    return torch.cat(chunks)


def _to_input(maps: torch.Tensor, size: Size) -> np.ndarray:
    """(B, gh, gw) grid maps → (B, H, W) numpy, upsampled exactly as LeGrad's own maps."""
    return upsample(maps.unsqueeze(1), size)[:, 0].numpy()


def compute_heatmaps(
    loaded: LoadedModel,
    cases: Sequence[Case],
    image_size: int | Size,
    layers: tuple[int, ...],
    resize_mode: str = "squash",
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, list[np.ndarray]]:
    """{method: one float32 map per case on its original image} for every method in METHODS.

    `on_progress(done, total)` is called after each forward, counting images (an image with very
    many prompts counts once per forward it needs).
    """
    if loaded.vit.is_classifier:
        raise ExportError(
            f"legrad-evaluate scores CLIP-style models (prompts as text); {loaded.model_name} is a "
            "classifier, not supported there yet"
        )
    if loaded.vit.explains_head:
        raise ExportError(
            f"legrad-evaluate scores token-mean towers (CLIP ViTs such as ViT-B-16) next to their "
            f"CLS-attention baselines; {loaded.model_name} explains its pooling head's attention (a SigLIP, "
            "PE-Core or CoCa tower), not supported there yet"
        )
    cfg = loaded.preprocess_cfg(image_size, resize_mode)
    legrad = build_image_graph(loaded, image_size, layers)
    vit = legrad.vit
    prompts = list(dict.fromkeys(c.prompt for c in cases))
    prompt_index = {p: i for i, p in enumerate(prompts)}
    text_embeds = _embed_prompts(loaded, prompts)

    pair_bytes = 4 * vit.cfg.heads * vit.num_tokens**2 * 3
    calls = plan_calls(prompts_by_image(cases), max(1, batch_size), max(1, _PAIR_BUDGET_BYTES // pair_bytes))

    found: dict[tuple[Path, str], dict[str, np.ndarray]] = {}
    done, total = 0, sum(len(call) for call in calls)
    for call in calls:
        paths = [path for path, _ in call]
        union = list(dict.fromkeys(p for _, ps in call for p in ps))
        images = [load_image(path, max_pixels=max_pixels) for path in paths]
        pixels, placements = preprocess_batch(images, cfg)
        pixel_values = torch.from_numpy(pixels)
        with torch.no_grad():
            heatmaps = legrad(pixel_values, text_embeds[[prompt_index[p] for p in union]])[0].numpy()
        cls_maps = _to_input(cls_attention(vit, pixel_values), vit.image_size)
        rollout_maps = _to_input(attention_rollout(vit, pixel_values), vit.image_size)
        for b, ((path, wanted), placement) in enumerate(zip(call, placements)):
            shared = {
                CLS_ATTENTION: to_original(cls_maps[b], placement),
                ROLLOUT: to_original(rollout_maps[b], placement),
                CENTRE_PRIOR: centre_prior(placement.height, placement.width),
            }
            for prompt in wanted:
                found[path, prompt] = {
                    LEGRAD: to_original(heatmaps[b, union.index(prompt)], placement),
                    **shared,
                }
        done += len(call)
        if on_progress is not None:
            on_progress(done, total)
    return {method: [found[c.image, c.prompt][method] for c in cases] for method in METHODS}


def evaluate_cases(
    loaded: LoadedModel,
    cases: Sequence[Case],
    image_size: int | Size,
    layers: tuple[int, ...],
    resize_mode: str = "squash",
    threshold: float = 0.5,
    extra: dict[str, list[np.ndarray]] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Evaluation:
    """Compute every method's heatmaps for `cases` and score them (plus `extra` saved methods)."""
    maps = compute_heatmaps(loaded, cases, image_size, layers, resize_mode, max_pixels=max_pixels)
    return score_cases(cases, maps | (extra or {}), threshold, max_pixels=max_pixels)
