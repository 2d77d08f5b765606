"""Generated scenes: 1–3 coloured shapes on a textured background, with each object's pixel mask.

Every scene is a pure function of (seed, index): `make_scene(seed, i)` gives the same pixels on any
machine, so training streams, held-out sets and test cases are addressed by seed alone. numpy and
PIL only; shapes are drawn at 4× and box-filtered down, so edges are antialiased and each mask is
the set of pixels the object covers at least half of.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "TEMPLATES",
    "Scene",
    "SceneObject",
    "caption",
    "class_captions",
    "partial_captions",
    "make_scene",
    "scenes",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TEMPLATES: tuple[str, ...] = (
    "{a} {color} {shape}",
    "a photo of {a} {color} {shape}",
    "{a} {color} {shape} on a background",
    "there is {a} {color} {shape}",
)
_SUPERSAMPLE = 4
_COLOR_JITTER = 18


def caption(color: str, shape: str, template: int = 0) -> str:
    """The caption naming one object, e.g. 'a red circle' or 'an orange cross' (template 0)."""
    return TEMPLATES[template].format(a="an" if color[0] in "aeiou" else "a", color=color, shape=shape)


def class_captions(template: int = 0) -> list[str]:
    """One caption per colour × shape class, colour-major: the zero-shot label set."""
    return [caption(c, s, template) for c in COLORS for s in SHAPES]


def partial_captions() -> list[str]:
    """Captions naming only a shape ('a circle', in SHAPES order) or only a colour ('a red object')."""
    return [f"a {shape}" for shape in SHAPES] + [caption(color, "object") for color in COLORS]


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    mask: np.ndarray  # (H, W) bool: the pixels this object covers

    @property
    def label(self) -> int:
        """Index into `class_captions()`."""
        return list(COLORS).index(self.color) * len(SHAPES) + SHAPES.index(self.shape)

    def caption(self, template: int = 0) -> str:
        return caption(self.color, self.shape, template)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]

    def shares_color(self, k: int) -> bool:
        """Whether another object has object k's colour, so only shape tells them apart."""
        return any(o.color == self.objects[k].color for i, o in enumerate(self.objects) if i != k)

    def patch_labels(self, patch: int) -> np.ndarray:
        """Each patch's class (`SceneObject.label`) on the ViT's (H/patch, W/patch) grid: the object
        whose mask covers at least half of the patch, -1 where none does."""
        grid_h, grid_w = self.image.shape[0] // patch, self.image.shape[1] // patch
        labels = np.full((grid_h, grid_w), -1, np.int64)
        for obj in self.objects:  # objects never overlap, so at most one covers half a patch
            mask = obj.mask[: grid_h * patch, : grid_w * patch]
            labels[mask.reshape(grid_h, patch, grid_w, patch).mean((1, 3)) >= 0.5] = obj.label
        return labels


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted textured background (noise, stripes, checks or a gradient), (H, W, 3) float."""
    base = rng.uniform(70, 185) + rng.uniform(-18, 18, size=3)  # greyish, never a saturated colour
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(4)
    if kind == 0:
        tex = rng.normal(0, 1, (size, size))
    elif kind == 1:
        angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 10)
        tex = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    elif kind == 2:
        cells = rng.integers(3, 9)
        tex = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2 - 1
    else:
        angle = rng.uniform(0, 2 * math.pi)
        tex = 2 * (xx * math.cos(angle) + yy * math.sin(angle)) - 1
    amp = rng.uniform(8, 28)
    img = base + amp * tex[..., None] + rng.normal(0, 4, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "cross":
        w = 0.3
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w)]
        pts += [(-w, -w), (-w, -1)]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _coverage(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, (H, W) float in [0, 1]."""
    k = _SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([k * (cx - r), k * (cy - r), k * (cx + r), k * (cy + r)], fill=255)
    else:
        draw.polygon([(k * x, k * y) for x, y in _polygon(shape, cx, cy, r, angle)], fill=255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255  # box filter: mean of each k×k block


def _pick_classes(rng: np.random.Generator, n: int, same_color: bool) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs; with same_color, the first two share a colour."""
    colors, shapes = list(COLORS), list(SHAPES)
    picked: list[tuple[str, str]] = []
    if same_color and n >= 2:
        color = colors[rng.integers(len(colors))]
        a, b = rng.choice(len(shapes), 2, replace=False)
        picked += [(color, shapes[a]), (color, shapes[b])]
    while len(picked) < n:
        pair = (colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))])
        if pair not in picked:
            picked.append(pair)
    order = rng.permutation(n)
    return [picked[i] for i in order]


def _place(rng: np.random.Generator, n: int, size: int) -> list[tuple[float, float, float]]:
    """Centres and radii of n objects that stay inside the image and never touch each other."""
    r_max = size * (0.3 if n == 1 else 0.22 if n == 2 else 0.19)
    for _ in range(1000):
        out: list[tuple[float, float, float]] = []
        for _ in range(n):
            r = rng.uniform(0.6, 1.0) * r_max
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in out):
                out.append((cx, cy, r))
        if len(out) == n:
            return out
    raise RuntimeError(f"could not place {n} objects in a {size}px scene")  # pragma: no cover


def make_scene(
    seed: int, index: int, size: int = 64, n_objects: int | None = None, same_color: bool | None = None
) -> Scene:
    """Scene `index` of the stream `seed`. n_objects (1–3) and same_color are drawn when None."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")
    if same_color is None:
        same_color = n >= 2 and rng.random() < 0.4
    img = _background(rng, size)
    objects = []
    for (color, shape), (cx, cy, r) in zip(_pick_classes(rng, n, same_color), _place(rng, n, size)):
        cover = _coverage(shape, cx, cy, r, rng.uniform(0, 2 * math.pi), size)
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3), 0, 255)
        img += cover[..., None] * (rgb.astype(np.float32) - img)
        objects.append(SceneObject(color, shape, cover >= 0.5))
    return Scene(np.round(img).astype(np.uint8), tuple(objects))


def scenes(
    seed: int,
    count: int,
    size: int = 64,
    n_objects: int | None = None,
    same_color: bool | None = None,
    start: int = 0,
) -> Iterator[Scene]:
    """Scenes start..start+count-1 of the stream `seed`."""
    for i in range(start, start + count):
        yield make_scene(seed, i, size, n_objects, same_color)
