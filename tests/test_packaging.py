"""Packaging: every documented install gets exactly one onnxruntime build, never both.

onnxruntime and onnxruntime-gpu install the same `onnxruntime` module; pip puts both in when two
extras ask for one each, and then whichever unpacked last wins (often the CPU one, silently). So the
exporter's extra names neither, and each install picks one with `cpu` or `gpu`. The combinations
checked are the ones below and every one the README and the Makefile (which CI runs) name
(`legrad-onnx[...]`, `".[...]"`).
Torch-free: pyproject.toml is read with tomllib and requirements parsed with `packaging` (a pytest
dependency).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
BUILDS = {"onnxruntime", "onnxruntime-gpu"}
PROMISED = ["cpu", "gpu", "export,cpu", "export,gpu", "export,cpu,test", "export,gpu,test"]
_INSTALL = re.compile(r"""(?:legrad-onnx|(?<=["'])\.)\[([A-Za-z0-9_, -]+)\]""")


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def documented(*files: str) -> list[str]:
    """Every extras list an install line of these files (default: the README and the Makefile) names,
    normalised ('export,cpu')."""
    found = []
    for name in files or ("README.md", "Makefile"):
        for match in _INSTALL.finditer((ROOT / name).read_text(encoding="utf-8")):
            found.append(",".join(e.strip() for e in match.group(1).split(",")))
    return found


def requirement_names(extras: str) -> list[str]:
    """The distributions `pip install "legrad-onnx[extras]"` asks for directly: the dependencies and
    each extra's, extras that name the project itself (legrad-onnx[cpu] inside another) followed.
    Markers are ignored: a requirement counts if any platform could install it. Names repeat as
    often as they are asked for."""
    project = _project()
    own, optional = canonicalize_name(project["name"]), project.get("optional-dependencies", {})
    names, todo, seen = [], [e.strip() for e in extras.split(",") if e.strip()], set()
    pending = list(project.get("dependencies", []))
    while pending or todo:
        for line in pending:
            req = Requirement(line)
            if canonicalize_name(req.name) == own:
                todo += sorted(req.extras)
            else:
                names.append(canonicalize_name(req.name))
        pending = []
        while todo:
            extra = todo.pop()
            if extra in seen:
                continue
            if extra not in optional:
                raise AssertionError(f"extra {extra!r} is documented but pyproject.toml does not define it")
            seen.add(extra)
            pending += optional[extra]
    return names


@pytest.mark.parametrize("extras", sorted(set(PROMISED) | set(documented())))
def test_every_documented_install_asks_for_exactly_one_onnxruntime(extras):
    builds = [n for n in requirement_names(extras) if n in BUILDS]
    assert len(builds) == 1, f'pip install "legrad-onnx[{extras}]" asks for {builds or "no onnxruntime"}'


def test_the_exporter_extra_leaves_the_onnxruntime_build_to_cpu_or_gpu():
    assert not BUILDS & set(requirement_names("export"))
    assert [n for n in requirement_names("cpu") if n in BUILDS] == ["onnxruntime"]
    assert [n for n in requirement_names("gpu") if n in BUILDS] == ["onnxruntime-gpu"]


def test_the_readme_names_both_exporter_pairs_and_the_makefile_installs_one_of_them():
    readme = set(documented("README.md"))
    assert {"export,cpu", "export,gpu", "cpu", "gpu"} <= readme, readme
    assert any({"export", "cpu", "test"} <= set(c.split(",")) for c in documented("Makefile"))


def test_the_requirement_reader_follows_self_references(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "Legrad_ONNX"\ndependencies = ["numpy"]\n'
        '[project.optional-dependencies]\ncpu = ["onnxruntime>=1.18"]\ngpu = ["onnxruntime-gpu"]\n'
        'all = ["legrad-onnx[cpu]", "rich"]\nloop = ["legrad-onnx[loop,gpu]"]\n',
        encoding="utf-8",
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert sorted(requirement_names("all")) == ["numpy", "onnxruntime", "rich"]
    assert sorted(requirement_names("loop,cpu")) == ["numpy", "onnxruntime", "onnxruntime-gpu"]
    with pytest.raises(AssertionError, match="'nope'"):
        requirement_names("cpu,nope")


def _installed_requirements(name: str) -> list[str]:
    """The names an installed distribution requires on this machine (markers evaluated, no extras)."""
    try:
        lines = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(canonicalize_name(req.name))
    return out


def test_no_installed_dependency_of_the_exporter_pulls_in_an_onnxruntime():
    """The other half of "never both": nothing the exporter installs requires onnxruntime itself
    (onnxscript, say). Checked over what this environment has installed, transitively."""
    roots = [n for n in requirement_names("export") if n not in BUILDS]
    installed = [n for n in roots if _installed_requirements(n) or _is_installed(n)]
    if not installed:
        pytest.skip("the export extra is not installed here")
    seen, todo, culprits = set(), list(installed), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in _installed_requirements(name):
            if dep in BUILDS:
                culprits.append(f"{name} requires {dep}")
            todo.append(dep)
    assert not culprits, culprits


def _is_installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True
