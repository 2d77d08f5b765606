"""Which open_clip models export: the config classifier against built models, the CLI, the README."""

from __future__ import annotations

import re
from pathlib import Path

import open_clip
import pytest
import torch

from legrad_export.cli import main
from legrad_export.ops import activation
from legrad_export.support import all_models, markdown, model_support, pair_support
from legrad_export.towers import canonical_state_dict, describe_tower
from legrad_runtime.errors import UnsupportedModelError
from tiny_models import meta_tower

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_holds_the_generated_section():
    section = re.search(
        r"<!-- supported-models:start -->\n(.*?)<!-- supported-models:end -->", README.read_text(), re.S
    )
    assert section is not None
    assert section.group(1) == markdown(), "regenerate it: python -m legrad_export.support"


# one small model per family; building a model is the independent check of what its config says
@pytest.mark.parametrize("name", ["ViT-S-32", "ViT-B-32", "ViT-M-16-alt", "ViT-B-16-quickgelu"])
def test_models_called_supported_build_a_tower_the_exporter_accepts(name):
    assert model_support(name).supported
    describe_tower(open_clip.create_model(name), name)


SIGLIP_NAMES = [n for n, s in all_models() if s.family in ("timm SigLIP ViT", "timm PE-Core")]


@pytest.mark.parametrize("name", SIGLIP_NAMES)
def test_every_map_head_model_called_supported_has_a_tower_the_exporter_describes(name):
    """Each image tower built without memory (meta device): the whole family, up to ViT-gopt, in seconds."""
    cfg = open_clip.get_model_config(name)
    model = meta_tower(name)
    visual = model.visual
    spec = describe_tower(model, name)
    pe_core = name.startswith("PE-Core")
    assert spec.head == "map" and spec.rope == pe_core
    assert spec.prefix_tokens == (visual.trunk.cls_token is not None)
    assert spec.tokens(spec.native_grid) == visual.trunk.pos_embed.shape[1]
    assert spec.native_grid == cfg["vision_cfg"]["image_size"] // spec.patch_size  # 384 // 14 = 27
    x = torch.linspace(-6, 6, 101)  # the spec's activation computes what the tower's own modules do
    for act in (visual.trunk.blocks[0].mlp.act, visual.trunk.attn_pool.mlp.act):
        torch.testing.assert_close(activation(x, spec.activation), act(x), rtol=0, atol=1e-6)


TIMM_TOKEN_NAMES = [n for n, s in all_models() if s.family in ("timm ViT", "timm ViTamin")]


@pytest.mark.parametrize("name", TIMM_TOKEN_NAMES)
def test_every_timm_token_model_called_supported_has_a_tower_the_exporter_describes(name):
    """MobileCLIP, ViTamin and the GAP ViT, built on the meta device: the spec matches the built tower."""
    cfg = open_clip.get_model_config(name)
    model = meta_tower(name)
    visual = model.visual
    spec = describe_tower(model, name)
    trunk = visual.trunk
    assert spec.head == "token_mean" and spec.family == "timm_vit"
    assert spec.prefix_tokens == (trunk.cls_token is not None)
    assert spec.mlp == ("geglu" if name.startswith("ViTamin") else "plain")
    assert spec.stem == ("patch" if type(trunk.patch_embed).__name__ == "PatchEmbed" else "hybrid")
    assert spec.native_grid**2 == trunk.patch_embed.num_patches
    assert spec.native_grid * spec.patch_size == trunk.patch_embed.img_size[0]  # ViTamin-XL-384: 384, its
    # open_clip config says 256 (the tower has no positions, so the runtime's 256 px give a 16×16 grid)
    assert spec.embed_dim == cfg["embed_dim"]
    sd = canonical_state_dict(model, spec)  # ViTamin-XL has no positions, the GAP ViT no qkv bias
    assert sd["pos_embed"].shape == (spec.tokens(spec.native_grid), spec.width)
    assert all(sd[f"blocks.{i}.attn.qkv.bias"].shape == (3 * spec.width,) for i in range(spec.num_layers))


EVA_NAMES = [n for n, s in all_models() if s.family == "timm EVA-CLIP"]


