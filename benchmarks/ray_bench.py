"""Images/s of `legrad_runtime.ray.explain_dataset` with 1 and 2 actors, and of the in-process runtime.

    .venv/bin/legrad-export --model assets/shapes-clip --out /tmp/ray_models
    .venv/bin/python benchmarks/ray_bench.py /tmp/ray_models/shapes-clip__open_clip_model__64 --images 200

The sample scenes (assets/sample/images) are repeated into a folder of N PNG files; every engine
reads that folder (Ray with `read_images`, the runtime by path) and computes each image's heatmaps
on the original image for the prompts. Ray's times run from the dataset's creation to its last row,
actor start-up and model loading included (`ray.init` not); the best of --repeats runs is shown.
Ray gets --cpus CPUs (default 2): each actor's onnxruntime uses cpus / actors threads.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import ray

from legrad_runtime import load
from legrad_runtime.ray import explain_dataset, read_image_folder

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "sample" / "images"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def _folder(n: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    samples = sorted(SAMPLES.glob("*.png"))
    for i in range(n):
        shutil.copyfile(samples[i % len(samples)], folder / f"{i:05d}.png")
    return folder


def _local(model_dir: str, folder: Path, threads: int, batch_size: int) -> float:
    start = time.perf_counter()
    model = load(model_dir, device="cpu", threads=threads)
    files = sorted(folder.iterdir())
    for batch in model.explain_batches(files, PROMPTS, batch_size=batch_size, layer_maps=False):
        rows = range(len(batch.sources))
        maps = [batch.heatmap_on_original(b, p) for b in rows for p in range(len(PROMPTS))]
        assert len(maps) == len(batch.sources) * len(PROMPTS)
    return time.perf_counter() - start


def _ray(model_dir: str, folder: Path, actors: int, threads: int, batch_size: int) -> float:
    start = time.perf_counter()
    ds = explain_dataset(
        read_image_folder(folder),
        model_dir,
        PROMPTS,
        batch_size=batch_size,
        concurrency=actors,
        threads=threads,
        device="cpu",
    )
    rows = sum(len(b["similarity"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    elapsed = time.perf_counter() - start
    if rows != len(list(folder.iterdir())):
        raise RuntimeError(f"Ray gave {rows} rows")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folder = _folder(args.images)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = {
        f"in-process runtime ({args.cpus} threads)": lambda: _local(
            args.model_dir, folder, args.cpus, args.batch_size
        ),
        f"Ray, 1 actor ({args.cpus} threads)": lambda: _ray(
            args.model_dir, folder, 1, args.cpus, args.batch_size
        ),
        f"Ray, 2 actors ({max(1, args.cpus // 2)} thread(s) each)": lambda: _ray(
            args.model_dir, folder, 2, max(1, args.cpus // 2), args.batch_size
        ),
    }
    print(f"{args.images} images (sample scenes repeated), {len(PROMPTS)} prompts, batch {args.batch_size}")
    print(f"{'engine':<42} {'seconds':>8} {'images/s':>9}")
    try:
        for name, run in runs.items():
            best = min(run() for _ in range(args.repeats))
            print(f"{name:<42} {best:8.2f} {args.images / best:9.1f}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
