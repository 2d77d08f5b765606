"""LeGrad's cost against a plain image-embedding forward of the same model, side by side in one run.

    python benchmarks/bench.py --model ViT-B-16 --image-size 224 --batch 8 --prompts 4 --layers -2
    python benchmarks/bench.py --model-folder models/ViT-B-16__laion2b_s34b_b88k__448 --batch 8 --prompts 32
    python benchmarks/bench.py --model ViT-B-16-SigLIP --tokenizer TOK_DIR --methods plain,legrad,released

Give an exported model folder (`legrad-export` output), or a model name to export one here with
random weights (`pretrained="none"`; speed does not depend on the weights; models with a Hugging Face
tokenizer, SigLIP, need `--tokenizer`, since nothing is downloaded). Each method runs in a
fresh process (benchmarks/worker.py), so its peak RSS is its own:

  plain ONNX forward     pixel_values → image_embeds, cut out of the LeGrad graph (same weights, same ops)
  LeGrad ONNX (ours)     the exported image graph
  runtime explain()      legrad_runtime on uint8 images: preprocessing and memory-budget batching included
  reference (PyTorch)    our autograd reference, one image forward for all prompts
  authors' (PyTorch)     the authors' approach emulated: each image repeated once per prompt, autograd
                         (CLIP towers only; skipped for MAP-head towers such as SigLIP)
  authors' released      their legrad_torch 1.1 itself (--methods ...,released; needs .authors-site/):
                         compute_legrad_clip per image, or compute_legrad_siglip per prompt (MAP head)
  torch.compile (ours)   torch.compile of our analytic module (--methods ...,compile; the first warm-up
                         call compiles; fp16 under autocast)
  ... int8               the ONNX graphs after onnxruntime's dynamic int8 quantisation (--dtype int8, CPU)
  ... fp16               an fp16 export of the same model (--dtype fp16: --fp16-folder, or exported here
                         when legrad-export has --dtype)
  LeGrad ONNX (ours) ... (LABEL)   the image graph of another export of the same model, e.g. one with
                         its prompts batched (legrad-export --prompts batch): --extra-legrad LABEL=FOLDER

--device cuda: the ONNX rows on onnxruntime's CUDA provider with IO binding (inputs on the device once),
the torch rows on the GPU with torch.cuda.synchronize() after each timed call, device memory per row
(torch: max_memory_allocated; ONNX: nvidia-smi memory.used growth) and the issue's GPU targets. It
needs onnxruntime-gpu for the ONNX rows and a CUDA torch for the torch rows; --add-rows merges rows
measured in an earlier run (the torch rows of a first run on a machine that gets onnxruntime-gpu later).

Per method: throughput on B images × P prompts (median of --repeats after --warmups untimed runs), latency at
B=1 (p50/p95 of --latency-runs), peak RSS. Then a sweep, interleaved in one process: LeGrad at
P = --sweep-prompts and at 1, 2, 3 explained layers (graphs exported from random weights of the same
architecture), giving the marginal cost of one more prompt and one more layer as a fraction of a
plain forward (least-squares slope). With int8, the maps' agreement with fp32 (per-map Pearson r,
max abs diff). Run it alone on the machine (the numbers shift with background load):
    flock /tmp/legrad-heavy.lock .venv/bin/python benchmarks/bench.py ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
WEIGHT_SEED = 0  # random weights: the exports and the torch rows build them from the same seed
METHODS = {
    "plain": "plain ONNX forward",
    "legrad": "LeGrad ONNX (ours)",
    "runtime": "runtime explain() (ours)",
    "reference": "reference (PyTorch autograd)",
    "authors": "authors' approach (PyTorch)",
    "released": "authors' released code",
    "compile": "torch.compile (ours, analytic)",
}
WORKER_METHOD = {
    "plain": "plain_onnx",
    "legrad": "legrad_onnx",
    "runtime": "runtime",
    "reference": "reference_torch",
    "authors": "authors_torch",
    "released": "authors_released",
    "compile": "compile_torch",
}
AUTHORS_SITE = HERE.parent / ".authors-site"  # legrad_torch 1.1 + open_clip 2.23.0, pip --target
ONNX_METHODS = ("plain", "legrad", "runtime")  # need onnxruntime's CUDA provider on --device cuda
TORCH_METHODS = ("reference", "authors", "released", "compile")
DTYPES = ("fp32", "int8", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-folder", type=Path, help="an exported model folder (legrad-export output)")
    src.add_argument("--model", help="open_clip model name to export here with random weights")
    p.add_argument("--image-size", type=int, default=None, help="input size when exporting (default: native)")
    p.add_argument("--layers", default="-2", help="layer spec when exporting, as legrad-export --layers")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the Hugging Face tokenizer (saved folder or tokenizer.json) of SigLIP-style models, as "
        "legrad-export --tokenizer (nothing is downloaded): the export and the torch rows, which embed "
        "the correction's empty prompt, need it",
    )
    p.add_argument("--batch", type=int, default=8, help="images per workload (B)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per workload (P)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu, or cuda: onnxruntime's CUDA provider with IO binding, torch on the GPU",
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        help="comma list of fp32, int8, fp16 (int8: onnxruntime dynamic quantisation, ONNX rows, CPU only; "
        "fp16: an fp16 export, see --fp16-folder; the compile row under autocast)",
    )
    p.add_argument(
        "--fp16-folder",
        type=Path,
        default=None,
        help="with --model-folder and --dtype fp16: an fp16 export of the same model "
        "(legrad-export --dtype fp16)",
    )
    p.add_argument(
        "--extra-legrad",
        action="append",
        default=[],
        metavar="LABEL=FOLDER",
        help="also time the LeGrad graph of another export of the same model and size (e.g. legrad-export "
        "--prompts batch), as the row 'LeGrad ONNX (ours) [DTYPE] (LABEL)'; repeatable",
    )
    p.add_argument(
        "--compile-dtype",
        default=None,
        help="comma list of fp32, fp16 for the torch.compile rows (default: those of --dtype)",
    )
    p.add_argument(
        "--compile-mode", default=None, help="torch.compile's mode (default: its default; e.g. max-autotune)"
    )
    p.add_argument(
        "--authors-images",
        type=int,
        default=None,
        help="images per workload of the authors' rows, which run one image at a time anyway, so their "
        "images/s does not depend on B (default: --batch)",
    )
    p.add_argument(
        "--add-rows",
        type=Path,
        action="append",
        default=[],
        help="a JSON report of an earlier run of the same settings (--json): its rows join this table "
        "(rows measured here win); repeatable",
    )
    p.add_argument(
        "--methods", default="plain,legrad,reference,authors", help=f"comma list of {', '.join(METHODS)}"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed workload runs per method (median)")
    p.add_argument(
        "--warmups",
        type=int,
        default=1,
        help="untimed workload runs before them (0: for models so big "
        "that one run takes a minute and warming up changes nothing)",
    )
    p.add_argument("--latency-runs", type=int, default=10, help="B=1 runs per method for p50/p95 (0: skip)")
    p.add_argument("--sweep-prompts", default="1,2,4,8", help="prompt counts of the sweep ('' to skip)")
    p.add_argument("--sweep-layers", type=int, default=3, help="sweep 1..N last layers (0 to skip)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: all cores)")
    p.add_argument("--ort-options", choices=["tuned", "default"], default="tuned", help="SessionOptions used")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument("--out", type=Path, default=None, help="keep exported files here (default: temp dir)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.dtype = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [m for m in args.methods if m not in METHODS] + [d for d in args.dtype if d not in DTYPES]
    if args.compile_dtype is not None:
        args.compile_dtype = [d.strip() for d in args.compile_dtype.split(",") if d.strip()]
        bad += [d for d in args.compile_dtype if d not in ("fp32", "fp16")]
    if bad:
        p.error(f"unknown method or dtype {', '.join(bad)}")
    if "fp32" not in args.dtype:
        args.dtype.insert(0, "fp32")  # the plain fp32 forward is every ratio's denominator
    if args.compile_dtype is None:
        args.compile_dtype = [d for d in args.dtype if d in ("fp32", "fp16")]
    if args.device == "cuda" and "int8" in args.dtype:
        p.error("--dtype int8 is CPU-only (dynamic quantisation's kernels are onnxruntime CPU kernels)")
    if args.fp16_folder is not None and args.model_folder is None:
        p.error(
            "--fp16-folder goes with --model-folder (with --model, bench.py exports the fp16 graph itself)"
        )
    extra = [item.partition("=") for item in args.extra_legrad]
    if any(not label or not sep or not folder for label, sep, folder in extra):
        p.error("--extra-legrad takes LABEL=FOLDER, e.g. batch=models/ViT-B-16__none__224__fp16")
    args.extra_legrad = [(label, folder) for label, _, folder in extra]
    if args.authors_images is not None and args.authors_images < 1:
        p.error("--authors-images must be at least 1")
    args.sweep_prompts = [int(x) for x in args.sweep_prompts.split(",") if x.strip()]
    return args


def export_folder(
    model: str, size: int | None, layers: str, out: Path, tokenizer: str | None, dtype: str | None = None
) -> Path:
    """legrad-export with seeded random weights (no verification: the sanity check compares maps).
    `dtype` ("fp16"): ExportSettings(dtype=...), which only exporters that have that field take."""
    import torch

    from legrad_export.load import load_openclip
    from legrad_export.onnx_export import ExportSettings, export_model

    torch.manual_seed(WEIGHT_SEED)  # the torch rows rebuild the same weights from this seed
    loaded = load_openclip(model, "none", tokenizer=tokenizer)
    extra = {} if dtype is None else {"dtype": dtype}
    return export_model(
        loaded, out, ExportSettings(image_size=size, layers=layers, verify=False, overwrite=True, **extra)
    )


def export_has_dtype() -> bool:
    """Whether this exporter writes fp16 graphs (ExportSettings has a `dtype` field)."""
    import dataclasses

    from legrad_export.onnx_export import ExportSettings

    return "dtype" in {f.name for f in dataclasses.fields(ExportSettings)}


def check_cuda(methods: list[str]) -> None:
    """Exit with one line when --device cuda cannot run the requested rows here."""
    if any(m in ONNX_METHODS for m in methods):
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise SystemExit(
                f"--device cuda: onnxruntime {ort.__version__} ({Path(ort.__file__).parent}) has no "
                f"CUDAExecutionProvider (it offers {', '.join(providers)}): install onnxruntime-gpu, or "
                "measure only the torch rows (--methods reference,compile,authors)"
            )
    if any(m in TORCH_METHODS for m in methods):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device cuda: torch {torch.__version__} sees no CUDA device (torch.version.cuda "
                f"{torch.version.cuda}); run the torch rows on a machine with a GPU, or use --device cpu"
            )


def add_rows(
    paths: list[Path], rows: dict[str, Any], skipped: dict, errors: dict, settings: dict
) -> list[str]:
    """Rows of earlier runs' JSON reports that this run did not measure; their sources."""
    sources = []
    for path in paths:
        other = json.loads(path.read_text(encoding="utf-8"))
        theirs = other.get("settings")
        if theirs:
            mismatch = [
                k for k, v in settings.items() if k in theirs and theirs[k] != v and k != "image_size"
            ]
            if list(theirs.get("image_size", settings["image_size"])) != list(settings["image_size"]):
                mismatch.append("image_size")
            if mismatch:
                raise SystemExit(
                    f"--add-rows {path}: measured with other settings ({', '.join(mismatch)}), not merged"
                )
        else:
            print(f"--add-rows {path}: a partial report without settings; its rows are taken as they are")
        new = other.get("rows") or other.get("partial_rows") or {}
        for name, row in new.items():
            if name not in rows:
                rows[name] = dict(row, added_from=str(path))
        for name, why in (other.get("skipped") or {}).items():
            if name not in rows:
                skipped.setdefault(name, why)
        for name, why in (other.get("errors") or {}).items():
            if name not in rows:
                errors.setdefault(name, why)
        sources.append(str(path))
    return sources


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run benchmarks/worker.py with this spec in a fresh process and return its JSON result."""
    paths = [str(HERE), os.environ.get("PYTHONPATH", "")]
    if spec["method"] == "authors_released":
        paths.insert(0, str(AUTHORS_SITE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run(
        [sys.executable, str(HERE / "worker.py"), json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from variants import extract_plain_forward, quantize_int8

    from legrad_runtime.metadata import IMAGE_GRAPH, read_metadata

    self_exported = args.model is not None
    cuda = args.device == "cuda"
    if cuda:
        check_cuda(args.methods)
    if self_exported:
        print(f"exporting {args.model} (random weights) ...", flush=True)
        folder = export_folder(args.model, args.image_size, args.layers, work / "main", args.tokenizer)
    else:
        folder = args.model_folder
    meta = read_metadata(folder)
    map_head = meta.tower.head == "map"  # SigLIP: LeGrad explains the MAP head's attention
    tokenizer = args.tokenizer
    layers = tuple(meta.layers)
    last = tuple(range(meta.num_layers - len(layers), meta.num_layers))
    layer_index = layers[0] if layers == tuple(range(layers[0], meta.num_layers)) else None
    graph = folder / IMAGE_GRAPH.filename
    plain = extract_plain_forward(graph, work / "plain_forward.onnx")
    graphs = {("legrad", "fp32"): graph, ("plain", "fp32"): plain}
    if "int8" in args.dtype:
        print("quantising to int8 ...", flush=True)
        graphs[("legrad", "int8")] = quantize_int8(graph, work / "legrad_int8.onnx")
        graphs[("plain", "int8")] = quantize_int8(plain, work / "plain_int8.onnx")
    fp16_folder, fp16_note = None, None
    if "fp16" in args.dtype and any(m in ONNX_METHODS for m in args.methods):
        if args.fp16_folder is not None:
            fp16_folder = args.fp16_folder
        elif not self_exported:
            fp16_note = "no fp16 export given: --fp16-folder DIR (legrad-export --dtype fp16)"
        elif export_has_dtype():
            print(f"exporting {args.model} in fp16 (random weights) ...", flush=True)
            fp16_folder = export_folder(
                args.model, args.image_size, args.layers, work / "fp16", args.tokenizer, dtype="fp16"
            )
        else:
            fp16_note = "this exporter writes no fp16 graphs (ExportSettings has no dtype field)"
    if fp16_folder is not None:
        fp16_graph = fp16_folder / IMAGE_GRAPH.filename
        graphs[("legrad", "fp16")] = fp16_graph
        try:
            graphs[("plain", "fp16")] = extract_plain_forward(fp16_graph, work / "plain_forward_fp16.onnx")
        except Exception as exc:  # an fp16 graph whose embeddings cannot be cut out: no plain fp16 row
            print(f"could not cut the plain forward out of the fp16 graph: {exc}")

    if meta.image_size[0] != meta.image_size[1]:
        raise SystemExit(f"bench.py measures square exports; {folder} is {meta.image_size} (height, width)")
    base = {
        "size": meta.image_size[0],
        "batch": args.batch,
        "prompts": args.prompts,
        "embed_dim": meta.embed_dim,
        "threads": args.threads,
        "ort_options": args.ort_options,
        "model_name": meta.model_name,
        "weight_seed": WEIGHT_SEED,  # torch rows: same weights as our export only when self-exported
        "layers": list(layers),
        "layer_index": layer_index,
        "repeats": args.repeats,
        "warmups": args.warmups,
        "latency_runs": args.latency_runs,
        "folder": str(folder),
        "head": meta.tower.head,
        "tokenizer": tokenizer,
        "correction": bool(meta.correction and meta.correction.enabled),
        "correction_prompt": meta.correction.prompt if meta.correction else None,
        "correction_threshold": meta.correction.threshold if meta.correction else None,
        "device": args.device,
        "compile_mode": args.compile_mode,
    }
    if "released" in args.methods and (AUTHORS_SITE / "legrad").is_dir():
        # their open_clip 2.23 gets our (seeded) weights from a file, not from its own init
        base["weights"] = worker(dict(base, method="save_weights", out=str(work / "weights.pt")))["weights"]
    load_before = os.getloadavg()[0]
    rows: dict[str, dict[str, Any]] = {}
    report_errors: dict[str, str] = {}
    skipped: dict[str, str] = {}

    def dtypes(method: str) -> list[str]:
        if method in ("plain", "legrad"):
            return args.dtype
        if method == "compile":
            return args.compile_dtype
        if method == "runtime" and "fp16" in args.dtype:
            return ["fp32", "fp16"]
        return ["fp32"]

    for method in args.methods:
        for dtype in dtypes(method):
            name = METHODS[method] + ("" if dtype == "fp32" else f" {dtype}")
            if dtype == "fp16" and method in ONNX_METHODS and fp16_folder is None:
                skipped[name] = fp16_note or "no fp16 export"
                print(f"skipping {name}: {skipped[name]}")
                continue
            if (method, dtype) == ("plain", "fp16") and ("plain", "fp16") not in graphs:
                skipped[name] = "the plain forward could not be cut out of the fp16 graph"
                continue
            if method == "released" and cuda:
                skipped[name] = "measured on the CPU only (their code, from .authors-site/)"
                print(f"skipping {name}: {skipped[name]}")
                continue
            if method == "released" and not (AUTHORS_SITE / "legrad").is_dir():
                print(f"skipping the released code: no {AUTHORS_SITE} (test_authors_parity.py installs it)")
                continue
            if method in ("authors", "released") and layer_index is None:
                print(f"skipping authors: layers {layers} are not k..L-1, which is all their code explains")
                continue
            if method == "authors" and map_head:
                skipped[METHODS[method]] = (
                    "CLIP-only emulation (compute_legrad_clip); this tower has a MAP head: "
                    "use --methods ...,released (compute_legrad_siglip)"
                )
                print(f"skipping {METHODS[method]}: {skipped[METHODS[method]]}")
                continue
            print(f"measuring {name} ...", flush=True)
            spec = dict(base, method=WORKER_METHOD[method])
            if (method, dtype) in graphs:
                spec["graph"] = str(graphs[(method, dtype)])
            if method == "compile":
                spec["dtype"] = dtype
            if method == "runtime" and dtype == "fp16":
                spec["folder"] = str(fp16_folder)
            if method in ("authors", "released") and args.authors_images:
                spec["batch"] = min(args.batch, args.authors_images)
            try:
                steal_before, started = steal_seconds(), time.perf_counter()
                rows[name] = worker(spec) | {"key": method, "dtype": dtype}
                if spec["batch"] != args.batch:
                    rows[name]["images"] = spec["batch"]  # --authors-images: compare images/s, not seconds
                rows[name]["steal_fraction"] = steal_fraction(steal_before, time.perf_counter() - started)
            except RuntimeError as exc:  # one failing method must not lose the others' numbers
                print(exc)
                report_errors[name] = str(exc)[-500:]
            if args.json:  # partial results survive an interrupted run
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"partial_rows": rows}, indent=2), encoding="utf-8")

    for label, extra_path in args.extra_legrad:
        extra_folder = Path(extra_path)
        extra_meta = read_metadata(extra_folder)
        dtype = str(extra_meta.extra.get("dtype", "fp32"))
        name = METHODS["legrad"] + ("" if dtype == "fp32" else f" {dtype}") + f" ({label})"
        if (extra_meta.model_name, extra_meta.image_size) != (meta.model_name, meta.image_size):
            what = f"{extra_meta.model_name} at {extra_meta.image_size}"
            skipped[name] = f"{extra_folder} is {what}, not this model and size"
            continue
        print(f"measuring {name} ...", flush=True)
        spec = dict(base, method=WORKER_METHOD["legrad"], graph=str(extra_folder / IMAGE_GRAPH.filename))
        try:
            rows[name] = worker(spec) | {"key": "legrad", "dtype": dtype, "variant": label}
        except RuntimeError as exc:
            print(exc)
            report_errors[name] = str(exc)[-500:]

    settings_key = {
        "model_name": meta.model_name,
        "image_size": list(meta.image_size),
        "layers": list(layers),
        "batch": args.batch,
        "prompts": args.prompts,
        "device": args.device,
    }
    added = add_rows(args.add_rows, rows, skipped, report_errors, settings_key) if args.add_rows else []
    report: dict[str, Any] = {"rows": rows, "errors": report_errors, "skipped": skipped}
    if added:
        report["rows_added_from"] = added
    report |= row_ratios(rows, cuda)

    if args.sweep_prompts or args.sweep_layers:
        report["sweep"] = sweep(args, base, meta, graph, plain, layers, last, work, tokenizer)
    if ("legrad", "fp16") in graphs and not self_exported:
        report["fp16_agreement_note"] = (
            "not measured: --fp16-folder may hold other weights (random exports are not seeded alike); "
            "legrad-export --dtype fp16 checks its graph against its own fp32 graph"
        )
    if ("legrad", "fp16") in graphs and self_exported and METHODS["legrad"] + " fp16" in rows:
        print("fp16 agreement ...", flush=True)
        try:
            report["fp16_agreement"] = worker(
                dict(
                    base,
                    method="agreement",
                    graph_a=str(graph),
                    graph_b=str(graphs[("legrad", "fp16")]),
                    batch=min(8, args.batch),
                )
            )
        except RuntimeError as exc:
            print(exc)
            report_errors["fp16 agreement"] = str(exc)[-500:]
    if "int8" in args.dtype:
        print("int8 agreement ...", flush=True)
        report["int8_agreement"] = worker(
            dict(base, method="agreement", graph_a=str(graph), graph_b=str(graphs[("legrad", "int8")]))
        )
    if self_exported:
        print("sanity check ...", flush=True)
        report["sanity_max_abs_diff"] = worker(
            dict(base, method="sanity", graph=str(graph), plain_graph=str(plain), batch=min(2, args.batch))
        )
    load_after = os.getloadavg()[0]
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "model_name": meta.model_name,
        "image_size": list(meta.image_size),
        "layers": list(layers),
        "folder": str(folder),
    }
    report["machine"] = machine(load_before, load_after)
    report["versions"] = versions()
    if cuda:
        from gpu_check import gpu_info

        report["gpu"] = gpu_info()
        report["versions"] |= {
            "torch_cuda": report["gpu"].get("torch_cuda"),
            "driver": report["gpu"].get("driver"),
            "onnxruntime_providers": ",".join(ort_providers()),
        }
        report["targets"] = cuda_targets(report)
    return report


def row_ratios(rows: dict[str, dict[str, Any]], cuda: bool) -> dict[str, Any]:
    """The report's ratios: each row against the plain fp32 forward (and, on CUDA, against the plain
    forward of its own dtype), and the authors' rows against LeGrad ONNX."""
    out: dict[str, Any] = {}
    plain_row = rows.get(METHODS["plain"])
    if plain_row:
        out["ratio_vs_plain"] = {k: time_ratio(r, plain_row) for k, r in rows.items()}
    if cuda:
        out["ratio_vs_plain_same_dtype"] = ratios_same_dtype(rows)
    for key in ("authors", "released"):
        if METHODS[key] in rows and METHODS["legrad"] in rows:
            out[f"{key}_over_legrad_onnx"] = time_ratio(rows[METHODS[key]], rows[METHODS["legrad"]])
    return out


