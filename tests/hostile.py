"""Hostile inputs for the hardening tests, made by hand (torch-free): bombs, FIFOs, folder copies."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legrad_runtime.metadata import METADATA_FILE


def png_bomb(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A PNG of a few KB whose header declares width × height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width * 3 + 1) * 64, 9)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def jpeg_declaring(path: Path, width: int, height: int) -> Path:
    """A small JPEG whose frame header (SOF0) is patched to declare width × height pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def copy_folder(model_folder: Path, dest: Path) -> Path:
    shutil.copytree(model_folder, dest)
    return dest


def edit_metadata(folder: Path, edit) -> None:
    """Apply `edit(data)` (in place) to the folder's legrad.json."""
    path = folder / METADATA_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def listing(root: Path) -> list[str]:
    """Every path under `root`, relative, sorted: compared before and after to catch stray writes."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """`path` as a read-only tmpfs mount for the block (the test is skipped where mount is refused)."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
