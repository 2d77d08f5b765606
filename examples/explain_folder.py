"""A batch over a folder of images, in bounded memory, with a grid of images × prompts. Runtime only.

    python examples/explain_folder.py models/ViT-B-16__laion2b_s34b_b88k__448 photos/ \
        -p "a photo of a cat" -p "a dog" --out out/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from legrad_runtime import load
from legrad_runtime.cli import find_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("folder")
    parser.add_argument("-p", "--prompt", action="append", dest="prompts", required=True)
    parser.add_argument("--out", default="out", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    model = load(args.model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    images = find_images([args.folder])
    for k, batch in enumerate(
        model.explain_batches(images, args.prompts, batch_size=args.batch_size, on_error="skip")
    ):
        for failure in batch.failures:
            print(f"skipped {failure.source}: {failure.error}")
        batch.grid().save(args.out / f"grid_{k:03d}.png")  # one grid per batch: memory stays bounded
        best = batch.similarities.argmax(axis=1)
        for source, p in zip(batch.sources, best):
            print(f"{source}: best prompt {args.prompts[p]!r}")


if __name__ == "__main__":
    main()
