"""The nn.Modules whose forward IS each ONNX graph's signature (see legrad_runtime.metadata)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from legrad_runtime.metadata import Size, as_size

from .legrad import LeGrad
from .legrad_classifier import ClassifierLeGrad
from .legrad_map import MapLeGrad
from .load import LoadedModel, visual_state_dict
from .load_classifier import AnyLoaded
from .towers import stem_module
from .vit import ExplicitViT

__all__ = [
    "EMPTY_PROMPT",
    "DEFAULT_THRESHOLD",
    "TextGraph",
    "build_image_graph",
    "explicit_vit",
    "empty_prompt_embed",
    "example_image_inputs",
    "example_classifier_inputs",
]

EMPTY_PROMPT = "a photo of a"  # the authors' empty prompt of the SigLIP correction
DEFAULT_THRESHOLD = 0.8


def empty_prompt_embed(loaded: LoadedModel, prompt: str = EMPTY_PROMPT) -> torch.Tensor:
    """The model's own normalised text embedding of the correction's empty prompt, (E,)."""
    with torch.no_grad():
        return loaded.model.encode_text(loaded.tokenizer([prompt]), normalize=True)[0]


def explicit_vit(loaded: AnyLoaded, image_size: int | Size) -> ExplicitViT:
    """The explicit image tower at `image_size` ((height, width); an int is a square), from copies of
    the model's tensors (and stem)."""
    sd = visual_state_dict(loaded, image_size)
    return ExplicitViT(loaded.vit, sd, image_size, stem_module(loaded.owner, loaded.vit))


def build_image_graph(
    loaded: AnyLoaded,
    image_size: int | Size,
    layers: tuple[int, ...],
    correction: bool = True,
    threshold: float = DEFAULT_THRESHOLD,
    prompts: str = "loop",
) -> LeGrad | MapLeGrad | ClassifierLeGrad:
    """(pixel_values, text_embeds) → (heatmaps, layer_maps, image_embeds), from copied weights.

    `correction` and `threshold` apply to MAP-head towers (SigLIP's empty-prompt correction), whose
    graph always takes its prompts at once (a prompt's backward through the head is tiny);
    `prompts` ('loop' or 'batch', arguments.PROMPT_MODES) to the others.
    """
    vit = explicit_vit(loaded, image_size)
    if loaded.vit.is_classifier:
        return ClassifierLeGrad(vit, layers, prompts).eval()
    if loaded.vit.explains_head:
        empty = empty_prompt_embed(loaded) if correction and loaded.vit.has_correction else None
        return MapLeGrad(vit, layers, empty, threshold).eval()
    return LeGrad(vit, layers, prompts).eval()


class TextGraph(nn.Module):
    """input_ids (P, context_length) → L2-normalised text embeddings (P, E).

    Holds a private copy of the model, so putting it in eval mode never touches the caller's.
    """

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.clip = copy.deepcopy(loaded.model).eval()
        self.clip.visual = None  # only the text tower is traced; drop the copy's image tower

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids, normalize=True)


def example_classifier_inputs(
    image_size: int | Size, num_classes: int, batch: int, prompts: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random inputs of a classifier's image graph: standardised pixels and class ids."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *as_size(image_size), generator=gen)
    return pixels, torch.randint(0, num_classes, (prompts,), generator=gen)


def example_image_inputs(
    image_size: int | Size, embed_dim: int, batch: int, prompts: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random inputs of the image graph: standardised pixels and unit text embeddings."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *as_size(image_size), generator=gen)
    text = torch.nn.functional.normalize(torch.randn(prompts, embed_dim, generator=gen), dim=-1)
    return pixels, text
