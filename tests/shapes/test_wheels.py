"""The trainer is a tool, not part of the product: the runtime wheel (legrad-onnx) holds no
legrad_shapes, and tools/shapes builds a wheel of its own (legrad-shapes) that holds only it.

Each wheel is built with pip from a copy of its sources in a temporary folder, so the build leaves no
build/ folder in the repository. Torch-free; needs pip and setuptools (a few seconds).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools", reason="the wheels are built without build isolation")

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")


def build_wheel(source: Path, tmp_path: Path) -> tuple[set[str], set[str]]:
    """pip's wheel of `source` (no dependencies, no isolation): its top-level names and all its names."""
    out = tmp_path / "wheels"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        return {name.split("/")[0] for name in z.namelist()}, set(z.namelist())


@pytest.fixture(scope="module")
def runtime_wheel(tmp_path_factory) -> tuple[set[str], set[str]]:
    tmp_path = tmp_path_factory.mktemp("runtime_wheel")
    source = tmp_path / "legrad-onnx"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for folder in ("runtime", "export", "tools"):
        shutil.copytree(ROOT / folder, source / folder, ignore=IGNORE)
    return build_wheel(source, tmp_path)


def test_the_runtime_wheel_holds_no_trainer(runtime_wheel):
    top, names = runtime_wheel
    assert {"legrad_runtime", "legrad_export"} <= top
    assert not [name for name in names if "legrad_shapes" in name]


@pytest.mark.parametrize(("folder", "package"), [("runtime", "legrad_runtime"), ("export", "legrad_export")])
def test_the_runtime_wheel_holds_every_module_and_data_file(runtime_wheel, folder, package):
    """Subpackages (towers, serve) and data (class names, the web page) are listed by hand in
    pyproject.toml; a missing one would only show in an installed, non-editable copy."""
    _, names = runtime_wheel
    files = [f for f in (ROOT / folder).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    expected = {f"{package}/{f.relative_to(ROOT / folder).as_posix()}" for f in files}
    assert expected - names == set()


def test_the_trainer_is_a_wheel_of_its_own(tmp_path):
    source = tmp_path / "legrad-shapes"
    shutil.copytree(ROOT / "tools" / "shapes", source, ignore=IGNORE)
    top, names = build_wheel(source, tmp_path)
    assert {name for name in top if not name.endswith(".dist-info")} == {"legrad_shapes"}
    modules = {"__init__.py", "scenes.py", "cases.py", "train.py", "sweep.py", "py.typed"}
    assert {f"legrad_shapes/{m}" for m in modules} <= names
