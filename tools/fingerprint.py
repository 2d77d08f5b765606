"""Print a short sha256 of the given files and folders (their *.py, *.toml, *.txt files), for make's stamps.

A stamp named after it goes stale exactly when one of its inputs changes, whatever the files' mtimes
(a fresh clone, or a venv linked from another checkout, keeps a valid stamp).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for arg in paths:
        p = Path(arg)
        files = sorted(f for f in p.rglob("*") if f.suffix in {".py", ".toml", ".txt"}) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.as_posix()).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


if __name__ == "__main__":
    print(fingerprint(sys.argv[1:]))
