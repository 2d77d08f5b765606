"""Class names of supervised classifiers, and the user's classes resolved against them.

`imagenet1k_classes()` reads `data/imagenet1k_classes.txt`: the 1,000 ImageNet-1k classes in the
standard index order, each as its WordNet lemmas ("tabby, tabby cat"), the text timm's
`ImageNetInfo` gives. Nothing is downloaded.

`ClassIndex(names).resolve(classes)` turns what a user asks for into class ids: an int is an id in
[0, C); a name matches, case-insensitively and with runs of spaces read as one, a class's whole
name or any of its comma-separated synonyms ("tabby cat", "tabby" and "Tabby, tabby cat" are all
281). A name that matches several classes ("crane": the bird 134 and the machine 517) is refused
with the ids to use instead. `parse_top_k("top-5")` reads the request for each image's K most
likely classes.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources

import numpy as np

from .errors import PromptError

__all__ = ["imagenet1k_classes", "IMAGENET1K_SIZE", "ClassIndex", "parse_top_k", "short_name"]

IMAGENET1K_SIZE = 1000
_TOP_K = re.compile(r"top-(.*)", re.IGNORECASE | re.DOTALL)
_SHOWN = 60  # characters of a user's class name repeated in an error message


@cache
def imagenet1k_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, index order ("tench, Tinca tinca", ..., "toilet tissue, ...")."""
    text = resources.files(__package__).joinpath("data/imagenet1k_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != IMAGENET1K_SIZE:  # a broken install, not user input
        raise RuntimeError(f"the packaged ImageNet-1k class list has {len(names)} names, not 1000")
    return names


def short_name(name: str) -> str:
    """A class's first synonym: "tabby, tabby cat" → "tabby" (the whole name if it has no comma)."""
    first = name.split(",")[0].strip()
    return first or name.strip() or name


def _key(text: str) -> str:
    """Case and spacing ignored: "Tabby ,tabby  cat" → "tabby, tabby cat"."""
    return ", ".join(" ".join(part.split()) for part in text.split(",")).casefold()


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def parse_top_k(request: object, num_classes: int) -> int | None:
    """K for a "top-K" string (any case, e.g. "top-5"); None for anything else.

    PromptError for a "top-" string whose K is not a whole number in [1, num_classes].
    """
    if not isinstance(request, str) or (match := _TOP_K.fullmatch(request.strip())) is None:
        return None
    k_text = match.group(1).strip()
    if not k_text.isdecimal() or not k_text.isascii():
        raise PromptError(
            f"{_show(request)} is not a top-K request: K must be a whole number, e.g. classes='top-5' "
            "for each image's 5 most likely classes"
        )
    k = int(k_text)
    if not 1 <= k <= num_classes:
        raise PromptError(
            f"{_show(request)} asks for {k:,} classes per image; K must be 1 to {num_classes:,} "
            f"(this model's classes), e.g. classes='top-5'"
        )
    return k


class ClassIndex:
    """A classifier's class names, looked up by name, synonym or id."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._ids: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            keys = {_key(name), *(_key(s) for s in name.split(",") if s.strip())}
            for key in keys:
                self._ids.setdefault(key, []).append(i)

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, name: str) -> list[int]:
        """Every class whose whole name or one of whose synonyms is `name` (case and spacing ignored)."""
        return list(self._ids.get(_key(name), ()))

    def resolve(self, classes: str | int | Sequence[str | int] | np.ndarray) -> list[int]:
        """Class ids for a class name or id, or a list of them (mixed, in order, repeats kept)."""
        if isinstance(classes, np.ndarray):
            if classes.ndim > 1:
                raise PromptError(
                    f"classes given as an array must be 1-D class ids, not shape {classes.shape}"
                )
            classes = classes.reshape(-1).tolist()
        if isinstance(classes, (str, int, np.integer)):
            classes = [classes]
        if not isinstance(classes, Sequence):
            raise TypeError(
                f"classes must be a class name, a class id, a list of them or 'top-K', "
                f"not {type(classes).__name__}"
            )
        if len(classes) == 0:
            raise PromptError(
                "the class list is empty; pass at least one class name or id, e.g. "
                "classes=['tabby cat', 281], or classes='top-5' for each image's most likely classes"
            )
        return [self._one(c, i) for i, c in enumerate(classes)]

    def _one(self, item: object, position: int) -> int:
        if isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
            if not 0 <= int(item) < len(self.names):
                raise PromptError(
                    f"class id {int(item)} is out of range: this model has {len(self.names):,} classes; "
                    f"pass an id in [0, {len(self.names)}) or a class name"
                )
            return int(item)
        if not isinstance(item, str):
            raise TypeError(f"class #{position} is {type(item).__name__}, not a class name (str) or id (int)")
        found = self.lookup(item)
        if len(found) == 1:
            return found[0]
        if found:
            listed = ", ".join(f"{i} ({self.names[i]!r})" for i in found)
            raise PromptError(
                f"class name {_show(item)} is ambiguous: it names {listed}; pass the class id instead "
                f"({' or '.join(map(str, found))})"
            )
        raise PromptError(self._unknown(item))

    def _unknown(self, item: str) -> str:
        if not item.strip():
            return "a class name is empty; pass a class name, e.g. 'tabby cat', or a class id"
        if _TOP_K.fullmatch(item.strip()):
            return (
                f"{_show(item)} asks for each image's most likely classes; pass it alone, "
                f"classes={item.strip()!r}, not inside a list"
            )
        if item.strip().isdecimal() and item.strip().isascii():
            return f"no class is named {_show(item)}; for the class id, pass the number {int(item)} as an int"
        shown: dict[tuple[int, ...], str] = {}  # one spelling per class: 'tabby cat', not also 'tabby'
        for key in difflib.get_close_matches(_key(item), list(self._ids), n=12, cutoff=0.6):
            shown.setdefault(tuple(self._ids[key]), key)
        hint = ", ".join(f"{k!r} ({' or '.join(map(str, ids))})" for ids, k in list(shown.items())[:4])
        fix = (
            f"a class name this model knows (`legrad info --classes` lists them) or an id in [0, {len(self)})"
        )
        if hint:
            return f"unknown class {_show(item)}; did you mean {hint}? Pass {fix}"
        return f"unknown class {_show(item)}; pass {fix}"
