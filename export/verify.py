"""Check exported ONNX files under onnxruntime against the autograd reference and open_clip.

Every output is compared; all mismatches are collected and raised as one VerificationError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from legrad_runtime.errors import VerificationError
from legrad_runtime.metadata import CLASSIFIER_GRAPH, IMAGE_GRAPH, TEXT_GRAPH

from .graphs import example_classifier_inputs, example_image_inputs
from .load import LoadedModel
from .reference import LeGradOutput, legrad_reference
from .reference_coca import legrad_reference_coca
from .reference_siglip import legrad_reference_siglip
from .reference_timm import legrad_reference_timm

__all__ = ["VERIFY_PROMPTS", "reference", "verify_export", "verify_classifier_export"]

VERIFY_PROMPTS = ("a photo of a cat", "a remote control", "two dogs playing in the snow, at night!")


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference(
    loaded: LoadedModel,
    pixels: torch.Tensor,
    text: torch.Tensor,
    layers: tuple[int, ...],
    empty_embed: torch.Tensor | None = None,
    threshold: float = 0.8,
) -> LeGradOutput:
    """The autograd reference of the tower's kind; `empty_embed` turns on a MAP head's correction."""
    if loaded.vit.head == "attn_pool":
        return legrad_reference_coca(loaded.model, pixels, text, layers)
    if loaded.vit.explains_head:
        return legrad_reference_siglip(loaded.model, pixels, text, layers, empty_embed, threshold)
    if loaded.vit.family in ("timm_vit", "timm_eva"):  # token-mean towers (MAP heads returned above)
        return legrad_reference_timm(loaded.model, pixels, text, layers)
    return legrad_reference(loaded.model, pixels, text, layers)


def verify_export(
    folder: Path,
    loaded: LoadedModel,
    image_size: int | tuple[int, int],
    layers: tuple[int, ...],
    batch: int = 2,
    prompts: int = 3,
    empty_embed: torch.Tensor | None = None,
    threshold: float = 0.8,
) -> dict[str, float]:
    """Max abs difference of every output; raises VerificationError if any exceeds its tolerance."""
    pixels, text = example_image_inputs(image_size, loaded.vit.embed_dim, batch, prompts, seed=1234)
    got = _session(folder / IMAGE_GRAPH.filename).run(
        IMAGE_GRAPH.output_names, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    ref = reference(loaded, pixels, text, layers, empty_embed, threshold)
    expected = {"heatmaps": ref.heatmaps, "layer_maps": ref.layer_maps, "image_embeds": ref.image_embeds}

    ids = loaded.tokenizer(list(VERIFY_PROMPTS))
    got_text = _session(folder / TEXT_GRAPH.filename).run(TEXT_GRAPH.output_names, {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected["text_embeds"] = loaded.model.encode_text(ids, normalize=True)

    outputs = dict(zip(IMAGE_GRAPH.output_names, got)) | dict(zip(TEXT_GRAPH.output_names, got_text))
    return _compare(IMAGE_GRAPH.outputs + TEXT_GRAPH.outputs, outputs, expected)


def verify_classifier_export(
    folder: Path,
    loaded,
    image_size: int | tuple[int, int],
    layers: tuple[int, ...],
    batch: int = 2,
    prompts: int = 3,
) -> dict[str, float]:
    """A classifier's image graph under onnxruntime against its library's autograd reference."""
    from .reference_classifier import legrad_reference_classifier

    pixels, class_ids = example_classifier_inputs(image_size, loaded.vit.embed_dim, batch, prompts, seed=1234)
    got = _session(folder / CLASSIFIER_GRAPH.filename).run(
        CLASSIFIER_GRAPH.output_names, {"pixel_values": pixels.numpy(), "class_ids": class_ids.numpy()}
    )
    ref = legrad_reference_classifier(loaded.model, pixels, class_ids, layers)
    expected = {"heatmaps": ref.heatmaps, "layer_maps": ref.layer_maps, "logits": ref.logits}
    return _compare(CLASSIFIER_GRAPH.outputs, dict(zip(CLASSIFIER_GRAPH.output_names, got)), expected)


def _compare(specs, outputs: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference of every output; one VerificationError listing each one over its tolerance."""
    diffs, failures = {}, []
    for spec in specs:
        want = expected[spec.name].detach().numpy()
        have = outputs[spec.name]
        if have.shape != want.shape:
            failures.append(f"{spec.name}: shape {have.shape} != reference {want.shape}")
            continue
        diff = float(np.abs(have - want).max()) if have.size else 0.0
        diffs[spec.name] = diff
        if not np.isfinite(have).all() or diff > spec.atol:
            failures.append(f"{spec.name}: max abs diff {diff:.3g} > {spec.atol:g}")
    if failures:
        raise VerificationError("exported graphs disagree with the reference: " + "; ".join(failures))
    return diffs
