"""One benchmark measurement in a fresh process, so each method's peak RSS is its own.

    python benchmarks/worker.py '{"method": "legrad_onnx", "graph": "...", ...}'

Prints one JSON line with the result. Methods:
  plain_onnx, legrad_onnx   an ONNX graph under onnxruntime (CPU)
  runtime                   legrad_runtime's LeGradModel.explain on uint8 images (preprocessing,
                            memory-budget batching): what an application gets
  reference_torch           our autograd reference, legrad_reference (one image forward for all prompts);
                            legrad_reference_siglip for MAP-head towers (with the empty-prompt correction
                            when the folder has it on)
  authors_torch             the authors' approach emulated in PyTorch (see authors.py; CLIP towers only)
  authors_released          the authors' released code itself (legrad_torch 1.1, open_clip 2.23.0 from
                            .authors-site/, installed by tests/export/test_authors_parity.py): per image
                            for CLIP, per prompt (compute_legrad_siglip, all images) for MAP heads
  save_weights              our seeded model's image-tower weights (and the empty-prompt embedding) to a
                            file, so the released code, on its own open_clip, runs the same weights
  sweep                     LeGrad ONNX time as prompts or layers grow, interleaved with the plain forward
  agreement                 maps of two LeGrad graphs (fp32 vs int8) on the same inputs
  sanity                    LeGrad ONNX vs the autograd reference vs the authors' emulation (same weights)
Torch is imported only by the torch methods, so the ONNX rows' RSS holds no torch.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def inputs(spec: dict[str, Any], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded standardised pixels (B, 3, S, S) and unit text embeddings (P, E)."""
    rng = np.random.default_rng(spec.get("seed", 0))
    pixels = rng.standard_normal((batch, 3, spec["size"], spec["size"]), dtype=np.float32)
    text = rng.standard_normal((spec["prompts"], spec["embed_dim"]), dtype=np.float32)
    return pixels, text / np.linalg.norm(text, axis=1, keepdims=True)


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM; getrusage's ru_maxrss survives exec, so it would
    report the parent's peak when that is higher)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def ort_session(spec: dict[str, Any], path: str):
    import onnxruntime as ort

    if spec.get("ort_options", "tuned") == "tuned":
        from legrad_runtime.session import session_options

        options = session_options(spec.get("threads"))
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.get("threads") or 0
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def torch_loaded(spec: dict[str, Any]):
    """Our LoadedModel with the same seeded random weights as bench.py's export."""
    import torch

    from legrad_export.load import load_openclip

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["weight_seed"])  # the same random weights as bench.py's export
    return load_openclip(spec["model_name"], "none", tokenizer=spec.get("tokenizer"))


def torch_model(spec: dict[str, Any]):
    return torch_loaded(spec).model


def empty_embed(spec: dict[str, Any], loaded):
    """The correction's empty-prompt embedding (E,) of a MAP-head model, or None when it is off."""
    from legrad_export.graphs import empty_prompt_embed

    if spec.get("head") != "map" or not spec.get("correction"):
        return None
    return empty_prompt_embed(loaded, spec["correction_prompt"])


def torch_reference(spec: dict[str, Any], loaded) -> Callable[[Any, Any], Any]:
    """run(pixels, text) of our autograd reference for this tower (tensors in, LeGradOutput out)."""
    layers = list(spec["layers"])
    if spec.get("head") == "map":
        from legrad_export.reference_siglip import legrad_reference_siglip

        empty, threshold = empty_embed(spec, loaded), spec.get("correction_threshold") or 0.8
        return lambda x, t: legrad_reference_siglip(loaded.model, x, t, layers, empty, threshold)
    from legrad_export.reference import legrad_reference

    return lambda x, t: legrad_reference(loaded.model, x, t, layers)


