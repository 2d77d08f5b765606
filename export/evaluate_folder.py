"""`legrad-evaluate` on an exported model folder: the ONNX graph a user ships, scored through the runtime.

No torch: the folder is opened with `legrad_runtime.load`, each image is explained for its cases'
prompts (a classifier's: class names), and each map is taken on the original image
(`Explanation.heatmap_on_original`), as `evaluate.py` does with the torch model. The folder fixes
the image size, layers and preprocessing, so the torch side's options do not apply; the only other
method is the model-free centre prior. Also the home of the call planning both sides share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from legrad_runtime.evaluation import Case, centre_prior

__all__ = [
    "LEGRAD",
    "CLS_ATTENTION",
    "ROLLOUT",
    "CENTRE_PRIOR",
    "FOLDER_METHODS",
    "plan_calls",
    "folder_heatmaps",
]

LEGRAD, CLS_ATTENTION, ROLLOUT, CENTRE_PRIOR = "legrad", "cls-attention", "rollout", "centre-prior"
FOLDER_METHODS = (LEGRAD, CENTRE_PRIOR)  # the attention baselines need the torch model's attention
# a call runs its images against the union of their prompts: it may do up to this many times the
# (image, prompt) maps its cases need, since fewer, larger calls beat many small ones on CPU
_MAX_WASTE = 4
_FOLDER_PAIRS = 256  # (image, prompt) maps per runtime call at most; the runtime splits further for memory

Call = list[tuple[Path, list[str]]]  # (image, the prompts its cases need), for one forward


def prompts_by_image(cases: Sequence[Case]) -> dict[Path, list[str]]:
    """Each image's distinct prompts, in the cases' order."""
    by_image: dict[Path, list[str]] = {}
    for case in cases:
        listed = by_image.setdefault(case.image, [])
        if case.prompt not in listed:
            listed.append(case.prompt)
    return by_image


def plan_calls(by_image: dict[Path, list[str]], batch_size: int, max_pairs: int) -> list[Call]:
    """Calls of (image, its prompts) pairs, at most `batch_size` images and `max_pairs` maps each.
    Images join a call while it computes at most _MAX_WASTE times the maps its cases need."""
    pieces = [
        (path, prompts[i : i + max_pairs])
        for path, prompts in by_image.items()
        for i in range(0, len(prompts), max_pairs)
    ]
    calls: list[Call] = []
    union: set[str] = set()
    needed = 0
    for path, prompts in pieces:
        if calls and len(calls[-1]) < batch_size:
            new_union = union | set(prompts)
            work = (len(calls[-1]) + 1) * len(new_union)
            if work <= max_pairs and work <= _MAX_WASTE * (needed + len(prompts)):
                calls[-1].append((path, prompts))
                union, needed = new_union, needed + len(prompts)
                continue
        calls.append([(path, prompts)])
        union, needed = set(prompts), len(prompts)
    return calls


def folder_heatmaps(
    model: Any,
    cases: Sequence[Case],
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[np.ndarray]]:
    """{method: one float32 map per case on its original image} for FOLDER_METHODS, from `model`
    (a `legrad_runtime.LeGradModel`). A classifier's prompts are class names (or ids, as text).

    `on_progress(done, total)` is called after each runtime call, counting images.
    """
    calls = plan_calls(prompts_by_image(cases), max(1, batch_size), _FOLDER_PAIRS)
    prompts = list(dict.fromkeys(c.prompt for c in cases))
    index = {p: i for i, p in enumerate(prompts)}
    embeds = None if model.is_classifier else model.embed_text(prompts)
    found: dict[tuple[Path, str], dict[str, np.ndarray]] = {}
    done, total = 0, sum(len(call) for call in calls)
    for call in calls:
        paths = [path for path, _ in call]
        union = list(dict.fromkeys(p for _, ps in call for p in ps))
        if embeds is None:
            result = model.explain(paths, classes=union, batch_size=len(paths), layer_maps=False)
        else:
            chosen = embeds[[index[p] for p in union]]
            result = model.explain(paths, text_embeds=chosen, batch_size=len(paths), layer_maps=False)
        for b, (path, wanted) in enumerate(call):
            placement = result.placements[b]
            prior = centre_prior(placement.height, placement.width)
            for prompt in wanted:
                found[path, prompt] = {
                    LEGRAD: result.heatmap_on_original(b, union.index(prompt)),
                    CENTRE_PRIOR: prior,
                }
        done += len(call)
        if on_progress is not None:
            on_progress(done, total)
    return {method: [found[c.image, c.prompt][method] for c in cases] for method in FOLDER_METHODS}
