"""Every open_clip pretrained pair's model config, SHRUNK: the same image-tower family and options, 2
blocks, width 64, 4 heads, MLP ratio 2, the real patch size (or stem stride), pooling, activation, LayerScale,
positions and head; a grid of at most 3×3 patches (plus the real remainder of a size that is no
multiple of the patch); a 32-d embedding. As timm's test models are made: the real builders with
small numbers, so the code that builds the real model builds this one.

timm towers are shrunk through their own entrypoints, registered again under `legrad_shrunk_<name>`
with the small numbers passed as keyword arguments (which timm's entrypoints let override their own);
hybrid stems are rebuilt with the real strides and small channels. The text tower is one tiny CLIP
text transformer for every pair (CoCa's with its decoder): the coverage is the image tower's, which
is what decides support; the text towers have their own tests.
"""

from __future__ import annotations

import copy
from functools import partial

import open_clip
import timm
import torch
from timm.models import register_model

WIDTH, HEADS, LAYERS, EMBED, GRID, MLP_RATIO = 64, 4, 2, 32, 3, 2.0
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
COCA_TEXT_CFG = TEXT_CFG | {"embed_cls": True, "output_tokens": True}
COCA_MULTIMODAL_CFG = dict(TEXT_CFG)

__all__ = ["shrunk_pair_cfg", "build_shrunk", "shrunk_size", "TEXT_CFG"]


def shrunk_size(size: int, patch: int) -> int:
    """At most GRID patches a side, keeping the real size's remainder modulo the patch."""
    return min(size // patch, GRID) * patch + size % patch


def _mci_stem_tower(pretrained: bool = False, **kwargs):
    """`vit_base_mci_224` (MobileCLIP-B) with its ConvStem's real strides and kernels, small channels."""
    from timm.models.vision_transformer_hybrid import ConvStem, _create_vision_transformer_hybrid

    backbone = ConvStem(
        channels=(16, 16, WIDTH), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0, act_layer=torch.nn.GELU
    )
    args = dict(embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS, no_embed_class=True) | kwargs
    return _create_vision_transformer_hybrid(
        "legrad_shrunk_vit_base_mci_224", backbone=backbone, embed_args=dict(proj=False), **args
    )


def _small_vitamin_stem():
    from timm.models.vitamin import VitCfg, VitConvCfg

    return VitCfg(
        embed_dim=(16, 32, WIDTH),
        depths=(1, 1, 1),
        stem_width=16,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )


def _native_trunk(timm_name: str) -> tuple[int, int, int]:
    """(image size, patch or stem stride, width) of the real trunk, read from a meta-device build."""
    with torch.device("meta"):
        trunk = timm.create_model(timm_name, pretrained=False)
    size = trunk.patch_embed.img_size[0]
    grid = trunk.patch_embed.grid_size[0]
    return size, size // grid, trunk.embed_dim


def _shrunk_timm_entry(timm_name: str, size: int):
    """Register `legrad_shrunk_<timm_name>`: the real entrypoint with small numbers; its name."""
    name = f"legrad_shrunk_{timm_name}"
    if name in timm.list_models(name):
        return name
    small = dict(depth=LAYERS, embed_dim=WIDTH, num_heads=HEADS, img_size=size, mlp_ratio=MLP_RATIO)
    if timm_name == "vit_base_mci_224":
        build = partial(_mci_stem_tower, img_size=size)
    else:
        if timm_name.startswith("vitamin"):
            small["embed_cfg"] = _small_vitamin_stem()
        entry = timm.models.model_entrypoint(timm_name)

        def build(pretrained: bool = False, **kwargs):
            return entry(pretrained=False, **(kwargs | small))

    build.__name__ = name
    build.__module__ = __name__
    register_model(build)
    return name


def shrunk_pair_cfg(model_name: str, tag: str) -> dict:
    """The open_clip model config of (model_name, tag), shrunk (see the module docstring)."""
    real = open_clip.get_model_config(model_name)
    vision = copy.deepcopy(real["vision_cfg"])
    cfg = {k: v for k, v in real.items() if k in ("init_logit_bias", "init_logit_scale", "custom_text")}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    quick = real.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False)
    cfg |= {"embed_dim": EMBED, "quick_gelu": bool(quick), "text_cfg": dict(TEXT_CFG)}
    if vision.get("timm_model_name"):
        native, stride, width = _native_trunk(vision["timm_model_name"])
        size = shrunk_size(native, stride)
        if real["embed_dim"] == width:  # no projection after the trunk (SigLIP): the embedding is its width
            cfg["embed_dim"] = WIDTH
        vision |= {"timm_model_name": _shrunk_timm_entry(vision["timm_model_name"], size)}
        vision |= {"timm_model_pretrained": False, "image_size": size}
        cfg["custom_text"] = True
    elif isinstance(vision.get("layers"), int):
        size = vision.get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        vision |= {"layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS, "mlp_ratio": MLP_RATIO}
        vision |= {"image_size": shrunk_size(size, vision["patch_size"])}
    else:  # a ResNet (layers per stage): shrink its width only; it is refused before any export
        vision |= {"width": 16, "image_size": 64}
    if "multimodal_cfg" in real:
        cfg |= {"custom_text": True, "text_cfg": dict(COCA_TEXT_CFG)}
        cfg["multimodal_cfg"] = dict(COCA_MULTIMODAL_CFG)
    cfg["vision_cfg"] = vision
    return cfg


def build_shrunk(cfg: dict, seed: int = 0) -> torch.nn.Module:
    """A random-init model of a shrunk config, its image tower's norm affines and gammas perturbed."""
    torch.manual_seed(seed)
    args = {k: v for k, v in cfg.items() if k != "custom_text"}
    if "multimodal_cfg" in cfg:
        model = open_clip.CoCa(**args)
    elif cfg.get("custom_text"):
        model = open_clip.CustomTextCLIP(**args)
    else:
        model = open_clip.CLIP(**args)
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "norm" in name or ".ln" in name or name.startswith("ln") or name.endswith("gamma"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()