def merge_into(report_path: Path, paths: list[Path]) -> dict[str, Any]:
    """Add the rows of earlier (or later) reports of the same settings to a written --device cuda
    report, as --add-rows would have, and write it again (ratios and targets recomputed)."""
    report = json.loads(report_path.read_text(encoding="utf-8"))
    s = report["settings"]
    key = {k: s[k] for k in ("model_name", "image_size", "layers", "batch", "prompts", "device")}
    added = add_rows(paths, report["rows"], report["skipped"], report["errors"], key)
    report["rows_added_from"] = report.get("rows_added_from", []) + added
    report |= row_ratios(report["rows"], s["device"] == "cuda")
    if s["device"] == "cuda":
        report["targets"] = cuda_targets(report)
    report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def time_ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    """How many times `base`'s time the row takes for the same images: the ratio of the medians, or of
    images/s where the row ran fewer images (--authors-images)."""
    if row.get("images") == base.get("images"):
        return row["median_s"] / base["median_s"]
    return base["images_per_s"] / row["images_per_s"]


def ratios_same_dtype(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each row's time over the plain forward of its own dtype (fp32's where there is none)."""
    out = {}
    for name, row in rows.items():
        dtype = row.get("dtype", "fp32")
        plain = rows.get(METHODS["plain"] + ("" if dtype == "fp32" else f" {dtype}")) or rows.get(
            METHODS["plain"]
        )
        if plain:
            out[name] = time_ratio(row, plain)
    return out


def cuda_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's GPU targets (H100/H200, ViT-B-16, fp16, P=1) against this run's rows."""
    from gpu_check import PAPER_FRAMES_PER_S, TARGET_IMAGES_PER_S, TARGET_LEGRAD_OVER_PLAIN

    rows, s = report["rows"], report["settings"]
    size = s["image_size"][0] if s["image_size"][0] == s["image_size"][1] else None
    conditions = []
    if s["model_name"] != "ViT-B-16":
        conditions.append(f"the targets are for ViT-B-16, this is {s['model_name']}")
    if s["prompts"] != 1:
        conditions.append(f"the targets are for P=1, this is P={s['prompts']}")
    note = "; ".join(conditions) or None
    legrad, plain = rows.get(METHODS["legrad"] + " fp16"), rows.get(METHODS["plain"] + " fp16")
    out: dict[str, dict[str, Any]] = {}
    ratio = legrad["images_per_s"] / plain["images_per_s"] if legrad and plain else None
    out["legrad_over_plain_fp16"] = {
        "what": "LeGrad fp16 throughput / plain forward fp16 throughput",
        "value": ratio,
        "target": TARGET_LEGRAD_OVER_PLAIN,
        "met": None if ratio is None else ratio >= TARGET_LEGRAD_OVER_PLAIN,
        "note": note if ratio is not None else "no fp16 rows",
    }
    variants = {  # --extra-legrad rows in fp16: other exports of the same model (e.g. prompts batched)
        row["variant"]: row["images_per_s"] / plain["images_per_s"]
        for row in rows.values()
        if row.get("variant") and row.get("dtype") == "fp16" and plain
    }
    if variants:
        out["legrad_over_plain_fp16"]["variants"] = variants
    wanted = TARGET_IMAGES_PER_S.get(size)
    value = legrad["images_per_s"] if legrad else None
    out["legrad_fp16_images_per_s"] = {
        "what": f"LeGrad fp16 images/s at {size or s['image_size']}",
        "value": value,
        "target": wanted,
        "met": None if value is None or wanted is None else value >= wanted,
        "note": note if value is not None else "no fp16 LeGrad row",
    }
    authors = rows.get(METHODS["authors"])
    out["authors_images_per_s"] = {
        "what": "the authors' approach (PyTorch, one image at a time) images/s",
        "value": authors["images_per_s"] if authors else None,
        "paper": PAPER_FRAMES_PER_S,
        "met": None,
    }
    return out


