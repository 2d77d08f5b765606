"""`legrad-export` as a hostile or careless user runs it: signals, garbage files, absurd sizes.

Each case checks the exit code, one `legrad-export: ...` line naming the problem, no Traceback,
and nothing written outside --out (nor a temporary folder left inside it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile import listing, read_only_folder
from legrad_export.cli import main
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.torch


def _error_line(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("legrad-export: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "legrad_export.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_importing_the_exporter_and_its_clis_does_not_import_torch():
    code = (
        "import sys, legrad_export, legrad_export.cli, legrad_export.evaluate_cli; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_argument_errors_come_before_the_torch_import(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from legrad_export.cli import main; main(['--model', 'x', "
         f"'--image-size', '0', '--out', {str(tmp_path)!r}]); print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.stdout.strip() == "False" and "--image-size 0" in run.stderr


def test_ctrl_c_during_the_torch_import_is_one_line_and_exit_130(tmp_path):
    process = _cli("--model", "ViT-B-16", "--pretrained", "none", "--out", str(tmp_path / "out"))
    time.sleep(0.8)  # `import torch` alone takes about 2 s on this machine
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "legrad-export: interrupted:" in err


def test_sigterm_mid_export_removes_the_temporary_folder(tmp_path):
    source = save_tiny_model_dir(tmp_path, "b16_like")
    out = tmp_path / "out"
    process = _cli("--model", str(source), "--out", str(out))
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".") and ".tmp-" in p.name for p in out.glob(".*")):
        assert process.poll() is None and time.monotonic() < deadline, "no temporary folder appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Traceback" not in err and "legrad-export: terminated:" in err
    assert listing(out) == []  # no model folder, no .tmp-* left


def test_a_garbage_safetensors_checkpoint_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(os.urandom(4096))
    line = _error_line(
        capsys, "--model", "ViT-B-32", "--pretrained", str(garbage), "--out", str(tmp_path / "o")
    )
    assert "cannot read checkpoint" in line and "weights.safetensors" in line


def test_a_garbage_safetensors_in_a_local_folder_is_one_line(tmp_path, capsys):
    source = save_tiny_model_dir(tmp_path, "b16_like")
    (source / "open_clip_pytorch_model.bin").unlink()
    (source / "open_clip_model.safetensors").write_bytes(os.urandom(4096))
    line = _error_line(capsys, "--model", str(source), "--out", str(tmp_path / "o"))
    assert "SafetensorError" in line


@pytest.mark.parametrize("size", ["0", "-16"])
def test_a_zero_or_negative_image_size_is_refused_not_defaulted(tmp_path, capsys, size):
    line = _error_line(capsys, "--model", "ViT-B-16", "--image-size", size, "--out", str(tmp_path / "o"))
    assert f"--image-size {size}" in line


def test_an_image_size_that_cannot_fit_in_memory_is_refused_with_the_estimate(tmp_path, capsys):
    args = ["--model", "ViT-B-32", "--pretrained", "none", "--image-size", "100000"]
    line = _error_line(capsys, *args, "--out", str(tmp_path / "o"))
    assert "image size 100000 needs about" in line and "GB available" in line
    assert listing(tmp_path / "o") == []


def test_the_estimate_allows_the_sizes_people_use():
    from legrad_export.memory import estimate_bytes
    from legrad_export.towers import TowerSpec

    vit_b16 = TowerSpec(
        "openclip_vit", width=768, heads=12, num_layers=12, patch_size=16, native_grid=14, embed_dim=512
    )
    assert estimate_bytes(vit_b16, 448, 2, True) < 2e9
    assert estimate_bytes(vit_b16, 896, 2, True) < 20e9  # fits this 24 GB machine
    assert estimate_bytes(vit_b16, 100_000, 2, True) > 1e15


def test_pretrained_with_a_local_folder_is_refused(tmp_path, capsys):
    source = save_tiny_model_dir(tmp_path, "b16_like")
    line = _error_line(
        capsys, "--model", str(source), "--pretrained", "laion2b_s34b_b88k", "--out", str(tmp_path)
    )
    assert "carries its own weights; drop --pretrained" in line


@pytest.mark.parametrize("where", ["file", "under-a-file", "proc"])
def test_an_unwritable_out_fails_before_the_model_loads(tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    out = {
        "file": tmp_path / "afile",
        "under-a-file": tmp_path / "afile" / "o",
        "proc": Path("/proc/legrad-o"),
    }
    before = listing(tmp_path)
    line = _error_line(capsys, "--model", "ViT-B-16", "--pretrained", "none", "--out", str(out[where]))
    assert "output folder" in line
    assert listing(tmp_path) == before


def test_a_read_only_out_fails_before_the_model_loads(tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as ro:
        line = _error_line(capsys, "--model", "ViT-B-16", "--pretrained", "none", "--out", str(ro / "o"))
        assert "read-only file system" in line
