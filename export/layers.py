"""Which blocks LeGrad sums over: the reference's `layer_index`, 'all', or an explicit list."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_LAYERS", "parse_layer_spec", "resolve_layers"]

DEFAULT_LAYERS = -2  # the authors' default: the last two blocks


def parse_layer_spec(spec: int | str | Sequence[int]) -> int | str | tuple[int, ...]:
    """A layer spec as resolve_layers reads it: an int, 'all' or a tuple of ints; ValueError names the
    fix. Needs no model, so the CLIs refuse a malformed --layers before loading one."""
    if not isinstance(spec, str):
        return spec if isinstance(spec, int) else tuple(spec)
    text = spec.strip().lower()
    if text == "all":
        return "all"
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"bad layer spec {spec!r}; expected 'all', an int like -2, or a list like '8,10,11'"
        ) from None
    if not parts:
        raise ValueError(f"bad layer spec {spec!r}; expected 'all', an int like -2, or a list")
    return parts[0] if len(parts) == 1 and "," not in text else tuple(parts)


def resolve_layers(spec: int | str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Block indices (sorted, 0-based) for a layer spec.

    - int k < 0: the last |k| blocks (the reference's `layer_index=-2` is the last two);
    - int k ≥ 0: blocks k..L-1, as in the reference;
    - 'all': every block; a string like '-2' or '8,10,11' is parsed as the int or list;
    - a sequence of ints: those blocks (negative ones count from the end).
    """
    spec = parse_layer_spec(spec)
    if spec == "all":
        return tuple(range(num_layers))
    if isinstance(spec, int):
        start = spec if spec >= 0 else num_layers + spec
        if not 0 <= start < num_layers:
            raise ValueError(f"layer index {spec} out of range for a {num_layers}-block model")
        return tuple(range(start, num_layers))
    layers = sorted({i if i >= 0 else num_layers + i for i in spec})
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers {list(spec)} out of range for a {num_layers}-block model")
    return tuple(layers)
