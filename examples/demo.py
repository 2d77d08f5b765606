"""The demo `make demo` runs: explain each sample scene for its own prompts, mark hits and misses.

    python examples/demo.py models/shapes-clip__open_clip_model__64 assets/sample --out out/demo

The cases folder (`cases.csv`: image, prompt, mask) says which prompts each scene gets and where
each object really is, so every picture is captioned with where its heatmap peaks: on the object
the prompt names, on another object (named), or on the background. Runtime only (no torch).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from legrad_runtime import load
from legrad_runtime.evaluation import Case, load_cases, pointing_hit
from legrad_runtime.visualize import STYLES

CELL = 256
CAPTION = 44


def peak_caption(heatmap: np.ndarray, case: Case, others: list[Case]) -> tuple[bool, str]:
    """Whether the map's peak lies on the prompt's object, and a caption saying where it lies."""
    if pointing_hit(heatmap, _mask(case)) > 0.5:
        return True, "peak on it"
    peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    other = next((o.prompt for o in others if _mask(o)[peak]), None)
    if other is None:
        return False, "miss: peak on background"
    return False, f"miss: peak on the {other.removeprefix('a ').removeprefix('an ')}"


def _mask(case: Case) -> np.ndarray:
    with Image.open(case.mask) as m:
        return np.asarray(m.convert("L")) > 0


def sheet(rows: list[list[tuple[Image.Image, str, str, bool]]]) -> Image.Image:
    """Scenes as rows, prompts as columns; each cell captioned with its prompt and where it peaks."""
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * CELL, len(rows) * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=15)
    for i, row in enumerate(rows):
        for j, (picture, prompt, caption, hit) in enumerate(row):
            left, top = j * CELL, i * (CELL + CAPTION)
            out.paste(picture.resize((CELL, CELL)), (left, top + CAPTION))
            draw.text((left + 6, top + 4), f'"{prompt}"', fill="black", font=font)
            draw.text((left + 6, top + 23), caption, fill=(0, 120, 0) if hit else (190, 0, 0), font=font)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="an exported model folder")
    parser.add_argument("cases_dir", help="a folder with cases.csv (image, prompt, mask)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--style", choices=STYLES, default="contour", help="how a heatmap is drawn")
    args = parser.parse_args()

    model = load(args.model_dir)
    scenes: dict[Path, list[Case]] = defaultdict(list)
    for case in load_cases(args.cases_dir):
        scenes[case.image].append(case)

    rows, hits = [], 0
    for image, cases in scenes.items():
        result = model.explain([str(image)], [c.prompt for c in cases])
        folder = args.out / image.stem
        folder.mkdir(parents=True, exist_ok=True)
        row = []
        for p, case in enumerate(cases):
            others = [c for c in cases if c is not case]
            hit, caption = peak_caption(result.heatmap_on_original(0, p), case, others)
            hits += hit
            picture = result.overlay(0, p, style=args.style)
            picture.save(folder / f"{case.prompt.replace(' ', '-')}.png")
            row.append((picture, case.prompt, caption, hit))
        rows.append(row)

    path = args.out / "demo.png"
    sheet(rows).save(path)
    total = sum(len(r) for r in rows)
    print(f"{hits} of {total} prompts peak on the object they name")
    print(f"pictures: {args.out}/<scene>/<prompt>.png, all together: {path}")


if __name__ == "__main__":
    main()