def sweep(args, base, meta, graph: Path, plain: Path, layers, last, work: Path, tokenizer) -> dict[str, Any]:
    """LeGrad time vs P (the model's graph) and vs the number of last layers explained."""
    graphs = {f"L{len(layers)}": str(graph)}
    if args.sweep_layers:
        for k in range(1, args.sweep_layers + 1):
            if k == len(layers) and layers == last:
                continue
            print(f"exporting a graph for the last {k} layer(s) (random weights) ...", flush=True)
            folder = export_folder(meta.model_name, meta.image_size, str(-k), work / f"layers{k}", tokenizer)
            graphs[f"L{k}"] = str(folder / "legrad_image.onnx")
    main = f"L{len(layers)}"
    counts = args.sweep_prompts or [args.prompts]
    print("sweep ...", flush=True)
    spec = dict(
        base,
        method="sweep",
        plain_graph=str(plain),
        graphs=graphs,
        main=main,
        prompt_counts=counts,
        layer_sweep_prompts=args.prompts,
    )
    times = worker(spec)["median_s"]
    plain_s = times["plain"]
    out: dict[str, Any] = {"median_s": times, "plain_s": plain_s}
    if len(counts) > 1:
        per_prompt = fit_slope(counts, [times[f"{main}|P={p}"] for p in counts])
        out["marginal_prompt_s"] = per_prompt
        out["marginal_prompt_vs_plain"] = per_prompt / plain_s
    layer_counts = sorted(int(k[1:]) for k in graphs if k == main or args.sweep_layers)
    if args.sweep_layers and len(layer_counts) > 1:
        ys = [times[f"L{k}|P={args.prompts}"] for k in layer_counts]
        per_layer = fit_slope(layer_counts, ys)
        out["marginal_layer_s"] = per_layer
        out["marginal_layer_vs_plain"] = per_layer / plain_s
        out["layer_counts"] = layer_counts
    return out


