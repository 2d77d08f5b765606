"""Tiny random-init OpenCLIP models saved as open_clip `local-dir:` folders (config + checkpoint).

They load through open_clip's real loading code. LayerNorm affines and LayerScale gammas are
perturbed away from their 1/0 init, so a formula that forgot one of them cannot pass.

Also a command, run by CI before the torch-free runtime tests:
    python tests/tiny_models.py OUT_DIR     # exports the runtime test folders into OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import torch

# name → vision_cfg overrides; each mirrors a structural feature of a real config in the matrix
TINY_VARIANTS = {
    "b32_like": dict(patch_size=32, image_size=96),  # ViT-B-32: large patches
    "b16_like": dict(patch_size=16, image_size=64),  # ViT-B-16
    "quickgelu": dict(patch_size=16, image_size=64),  # OpenAI weights: QuickGELU
    "layerscale": dict(patch_size=16, image_size=64, ls_init_value=0.5),  # ViT-M-16-alt: LayerScale
}


def tiny_model_cfg(variant: str) -> dict:
    vision = dict(layers=3, width=64, head_width=16, mlp_ratio=2.0) | TINY_VARIANTS[variant]
    return {
        "embed_dim": 32,
        "quick_gelu": variant == "quickgelu",
        "vision_cfg": vision,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


# SigLIP-style text towers (open_clip's TextTransformer fed by a Hugging Face tokenizer), per tokenizer
HF_TEXT_CLEAN = {"unigram": "canonicalize", "wordpiece": "lower", "bpe": "whitespace"}


def tiny_hf_text_cfg(kind: str, vocab_size: int) -> dict:
    """b16_like with a text tower like SigLIP's: no causal mask, last-token pooling, a HF tokenizer."""
    return tiny_model_cfg("b16_like") | {
        "text_cfg": {
            "context_length": 16,
            "vocab_size": vocab_size,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "no_causal_mask": True,
            "pool_type": "last",
            "proj_bias": True,
            "hf_tokenizer_name": f"tiny-{kind}",  # a Hub name; open_clip reads local-dir: folders' own files
            "tokenizer_kwargs": {"clean": HF_TEXT_CLEAN[kind], "strip_sep_token": kind == "wordpiece"},
        }
    }


def build_tiny_model(variant: str, seed: int = 0, cfg: dict | None = None):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**(cfg or tiny_model_cfg(variant))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("visual.ln", "ln_final")) or name.endswith("gamma"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_tiny_model_dir(root: Path, variant: str, seed: int = 0, cfg: dict | None = None) -> Path:
    folder = root / f"tiny-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = cfg or tiny_model_cfg(variant)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"interpolation": "bicubic"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(
        build_tiny_model(variant, seed, model_cfg).state_dict(), folder / "open_clip_pytorch_model.bin"
    )
    return folder


def save_tiny_hf_text_encoder_model(root: Path, seed: int = 0) -> Path:
    """A local-dir: folder like roberta-ViT-B-32: open_clip's HFTextEncoder (tiny RoBERTa), BPE tokenizer.

    The RoBERTa config is saved beside the folder and named by absolute path, as open_clip's
    `hf_model_name` would name a Hub repo; the text tower's weights are in the CLIP checkpoint.
    """
    from transformers import RobertaConfig

    from hf_tokenizers import build_hf_tokenizer, save_hf_tokenizer

    vocab = build_hf_tokenizer("bpe")[0].get_vocab_size()
    text_config = root / "tiny-roberta-config"
    RobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=20,  # RoBERTa's positions start after the pad id: 16 + 2 fit
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ).save_pretrained(str(text_config))
    text_cfg = {
        "hf_model_name": str(text_config.resolve()),
        "hf_tokenizer_name": "tiny-bpe",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "mean_pooler",
        "context_length": 16,
    }
    cfg = tiny_model_cfg("b16_like") | {"text_cfg": text_cfg}
    folder = root / "tiny-hf-roberta"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    save_hf_tokenizer("bpe", folder)
    return folder


