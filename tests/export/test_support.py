"""Which open_clip models export: the config classifier against built models, the CLI, the README."""

from __future__ import annotations

import re
from pathlib import Path

import open_clip
import pytest

from legrad_export.cli import main
from legrad_export.load import describe_vit
from legrad_export.support import markdown, model_support, pair_support
from legrad_runtime.errors import UnsupportedModelError

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
    describe_vit(open_clip.create_model(name), name)


@pytest.mark.parametrize(
    "name", ["RN50", "convnext_tiny", "coca_ViT-B-32", "ViT-B-16-SigLIP", "MobileCLIP-S1"]
)
def test_models_called_unsupported_build_a_tower_the_exporter_refuses(name):
    assert not model_support(name).supported
    with pytest.raises(UnsupportedModelError):
        describe_vit(open_clip.create_model(name), name)


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
    assert main(["--model", name, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("legrad-export: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{name}'s image tower is" in lines[0] and words in lines[0]
    assert "no self-attention over patch tokens, which LeGrad explains" in lines[0]
