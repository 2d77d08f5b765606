"""Host overhead of `model.explain()`: the work around the image graph, per image.

    python benchmarks/host_overhead.py --folder MODEL_FOLDER [--old-runtime DIR] [--sizes 1 32 256]

Times `model.explain(photos, text_embeds=t)` on B uint8 (H, W, 3) arrays already at the model's
input size (as benchmarks/worker.py's "runtime" method does on the GPU) against bare
`session.run` of the same pixel values in the same calls (explain's own images per call), and
breaks the host work into stages, each timed alone on the same batch:

- decode: `load_image` of each array (checks, a PIL image);
- preprocess: the images → (B, 3, H, W) float32 pixel values (resize skipped: already at size;
  the RGB conversion, the normalisation, the batch array);
- originals: the RGB images kept for overlays (the old code copied each, the new keeps an RGB one);
- check outputs: `_check_finite` on the outputs;
- concat: joining the calls' outputs into one Explanation.

Use a tiny model (tests/tiny_models.py) so that the graph's own time is small and the host's shows.
`--old-runtime DIR`: DIR is another version's `runtime/` folder (say an earlier commit's, from
`git archive COMMIT runtime | tar -x -C /tmp/old`, then DIR=/tmp/old/runtime), imported alongside
as `legrad_runtime_old`; each stage is then timed for old, new and bare session.run back to back,
--repeats times, and the best of each is printed side by side (ratios old / new).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PAUSE = 0.02  # seconds between timed runs, so that onnxruntime's threads stop spinning


def import_runtime(path: str | None, name: str = "legrad_runtime_old") -> Any:
    """The installed legrad_runtime (path None), or the package in folder `path` imported as `name`
    (its imports are relative, so two versions live side by side in one process)."""
    if path is None:
        import legrad_runtime

        return legrad_runtime
    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[path])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--old-runtime {path}: no package there (expected {init})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stage_runs(
    pkg: Any, model: Any, photos: list[np.ndarray], text: np.ndarray
) -> dict[str, Callable[[], Any]]:
    """explain() and each host stage of one runtime version on one batch, as calls to time."""
    pre, sess = (
        importlib.import_module(pkg.__name__ + ".preprocess"),
        importlib.import_module(pkg.__name__ + ".session"),
    )
    cfg = model.metadata.preprocess
    images = [pre.load_image(p) for p in photos]
    new = hasattr(pre, "preprocess_into")  # the new code: straight into the batch array, threaded
    workers = getattr(model, "image_workers", 1)
    parts = list(model.explain_batches(photos, text_embeds=text))
    result = sess._concat(parts)
    outs = (result.heatmaps, result.layer_maps, result.image_embeds)
    return {
        "explain": lambda: model.explain(photos, text_embeds=text),
        "decode": lambda: [pre.load_image(p) for p in photos],
        "preprocess": (
            (lambda: pre.preprocess_batch(images, cfg, workers=workers))
            if new
            else (lambda: np.stack([pre.preprocess(im, cfg)[0] for im in images]))
        ),
        "originals": (
            (lambda: [im if im.mode == "RGB" else im.convert("RGB") for im in images])
            if new
            else (lambda: [im.convert("RGB") for im in images])
        ),
        "check outputs": lambda: model._check_finite(["x"], *outs),
        "concat": lambda: sess._concat(parts),
    }


def measure(folder: str, sizes: list[int], repeats: int, old: str | None) -> dict[str, Any]:
    """Seconds per batch (best of `repeats`) of each version ('new', and 'old' when given) and of
    bare session.run, the versions' runs interleaved so that the machine's load hits both alike."""
    versions = {"new": import_runtime(None)} | ({"old": import_runtime(old)} if old else {})
    models = {label: pkg.load(folder, device="cpu") for label, pkg in versions.items()}
    model = models["new"]
    cfg = model.metadata.preprocess
    h, w = cfg.size
    rng = np.random.default_rng(1)
    text = rng.standard_normal((1, model.metadata.embed_dim)).astype(np.float32)
    text /= np.linalg.norm(text)
    out: dict[str, Any] = {
        label: {"runtime": os.path.dirname(pkg.__file__), "sizes": {}} for label, pkg in versions.items()
    }
    for b in sizes:
        photos = list(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))
        per_call = model.chunk_sizes(1, None, model.memory_budget)[0]
        x = np.stack(
            [
                versions["new"].preprocess.preprocess(versions["new"].preprocess.load_image(p), cfg)[0]
                for p in photos
            ]
        )
        calls = [x[i : i + per_call] for i in range(0, b, per_call)]

        def bare(calls: list[np.ndarray] = calls) -> list[Any]:
            return [model._image.run(None, {"pixel_values": c, "text_embeds": text}) for c in calls]

        runs = {label: stage_runs(versions[label], m, photos, text) for label, m in models.items()}
        for label in runs:
            runs[label]["bare"] = bare
        for stage in runs["new"]:
            for label in runs:
                runs[label][stage]()  # warm
        times: dict[str, dict[str, list[float]]] = {label: {s: [] for s in runs[label]} for label in runs}
        for repeat in range(repeats):
            for stage in runs["new"]:
                order = list(runs) if repeat % 2 else list(runs)[::-1]  # each version first in turn
                for label in order:  # old and new back to back
                    time.sleep(PAUSE)
                    start = time.perf_counter()
                    runs[label][stage]()
                    times[label][stage].append(time.perf_counter() - start)
        for label in runs:
            seconds = {stage: min(t) for stage, t in times[label].items()}
            out[label]["sizes"][str(b)] = {"per_call": per_call, "seconds": seconds}
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = f"{names[0]}, {len(names)} logical cores" if names else cpu
    except OSError:
        pass
    return f"{cpu}; python {platform.python_version()}"


def table(runs: dict[str, dict[str, Any]], sizes: list[int]) -> str:
    labels = list(runs)
    rows = [
        "| B | stage | "
        + " | ".join(f"{lb} ms/img" for lb in labels)
        + (f" | {labels[0]} / {labels[1]} |" if len(labels) == 2 else " |"),
        "| ---: | --- | " + " | ".join("---:" for _ in labels) + (" | ---: |" if len(labels) == 2 else " |"),
    ]
    stages = ["explain", "bare", "host", "decode", "preprocess", "originals", "check outputs", "concat"]
    for b in sizes:
        for stage in stages:
            ms = []
            for lb in labels:
                s = runs[lb]["sizes"][str(b)]["seconds"]
                value = s["explain"] - s["bare"] if stage == "host" else s[stage]
                ms.append(1e3 * value / b)
            cells = " | ".join(f"{v:.3f}" for v in ms)
            ratio = (f" {ms[0] / ms[1]:.2f}x |" if ms[1] > 0 else " – |") if len(ms) == 2 else ""
            name = {"bare": "bare session.run", "host": "host (explain - bare)"}.get(stage, stage)
            rows.append(f"| {b} | {name} | {cells} |{ratio}")
        ips = []
        for lb in labels:
            s = runs[lb]["sizes"][str(b)]["seconds"]
            ips.append(f"explain {b / s['explain']:.0f} img/s, bare {b / s['bare']:.0f} img/s")
        rows.append(f"| {b} | images/s | " + " | ".join(ips) + (" | |" if len(labels) == 2 else " |"))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="an exported model folder (a tiny one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--old-runtime", help="another version's runtime/ folder (a legrad_runtime package)")
    args = parser.parse_args()
    got = measure(args.folder, args.sizes, args.repeats, args.old_runtime)
    runs = {label: got[label] for label in ("old", "new") if label in got}
    if len(runs) == 1:
        runs = {"this": runs["new"]}
    print(f"machine: {machine()}")
    print(f"model: {args.folder}; best of {args.repeats}")
    for label, run in runs.items():
        calls = ", ".join(f"B={b}: {v['per_call']}" for b, v in run["sizes"].items())
        print(f"{label}: {run['runtime']} (images per call: {calls})")
    print()
    print(table(runs, args.sizes))


if __name__ == "__main__":
    main()
