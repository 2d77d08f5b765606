"""The autograd LeGrad reference for supervised ViT classifiers: docs/classifiers.md's rule on the
UNTOUCHED torchvision `VisionTransformer` (the counterpart of torchcam 0.5.0's `LeGrad`) or timm
`VisionTransformer` (torchcam refuses timm; the same rule with timm's names: the tower's final norm,
`norm` or `fc_norm`, and its classifier `head`).

For each explained block l and class c, the score is the raw logit of the block's token mean,
`heads(encoder.ln(mean_i z_l[i]))[c]`; the map is the positive part of its gradient with respect to
the same block's post-softmax attention, averaged over heads and all queries, the class token's
column dropped. Maps are averaged over layers and min-max normalised per (image, class) over the
patch grid with torchcam's eps (1e-8); the image-size heatmap is that map upsampled bilinearly by
the patch size (half-pixel), not normalised again.

The model's own modules run in order; explained blocks run through their submodules with the
attention softmax written out, so that A is a tensor autograd differentiates against. No hooks, no
patching (torchcam hooks the model and replaces the attention's output while it is attached).
Several classes per image come from one forward; torchcam takes one class per image and call.
Shares no code with the closed-form path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .layers import resolve_layers
from .reference import mha_attention, timm_trunk_at
from .reference_timm import _block_with_attention as _timm_block_with_attention

__all__ = [
    "ClassifierLeGradOutput",
    "legrad_reference_classifier",
    "legrad_reference_torchvision",
    "legrad_reference_timm_classifier",
    "TORCHCAM_EPS",
]

TORCHCAM_EPS = 1e-8  # torchcam's `_normalize`: (M - min) / (max - min + eps)


@dataclass(frozen=True)
class ClassifierLeGradOutput:
    maps: torch.Tensor  # (B, P, gh, gw) in [0, 1]: torchcam's output, one map per (image, class)
    heatmaps: torch.Tensor  # (B, P, H, W): `maps` upsampled bilinearly by the patch size
    layer_maps: torch.Tensor  # (B, P, L, gh, gw) raw per-layer maps
    logits: torch.Tensor  # (B, C) the model's own output
    layers: tuple[int, ...]


def _block_with_attention(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision EncoderBlock on x (B, N, D): its output and its attention probabilities, a
    leaf requiring grad (the score of this layer reaches them only through this block)."""
    o, attn = mha_attention(block.self_attention, block.ln_1(x))
    x = x + block.self_attention.out_proj(o)
    return x + block.mlp(block.ln_2(x)), attn


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    return (maps - lo) / ((maps - lo).amax(dim=(-2, -1), keepdim=True) + TORCHCAM_EPS)


def legrad_reference_torchvision(
    model,
    pixel_values: torch.Tensor,
    class_ids: torch.Tensor | Sequence[int],
    layers: int | str | Sequence[int] = -2,
) -> ClassifierLeGradOutput:
    """LeGrad maps for B images × P classes of a torchvision `VisionTransformer` (eval mode),
    `pixel_values` (B, 3, H, W) preprocessed, H and W multiples of the patch; `class_ids` (P,) int.

    At another size than the model's own (torchvision itself refuses one) the positional embedding
    is resampled into a new tensor, bicubic and antialiased, as timm's `resample_abs_pos_embed`."""
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()): dropout would make the maps random")
    patch, native = model.patch_size, model.image_size // model.patch_size
    height, width = pixel_values.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(
            f"pixel_values are {height}×{width}; each side must be a multiple of the patch {patch}"
        )
    grid = (height // patch, width // patch)
    classes = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    blocks = list(model.encoder.layers)
    chosen = resolve_layers(layers, len(blocks))

    with torch.no_grad():
        pos = model.encoder.pos_embedding
        if grid != (native, native):
            pos = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=[native, native], num_prefix_tokens=1, antialias=True
            )
        x = F.conv2d(pixel_values, model.conv_proj.weight, model.conv_proj.bias, stride=patch)
        x = x.flatten(2).transpose(1, 2)  # (B, gh·gw, D), as torchvision's _process_input
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = model.encoder.dropout(x + pos)
    outputs, attentions = {}, {}
    for i, block in enumerate(blocks):
        if i in chosen:
            with torch.enable_grad():
                x, attentions[i] = _block_with_attention(block, x)
            outputs[i] = x
        else:
            with torch.no_grad():
                x = block(x)
    with torch.no_grad():
        logits = model.heads(model.encoder.ln(x)[:, 0])  # the model's own output, at any size

    per_layer = []
    for i in chosen:
        with torch.enable_grad():
            scores = model.heads(model.encoder.ln(outputs[i].mean(dim=1)))  # (B, C) raw logits
            maps = []
            for c in classes.tolist():
                (grad,) = torch.autograd.grad(scores[:, c].sum(), attentions[i], retain_graph=True)
                maps.append(grad.clamp(min=0).mean(dim=(1, 2))[:, 1:].reshape(-1, *grid))
        per_layer.append(torch.stack(maps, dim=1).detach())  # (B, P, gh, gw)

    return _aggregate(per_layer, patch, logits, chosen)


