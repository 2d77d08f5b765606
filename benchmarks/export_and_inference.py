"""Export time and CPU inference speed: LeGrad ONNX vs a plain ONNX forward vs PyTorch LeGrad.

    python benchmarks/export_and_inference.py --model ViT-B-16 --image-size 224 --batch 4 --prompts 4

Rows (the whole workload: B images × P prompts; one warm-up, then the median of --repeats
interleaved rounds; the machine's load average is printed since other work skews timings):
  (a) plain ONNX image-embedding forward (onnxruntime CPU)   (b) our LeGrad ONNX graph
  (c) our autograd reference, legrad_reference               (d) the authors' approach, emulated
Random weights (pretrained='none'): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import open_clip
import torch
from authors import LAYER_INDEX, authors_legrad

from legrad_export.graphs import example_image_inputs
from legrad_export.load import LoadedModel, load_openclip, visual_state_dict
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference import legrad_reference
from legrad_export.vit import ExplicitViT

PLAIN, OURS = "(a) plain ONNX forward", "(b) LeGrad ONNX (ours)"
AUTHORS = "(d) authors' approach (PyTorch)"
RATIO_OVERHEAD = "LeGrad ONNX / plain ONNX forward"
RATIO_SPEEDUP = "authors' approach (PyTorch) / LeGrad ONNX"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.onnx's progress prints and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def median_seconds(methods: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """One warm-up call each, then `repeats` rounds calling each method once (interleaved, so a
    change in background load hits every method alike); the median wall time per method."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed_export(model_name: str, size: int, out: Path) -> tuple[LoadedModel, Path, dict[str, float]]:
    """load_openclip + export_model(verify=True); seconds per stage and in total."""
    marks: list[tuple[str, float]] = [("load", time.perf_counter())]
    loaded = load_openclip(model_name, "none")
    folder = export_model(
        loaded,
        out,
        ExportSettings(image_size=size, verify=True),
        on_stage=lambda name: marks.append((name, time.perf_counter())),
    )
    marks.append(("end", time.perf_counter()))
    stages = {name: t1 - t0 for (name, t0), (_, t1) in zip(marks, marks[1:], strict=False)}
    return loaded, folder, stages | {"total": marks[-1][1] - marks[0][1]}


def export_plain_forward(loaded: LoadedModel, size: int, path: Path) -> float:
    """The image tower alone (pixels → normalised embeddings) as ONNX; returns seconds taken."""
    start = time.perf_counter()
    vit = ExplicitViT(loaded.vit, visual_state_dict(loaded, size), size).eval()
    pixels = torch.randn(2, 3, size, size)
    with _quiet():
        program = torch.onnx.export(
            vit,
            (pixels,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
        )
        program.save(str(path))
    return time.perf_counter() - start


# ------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4, help="images per workload (B)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per workload (P)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument("--out", type=Path, default=None, help="keep exported files here (default: temp dir)")
    return p.parse_args()


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Export, time the four methods, cross-check them; every number of the report."""
    size, B, P = args.image_size, args.batch, args.prompts
    print(f"exporting {args.model} at {size}px (load + export_model, verify=True) ...", flush=True)
    loaded, folder, export_s = timed_export(args.model, size, out)
    plain_path = out / f"plain_forward_{size}.onnx"
    plain_export_s = export_plain_forward(loaded, size, plain_path)

    pixels, text = example_image_inputs(size, loaded.vit.embed_dim, B, P, seed=0)
    options, cpu = ort.SessionOptions(), ["CPUExecutionProvider"]  # the same default options for both
    plain = ort.InferenceSession(str(plain_path), options, providers=cpu)
    legrad = ort.InferenceSession(str(folder / "legrad_image.onnx"), options, providers=cpu)
    feeds = {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    model = loaded.model

    def authors_all() -> list[torch.Tensor]:
        return [authors_legrad(model, pixels[i : i + 1], text) for i in range(B)]

    print(f"timing B={B} images x P={P} prompts, median of {args.repeats} ...", flush=True)
    methods: dict[str, Callable[[], Any]] = {
        PLAIN: lambda: plain.run(None, {"pixel_values": feeds["pixel_values"]}),
        OURS: lambda: legrad.run(None, feeds),
        "(c) autograd reference (PyTorch)": lambda: legrad_reference(model, pixels, text, LAYER_INDEX),
        AUTHORS: authors_all,
    }
    load_before = os.getloadavg()[0]
    seconds = median_seconds(methods, args.repeats)
    load_after = os.getloadavg()[0]

    ref = legrad_reference(model, pixels, text, LAYER_INDEX)
    heatmaps, embeds = legrad.run(["heatmaps", "image_embeds"], feeds)
    (plain_embeds,) = plain.run(None, {"pixel_values": feeds["pixel_values"]})
    sanity = {
        "authors_vs_reference_image0": _max_diff(authors_legrad(model, pixels[:1], text), ref.heatmaps[:1]),
        "onnx_vs_reference_heatmaps": _max_diff(torch.from_numpy(heatmaps), ref.heatmaps),
        "plain_vs_legrad_onnx_embeds": _max_diff(torch.from_numpy(plain_embeds), torch.from_numpy(embeds)),
    }
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "nproc": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1min_before_after_timing": [load_before, load_after],
        },
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "open_clip": open_clip.__version__,
        },
        "export_seconds": export_s,
        "plain_export_seconds": plain_export_s,
        "median_seconds": seconds,
        "images_per_second": {k: B / s for k, s in seconds.items()},
        "ratios": {
            RATIO_OVERHEAD: seconds[OURS] / seconds[PLAIN],
            RATIO_SPEEDUP: seconds[AUTHORS] / seconds[OURS],
        },
        "sanity_max_abs_diff": sanity,
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def print_report(r: dict[str, Any]) -> None:
    """The machine, the export time, the aligned table and the two headline ratios."""
    m, s, seconds = r["machine"], r["settings"], r["median_seconds"]
    print(
        f"\nmachine: {m['platform']} ({m['processor']}), nproc={m['nproc']}, "
        f"torch threads={m['torch_threads']}; 1-min load average before/after timing: "
        + "/".join(f"{x:.2f}" for x in m["loadavg_1min_before_after_timing"])
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    print(
        f"model: {s['model']} (random weights), {s['image_size']}px, B={s['batch']} images, "
        f"P={s['prompts']} prompts, last 2 layers, median of {s['repeats']}\n"
    )
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in r["export_seconds"].items() if k != "total")
    print(f"export: {stages}  -> TOTAL {r['export_seconds']['total']:.1f}s (target < 120s)")
    print(f"plain-forward ONNX export (comparison only): {r['plain_export_seconds']:.1f}s\n")
    width = max(map(len, seconds))
    print(f"{'method':<{width}}  {'median s':>9}  {'images/s':>9}  {'vs (a)':>7}")
    print("-" * (width + 31))
    for name, sec in seconds.items():
        rate, ratio = r["images_per_second"][name], sec / seconds[PLAIN]
        print(f"{name:<{width}}  {sec:>9.3f}  {rate:>9.2f}  {ratio:>6.2f}x")
    targets = {RATIO_OVERHEAD: "target <= 1.5x", RATIO_SPEEDUP: "target > 1: ours faster"}
    print()
    for name, value in r["ratios"].items():
        print(f"{name + ':':<44} {value:6.2f}x  ({targets[name]})")
    print("\nsanity, max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in r["sanity_max_abs_diff"].items()))


def main() -> None:
    args = parse_args()
    with contextlib.ExitStack() as stack:
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="legrad-bench-")))
        out.mkdir(parents=True, exist_ok=True)
        report = run(args, out)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