def test_the_eva_clip_models_are_the_seven_of_open_clip():
    assert sorted(EVA_NAMES) == sorted(
        ["EVA01-g-14", "EVA01-g-14-plus", "EVA02-B-16", "EVA02-L-14", "EVA02-L-14-336", "EVA02-E-14",
         "EVA02-E-14-plus"]
    )  # fmt: skip


# one model per trunk: the -plus models differ from their pair in the text tower only
EVA_TRUNKS = {open_clip.get_model_config(n)["vision_cfg"]["timm_model_name"]: n for n in reversed(EVA_NAMES)}


@pytest.mark.parametrize("name", sorted(EVA_TRUNKS.values()))
def test_every_eva_clip_trunk_has_a_tower_the_exporter_describes(name):
    """EVA01-g, EVA02-B/L/E built on the meta device: block kind, RoPE, grid and projection as built."""
    cfg = open_clip.get_model_config(name)
    model = meta_tower(name)
    visual = model.visual
    spec = describe_tower(model, name)
    kind = {"EVA01": ("plain", False, False, False), "EVA02-E": ("plain", False, True, False)}.get(
        name[:7] if name.startswith("EVA02-E") else name[:5], ("swiglu", True, False, True)
    )
    assert (spec.mlp, spec.attn_norm, spec.post_norm, spec.rope) == kind
    assert (spec.family, spec.head, spec.prefix_tokens) == ("timm_eva", "token_mean", 1)
    assert spec.embed_dim == cfg["embed_dim"]
    assert spec.native_grid * spec.patch_size == cfg["vision_cfg"]["image_size"]
    assert isinstance(visual.trunk.head, torch.nn.Linear) and visual.trunk.head.bias is not None
    sd = canonical_state_dict(model, spec)
    assert sd["pos_embed"].shape == (spec.tokens(spec.native_grid), spec.width)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * spec.width, spec.width)
    assert ("rope" in sd) == spec.rope and ("blocks.0.attn.norm.weight" in sd) == spec.attn_norm


def test_a_relative_position_vit_is_refused_in_one_line():
    support = model_support("vit_relpos_medium_patch16_cls_224")
    assert not support.supported and "relative position bias" in support.reason
    with pytest.raises(UnsupportedModelError, match="vit_relpos_medium_patch16_cls_224"):
        describe_tower(
            open_clip.create_model("vit_relpos_medium_patch16_cls_224"), "vit_relpos_medium_patch16_cls_224"
        )


@pytest.mark.parametrize("name", ["RN50", "convnext_tiny", "MobileCLIP-S1"])
def test_models_called_unsupported_build_a_tower_the_exporter_refuses(name):
    assert not model_support(name).supported
    with pytest.raises(UnsupportedModelError):
        describe_tower(open_clip.create_model(name), name)


def test_list_models_prints_every_model_and_every_pair(capsys):
    assert main(["--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == open_clip.list_models()
    rn50 = next(ln for ln in lines if ln.startswith("RN50\t"))
    assert "not supported" in rn50 and "no self-attention over patch tokens" in rn50
    assert next(ln for ln in lines if ln.startswith("ViT-B-16\t")).endswith("\tsupported")

    assert main(["--list-models", "--pretrained", "all"]) == 0
    pairs = [tuple(ln.split("\t")[:2]) for ln in capsys.readouterr().out.splitlines()]
    assert pairs == [tuple(p) for p in open_clip.list_pretrained()]


def test_quickgelu_tags_are_noted():
    assert "QuickGELU" in pair_support("ViT-B-16", "openai").reason
    assert pair_support("ViT-B-16", "laion2b_s34b_b88k").reason == ""


@pytest.mark.parametrize(
    "name, words",
    [
        ("RN50", "ResNet"),
        ("convnext_base", "ConvNeXt"),
        ("MobileCLIP-S2", "FastViT"),
    ],
)
def test_convolutional_towers_are_one_line_saying_why_without_building_them(
    tmp_path, capsys, monkeypatch, name, words
):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    assert main(["--model", name, "--pretrained", "none", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("legrad-export: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{name}'s image tower is" in lines[0] and words in lines[0]
    assert "no self-attention over patch tokens, which LeGrad explains" in lines[0]