def steal_seconds() -> float | None:
    """CPU seconds the hypervisor has given to other guests since boot (/proc/stat's steal column)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None


def steal_fraction(before: float | None, elapsed_s: float) -> float | None:
    """The share of this machine's CPU time stolen since `before` (None where it can't be read)."""
    after = steal_seconds()
    if before is None or after is None or elapsed_s <= 0:
        return None
    return (after - before) / (elapsed_s * len(os.sched_getaffinity(0)))


STEAL_WARNING = 0.05


def machine(load_before: float, load_after: float) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "cpu": cpu or platform.processor(),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_1min_before_after": [load_before, load_after],
    }


def versions() -> dict[str, str]:
    import onnxruntime as ort

    out = {"python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import open_clip
        import torch

        out |= {"torch": torch.__version__, "open_clip": open_clip.__version__}
    return out


def _size_label(size: int | list[int]) -> str:
    """A report's image size: an int (older reports) or [height, width]."""
    from legrad_runtime.metadata import format_size

    return str(size) if isinstance(size, int) else format_size(tuple(size))


def print_fp16_agreement(r: dict[str, Any]) -> None:
    if "fp16_agreement" in r:
        a = r["fp16_agreement"]
        for key in ("heatmaps", "layer_maps"):
            x = a[key]
            print(
                f"fp16 vs fp32 {key}: Pearson min {x['pearson_min']:.4f} mean {x['pearson_mean']:.4f}, "
                f"max abs diff {x['max_abs_diff']:.3g} ({x['maps']} maps)"
            )
        print(f"fp16 vs fp32 image embeddings: min cosine {a['image_embeds_min_cosine']:.5f}")
    elif "fp16_agreement_note" in r:
        print(f"fp16 vs fp32 agreement: {r['fp16_agreement_note']}")


