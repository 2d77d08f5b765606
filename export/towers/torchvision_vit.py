"""torchvision's `VisionTransformer` (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14): an ImageNet
classifier, its description and its tensors under the canonical names of spec.py.

The blocks are pre-norm with `nn.MultiheadAttention` (fused in_proj), erf GELU and LayerNorm eps
1e-6; the class token feeds `encoder.ln` and `heads.head`. LeGrad scores each explained layer by
the raw logit of its token mean (docs/classifiers.md, torchcam 0.5.0's rule): the head is the
projection, with its bias, and the spec's `score` is "logit".
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from legrad_runtime.errors import UnsupportedModelError

from .spec import TowerSpec

__all__ = ["is_torchvision_vit", "describe", "canonical_state_dict"]

_RENAMES = [
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "head.norm."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
]


def is_torchvision_vit(model: nn.Module | None) -> bool:
    from torchvision.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def describe(model: nn.Module, model_name: str) -> TowerSpec:
    """The spec of a torchvision ViT classifier; UnsupportedModelError for what LeGrad lacks."""
    from torchvision.models.vision_transformer import EncoderBlock, MLPBlock

    if list(dict(model.heads.named_children())) != ["head"]:
        raise UnsupportedModelError(
            f"{model_name} has a pre-logits layer (representation_size) before its classifier; "
            "LeGrad export supports heads made of one Linear"
        )
    blocks = list(model.encoder.layers)
    odd = {type(b).__name__ for b in blocks if type(b) is not EncoderBlock or type(b.mlp) is not MLPBlock}
    if odd or not all(isinstance(b.mlp[1], nn.GELU) and b.mlp[1].approximate == "none" for b in blocks):
        raise UnsupportedModelError(
            f"{model_name} has blocks other than torchvision's EncoderBlock with GELU"
        )
    norms = [n for b in blocks for n in (b.ln_1, b.ln_2)] + [model.encoder.ln]
    if not all(isinstance(n, nn.LayerNorm) for n in norms) or len({n.eps for n in norms}) != 1:
        raise UnsupportedModelError(f"{model_name} mixes norms or LayerNorm eps; not supported")
    return TowerSpec(
        family="torchvision_vit",
        width=model.hidden_dim,
        heads=blocks[0].self_attention.num_heads,
        num_layers=len(blocks),
        patch_size=model.patch_size,
        native_grid=model.image_size // model.patch_size,
        embed_dim=model.heads.head.out_features,
        activation="gelu",
        head="token_mean",
        prefix_tokens=1,
        pool_type="tok",
        eps=norms[0].eps,
        score="logit",
    )


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's tensors (views) under the canonical names; the head as `head.proj` (D, C)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("heads."):
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, name):
                new = re.sub(pattern, repl, name)
                out[new] = tensor.reshape(-1) if new == "cls_token" else tensor
                break
        else:
            raise UnsupportedModelError(f"unexpected tensor {name!r} in the torchvision ViT")
    out["pos_embed"] = out["pos_embed"][0]  # (N, D)
    out["head.proj"] = model.heads.head.weight.T  # (D, C)
    out["head.proj_bias"] = model.heads.head.bias
    return out
