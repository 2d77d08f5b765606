"""One image, two prompts (the LeGrad paper's demo: a cat and a remote control). Runtime only.

    python examples/explain_one_image.py models/ViT-B-16__laion2b_s34b_b88k__448 cats.jpg --out out/

Without an image argument it draws a stand-in picture, so the example runs anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from legrad_runtime import load

PROMPTS = ["a photo of a cat", "a remote control"]


def stand_in_picture() -> Image.Image:
    """A sofa-coloured scene with a grey 'cat' blob and a black 'remote' bar."""
    img = Image.new("RGB", (640, 480), (150, 40, 60))
    draw = ImageDraw.Draw(img)
    draw.ellipse((80, 140, 330, 400), fill=(120, 110, 100))
    draw.polygon([(110, 170), (150, 80), (190, 160)], fill=(120, 110, 100))
    draw.rounded_rectangle((420, 300, 600, 340), radius=12, fill=(20, 20, 20))
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("image", nargs="?", help="an image file (default: a drawn stand-in)")
    parser.add_argument("--out", default="out", type=Path)
    args = parser.parse_args()

    model = load(args.model_dir)
    image = args.image or stand_in_picture()
    result = model.explain([image], PROMPTS)
    args.out.mkdir(parents=True, exist_ok=True)
    for p, prompt in enumerate(PROMPTS):
        path = args.out / f"overlay_{p}.png"
        result.overlay(0, p).save(path)
        result.layer_figure(0, p).save(args.out / f"layers_{p}.png")
        print(f"{prompt!r}: cosine {result.similarities[0, p]:.3f}, overlay {path}")


if __name__ == "__main__":
    main()