def save_weights(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    loaded = torch_loaded(spec)
    torch.save(
        {"visual": loaded.model.visual.state_dict(), "empty_embed": empty_embed(spec, loaded)}, spec["out"]
    )
    return {"weights": spec["out"]}


def make_runner(spec: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], Any]:
    """Load the method (timed by the caller) and return run(pixels, text)."""
    method = spec["method"]
    if method in ("plain_onnx", "legrad_onnx"):
        session = ort_session(spec, spec["graph"])
        if method == "plain_onnx":
            return lambda x, t: session.run(None, {"pixel_values": x})
        return lambda x, t: session.run(None, {"pixel_values": x, "text_embeds": t})
    if method == "runtime":
        from legrad_runtime import load

        model = load(spec["folder"], device="cpu", threads=spec.get("threads"))
        rng = np.random.default_rng(1)
        size = spec["size"]
        photos = {}

        def run_runtime(x: np.ndarray, t: np.ndarray):
            if len(x) not in photos:  # uint8 photos at the input size: preprocessing is a plain resize
                photos[len(x)] = list(rng.integers(0, 256, (len(x), size, size, 3), dtype=np.uint8))
            return model.explain(photos[len(x)], text_embeds=t)

        return run_runtime
    import torch

    if method == "reference_torch":
        reference = torch_reference(spec, torch_loaded(spec))
        return lambda x, t: reference(torch.from_numpy(x), torch.from_numpy(t))
    if method == "authors_released":  # their legrad_torch 1.1 on open_clip 2.23.0 (.authors-site first)
        import open_clip
        from legrad import LeWrapper

        torch.manual_seed(spec["weight_seed"])
        model = open_clip.create_model(spec["model_name"]).eval()
        saved = torch.load(spec["weights"]) if spec.get("weights") else None
        if saved is not None:  # bench.py's weights, exactly (their open_clip may initialise otherwise)
            model.visual.load_state_dict(saved["visual"])
        wrapped = LeWrapper(model, layer_index=spec["layer_index"])
        if spec.get("head") == "map":  # compute_legrad_siglip sums its prompts: one call per prompt
            correction = bool(spec.get("correction"))
            if correction:  # set, so that their code embeds no text (that would download a tokenizer)
                wrapped.empty_embedding = saved["empty_embed"].reshape(-1, 1)

            # their PatchEmbed (dynamic size, no padding) asserts a multiple of the patch: at a size
            # the patches do not tile (SO400M-14 at 384) give it the covered pixels, the same patches
            covered = spec["size"] // wrapped.patch_size * wrapped.patch_size

            def run_released_siglip(x: np.ndarray, t: np.ndarray):
                image = torch.from_numpy(np.ascontiguousarray(x[..., :covered, :covered]))
                return [
                    wrapped.compute_legrad(
                        text_embedding=torch.from_numpy(t[p : p + 1]),
                        image=image,
                        apply_correction=correction,
                    )
                    for p in range(len(t))
                ]

            return run_released_siglip

        def run_released(x: np.ndarray, t: np.ndarray):
            text = torch.from_numpy(t)
            return [
                wrapped.compute_legrad(text_embedding=text, image=torch.from_numpy(x[i : i + 1]))
                for i in range(len(x))
            ]

        return run_released
    model = torch_model(spec)
    if method == "authors_torch":
        from authors import authors_legrad

        def run_authors(x: np.ndarray, t: np.ndarray):
            text = torch.from_numpy(t)
            return [
                authors_legrad(model, torch.from_numpy(x[i : i + 1]), text, spec["layer_index"])
                for i in range(len(x))
            ]

        return run_authors
    raise ValueError(f"unknown method {method!r}")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput on B images × P prompts, latency at B=1, peak RSS."""
    rss_start = current_rss_mb()
    start = time.perf_counter()
    run = make_runner(spec)
    load_s = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    pixels, text = inputs(spec, spec["batch"])
    for _ in range(spec.get("warmups", 1)):
        run(pixels, text)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        run(pixels, text)
        times.append(time.perf_counter() - start)
    peak_workload = peak_rss_mb()
    latencies = []
    if spec.get("latency_runs", 0):
        one = pixels[:1].copy()
        run(one, text)
        for _ in range(spec["latency_runs"]):
            start = time.perf_counter()
            run(one, text)
            latencies.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "method": spec["method"],
        "load_s": load_s,
        "seconds": times,
        "median_s": median,
        "images_per_s": spec["batch"] / median,
        "latency_b1_ms": (
            {
                "p50": float(np.percentile(latencies, 50)) * 1e3,
                "p95": float(np.percentile(latencies, 95)) * 1e3,
            }
            if latencies
            else None
        ),
        "rss_mb": {"start": rss_start, "loaded": rss_loaded, "peak_workload": peak_workload},
    }


def sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of the plain forward and of LeGrad per prompt count and per graph (layer count)."""
    plain = ort_session(spec, spec["plain_graph"])
    graphs = {name: ort_session(spec, path) for name, path in spec["graphs"].items()}
    base = dict(spec, prompts=max(spec["prompt_counts"]))
    pixels, text_all = inputs(base, spec["batch"])
    cases: dict[str, Callable[[], Any]] = {"plain": lambda: plain.run(None, {"pixel_values": pixels})}
    for name, session in graphs.items():
        counts = {spec["layer_sweep_prompts"]} | (
            set(spec["prompt_counts"]) if name == spec["main"] else set()
        )
        for p in sorted(counts):
            feeds = {"pixel_values": pixels, "text_embeds": text_all[:p]}
            cases[f"{name}|P={p}"] = lambda s=session, f=feeds: s.run(None, f)
    for _ in range(spec.get("warmups", 1)):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(spec["repeats"]):
        for name, fn in cases.items():  # interleaved: background load hits every case alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}}


