"""Loading a folder again in one process does not hash its unchanged files again, and any change
is still caught. The cache lives in memory only: nothing is written anywhere. Torch-free.

Hashes are counted by wrapping the one function that computes them (metadata._sha256).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import legrad_runtime.metadata as metadata
from hostile import copy_folder
from legrad_runtime import ModelFolderError, load

MERGES = "tokenizer/merges.txt"


@pytest.fixture
def hashes(monkeypatch) -> list[int]:
    """The sizes of the byte strings or files hashed since the test began, one entry per hash."""
    seen: list[int] = []
    plain = metadata._sha256

    def counted(source):
        seen.append(len(source) if isinstance(source, bytes) else os.fstat(source.fileno()).st_size)
        return plain(source)

    monkeypatch.setattr(metadata, "_sha256", counted)
    return seen


@pytest.fixture
def folder(model_folder, tmp_path) -> Path:
    """A copy whose files keep the originals' (old) modification times, as a downloaded folder has."""
    copy = copy_folder(model_folder, tmp_path / "model")
    old = time.time_ns() - 3600 * 10**9
    for path in copy.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(old, old))
    return copy


def _listed(folder: Path) -> int:
    return len(json.loads((folder / metadata.METADATA_FILE).read_text())["files"])


def test_loading_an_unchanged_folder_again_hashes_nothing(folder, hashes):
    load(folder, device="cpu")
    assert len(hashes) == _listed(folder)  # every listed file, once
    load(folder, device="cpu")
    load(folder, device="cpu")
    assert len(hashes) == _listed(folder)


def test_a_file_whose_mtime_changed_is_hashed_again_and_only_it(folder, hashes):
    load(folder, device="cpu")
    hashes.clear()
    path = folder / MERGES
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # older still, but different
    load(folder, device="cpu")
    assert hashes == [st.st_size]


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    """Swap two bytes of the file in place, then set its mtime back: only its ctime tells."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    k = data.index(b"\n", 100) + 1  # a merges line: "a b" → "b a"
    line_end = data.index(b"\n", k)
    first, second = bytes(data[k:line_end]).split(b" ")
    data[k:line_end] = second + b" " + first
    with open(path, "r+b") as fh:  # the same inode
        fh.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_file_rewritten_in_place_with_its_old_mtime_is_caught(folder, hashes):
    load(folder, device="cpu")
    _rewrite_keeping_size_and_mtime(folder / MERGES)
    with pytest.raises(ModelFolderError, match=f"{MERGES} was altered"):
        load(folder, device="cpu")


def test_a_file_replaced_by_another_with_the_same_size_and_mtime_is_caught(folder, tmp_path):
    load(folder, device="cpu")
    path, spare = folder / MERGES, tmp_path / "merges.txt"
    spare.write_bytes(path.read_bytes())
    _rewrite_keeping_size_and_mtime(spare)
    st = path.stat()
    os.utime(spare, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(spare, path)  # a new inode, at the same path, with the same size and mtime
    with pytest.raises(ModelFolderError, match=f"{MERGES} was altered"):
        load(folder, device="cpu")


def test_a_copy_of_the_folder_elsewhere_is_hashed_on_its_own(folder, tmp_path, hashes):
    load(folder, device="cpu")
    other = copy_folder(folder, tmp_path / "elsewhere")  # copytree keeps the mtimes
    load(other, device="cpu")
    assert len(hashes) == 2 * _listed(folder)


def test_files_modified_moments_ago_are_hashed_at_every_load(folder, hashes):
    """A write in the same timestamp tick as a hash could go unseen; such files are never cached."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path)  # now
    load(folder, device="cpu")
    load(folder, device="cpu")
    assert len(hashes) == 2 * _listed(folder)


def test_without_verification_nothing_is_hashed(folder, hashes):
    load(folder, device="cpu", verify=False)
    assert hashes == []


def test_loading_twice_writes_no_file_anywhere(folder):
    """Python's audit hook sees every open: none of them may write (the cache is memory only)."""
    script = textwrap.dedent(
        """
        import json, os, sys
        from legrad_runtime import load
        writes = []

        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                mode, flags = args[1] or "", args[2] or 0
                if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    writes.append(os.fsdecode(args[0]))

        sys.addaudithook(hook)
        load(sys.argv[1], device="cpu")
        load(sys.argv[1], device="cpu")
        print(json.dumps(writes))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == []
