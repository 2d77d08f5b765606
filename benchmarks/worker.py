"""One benchmark measurement in a fresh process, so each method's peak RSS is its own.

    python benchmarks/worker.py '{"method": "legrad_onnx", "graph": "...", ...}'

Prints one JSON line with the result. Methods:
  plain_onnx, legrad_onnx   an ONNX graph under onnxruntime (CPU; on "device": "cuda" the CUDA provider,
                            inputs bound once as device OrtValues, run_with_iobinding)
  runtime                   legrad_runtime's LeGradModel.explain on uint8 images (preprocessing,
                            memory-budget batching): what an application gets
  reference_torch           our autograd reference, legrad_reference (one image forward for all prompts);
                            legrad_reference_siglip for MAP-head towers (with the empty-prompt correction
                            when the folder has it on)
  authors_torch             the authors' approach emulated in PyTorch (see authors.py; CLIP towers only)
  compile_torch             torch.compile of our analytic module (legrad_export.graphs.build_image_graph),
                            "dtype": "fp16" under autocast; the first warm-up call compiles
  authors_released          the authors' released code itself (legrad_torch 1.1, open_clip 2.23.0 from
                            .authors-site/, installed by tests/export/test_authors_parity.py): per image
                            for CLIP, per prompt (compute_legrad_siglip, all images) for MAP heads
  save_weights              our seeded model's image-tower weights (and the empty-prompt embedding) to a
                            file, so the released code, on its own open_clip, runs the same weights
  sweep                     LeGrad ONNX time as prompts or layers grow, interleaved with the plain forward
  agreement                 maps of two LeGrad graphs (fp32 vs int8) on the same inputs
  sanity                    LeGrad ONNX vs the autograd reference vs the authors' emulation (same weights)
Torch is imported only by the torch methods, so the ONNX rows' RSS holds no torch.

"device": "cuda" runs the torch methods on the GPU (inputs copied there once, torch.cuda.synchronize()
after every timed call) and reports device memory: torch's max_memory_allocated for the torch methods,
and for every method the growth of nvidia-smi's memory.used over the run (onnxruntime's CUDA arena
cannot be asked for its size; that delta includes the process's CUDA context).
"""

from __future__ import annotations

import contextlib
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


def on_cuda(spec: dict[str, Any]) -> bool:
    return spec.get("device", "cpu") == "cuda"


def ort_session(spec: dict[str, Any], path: str):
    import onnxruntime as ort

    if spec.get("ort_options", "tuned") == "tuned":
        from legrad_runtime.session import session_options

        options = session_options(spec.get("threads"))
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.get("threads") or 0
    if not on_cuda(spec):
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    from gpu_check import cuda_providers, preload_ort_dlls

    preload_ort_dlls(ort)
    session = ort.InferenceSession(path, options, providers=cuda_providers())
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(
            f"onnxruntime's CUDA provider did not start for {path} (session providers "
            f"{session.get_providers()}; this onnxruntime offers {ort.get_available_providers()})"
        )
    return session


def cast_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds in the dtypes the graph declares (an fp16 export may take float16 inputs)."""
    types = {i.name: i.type for i in session.get_inputs()}
    return {
        name: value.astype(np.float16) if types.get(name) == "tensor(float16)" else value
        for name, value in feeds.items()
    }


def ort_call(
    session, feeds: dict[str, np.ndarray], device: str = "cpu", bind: bool | None = None
) -> Callable[[], Any]:
    """A call that runs `session` on `feeds`. On CUDA (or with bind=True) the inputs become OrtValues
    on the device once, the outputs stay there (IO binding), and the call returns, with the binding,
    when they are written; elsewhere it returns session.run's outputs."""
    feeds = cast_feeds(session, feeds)
    if not (device == "cuda" if bind is None else bind):
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    where = "cuda" if device == "cuda" else "cpu"
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(v, where, 0) for name, v in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, where, 0)

    def call():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding, values  # the device inputs live as long as the call

    return call


def cached_by_input(make: Callable[..., Callable[[], Any]]) -> Callable[..., Any]:
    """run(x, t) that builds make(x, t) once per pair of input arrays (kept alive, so ids stay unique)."""
    calls: dict[tuple[int, int], tuple[Any, Any, Callable[[], Any]]] = {}

    def run(x: np.ndarray, t: np.ndarray):
        key = (id(x), id(t))
        if key not in calls:
            calls[key] = (x, t, make(x, t))
        return calls[key][2]()

    return run


def torch_device(spec: dict[str, Any]):
    import torch

    return torch.device("cuda" if on_cuda(spec) else "cpu")