def agreement(spec: dict[str, Any]) -> dict[str, Any]:
    """Heatmaps, layer maps and embeddings of graph `a` vs graph `b` on the same inputs."""
    from variants import map_agreement

    pixels, text = inputs(spec, spec["batch"])
    feeds = {"pixel_values": pixels, "text_embeds": text}
    a = ort_session(spec, spec["graph_a"]).run(None, feeds)
    b = ort_session(spec, spec["graph_b"]).run(None, feeds)
    cos = (a[2] * b[2]).sum(1) / np.linalg.norm(a[2], axis=1) / np.linalg.norm(b[2], axis=1)
    return {
        "heatmaps": map_agreement(a[0], b[0]),
        "layer_maps": map_agreement(a[1], b[1]),
        "image_embeds_min_cosine": float(cos.min()),
    }


def sanity(spec: dict[str, Any]) -> dict[str, Any]:
    """Max abs differences between LeGrad ONNX, the autograd reference and the authors' emulation."""
    import torch

    loaded = torch_loaded(spec)
    model = loaded.model
    pixels, text = inputs(spec, spec["batch"])
    heat, _, embeds = ort_session(spec, spec["graph"]).run(
        None, {"pixel_values": pixels, "text_embeds": text}
    )
    (plain_embeds,) = ort_session(spec, spec["plain_graph"]).run(None, {"pixel_values": pixels})
    ref = torch_reference(spec, loaded)(torch.from_numpy(pixels), torch.from_numpy(text))
    out = {
        "onnx_vs_reference_heatmaps": float(np.abs(heat - ref.heatmaps.numpy()).max()),
        "plain_vs_legrad_onnx_embeds": float(np.abs(plain_embeds - embeds).max()),
    }
    if spec.get("layer_index") is not None and spec.get("head") != "map":  # the emulation is CLIP's
        from authors import authors_legrad

        authors = authors_legrad(
            model, torch.from_numpy(pixels[:1]), torch.from_numpy(text), spec["layer_index"]
        )
        out["authors_vs_reference_image0"] = float((authors - ref.heatmaps[:1]).abs().max())
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    handlers = {"sweep": sweep, "agreement": agreement, "sanity": sanity, "save_weights": save_weights}
    result = handlers.get(spec["method"], measure)(spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
