"""Both CLIs' argument checks: --pretrained required where weights are chosen, random weights said
aloud, and every argument or path error answered before torch, open_clip or timm is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import open_clip
import pytest
from PIL import Image

import legrad_export
from legrad_export import arguments, openclip_names
from legrad_export.arguments import CLASSIFIER, HF_HUB, LOCAL_DIR, OPEN_CLIP, check_model_arguments
from legrad_export.cli import main
from legrad_export.evaluate_cli import main as evaluate_main
from legrad_runtime.errors import ExportError

pytestmark = pytest.mark.torch

HEAVY = ("torch", "open_clip", "timm", "torchvision")


def _only_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("legrad-export: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_open_clip_name_without_pretrained_is_refused_with_its_tags(tmp_path, capsys):
    assert main(["--model", "ViT-B-16", "--out", str(tmp_path)]) == 2
    line = _only_error_line(capsys)
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16")
    assert "--model ViT-B-16 needs --pretrained" in line and ", ".join(tags[:5]) in line
    assert f"and {len(tags) - 5} more" in line and tags[-1] not in line  # a few, not all fifteen
    assert "a local checkpoint path" in line and "--pretrained none for random weights" in line
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_one_tag_lists_it_and_a_classifier_names_its_kind_of_weights(tmp_path, capsys):
    (name, tag), *_ = [
        (m, t) for m, t in open_clip.list_pretrained() if len(open_clip.list_pretrained_tags_by_model(m)) == 1
    ]
    assert main(["--model", name, "--out", str(tmp_path)]) == 2
    assert f"an open_clip tag ({tag})," in _only_error_line(capsys)
    assert main(["--model", "torchvision:vit_b_16", "--out", str(tmp_path)]) == 2
    assert "a torchvision weights name such as IMAGENET1K_V1" in _only_error_line(capsys)
    assert main(["--model", "timm:vit_tiny_patch16_224", "--out", str(tmp_path)]) == 2
    assert "needs --pretrained: hub (timm's own weights" in _only_error_line(capsys)


def test_models_that_carry_their_own_weights_need_no_pretrained(tiny_dirs):
    folder = tiny_dirs["b16_like"]
    assert check_model_arguments(str(folder), None) == LOCAL_DIR
    assert check_model_arguments(f"local-dir:{folder}", None) == LOCAL_DIR
    assert check_model_arguments("hf-hub:someone/some-clip", None) == HF_HUB
    assert check_model_arguments("ViT-B-16", "none") == OPEN_CLIP
    assert check_model_arguments("torchvision:vit_b_16", "IMAGENET1K_V1") == CLASSIFIER
    with pytest.raises(ExportError, match="carries its own weights; drop --pretrained"):
        check_model_arguments(str(folder), "laion2b_s34b_b88k")


def test_pretrained_none_warns_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def stop(args):
        raise ExportError("stopped where the model would load")

    monkeypatch.setattr("legrad_export.cli.load_from_args", stop)
    assert main(["--model", "ViT-B-16", "--pretrained", "none", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    warnings = [ln for ln in err if ln.startswith("legrad-export: warning:")]
    assert warnings == [
        "legrad-export: warning: --pretrained none: ViT-B-16 gets random weights; its heatmaps mean nothing "
        "(fine for tests and timing only)"
    ]
    assert err.index(warnings[0]) < err.index("legrad-export: error: stopped where the model would load")


def test_legrad_evaluate_warns_the_same_way(bad_input, capsys, monkeypatch):
    def stop(args):
        raise ExportError("stopped where the model would load")

    monkeypatch.setattr("legrad_export.evaluate_cli.load_from_args", stop)
    assert evaluate_main([str(bad_input / "cases"), "--model", "ViT-B-16", "--pretrained", "none"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [
        ln for ln in err if ln.startswith("legrad-evaluate: warning: --pretrained none: ViT-B-16 gets random")
    ]
    assert err[-1] == "legrad-evaluate: error: stopped where the model would load"


def test_a_local_folder_without_a_checkpoint_is_said_to_have_random_weights(tmp_path, tiny_dirs):
    assert arguments.random_weights_note(str(tiny_dirs["b16_like"]), None) is None
    assert arguments.random_weights_note(str(tiny_dirs["b16_like"]), "none") is None  # its own weights
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "open_clip_config.json").write_text("{}")
    assert "holds no checkpoint" in arguments.random_weights_note(str(bare), None)


def test_the_name_snapshot_is_the_installed_open_clips():
    assert openclip_names.OPEN_CLIP_VERSION == open_clip.__version__, "python -m legrad_export.arguments"
    assert openclip_names.MODELS == tuple(open_clip.list_models())
    assert [tuple(p) for p in openclip_names.PRETRAINED] == [tuple(p) for p in open_clip.list_pretrained()]


def test_another_open_clip_version_is_asked_directly(monkeypatch):
    snapshot = arguments.openclip_catalogue()
    monkeypatch.setattr(openclip_names, "OPEN_CLIP_VERSION", "0.0.0")
    live = arguments.openclip_catalogue()
    assert live == snapshot and live[1]["ViT-B-32"] == tuple(
        open_clip.list_pretrained_tags_by_model("ViT-B-32")
    )


def test_the_public_loaders_are_exported_lazily():
    code = (
        "import sys, legrad_export; heavy = [m for m in ('torch', 'open_clip') if m in sys.modules]; "
        "from legrad_export import load_openclip, export_model; "
        "print(heavy, load_openclip.__module__, export_model.__module__, 'torch' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert run.stdout.split() == ["[]", "legrad_export.load", "legrad_export.onnx_export", "True"]
    assert {"load_openclip", "export_model", "load_classifier", "ExportSettings"} <= set(
        legrad_export.__all__
    )
    for name in legrad_export.__all__:
        assert getattr(legrad_export, name) is not None


# one interpreter runs every bad command line in turn; after each: its exit code, the heavy modules
# imported by then, and its last stderr line
_PROBE = """
import contextlib, io, json, sys
from legrad_export import cli, evaluate_cli
results = []
for prog, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = (cli if prog == "export" else evaluate_cli).main(argv)
    heavy = [m for m in {heavy!r} if m in sys.modules]
    results.append([code, heavy, err.getvalue().strip().splitlines()[-1:]])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """A one-case cases folder, a folder holding only open_clip_config.json, and a fake exported folder."""
    root = tmp_path_factory.mktemp("bad-input")
    cases = root / "cases"
    cases.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(cases / "a.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(cases / "m.png")
    (cases / "cases.csv").write_text("image,prompt,mask\na.png,a cat,m.png\n")
    (root / "config-only").mkdir()
    (root / "config-only" / "open_clip_config.json").write_text("{}")
    (root / "exported").mkdir()
    (root / "exported" / "legrad.json").write_text(json.dumps({"model_name": "ViT-B-16"}))
    (root / "a_file").write_text("")
    return root


def test_every_argument_error_exits_2_before_torch_is_imported(bad_input):
    out, cases, exported = str(bad_input / "out"), str(bad_input / "cases"), str(bad_input / "exported")
    runs = [
        (["--model", "ViT-B-16", "--out", out], "needs --pretrained"),
        (["--model", "ViT-B-61", "--pretrained", "none", "--out", out], "unknown model 'ViT-B-61'"),
        (["--model", "ViT-B-16", "--pretrained", "laion9000", "--out", out], "laion2b_s34b_b88k"),
        (
            ["--model", "ViT-B-16", "--pretrained", "none", "--layers", "x", "--out", out],
            "--layers: bad layer",
        ),
        (["--model", "ViT-B-16", "--pretrained", "none", "--image-size", "banana"], "--image-size banana"),
        (["--model", "local-dir:/nonexistent", "--out", out], "folder /nonexistent does not exist"),
        (["--model", str(bad_input / "config-only"), "--pretrained", "openai"], "drop --pretrained"),
        (["--model", "torchvision:vit_b_16", "--out", out], "a torchvision weights name"),
        (["--model", "torchvision:vit_b_16", "--pretrained", "none", "--tokenizer", "t"], "is a classifier"),
        (["--model", exported, "--out", out], "is an exported model folder"),
        (["--model", "ViT-B-16", "--pretrained", "none", "--out", f"{bad_input}/a_file/m"], "cannot write"),
    ]
    runs = [("export", argv, message) for argv, message in runs] + [
        ("evaluate", argv, message)
        for argv, message in [
            (["/nonexistent", "--model", "x"], "cases folder /nonexistent does not exist"),
            ([cases, "--model", "x"], "unknown model 'x'"),
            ([cases, "--model", "ViT-B-16"], "needs --pretrained"),
            ([cases, "--model", "ViT-B-16", "--pretrained", "none", "--layers", "x"], "--layers: bad layer"),
            ([cases, "--model", exported, "--layers", "-2"], "--layers does not apply to an exported folder"),
            ([cases, "--model", exported, "--pretrained", "none", "--image-size", "64"], "do not apply"),
            ([cases, "--model", exported], "legrad.json"),  # a broken folder: the runtime's own error
        ]
    ]
    probe = _PROBE.format(heavy=HEAVY)
    argv = json.dumps([(prog, args) for prog, args, _ in runs])
    done = subprocess.run([sys.executable, "-c", probe, argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for (prog, args, message), (code, heavy, last) in zip(runs, json.loads(done.stdout)):
        assert code == 2 and heavy == [], (prog, args, code, heavy, last)
        assert last and last[0].startswith(f"legrad-{prog}: error:") and message in last[0], (args, last)
