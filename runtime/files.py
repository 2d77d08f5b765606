"""Untrusted paths: regular files only, nothing outside a folder, output names that stay put.

Both CLIs and the runtime read model folders, images and cases folders that a stranger may have
made, and write into a folder the user named. These helpers are the only place where the rules
live:

- `open_regular` opens a file for reading only if it is a regular file (a FIFO or a device would
  block or never end), and says why not in words (missing, a symlink loop, a directory, ...).
- `inside` turns a '/'-separated relative path from metadata into a path inside a folder, refusing
  absolute paths, '..', and symlinks that leave the folder, without touching anything outside.
- `safe_name` makes a file name from any text (an image stem, a prompt) that cannot escape the
  output folder; `ensure_output_folder` checks, before any slow work, that a folder can be written.
- `printable` makes text from metadata or file names safe to print on a terminal.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import unicodedata
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "UnreadableFile",
    "open_regular",
    "read_regular",
    "read_limited",
    "inside",
    "safe_name",
    "ensure_output_folder",
    "printable",
]

_REASONS = {
    errno.ENOENT: "does not exist",
    errno.ELOOP: "is a symlink loop (or has too many levels of symlinks)",
    errno.EACCES: "cannot be read (permission denied)",
    errno.EPERM: "cannot be read (operation not permitted)",
    errno.ENAMETOOLONG: "has a name too long for the file system",
    errno.ENOTDIR: "does not exist (a part of its path is a file, not a folder)",
}
_KINDS = (
    (stat.S_ISDIR, "is a directory, not a file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)


class UnreadableFile(Exception):
    """A path that cannot be opened as a regular file; `reason` completes "<path> ..."."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file; else raise UnreadableFile.

    Opened non-blocking and checked on the open descriptor, so a FIFO swapped in after a check
    cannot block us, then switched back to blocking reads.
    """
    text = os.fspath(path)
    if not text:
        raise UnreadableFile("is an empty path")
    if "\0" in text:
        raise UnreadableFile("contains a NUL character")
    try:
        fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableFile(_REASONS.get(exc.errno or 0, f"cannot be opened ({exc.strerror})")) from None
    try:
        mode = os.fstat(fd).st_mode
        for is_kind, reason in _KINDS:
            if is_kind(mode):
                raise UnreadableFile(reason)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; UnreadableFile otherwise."""
    with open_regular(path) as fh:
        return read_limited(fh, max_bytes)


def read_limited(fh: BinaryIO, max_bytes: int) -> bytes:
    """The rest of an open file if it is at most `max_bytes` (checked before and while reading, so a
    file growing meanwhile is refused too); UnreadableFile otherwise."""
    size = os.fstat(fh.fileno()).st_size
    if size > max_bytes:
        raise UnreadableFile(f"is {size:,} bytes, more than the {max_bytes:,} allowed")
    data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnreadableFile(f"is more than the {max_bytes:,} bytes allowed")
    return data


_DRIVE = re.compile(r"^[A-Za-z]:")


def inside(folder: Path, relative: str) -> Path:
    """`folder / relative` for a '/'-separated relative path that stays inside `folder`.

    Raises ValueError (naming the path, never whether anything outside exists) for absolute paths,
    drive letters, backslashes, '..', '.', empty parts, NUL, and symlinks resolving outside.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"file path {relative!r} is not a non-empty string")
    if "\0" in relative or "\\" in relative or relative.startswith("/") or _DRIVE.match(relative):
        raise ValueError(f"file path {relative!r} is not a relative '/'-separated path inside the folder")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"file path {relative!r} has '..', '.' or empty parts; it must stay in the folder")
    path = folder.joinpath(*parts)
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise ValueError(f"file path {relative!r} cannot be resolved ({exc})") from None
    if real != root and root not in real.parents:
        raise ValueError(f"file path {relative!r} is a symlink that leads outside the folder")
    return path


def safe_name(text: str, fallback: str, max_length: int = 80) -> str:
    """A file name from any text: ASCII letters, digits, '-', '_' and inner dots, lower case.

    Never empty, never '.' or '..', never starting with a dot, at most `max_length` characters.
    Different texts can give the same name; callers make names unique and record the mapping.
    """
    name = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^A-Za-z0-9._]+", "-", name).lower()
    name = re.sub(r"\.{2,}", ".", name).strip("-._")[:max_length].rstrip("-._")
    return name or fallback


def ensure_output_folder(folder: str | Path) -> Path:
    """Create `folder` if needed and prove it writable, or raise ValueError saying why.

    Call it before any slow work: a file in the way, a parent that is a file, /proc, a read-only
    file system, all fail here in one line instead of at the end of a run.
    """
    path = Path(folder)
    if not os.fspath(path):
        raise ValueError("the output folder is an empty path; pass a folder, e.g. --out out/")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file, not a folder; pass another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".legrad-probe-"):
            pass
    except OSError as exc:
        reason = {
            errno.ENOTDIR: "a part of its path is a file, not a folder",
            errno.EROFS: "it is on a read-only file system",
            errno.EACCES: "permission denied",
            errno.ENOSPC: "the disk is full",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise ValueError(f"cannot write to output folder {path} ({reason}); pass a writable --out") from None
    return path


def printable(text: object) -> str:
    """`text` on one line, with control and format characters (ANSI escapes, newlines, NUL, bidi
    overrides) shown as escapes, so metadata and file names cannot redraw or forge terminal output."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch)[0] == "C":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