def save_tiny_hf_text_model(root: Path, kind: str, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A local-dir: folder whose tokenizer is the small HF tokenizer KIND, saved inside it (or not)."""
    from hf_tokenizers import build_hf_tokenizer, save_hf_tokenizer

    vocab_size = build_hf_tokenizer(kind)[0].get_vocab_size()
    folder = save_tiny_model_dir(root, f"hf-{kind}", seed, tiny_hf_text_cfg(kind, vocab_size))
    if with_tokenizer:
        save_hf_tokenizer(kind, folder)
    return folder


# SigLIP-style towers: a timm VisionTransformer with a MAP head and no class token, shrunk. open_clip
# builds timm trunks by registered name only, so the tiny trunks are registered with timm (once).
SIGLIP_VARIANTS = {
    # ViT-B-16-SigLIP: exact GELU, MLP ratio 4, its Unigram (sentencepiece) tokenizer
    "siglip": dict(image_size=48, patch_size=8, mlp_ratio=4.0, act_layer="gelu", tokenizer="unigram"),
    # ViT-SO400M-16-SigLIP2: tanh GELU, MLP ratio 3.7362, a BPE (Gemma) tokenizer
    "siglip2": dict(image_size=64, patch_size=16, mlp_ratio=3.7362, act_layer="gelu_tanh", tokenizer="bpe"),
}


def _register_tiny_siglip_trunks() -> None:
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    for variant, v in SIGLIP_VARIANTS.items():
        name = f"legrad_tiny_{variant}"
        if name in timm.list_models(name):
            continue
        args = dict(
            img_size=v["image_size"],
            patch_size=v["patch_size"],
            embed_dim=64,
            depth=3,
            num_heads=4,
            mlp_ratio=v["mlp_ratio"],
            act_layer=v["act_layer"],
            class_token=False,
            global_pool="map",
        )

        def build(pretrained: bool = False, _name=name, _args=args, **kwargs):
            return _create_vision_transformer(_name, pretrained=False, **dict(_args, **kwargs))

        build.__name__ = name
        register_model(build)

    if "legrad_tiny_pe_core" not in timm.list_models("legrad_tiny_pe_core"):
        register_model(legrad_tiny_pe_core)


def legrad_tiny_pe_core(pretrained: bool = False, **kwargs):
    """PE-Core-T's trunk (timm Eva: class token, 2-D RoPE, MAP head, a Linear after it), shrunk, with
    LayerScale as the larger PE configs allow."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.eva import _create_eva

    args = dict(
        img_size=64,
        patch_size=16,
        embed_dim=64,
        depth=3,
        num_heads=4,
        mlp_ratio=4.0,
        global_pool="map",
        attn_type="rope",
        use_pre_transformer_norm=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        rope_grid_offset=1.0,
        rope_grid_indexing="xy",
        attn_pool_num_heads=8,
        attn_pool_mlp_ratio=4.0,
        norm_layer=partial(LayerNorm, eps=1e-5),
        init_values=0.5,
    )
    return _create_eva("legrad_tiny_pe_core", pretrained=False, **dict(args, **kwargs))


_register_tiny_siglip_trunks()

PE_CORE_CFG = {
    "embed_dim": 48,  # ≠ width: the trunk's Linear head projects 64 → 48
    "custom_text": True,
    "vision_cfg": {
        "image_size": 64,
        "timm_model_name": "legrad_tiny_pe_core",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": None,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_pe_core_model(root: Path, seed: int = 0) -> Path:
    """A local-dir: folder of a tiny PE-Core (CLIP tokenizer), norms, LayerScale and latent perturbed."""
    folder = root / "tiny-pe-core"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": PE_CORE_CFG, "preprocess_cfg": {}})
    )
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in PE_CORE_CFG.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "norm" in name or name.endswith(("latent", "gamma_1", "gamma_2")):
                p.add_(0.2 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def tiny_siglip_cfg(variant: str, vocab_size: int) -> dict:
    v = SIGLIP_VARIANTS[variant]
    return {
        "embed_dim": 64,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": v["image_size"],
            "timm_model_name": f"legrad_tiny_{variant}",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": tiny_hf_text_cfg(v["tokenizer"], vocab_size)["text_cfg"] | {"norm_kwargs": {"eps": 1e-6}},
    }


def build_tiny_siglip(variant: str, seed: int = 0, cfg: dict | None = None):
    """A random-init tiny SigLIP (CustomTextCLIP), norms' affines and the MAP latent perturbed."""
    from hf_tokenizers import build_hf_tokenizer

    if cfg is None:
        cfg = tiny_siglip_cfg(
            variant, build_hf_tokenizer(SIGLIP_VARIANTS[variant]["tokenizer"])[0].get_vocab_size()
        )
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "norm" in name or name.endswith("latent"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_tiny_siglip_model(root: Path, variant: str, seed: int = 0) -> Path:
    """A local-dir: folder of a tiny SigLIP with its small HF tokenizer saved inside."""
    from hf_tokenizers import build_hf_tokenizer, save_hf_tokenizer

    kind = SIGLIP_VARIANTS[variant]["tokenizer"]
    cfg = tiny_siglip_cfg(variant, build_hf_tokenizer(kind)[0].get_vocab_size())
    folder = root / f"tiny-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(build_tiny_siglip(variant, seed, cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    save_hf_tokenizer(kind, folder)
    return folder


# timm token-mean towers (the CLIP rule): MobileCLIP's conv stem, MobileCLIP2-L's plain CLIP ViT, ViTamin
def legrad_tiny_mobileclip(pretrained: bool = False, **kwargs):
    """MobileCLIP-B's `vit_base_mci_224`, shrunk: a 3-conv ConvStem (stride 16), a class token without
    a position, token pooling, timm's classifier as the projection."""
    from timm.models.vision_transformer_hybrid import ConvStem, _create_vision_transformer_hybrid

    backbone = ConvStem(
        channels=(16, 16, 64), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0, act_layer=torch.nn.GELU
    )
    args = dict(img_size=64, embed_dim=64, depth=3, num_heads=4, no_embed_class=True)
    return _create_vision_transformer_hybrid(
        "legrad_tiny_mobileclip", backbone=backbone, embed_args=dict(proj=False), **dict(args, **kwargs)
    )


def legrad_tiny_clip_l14(pretrained: bool = False, **kwargs):
    """MobileCLIP2-L-14's `vit_large_patch14_clip_224`, shrunk: patch 14, `norm_pre`, a class token;
    LayerScale added so the math's γ cannot be skipped."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.vision_transformer import _create_vision_transformer

    args = dict(
        img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-5), init_values=0.5,
    )  # fmt: skip
    return _create_vision_transformer("legrad_tiny_clip_l14", pretrained=False, **dict(args, **kwargs))


def legrad_tiny_vitamin(pretrained: bool = False, **kwargs):
    """ViTamin-S, shrunk: an MbConv stem (stride 16), no class token, mean pooling, GeGLU MLPs."""
    from timm.models.vitamin import GeGluMlp, VitCfg, VitConvCfg, _create_vitamin

    embed_cfg = VitCfg(
        embed_dim=(16, 32, 64),
        depths=(1, 1, 1),
        stem_width=16,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    args = dict(
        img_size=64, embed_dim=64, depth=3, num_heads=4, mlp_layer=GeGluMlp, mlp_ratio=2.0,
        class_token=False, global_pool="avg", embed_cfg=embed_cfg,
    )  # fmt: skip
    return _create_vitamin("legrad_tiny_vitamin", pretrained=False, **dict(args, **kwargs))


def _register_tiny_token_trunks() -> None:
    import timm
    from timm.models import register_model

    for build in (legrad_tiny_mobileclip, legrad_tiny_clip_l14, legrad_tiny_vitamin):
        if build.__name__ not in timm.list_models(build.__name__):
            register_model(build)


_register_tiny_token_trunks()

# variant → (timm trunk, image size, open_clip's timm_pool / timm_proj as the real config has them)
TIMM_TOKEN_VARIANTS = {
    "mobileclip": ("legrad_tiny_mobileclip", 64, "token", None),  # MobileCLIP-B, MobileCLIP2-B
    "clip_l14": ("legrad_tiny_clip_l14", 56, "token", None),  # MobileCLIP2-L-14
    "vitamin": ("legrad_tiny_vitamin", 64, "", "linear"),  # ViTamin-*
}


def tiny_timm_token_cfg(variant: str) -> dict:
    trunk, size, pool, proj = TIMM_TOKEN_VARIANTS[variant]
    vision = {"image_size": size, "timm_model_name": trunk, "timm_model_pretrained": False}
    return {
        "embed_dim": 48,  # ≠ width 64: the projection cannot be skipped
        "custom_text": True,
        "vision_cfg": vision | {"timm_pool": pool, "timm_proj": proj},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def save_tiny_timm_token_model(root: Path, variant: str, seed: int = 0) -> Path:
    """A local-dir: folder of a tiny timm token-mean tower (CLIP tokenizer); norms, LayerScale and the
    projection's bias perturbed away from their init."""
    cfg = tiny_timm_token_cfg(variant)
    folder = root / f"tiny-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "norm" in name or name.endswith(("gamma", "head.bias")):
                p.add_(0.2 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


# EVA-CLIP towers (timm Eva, class-token pooled, the CLIP rule): 2 blocks, width 64, 4 heads, real patches
def _tiny_eva(name: str, **args):
    from timm.models.eva import _create_eva

    base = dict(embed_dim=64, depth=2, num_heads=4, global_pool="token")
    return _create_eva(name, pretrained=False, **(base | args))


def legrad_tiny_eva01(pretrained: bool = False, **kwargs):
    """EVA01-g's `eva_giant_patch14_224`, shrunk: plain pre-norm blocks, fused qkv with q/v biases."""
    return _tiny_eva("legrad_tiny_eva01", img_size=56, patch_size=14, mlp_ratio=6144 / 1408, **kwargs)


def legrad_tiny_eva02(pretrained: bool = False, **kwargs):
    """EVA02-B-16's `eva02_base_patch16_clip_224`, shrunk: separate q/k/v, attn.norm, SwiGLU with its
    LayerNorm, 2-D RoPE rescaled from a 5×5 reference grid (B's is 16×16 at 14×14); LayerScale added
    so the math's γ cannot be skipped."""
    args = dict(
        img_size=64, patch_size=16, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
        scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(5, 5), init_values=0.5,
    )  # fmt: skip
    return _tiny_eva("legrad_tiny_eva02", **(args | kwargs))


def legrad_tiny_eva02_e(pretrained: bool = False, **kwargs):
    """EVA02-E-14's `eva02_enormous_patch14_clip_224`, shrunk: post-norm blocks, GELU MLPs, fused qkv."""
    args = dict(img_size=56, patch_size=14, mlp_ratio=15360 / 1792, use_post_norm=True)
    return _tiny_eva("legrad_tiny_eva02_e", **(args | kwargs))


def _register_tiny_eva_trunks() -> None:
    import timm
    from timm.models import register_model

    for build in (legrad_tiny_eva01, legrad_tiny_eva02, legrad_tiny_eva02_e):
        if build.__name__ not in timm.list_models(build.__name__):
            register_model(build)


_register_tiny_eva_trunks()

EVA_VARIANTS = {"eva01": ("legrad_tiny_eva01", 56), "eva02": ("legrad_tiny_eva02", 64),
                "eva02_e": ("legrad_tiny_eva02_e", 56)}  # fmt: skip


def save_tiny_eva_model(root: Path, variant: str, seed: int = 0) -> Path:
    """A local-dir: folder of a tiny EVA-CLIP (CLIP tokenizer), `timm_pool` "token" and `timm_proj` null
    as the real configs; norms, LayerScale, q/v biases, the SwiGLU gate and the head's bias perturbed."""
    trunk, size = EVA_VARIANTS[variant]
    vision = {"image_size": size, "timm_model_name": trunk, "timm_model_pretrained": False}
    cfg = {
        "embed_dim": 48,  # ≠ width 64: the projection cannot be skipped
        "custom_text": True,
        "vision_cfg": vision | {"timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder = root / f"tiny-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "norm" in name or name.endswith(("gamma_1", "gamma_2", "q_bias", "v_bias", "head.bias")):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("fc1_g.weight"):  # timm inits the gate near zero: make it matter
                p.add_(0.1 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


# coca_ViT-B-32 shrunk: an attentional pooler of 256 latents, width 48 ≠ the tower's 64, 4 heads
COCA_CFG = {
    "embed_dim": 48,
    "custom_text": True,  # as the real configs: open_clip builds a CoCa for custom_text + multimodal_cfg
    "vision_cfg": {
        "image_size": 64,
        "layers": 3,
        "width": 64,
        "head_width": 16,
        "patch_size": 16,
        "attentional_pool": True,
        "attn_pooler_heads": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_coca(seed: int = 0):
    """A random-init tiny CoCa, its image tower's LayerNorm affines (ln_q, ln_k, ln_post too) perturbed."""
    torch.manual_seed(seed)
    model = open_clip.CoCa(**{k: v for k, v in COCA_CFG.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_tiny_coca_model(root: Path, seed: int = 0) -> Path:
    """A local-dir: folder of the tiny CoCa (CLIP tokenizer)."""
    folder = root / "tiny-coca"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": COCA_CFG, "preprocess_cfg": {}}))
    torch.save(build_tiny_coca(seed).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def meta_tower(name: str) -> torch.nn.Module:
    """open_clip model `name`'s image tower built on the meta device (no memory, any size in
    milliseconds), held as `.visual`: what describe_tower and canonical_state_dict take."""
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(name)
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    return holder


def encode_at(model, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's own normalised image embeddings of a timm-tower model at the pixels' size: at
    another size than its own, of a deep copy resized by timm's `set_input_size`."""
    import copy

    size = tuple(pixels.shape[-2:])  # (height, width)
    if size != tuple(model.visual.trunk.patch_embed.img_size):
        model = copy.deepcopy(model)
        model.visual.trunk.set_input_size(img_size=size)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)


def assert_each_pair_equals_single(session, pixels: torch.Tensor, text: torch.Tensor) -> None:
    """Every [b, p] of an onnxruntime image-graph run equals that image and prompt run alone."""
    import numpy as np

    heatmaps, layer_maps, embeds = session.run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    assert heatmaps.shape == (pixels.shape[0], text.shape[0], *pixels.shape[-2:])
    for b in range(pixels.shape[0]):
        for p in range(text.shape[0]):
            one = session.run(
                None, {"pixel_values": pixels[b : b + 1].numpy(), "text_embeds": text[p : p + 1].numpy()}
            )
            np.testing.assert_allclose(heatmaps[b, p], one[0][0, 0], atol=1e-5)
            np.testing.assert_allclose(layer_maps[b, p], one[1][0, 0], atol=1e-6)
            np.testing.assert_allclose(embeds[b], one[2][0], atol=1e-6)


def random_inputs(batch: int, prompts: int, size: int | tuple[int, int], embed_dim: int, seed: int = 0):
    """Seeded standardised pixels (B, 3, H, W) (an int size is a square) and unit text embeddings."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *((size, size) if isinstance(size, int) else size), generator=gen)
    text = torch.nn.functional.normalize(torch.randn(prompts, embed_dim, generator=gen), dim=-1)
    return pixels, text


RUNTIME_VARIANT = "layerscale"  # the runtime tests' model: every feature the math has
# the runtime test model ships a vocabulary (as a trainer's legrad_defaults.json would give it)
RUNTIME_VOCABULARY = {
    "slots": {"color": ["red", "orange"], "shape": ["circle", "square"]},
    "templates": ["{a} {color} {shape}", "a photo of {a} {color} {shape}"],
}


def assert_matches_reference(loaded, size: int, layer_spec, batch: int = 2, prompts: int = 3) -> None:
    """The analytic graph's outputs equal the autograd reference on the same weights (atol 1e-5)."""
    from legrad_export.graphs import build_image_graph
    from legrad_export.layers import resolve_layers
    from legrad_export.reference import legrad_reference

    layers = resolve_layers(layer_spec, loaded.vit.num_layers)
    graph = build_image_graph(loaded, size, layers)
    pixels, text = random_inputs(batch, prompts, size, loaded.vit.embed_dim, seed=size)
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    ref = legrad_reference(loaded.model, pixels, text, layer_spec)
    assert ref.layers == layers
    assert heatmaps.shape == (batch, prompts, size, size)
    assert layer_maps.shape == (
        batch,
        prompts,
        len(layers),
        size // loaded.vit.patch_size,
        size // loaded.vit.patch_size,
    )
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (image_embeds - ref.image_embeds).abs().max() <= 1e-5
    assert heatmaps.amin() >= 0 and heatmaps.amax() <= 1 and torch.isfinite(heatmaps).all()
    assert layer_maps.abs().max() > 0  # a real map, not a degenerate all-zero one


def export_with_cli(source: Path, out: Path) -> Path:
    """`legrad-export --model local-dir:<source>`, which verifies the graphs against the reference."""
    from legrad_export.cli import main

    if main(["--model", f"local-dir:{source}", "--out", str(out), "--overwrite"]) != 0:
        raise RuntimeError(f"legrad-export failed for {source}")
    (folder,) = out.iterdir()
    return folder


# ---------------------------------------------------------------- supervised classifiers

TORCHVISION_PREPROCESS = {  # torchvision's ImageNet preset (resize 256, crop 224) at the tiny size
    "size": 64,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "resize_mode": "shortest",
    "crop_pct": 0.875,
    "version": "torchvision (tiny test model)",
}


def _randomise_classifier(model, head: str, extra: tuple[str, ...] = ()):
    """torchvision zero-initialises the head (a zero head makes every map constant) and LayerNorms
    start at (1, 0): perturb them, so that a formula that forgets one cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(head) or name in extra:
                p.normal_(0, 0.5)
            elif "ln" in name or "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


def build_tiny_torchvision_vit(num_classes: int = 1000, seed: int = 0):
    """A small torchvision ViT classifier: 64 px, patch 16, 3 blocks, 4 heads, width 64."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=64,
        patch_size=16,
        num_layers=3,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=num_classes,
    )
    return _randomise_classifier(model, "heads", ("class_token",))


# name → timm VisionTransformer options: class-token pooling; the token mean with fc_norm (timm's
# default for 'avg') and without it (the final norm on every token, then the mean)
TIMM_CLASSIFIER_VARIANTS = {
    "token": dict(global_pool="token"),
    "avg_fc_norm": dict(global_pool="avg", class_token=False),
    "avg_norm": dict(global_pool="avg", fc_norm=False),
}


def build_tiny_timm_classifier(variant: str, num_classes: int = 10, seed: int = 0):
    """A small timm ViT classifier (64 px, patch 16, 3 blocks, 4 heads, width 64) of one pooling kind."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0,
        num_classes=num_classes, **TIMM_CLASSIFIER_VARIANTS[variant],
    )  # fmt: skip
    return _randomise_classifier(model, "head")


def wrap_tiny_classifier(model, name: str = "torchvision:tiny_vit"):
    from legrad_export.load_classifier import wrap_classifier

    preprocess = TORCHVISION_PREPROCESS if name.startswith("torchvision") else {
        **TORCHVISION_PREPROCESS, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
        "crop_pct": 0.9, "version": "timm (tiny test model)",
    }  # fmt: skip
    return wrap_classifier(model, name, "none", preprocess)


NON_SQUARE_SIZE = (48, 80)  # (height, width) of the runtime's non-square folder: `--image-size 80x48`


def export_runtime_folders(out: Path) -> dict[str, Path]:
    """One exported folder per resize mode, for the runtime tests: {'squash': ..., 'shortest': ...,
    'longest': ...}; 'longest' is non-square (NON_SQUARE_SIZE), the others the model's own square."""
    from legrad_export.load import load_openclip
    from legrad_export.onnx_export import ExportSettings, export_model

    source = save_tiny_model_dir(out / "source", RUNTIME_VARIANT)
    (source / "legrad_defaults.json").write_text(json.dumps({"vocabulary": RUNTIME_VOCABULARY}))
    loaded = load_openclip(str(source))
    folders = {}
    for mode in ("squash", "shortest"):
        folder = export_model(loaded, out / mode, ExportSettings(resize_mode=mode, overwrite=True))
        folders[mode] = folder
    folders["longest"] = export_model(
        loaded, out / "longest", ExportSettings(NON_SQUARE_SIZE, resize_mode="longest", overwrite=True)
    )
    hf_source = save_tiny_hf_text_model(out / "source", "unigram")
    folders["hf"] = export_model(load_openclip(str(hf_source)), out / "hf", ExportSettings(overwrite=True))
    siglip_source = save_tiny_siglip_model(out / "source", "siglip")
    folders["siglip"] = export_model(
        load_openclip(str(siglip_source)), out / "siglip", ExportSettings(overwrite=True)
    )
    pe_core = load_openclip(str(save_tiny_pe_core_model(out / "source")))
    folders["pe_core"] = export_model(pe_core, out / "pe_core", ExportSettings(overwrite=True))
    vitamin = load_openclip(str(save_tiny_timm_token_model(out / "source", "vitamin")))
    folders["vitamin"] = export_model(vitamin, out / "vitamin", ExportSettings(overwrite=True))
    folders["eva02"] = export_with_cli(save_tiny_eva_model(out / "source", "eva02"), out / "eva02")
    coca = load_openclip(str(save_tiny_coca_model(out / "source")))
    folders["coca"] = export_model(coca, out / "coca", ExportSettings(overwrite=True))
    classifier = wrap_tiny_classifier(build_tiny_torchvision_vit(1000))
    folders["classifier"] = export_model(classifier, out / "classifier", ExportSettings(overwrite=True))
    write_hf_tokenizer_cases(out / HF_TOKENIZER_CASES)
    return folders


HF_TOKENIZER_CASES = "hf-tokenizer-cases"


def write_hf_tokenizer_cases(out: Path) -> None:
    """Per HF tokenizer kind: the files an export writes, their TokenizerCfg, and open_clip's ids.

    For the torch-free runtime tests: `out/<kind>/` holds `tokenizer/`, `cfg.json` and `ids.json`
    (open_clip's HFTokenizer on prompt_corpus.CORPUS and 300 random prompts).
    """
    from dataclasses import asdict

    from hf_tokenizers import KINDS
    from legrad_export.load import load_openclip
    from legrad_export.text_tokenizer import write_tokenizer
    from prompt_corpus import CORPUS, random_prompts

    prompts = CORPUS + random_prompts(300, seed=3)
    for kind in KINDS:
        folder = out / kind
        loaded = load_openclip(str(save_tiny_hf_text_model(out / "sources", kind)))
        cfg = write_tokenizer(loaded, folder)
        (folder / "cfg.json").write_text(json.dumps(asdict(cfg)))
        ids = loaded.tokenizer(prompts).tolist()
        (folder / "ids.json").write_text(json.dumps({"prompts": prompts, "ids": ids}, ensure_ascii=False))


if __name__ == "__main__":
    for mode, folder in export_runtime_folders(Path(sys.argv[1])).items():
        print(mode, folder)