def print_cuda_report(r: dict[str, Any]) -> None:
    """The --device cuda table: images/s, ratio to the plain forward of the same dtype, B=1 latency,
    device memory (torch's allocator peak, or nvidia-smi's delta for onnxruntime), and the targets."""
    from gpu_check import gpu_memory_cell, target_line

    s, m, g = r["settings"], r["machine"], r.get("gpu", {})
    print(
        f"\nGPU: {g.get('torch_device_name') or g.get('name', '?')}, driver {g.get('driver', '?')}, "
        f"{g.get('memory_total_mb', '?')} MiB; host: {m['cpu']}, {m['nproc']} cores"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    print(
        f"model: {s['model_name']} at {_size_label(s['image_size'])}px, layers {s['layers']}, "
        f"B={s['batch']}, P={s['prompts']}, cuda, median of {s['repeats']} "
        f"after {s.get('warmups', 1)} warm-up\n"
    )
    cols = ["median s", "images/s", "vs plain*", "B=1 p50 ms", "p95 ms", "GPU MB", "peak RSS MB"]
    head = f"{'method':<38} " + " ".join(f"{c:>11}" for c in cols)
    print(head + "\n" + "-" * len(head))
    nan = float("nan")
    notes = set()
    for name, row in r["rows"].items():
        lat = row["latency_b1_ms"] or {"p50": nan, "p95": nan}
        ratio = r.get("ratio_vs_plain_same_dtype", {}).get(name, nan)
        mem, how = gpu_memory_cell(row)
        notes.add(how)
        mark = "" if how.startswith("torch") or mem == "–" else "~"
        values = [f"{row['median_s']:.4f}", f"{row['images_per_s']:.1f}", f"{ratio:.2f}x"]
        values += [
            f"{lat['p50']:.2f}",
            f"{lat['p95']:.2f}",
            mark + mem,
            f"{row['rss_mb']['peak_workload']:.0f}",
        ]
        label = name + (f" ({row['images']} img)" if "images" in row else "")
        print(f"{label:<38} " + " ".join(f"{v:>11}" for v in values))
    for name, why in r.get("skipped", {}).items():
        print(f"{name:<38} skipped: {why}")
    for name, why in r.get("errors", {}).items():
        last = why.strip().splitlines()[-1] if why.strip() else "?"
        print(f"{name:<38} FAILED: {last}")
    print("* against the plain ONNX forward of the same dtype (fp32's where that has none)")
    print(
        "GPU MB: torch rows torch.cuda.max_memory_allocated; ~ onnxruntime rows the growth of nvidia-smi's "
        "memory.used over the run (the CUDA context included: the CUDA provider's arena cannot be asked)"
        + ("; – nvidia-smi missing or unreadable" if "not read" in notes else "")
    )
    if r.get("rows_added_from"):
        print("rows added from: " + ", ".join(r["rows_added_from"]))
    sw = r.get("sweep")
    if sw:
        print(f"\nsweep (median s, plain forward {sw['plain_s']:.4f}s):")
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in sw["median_s"].items() if k != "plain"))
        if "marginal_prompt_s" in sw:
            share = 100 * sw["marginal_prompt_vs_plain"]
            print(f"  one more prompt: {sw['marginal_prompt_s']:.5f}s = {share:.1f}% of a plain forward")
    print_fp16_agreement(r)
    if r.get("targets"):
        print("\ntargets (issue 19: H100/H200, ViT-B-16, fp16, P=1):")
        for key, t in r["targets"].items():
            print("  " + target_line(key, t))


