"""`legrad-export` end to end: a real ViT-B-16 export, and every bad input ending in exit code 2."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch

from legrad_export.cli import main
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import IMAGE_GRAPH, read_metadata, verify_files
from tiny_models import build_tiny_model, random_inputs

pytestmark = pytest.mark.torch


def _fails_cleanly(capsys, out_dir, *argv: str) -> str:
    code = main([*argv, "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("legrad-export: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    if out_dir.is_dir():  # nothing half-written, not even a temporary folder
        assert list(out_dir.iterdir()) == []
    return lines[0]


def test_unknown_model_name_suggests_close_matches(tmp_path, capsys):
    line = _fails_cleanly(capsys, tmp_path / "out", "--model", "ViT-B-61")
    assert "unknown model 'ViT-B-61'" in line and "ViT-B-16" in line
    assert (
        "ViT-B-16" in _fails_cleanly(capsys, tmp_path / "out", "--model", "vit-b-16").split("did you mean")[1]
    )


def test_non_vit_tower_is_refused(tmp_path, capsys):
    line = _fails_cleanly(capsys, tmp_path / "out", "--model", "RN50", "--pretrained", "none")
    assert "RN50's image tower is ResNet" in line and "no self-attention over patch tokens" in line


def test_checkpoint_that_does_not_fit_the_config(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(build_tiny_model("b16_like").state_dict(), checkpoint)
    line = _fails_cleanly(capsys, tmp_path / "out", "--model", "ViT-B-32", "--pretrained", str(checkpoint))
    assert "does not fit model ViT-B-32" in line


def test_corrupt_checkpoint_and_unknown_tag(tmp_path, capsys):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert "cannot read checkpoint" in _fails_cleanly(
        capsys, tmp_path / "out", "--model", "ViT-B-32", "--pretrained", str(bad)
    )
    line = _fails_cleanly(capsys, tmp_path / "out", "--model", "ViT-B-32", "--pretrained", "laion9000")
    assert "neither an open_clip tag nor an existing file" in line and "laion2b_s34b_b79k" in line


def test_image_size_not_divisible_by_patch(tmp_path, capsys, tiny_dirs):
    line = _fails_cleanly(
        capsys, tmp_path / "out", "--model", str(tiny_dirs["b16_like"]), "--image-size", "72"
    )
    assert "not a positive multiple" in line and "patch size 16" in line and "64 or 80" in line


def test_unwritable_output_folder(tmp_path, capsys, tiny_dirs):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _fails_cleanly(capsys, blocker / "models", "--model", str(tiny_dirs["b16_like"]))
    assert "cannot write to output folder" in line


def test_no_network_gives_one_line_with_the_local_checkpoint_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("socket.create_connection", _refuse)
    line = _fails_cleanly(
        capsys, tmp_path / "out", "--model", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k"
    )
    assert "could not download" in line and "--pretrained /path/to/" in line
    line = _fails_cleanly(capsys, tmp_path / "out", "--model", "ViT-B-16", "--pretrained", "openai")
    assert "--model ViT-B-16-quickgelu --pretrained /path/to/" in line


def _refuse(*args, **kwargs):
    raise OSError("network unreachable")


def test_failure_midway_leaves_no_folder_behind(tmp_path, tiny_dirs):
    loaded = load_openclip(str(tiny_dirs["b16_like"]))

    def stop_at_write(stage: str) -> None:
        if stage == "write":
            raise ExportError("simulated failure")

    with pytest.raises(ExportError):
        export_model(loaded, tmp_path, ExportSettings(), on_stage=stop_at_write)
    assert list(tmp_path.iterdir()) == []


def test_openai_tags_build_the_quickgelu_model(tmp_path, monkeypatch):
    source = open_clip.create_model("ViT-B-32-quickgelu")
    checkpoint = tmp_path / "openai.bin"
    torch.save(source.state_dict(), checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("open_clip.factory.download_pretrained", lambda *a, **k: str(checkpoint))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # open_clip warns on a QuickGELU mismatch: there must be none
        loaded = load_openclip("ViT-B-32", "openai")
    assert loaded.vit.activation == "quick_gelu"
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


@pytest.mark.slow
def test_vit_b16_export_end_to_end(tmp_path, capsys):
    code = main(
        ["--model", "ViT-B-16", "--pretrained", "none", "--image-size", "224", "--out", str(tmp_path)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    for stage in ("build", "trace", "check", "write"):
        assert f"✓ {stage}" in err
    folder = tmp_path / "ViT-B-16__none__224"
    assert out.strip() == str(folder)
    meta = read_metadata(folder)
    verify_files(folder, meta)
    assert (meta.layers, meta.grid_size, meta.embed_dim) == ((10, 11), (14, 14), 512)
    # the random weights are not saved anywhere, so rebuild them: same seed → same open_clip model
    pixels, text = random_inputs(2, 3, 224, 512, seed=3)
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    heatmaps, layer_maps, embeds = session.run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    assert heatmaps.shape == (2, 3, 224, 224) and np.isfinite(heatmaps).all()
    assert meta.extra["verification_max_abs_diff"]["heatmaps"] <= 1e-4
