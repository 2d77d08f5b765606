"""Type and range checks for values parsed from untrusted JSON, each naming its field.

`Fields(data, "preprocess")` reads one JSON object; every getter checks the type and range of one
key and raises `FieldError` naming it (`preprocess.std`), what was expected and what was found.
Booleans are never integers here, and numbers must be finite.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Sequence
from typing import Any, TypeGuard

__all__ = ["FieldError", "Fields", "show"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FieldError(ValueError):
    """One field of a JSON document is missing, mistyped or out of range."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field = field


def show(value: Any, limit: int = 60) -> str:
    """A short repr of a found value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Fields:
    """Checked access to the keys of one JSON object found at `prefix` in the document.

    The getters are named after the JSON types they return (`int`, `bool`, `str`), so inside this
    class those names are the methods: annotations after them spell `builtins.int` and so on.
    """

    def __init__(self, data: Any, prefix: str, allowed: Sequence[str]):
        if not isinstance(data, dict):
            raise FieldError(prefix, f"must be a JSON object, got {show(data)}")
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise FieldError(f"{prefix}.{unknown[0]}" if prefix else unknown[0], "is not a known field")
        self.data, self.prefix = data, prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise FieldError(self.name(key), "is missing")
        return self.data[key]

    def int(self, key: str, lo: int, hi: int) -> int:
        value = self.raw(key)
        if not _is_int(value) or not lo <= value <= hi:
            raise FieldError(self.name(key), f"must be an integer in [{lo}, {hi}], got {show(value)}")
        return value

    def size(self, key: str, lo: builtins.int, hi: builtins.int) -> tuple[builtins.int, builtins.int]:
        """An integer (a square) or a list [height, width] of two, each in [lo, hi]: (height, width)."""
        value = self.raw(key)
        if _is_int(value):
            value = [value, value]
        if not (
            isinstance(value, list) and len(value) == 2 and all(_is_int(v) and lo <= v <= hi for v in value)
        ):
            raise FieldError(
                self.name(key),
                f"must be an integer or [height, width], each in [{lo}, {hi}], got {show(value)}",
            )
        return (value[0], value[1])

    def bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise FieldError(self.name(key), f"must be true or false, got {show(value)}")
        return value

    def number(self, key: str, positive: builtins.bool = False) -> float:
        value = self.raw(key)
        if not _is_number(value) or (positive and value <= 0):
            kind = "a positive finite number" if positive else "a finite number"
            raise FieldError(self.name(key), f"must be {kind}, got {show(value)}")
        return float(value)

    def str(self, key: str, max_length: builtins.int = 1000, choices: Sequence[str] | None = None) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or len(value) > max_length:
            raise FieldError(self.name(key), f"must be a string of at most {max_length} characters")
        if choices is not None and value not in choices:
            raise FieldError(self.name(key), f"must be one of {', '.join(choices)}, got {show(value)}")
        return value

    def optional_sha256(self, key: builtins.str) -> builtins.str | None:
        value = self.data.get(key)
        if value is not None and not (isinstance(value, str) and _SHA256.match(value)):
            raise FieldError(self.name(key), f"must be null or 64 lower-case hex digits, got {show(value)}")
        return value

    def sha256(self, key: builtins.str) -> builtins.str:
        value = self.raw(key)
        if not (isinstance(value, str) and _SHA256.match(value)):
            raise FieldError(self.name(key), f"must be 64 lower-case hex digits, got {show(value)}")
        return value

    def numbers(
        self, key: builtins.str, length: builtins.int, positive: builtins.bool = False
    ) -> tuple[float, ...]:
        value = self.raw(key)
        ok = isinstance(value, list) and len(value) == length
        if not ok or not all(_is_number(v) and (not positive or v > 0) for v in value):
            kind = "positive finite numbers" if positive else "finite numbers"
            raise FieldError(self.name(key), f"must be a list of {length} {kind}, got {show(value)}")
        return tuple(float(v) for v in value)

    def ints(
        self, key: builtins.str, lo: builtins.int, hi: builtins.int, max_items: builtins.int
    ) -> tuple[builtins.int, ...]:
        value = self.raw(key)
        ok = isinstance(value, list) and 0 < len(value) <= max_items
        if not ok or not all(_is_int(v) and lo <= v <= hi for v in value):
            raise FieldError(
                self.name(key),
                f"must be a list of 1 to {max_items} integers in [{lo}, {hi}], got {show(value)}",
            )
        return tuple(value)

    def strs(
        self, key: builtins.str, max_items: builtins.int, max_length: builtins.int = 1000
    ) -> tuple[builtins.str, ...]:
        value = self.raw(key)
        ok = isinstance(value, list) and len(value) <= max_items
        if not ok or not all(isinstance(v, str) and 0 < len(v) <= max_length for v in value):
            raise FieldError(
                self.name(key),
                f"must be a list of at most {max_items} non-empty strings of at most {max_length} characters",
            )
        return tuple(value)

    def object(self, key: builtins.str, max_items: builtins.int) -> dict[builtins.str, Any]:
        value = self.raw(key)
        if not isinstance(value, dict) or len(value) > max_items:
            raise FieldError(self.name(key), f"must be a JSON object of at most {max_items} entries")
        return value