def print_report(r: dict[str, Any]) -> None:
    if r["settings"].get("device") == "cuda":
        print_cuda_report(r)
        return
    s, m = r["settings"], r["machine"]
    before, after = m["loadavg_1min_before_after"]
    print(f"\nmachine: {m['cpu']}, {m['nproc']} cores, {m['memory_gb']} GB, {m['platform']}")
    print(f"load average (1 min) before/after: {before:.2f}/{after:.2f}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    print(
        f"model: {s['model_name']} at {_size_label(s['image_size'])}px, layers {s['layers']}, "
        f"B={s['batch']}, P={s['prompts']}, {s['device']}, onnxruntime options: {s['ort_options']}, "
        f"median of {s['repeats']} after {s.get('warmups', 1)} warm-up\n"
    )
    cols = ["median s", "images/s", "vs plain", "B=1 p50 ms", "p95 ms", "peak RSS MB", "steal %"]
    head = f"{'method':<34} " + " ".join(f"{c:>11}" for c in cols)
    print(head + "\n" + "-" * len(head))
    nan = float("nan")
    for name, row in r["rows"].items():
        lat = row["latency_b1_ms"] or {"p50": nan, "p95": nan}
        ratio = r.get("ratio_vs_plain", {}).get(name, nan)
        values = [f"{row['median_s']:.3f}", f"{row['images_per_s']:.2f}", f"{ratio:.2f}x"]
        values += [f"{lat['p50']:.1f}", f"{lat['p95']:.1f}", f"{row['rss_mb']['peak_workload']:.0f}"]
        steal = row.get("steal_fraction")
        values.append("?" if steal is None else f"{100 * steal:.1f}")
        print(f"{name:<34} " + " ".join(f"{v:>11}" for v in values))
    stolen = {
        n: row["steal_fraction"]
        for n, row in r["rows"].items()
        if (row.get("steal_fraction") or 0) > STEAL_WARNING
    }
    if stolen:
        print(
            "WARNING: the hypervisor took CPU time from this machine during "
            + ", ".join(f"{n} ({100 * f:.0f}%)" for n, f in stolen.items())
            + ": those times, and ratios with them, are not comparable; run again when it is quiet"
        )
    for name, why in r.get("skipped", {}).items():
        print(f"{name:<34} skipped: {why}")
    for key in ("authors", "released"):
        if f"{key}_over_legrad_onnx" in r:
            print(f"{METHODS[key]} / LeGrad ONNX: {r[f'{key}_over_legrad_onnx']:.2f}x")
    sw = r.get("sweep")
    if sw:
        print(f"\nsweep (median s, plain forward {sw['plain_s']:.3f}s):")
        print("  " + ", ".join(f"{k} {v:.3f}" for k, v in sw["median_s"].items() if k != "plain"))
        for what, key in (("prompt", "prompt"), (f"layer (P={s['prompts']})", "layer")):
            if f"marginal_{key}_s" in sw:
                share = 100 * sw[f"marginal_{key}_vs_plain"]
                print(f"  one more {what}: {sw[f'marginal_{key}_s']:.4f}s = {share:.1f}% of a plain forward")
    if "int8_agreement" in r:
        a = r["int8_agreement"]
        for key in ("heatmaps", "layer_maps"):
            x = a[key]
            print(
                f"int8 vs fp32 {key}: Pearson min {x['pearson_min']:.4f} mean {x['pearson_mean']:.4f}, "
                f"max abs diff {x['max_abs_diff']:.3g} ({x['maps']} maps)"
            )
        print(f"int8 vs fp32 image embeddings: min cosine {a['image_embeds_min_cosine']:.5f}")
    print_fp16_agreement(r)
    if "sanity_max_abs_diff" in r:
        print(
            "sanity, max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in r["sanity_max_abs_diff"].items())
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="legrad-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        report = run(args, work)
    report["wall_s"] = time.perf_counter() - start
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