def device_tensor(spec: dict[str, Any]) -> Callable[[np.ndarray], Any]:
    """numpy → torch tensor on the spec's device; on CUDA copied once per array (kept alive)."""
    import torch

    if not on_cuda(spec):
        return torch.from_numpy
    device, cache = torch_device(spec), {}

    def to(x: np.ndarray):
        if id(x) not in cache:
            cache[id(x)] = (x, torch.from_numpy(x).to(device))
        return cache[id(x)][1]

    return to


def loop_prompts_when_compiled() -> None:
    """Make our module loop over the prompts under torch.compile, as it does in eager mode.

    `LeGrad.layer_maps` runs its prompts in a scan when `torch.compiler.is_compiling()` (so that the
    ONNX export, traced by dynamo, gets one Scan node), and inductor cannot lower a scan here
    (torch 2.14: DataDependentOutputException in decompose_scan_to_while_loop, even for a one-line
    scan). The loop is unrolled instead: P is fixed per compiled graph, as B is (dynamic=False).
    Only legrad_export.legrad's own `torch` is replaced, by a module that forwards everything but
    `compiler.is_compiling`."""
    import types

    import torch

    import legrad_export.legrad as legrad

    if getattr(legrad.torch, "_legrad_bench_shim", False):
        return
    compiler = types.ModuleType("torch.compiler")
    compiler.__dict__.update(vars(torch.compiler))
    compiler.is_compiling = lambda: False
    shim = types.ModuleType("torch")
    shim.__dict__.update(vars(torch))
    shim.compiler = compiler
    shim._legrad_bench_shim = True
    legrad.torch = shim


def autocast(spec: dict[str, Any]):
    """fp16 under torch.autocast for the torch rows with "dtype": "fp16", else nothing."""
    import torch

    if spec.get("dtype") != "fp16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch_device(spec).type, dtype=torch.float16)


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
        if empty is not None and on_cuda(spec):
            empty = empty.to(torch_device(spec))
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
        if on_cuda(spec):
            if method == "plain_onnx":
                return cached_by_input(lambda x, t: ort_call(session, {"pixel_values": x}, "cuda"))
            feeds = lambda x, t: {"pixel_values": x, "text_embeds": t}  # noqa: E731
            return cached_by_input(lambda x, t: ort_call(session, feeds(x, t), "cuda"))
        if session.get_inputs()[0].type == "tensor(float16)":  # an fp16 export on the CPU: cast once
            if method == "plain_onnx":
                return cached_by_input(lambda x, t: ort_call(session, {"pixel_values": x}))
            return cached_by_input(lambda x, t: ort_call(session, {"pixel_values": x, "text_embeds": t}))
        if method == "plain_onnx":
            return lambda x, t: session.run(None, {"pixel_values": x})
        return lambda x, t: session.run(None, {"pixel_values": x, "text_embeds": t})
    if method == "runtime":
        from legrad_runtime import load

        model = load(spec["folder"], device=spec.get("device", "cpu"), threads=spec.get("threads"))
        if on_cuda(spec) and getattr(model, "device", "cuda") != "cuda":
            raise RuntimeError(f"legrad_runtime.load(device='cuda') runs on {model.device}, not the GPU")
        rng = np.random.default_rng(1)
        size = spec["size"]
        photos = {}

        def run_runtime(x: np.ndarray, t: np.ndarray):
            if len(x) not in photos:  # uint8 photos at the input size: preprocessing is a plain resize
                photos[len(x)] = list(rng.integers(0, 256, (len(x), size, size, 3), dtype=np.uint8))
            return model.explain(photos[len(x)], text_embeds=t)

        return run_runtime
    import torch

    to = device_tensor(spec)
    if method == "reference_torch":
        loaded = torch_loaded(spec)
        reference = torch_reference(spec, loaded)  # embeds the correction's prompt, on the CPU
        if on_cuda(spec):
            loaded.model.to(torch_device(spec))
            return lambda x, t: reference(to(x), to(t))
        return lambda x, t: reference(torch.from_numpy(x), torch.from_numpy(t))
    if method == "compile_torch":
        from legrad_export.graphs import build_image_graph

        loop_prompts_when_compiled()
        loaded = torch_loaded(spec)
        options = {"correction": bool(spec.get("correction", True))}
        if spec.get("correction_threshold") is not None:
            options["threshold"] = spec["correction_threshold"]
        module = build_image_graph(loaded, spec["size"], tuple(spec["layers"]), **options)
        module = module.to(torch_device(spec)).eval()
        compiled = torch.compile(module, mode=spec.get("compile_mode") or None, dynamic=False)

        def run_compiled(x: np.ndarray, t: np.ndarray):
            with torch.no_grad(), autocast(spec):
                return compiled(to(x), to(t))

        return run_compiled
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

        if on_cuda(spec):
            model.to(torch_device(spec))

            def run_authors_device(x: np.ndarray, t: np.ndarray):
                images, text = to(x), to(t)  # on the device once; one image at a time, as theirs
                return [
                    authors_legrad(model, images[i : i + 1], text, spec["layer_index"]) for i in range(len(x))
                ]

            return run_authors_device

        def run_authors(x: np.ndarray, t: np.ndarray):
            text = torch.from_numpy(t)
            return [
                authors_legrad(model, torch.from_numpy(x[i : i + 1]), text, spec["layer_index"])
                for i in range(len(x))
            ]

        return run_authors
    raise ValueError(f"unknown method {method!r}")


