"""The README's two first-use commands, run literally in a fresh clone, offline.

The clone gets this checkout's venvs and test models by symlink, so the commands' idempotence is
what lets them run without a download: their stamps must match (they do after `make test`, which is
how this test runs in CI). The inner test run is narrowed with PYTEST_ADDOPTS, a pytest feature the
command line does not see, so the suite does not run itself twice.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LINKED = (".venv", ".venv-lean", ".ci-models")
INNER = "LEGRAD_FIRST_USE_INNER"

pytestmark = pytest.mark.torch


def readme_commands() -> list[str]:
    """The shell lines of the README's first-use block, comments stripped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- first-use:start -->\n```bash\n(.*?)```\n<!-- first-use:end -->", text, re.S)
    assert block, "README.md lost its first-use block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_names_two_commands_a_demo_and_the_tests():
    assert readme_commands() == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if os.environ.get(INNER):
        pytest.skip("already inside the first-use run")
    if not (ROOT / ".git").exists() or not shutil.which("git") or not shutil.which("make"):
        pytest.skip("needs a git checkout, git and make")
    stamps = subprocess.run(["make", "-s", "print-stamps"], cwd=ROOT, capture_output=True, text=True)
    missing = [s for s in stamps.stdout.split() if not (ROOT / s).exists()]
    if stamps.returncode or missing:
        pytest.skip(f"run `make test` once first: {missing or stamps.stderr.strip()} not set up")
    clone = tmp_path_factory.mktemp("first_use") / "legrad-onnx"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for name in LINKED:
        (clone / name).symlink_to(ROOT / name)
    return clone


def run(command: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LEGRAD_"))}
    env |= {INNER: "1", "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1", "PYTEST_ADDOPTS": "-k test_classes"}
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{command!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_make_demo_exports_the_shipped_model_and_draws_every_sample_case(clone):
    out = run(readme_commands()[0], clone)
    assert "Traceback" not in out
    sheet = clone / "out" / "demo" / "demo.png"
    assert str(sheet.relative_to(clone)) in out  # it says where the pictures are
    with Image.open(sheet) as img:
        assert np.asarray(img.convert("L")).std() > 10  # not blank
    with open(clone / "assets" / "sample" / "cases.csv", newline="") as f:
        cases = list(csv.DictReader(f))
    for case in cases:
        name = case["prompt"].replace(" ", "-") + ".png"
        assert (clone / "out" / "demo" / Path(case["image"]).stem / name).is_file(), name
    assert re.search(rf"\d+ of {len(cases)} prompts peak on the object they name", out)


def test_make_test_lints_and_runs_tests_in_both_venvs(clone):
    out = run(readme_commands()[1], clone)
    assert "ruff check" in out and "mypy runtime/" in out and "Success: no issues" in out
    passed = [int(n) for n in re.findall(r"(\d+) passed", out)]
    assert len(passed) == 2 and min(passed) > 0, out[-2000:]  # the full venv, then the lean one