def _aggregate(per_layer: list[torch.Tensor], patch: int, logits, chosen) -> ClassifierLeGradOutput:
    layer_maps = torch.stack(per_layer, dim=2)  # (B, P, L, gh, gw)
    maps = _min_max(layer_maps.mean(dim=2))
    heatmaps = F.interpolate(maps, scale_factor=patch, mode="bilinear", align_corners=False)
    return ClassifierLeGradOutput(maps, heatmaps, layer_maps, logits, chosen)


def legrad_reference_timm_classifier(
    model,
    pixel_values: torch.Tensor,
    class_ids: torch.Tensor | Sequence[int],
    layers: int | str | Sequence[int] = -2,
) -> ClassifierLeGradOutput:
    """LeGrad maps for B images × P classes of a timm ViT classifier pooled by its class token or the
    token mean (eval mode), `pixel_values` (B, 3, H, W); at another size than the model's own, of a
    deep copy resized by timm's `set_input_size` (the model is not touched)."""
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()): dropout would make the maps random")
    trunk = timm_trunk_at(model, tuple(pixel_values.shape[-2:]))
    classes = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    chosen = resolve_layers(layers, len(trunk.blocks))
    grid = tuple(trunk.patch_embed.grid_size)
    final_norm = trunk.fc_norm if isinstance(trunk.norm, torch.nn.Identity) else trunk.norm

    with torch.no_grad():
        logits = trunk(pixel_values)
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixel_values))))
    outputs, attentions = {}, {}
    for i, block in enumerate(trunk.blocks):
        if i in chosen:
            with torch.enable_grad():
                x, attentions[i] = _timm_block_with_attention(block, x)
            outputs[i] = x
        else:
            with torch.no_grad():
                x = block(x)

    prefix, per_layer = trunk.num_prefix_tokens, []
    for i in chosen:
        with torch.enable_grad():
            scores = trunk.head(final_norm(outputs[i].mean(dim=1)))  # (B, C) raw logits
            maps = []
            for c in classes.tolist():
                (grad,) = torch.autograd.grad(scores[:, c].sum(), attentions[i], retain_graph=True)
                maps.append(grad.clamp(min=0).mean(dim=(1, 2))[:, prefix:].reshape(-1, *grid))
        per_layer.append(torch.stack(maps, dim=1).detach())  # (B, P, gh, gw)
    return _aggregate(per_layer, pixel_values.shape[-1] // grid[1], logits, chosen)


def legrad_reference_classifier(model, pixel_values, class_ids, layers=-2) -> ClassifierLeGradOutput:
    """The reference of the classifier's library: torchvision or timm."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return legrad_reference_torchvision(model, pixel_values, class_ids, layers)
    return legrad_reference_timm_classifier(model, pixel_values, class_ids, layers)