def synchronized(spec: dict[str, Any], run: Callable[[np.ndarray, np.ndarray], Any]):
    """run, then wait for the device: torch's CUDA queue (the ONNX rows' IO binding waits itself)."""
    if not on_cuda(spec):
        return run

    def run_sync(x: np.ndarray, t: np.ndarray):
        out = run(x, t)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return out

    return run_sync


def gpu_memory(spec: dict[str, Any], smi_before: float | None) -> dict[str, Any] | None:
    """Device memory after the workload (MiB): torch's allocator peak where torch ran on the GPU, and
    nvidia-smi's memory.used growth since the process started (None where nvidia-smi is missing)."""
    if not on_cuda(spec):
        return None
    from gpu_check import gpu_memory_used_mb

    torch = sys.modules.get("torch")
    allocated = None
    if torch is not None and torch.cuda.is_initialized():
        allocated = torch.cuda.max_memory_allocated() / 2**20
    smi_after = gpu_memory_used_mb()
    smi_delta = None if smi_before is None or smi_after is None else smi_after - smi_before
    return {
        "max_allocated": allocated,
        "smi_delta": smi_delta,
        "smi_before": smi_before,
        "smi_after": smi_after,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput on B images × P prompts, latency at B=1, peak RSS (and device memory on CUDA)."""
    smi_before = None
    if on_cuda(spec):
        from gpu_check import gpu_memory_used_mb

        smi_before = gpu_memory_used_mb()
    rss_start = current_rss_mb()
    start = time.perf_counter()
    run = synchronized(spec, make_runner(spec))
    load_s = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    pixels, text = inputs(spec, spec["batch"])
    warmup_s = []
    for _ in range(spec.get("warmups", 1)):
        start = time.perf_counter()
        run(pixels, text)
        warmup_s.append(time.perf_counter() - start)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        run(pixels, text)
        times.append(time.perf_counter() - start)
    peak_workload = peak_rss_mb()
    device_memory = gpu_memory(spec, smi_before)
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
        "warmup_s": warmup_s,
        "gpu_memory_mb": device_memory,
        "device": spec.get("device", "cpu"),
    }


def sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of the plain forward and of LeGrad per prompt count and per graph (layer count)."""
    plain = ort_session(spec, spec["plain_graph"])
    graphs = {name: ort_session(spec, path) for name, path in spec["graphs"].items()}
    base = dict(spec, prompts=max(spec["prompt_counts"]))
    pixels, text_all = inputs(base, spec["batch"])
    device = spec.get("device", "cpu")
    cases: dict[str, Callable[[], Any]] = {"plain": lambda: plain.run(None, {"pixel_values": pixels})}
    if device == "cuda":
        cases["plain"] = ort_call(plain, {"pixel_values": pixels}, device)
    for name, session in graphs.items():
        counts = {spec["layer_sweep_prompts"]} | (
            set(spec["prompt_counts"]) if name == spec["main"] else set()
        )
        for p in sorted(counts):
            feeds = {"pixel_values": pixels, "text_embeds": text_all[:p]}
            cases[f"{name}|P={p}"] = lambda s=session, f=feeds: s.run(None, f)
            if device == "cuda":
                cases[f"{name}|P={p}"] = ort_call(session, feeds, device)
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
    session_a, session_b = ort_session(spec, spec["graph_a"]), ort_session(spec, spec["graph_b"])
    a = [np.asarray(o, np.float32) for o in session_a.run(None, cast_feeds(session_a, feeds))]
    b = [np.asarray(o, np.float32) for o in session_b.run(None, cast_feeds(session_b, feeds))]
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
