"""Generated scenes written as an evaluation cases folder (the format `legrad-evaluate` reads).

    python -m legrad_shapes.cases OUT --seed 7 --count 200 --objects 2,3

OUT/images/<i>.png, OUT/masks/<i>_<k>.png (object k of scene i; 255 inside, 0 outside) and
OUT/cases.csv with one case per object: prompt = the object's caption, group = "shared colour" when
another object in the scene has its colour (so only shape tells them apart), else "unique colour".
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .scenes import make_scene

__all__ = ["SHARED", "UNIQUE", "write_scene_cases", "main"]

SHARED = "shared colour"
UNIQUE = "unique colour"


def write_scene_cases(
    out_dir: str | Path,
    seed: int,
    count: int,
    size: int = 64,
    n_objects: int | Sequence[int] | None = None,
    start: int = 0,
) -> Path:
    """Write scenes start..start+count-1 of stream `seed` as a cases folder; return cases.csv's path.

    n_objects: None draws 1–3 per scene; an int fixes it; a sequence such as (2, 3) cycles through
    its values by scene index (scene i gets n_objects[i % len]).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    choices = [n_objects] if n_objects is None or isinstance(n_objects, int) else list(n_objects)
    rows = []
    for i in range(start, start + count):
        scene = make_scene(seed, i, size=size, n_objects=choices[i % len(choices)])
        image = f"images/{i:05d}.png"
        Image.fromarray(scene.image).save(out / image)
        for k, obj in enumerate(scene.objects):
            mask = f"masks/{i:05d}_{k}.png"
            Image.fromarray(obj.mask.astype("uint8") * 255).save(out / mask)
            rows.append((image, obj.caption(), mask, SHARED if scene.shares_color(k) else UNIQUE))
    path = out / "cases.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "prompt", "mask", "group"))
        writer.writerows(rows)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m legrad_shapes.cases", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, required=True, help="scene stream (use one training never saw)")
    p.add_argument("--count", type=int, required=True, help="number of scenes")
    p.add_argument("--start", type=int, default=0, help="first scene index (default 0)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--objects", default=None, help="objects per scene: 1, 2, 3 or a cycle like 2,3")
    args = p.parse_args(argv)
    n_objects = None
    if args.objects:
        try:
            n_objects = [int(v) for v in args.objects.split(",")]
        except ValueError:
            p.error(f"--objects {args.objects!r}: expected numbers like 2 or 2,3")
        if any(not 1 <= n <= 3 for n in n_objects):
            p.error(f"--objects {args.objects!r}: each value must be 1, 2 or 3")
    if args.count <= 0:
        p.error("--count must be positive")
    print(write_scene_cases(args.out, args.seed, args.count, args.size, n_objects, args.start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
