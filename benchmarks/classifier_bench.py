"""LeGrad for a supervised torchvision ViT classifier, against the plain forward of the same graph and
against the PyTorch explainers people use today, on the same weights, images and machine.

    flock /tmp/legrad-heavy.lock .venv/bin/python benchmarks/classifier_bench.py --batch 8 --classes 4 \\
        --json benchmarks/results/vit_b_16_classifier_224_b8_c4.json

The model (torchvision `vit_b_16`, any torchvision ViT with `--model`) gets seeded random weights
(speed does not depend on them), with the classification head drawn N(0, 0.02²): torchvision
initialises it to zero, which would make every map constant. Those weights are exported once
(`legrad-export`'s `export_model`, `--layers`, default -2: the last two blocks) and saved for the
torch rows, so every row runs the very same weights, B seeded images (standard normal pixels) and P
distinct classes. Each method runs in a fresh process (this script with `--worker`), so its peak RSS
(VmHWM) is its own:

  plain ONNX forward        pixel_values → logits, cut out of the LeGrad graph itself: same weights, same
                            ops. Every ratio's denominator.
  LeGrad ONNX (ours)        the exported image graph (B images × P classes in one call), onnxruntime CPU
                            with the runtime's `session_options()`
  plain PyTorch forward     the untouched torchvision model under torch.no_grad(): what the PyTorch rows'
                            forward costs on this machine (torch's and onnxruntime's kernels differ)
  reference (PyTorch)       `legrad_reference_torchvision`: one forward, autograd per layer and class
  torchcam LeGrad           torchcam 0.5.0's `LeGrad` on the explained blocks: one forward with its hooks,
                            then one call per class (`retain_graph=True` but for the last), each map
                            upsampled ×patch bilinearly as our heatmaps are
  torchcam, per class       the same, with a forward per class (the pattern of torchcam's docs)
  grad-cam GradCAM          `pytorch_grad_cam.GradCAM` as its ViT tutorial sets it up (target layer: the
                            last block's `ln_1`, tokens minus the class token reshaped to the grid), one
                            call per class over the B images (`ClassifierOutputTarget`); each call is a
                            forward and a full `loss.backward()`. A different method: its maps are not
                            expected to equal LeGrad's.

torchcam and grad-cam are installed with pip `--target` into `.torchcam-site/` and `.gradcam-site/`
(git-ignored; see benchmarks/README.md, "Classifiers"); a method whose package is missing is skipped
with a note. Per row: median seconds of B images × P classes after --warmups untimed runs, images/s,
ratio to the plain forward and to our graph, peak RSS, the hypervisor's steal share. Then the maps'
agreement (max abs diff): ours against torchcam's (upsampled) and against the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TORCHCAM_SITE = ROOT / ".torchcam-site"  # torchcam==0.5.0, pip --no-deps --target (the tests install it too)
GRADCAM_SITE = ROOT / ".gradcam-site"  # grad-cam and the imports the venv lacks, pip --no-deps --target
WEIGHT_SEED = 0
METHODS = {
    "plain": "plain ONNX forward",
    "legrad": "LeGrad ONNX (ours)",
    "torch_plain": "plain PyTorch forward (no_grad)",
    "reference": "reference (PyTorch autograd, ours)",
    "torchcam": "torchcam LeGrad (1 forward, a call per class)",
    "torchcam_per_class": "torchcam LeGrad (a forward per class)",
    "gradcam": "grad-cam GradCAM (a call per class)",
}
PEERS = ("torchcam", "torchcam_per_class", "gradcam")
ARCH_KEYS = ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "num_classes")

if str(HERE) not in sys.path:  # bench.py's machine()/versions(), worker.py's RSS readers, variants.py
    sys.path.insert(0, str(HERE))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="vit_b_16", help="torchvision ViT name (torchcam's LeGrad is torchvision's)"
    )
    p.add_argument("--batch", type=int, default=8, help="images per workload (B)")
    p.add_argument("--classes", type=int, default=4, help="classes explained per image (P)")
    p.add_argument(
        "--layers", default="-2", help="explained blocks, as legrad-export --layers (-2: the last two)"
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed workload runs per method (median)")
    p.add_argument("--warmups", type=int, default=1, help="untimed workload runs before them")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument(
        "--out", type=Path, default=None, help="keep the export and the maps here (default: temp dir)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one method, a JSON spec
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")  # every ratio's denominator
    return args


# ---------------------------------------------------------------- the model and its export (main process)


def architecture(model) -> dict[str, int]:
    """The `VisionTransformer(...)` arguments that rebuild this torchvision ViT."""
    return {
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "num_layers": len(model.encoder.layers),
        "num_heads": model.encoder.layers[0].num_heads,
        "hidden_dim": model.hidden_dim,
        "mlp_dim": model.mlp_dim,
        "num_classes": model.heads.head.out_features,
    }


def build_vit(arch: dict[str, int]):
    """A torchvision VisionTransformer of this architecture (eval mode; weights loaded by the caller)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{k: arch[k] for k in ARCH_KEYS}).eval()


def randomise_head(model, seed: int = WEIGHT_SEED, std: float = 0.02):
    """torchvision zero-initialises the classification head (constant maps): draw it N(0, std²)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head = model.heads.head
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
    return model


def prepare(loaded, layers: str, work: Path) -> dict[str, Any]:
    """Export the classifier (`loaded`, a LoadedClassifier), save its weights for the torch rows and
    cut the plain forward out of the graph; returns what the workers need."""
    import onnx
    import torch

    from legrad_export.onnx_export import ExportSettings, export_model
    from legrad_runtime.metadata import IMAGE_GRAPH, read_metadata

    folder = export_model(
        loaded, work / "export", ExportSettings(layers=layers, verify=False, overwrite=True)
    )
    meta = read_metadata(folder)
    graph = folder / IMAGE_GRAPH.filename
    plain = work / "plain_forward.onnx"
    onnx.utils.extract_model(str(graph), str(plain), ["pixel_values"], ["logits"])
    weights = work / "weights.pt"
    torch.save(loaded.model.state_dict(), weights)
    return {
        "folder": str(folder),
        "graph": str(graph),
        "plain_graph": str(plain),
        "weights": str(weights),
        "arch": architecture(loaded.model),
        "layers": list(meta.layers),
        "model_name": loaded.model_name,
    }


def load_randomised(model_name: str, seed: int = WEIGHT_SEED):
    """`torchvision:NAME` with seeded random weights and a non-zero head, as a LoadedClassifier."""
    import torch

    from legrad_export.load_classifier import load_classifier

    torch.manual_seed(seed)
    loaded = load_classifier(f"torchvision:{model_name}", "none")
    randomise_head(loaded.model, seed)
    return loaded


# ---------------------------------------------------------------- the workers (one method per process)


def workload(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Seeded standard-normal pixels (B, 3, S, S) float32 and the P class ids (int64)."""
    rng = np.random.default_rng(spec.get("seed", 0))
    size = spec["arch"]["image_size"]
    pixels = rng.standard_normal((spec["batch"], 3, size, size), dtype=np.float32)
    return pixels, np.asarray(spec["class_ids"], dtype=np.int64)


def class_ids(count: int, num_classes: int, seed: int = 0) -> list[int]:
    """`count` distinct seeded classes."""
    return sorted(int(c) for c in np.random.default_rng(seed + 7).choice(num_classes, count, replace=False))


def _torch_model(spec: dict[str, Any]):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = build_vit(spec["arch"])
    model.load_state_dict(torch.load(spec["weights"], map_location="cpu", weights_only=True))
    return model.eval()


def _upsample(maps, patch: int):
    """(B, P, g, g) grid maps → (B, P, g·patch, g·patch), bilinear, half-pixel (our heatmaps' rule)."""
    import torch.nn.functional as F

    size = (maps.shape[-2] * patch, maps.shape[-1] * patch)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _with_site(site: Path, append: bool = False) -> None:
    if not site.is_dir():
        raise ModuleNotFoundError(f"{site} is missing (see benchmarks/README.md, 'Classifiers')")
    if str(site) in sys.path:
        return
    if append:  # grad-cam's folder goes last: the venv's own numpy, packaging, ... stay first
        sys.path.append(str(site))
    else:
        sys.path.insert(0, str(site))


def package_version(name: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def make_runner(spec: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """Load the method (timed by the caller) and return run(pixels, class_ids) → its outputs as numpy:
    `heatmaps` (B, P, S, S) where the method makes maps, `maps` (B, P, g, g) for the grid maps, `logits`."""
    method = spec["method"]
    if method in ("plain", "legrad"):
        from worker import ort_session

        session = ort_session(
            {"threads": spec.get("threads")}, spec["plain_graph" if method == "plain" else "graph"]
        )
        if method == "plain":
            return lambda x, c: {"logits": session.run(["logits"], {"pixel_values": x})[0]}

        def run_onnx(x: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
            heatmaps, _, logits = session.run(None, {"pixel_values": x, "class_ids": c})
            return {"heatmaps": heatmaps, "logits": logits}

        return run_onnx

    import torch

    model = _torch_model(spec)
    layers = list(spec["layers"])
    patch = spec["arch"]["patch_size"]
    if method == "torch_plain":

        def run_torch_plain(x: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                return {"logits": model(torch.from_numpy(x)).numpy()}

        return run_torch_plain
    if method == "reference":
        from legrad_export.reference_classifier import legrad_reference_torchvision

        def run_reference(x: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
            out = legrad_reference_torchvision(model, torch.from_numpy(x), torch.from_numpy(c), layers)
            return {"heatmaps": out.heatmaps.numpy(), "maps": out.maps.numpy(), "logits": out.logits.numpy()}

        return run_reference

    if method in ("torchcam", "torchcam_per_class"):
        _with_site(TORCHCAM_SITE)
        from torchcam.methods import LeGrad

        cam = LeGrad(model, [model.encoder.layers[i] for i in layers])  # hooks stay on for this process

        def run_torchcam(x: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
            pixels, maps = torch.from_numpy(x), []
            scores = model(pixels)
            for p, cls in enumerate(c.tolist()):
                if p and method == "torchcam_per_class":
                    scores = model(pixels)  # a fresh forward for each class
                keep = method == "torchcam" and p < len(c) - 1  # one forward: keep its graph to the last
                maps.append(cam(cls, scores, retain_graph=keep)[0])
            grid = torch.stack(maps, dim=1)  # (B, P, g, g)
            heatmaps = _upsample(grid, patch)
            return {"heatmaps": heatmaps.numpy(), "maps": grid.numpy(), "logits": scores.detach().numpy()}

        return run_torchcam

    if method == "gradcam":
        _with_site(GRADCAM_SITE, append=True)
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        grid = spec["arch"]["image_size"] // patch

        def reshape_transform(tensor, height=grid, width=grid):  # grad-cam's ViT tutorial
            result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
            return result.transpose(2, 3).transpose(1, 2)

        gradcam = GradCAM(
            model=model, target_layers=[model.encoder.layers[-1].ln_1], reshape_transform=reshape_transform
        )

        def run_gradcam(x: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
            pixels = torch.from_numpy(x)
            cams = [
                gradcam(input_tensor=pixels, targets=[ClassifierOutputTarget(cls)] * len(x))
                for cls in c.tolist()
            ]
            return {"heatmaps": np.stack(cams, axis=1), "logits": gradcam.outputs.detach().numpy()}

        return run_gradcam
    raise ValueError(f"unknown method {method!r}")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of the whole workload (B images × P classes), peak RSS; the last run's outputs
    go to spec['save'] (an .npz), outside the timing."""
    from worker import current_rss_mb, peak_rss_mb

    rss_start = current_rss_mb()
    start = time.perf_counter()
    run = make_runner(spec)
    load_s = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    pixels, classes = workload(spec)
    for _ in range(spec.get("warmups", 1)):
        run(pixels, classes)
    times, out = [], {}
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        out = run(pixels, classes)
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    if spec.get("save"):
        np.savez(spec["save"], **out)
    median = statistics.median(times)
    versions = {
        "torchcam": package_version("torchcam") if spec["method"].startswith("torchcam") else None,
        "grad-cam": package_version("grad-cam") if spec["method"] == "gradcam" else None,
    }
    return {
        "method": spec["method"],
        "load_s": load_s,
        "seconds": times,
        "median_s": median,
        "images_per_s": spec["batch"] / median,
        "rss_mb": {"start": rss_start, "loaded": rss_loaded, "peak_workload": peak},
        "versions": {k: v for k, v in versions.items() if v},
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method in a fresh process (this script with --worker) and return its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- agreement, report


def agreement(outputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Max abs differences (and per-map Pearson r) between the methods' outputs, where meaningful."""
    from variants import map_agreement

    out: dict[str, Any] = {}
    ours = outputs.get("legrad")
    pairs = [
        ("legrad", "torchcam", "heatmaps"),
        ("legrad", "torchcam_per_class", "heatmaps"),
        ("legrad", "reference", "heatmaps"),
        ("reference", "torchcam", "maps"),
        ("torchcam", "torchcam_per_class", "maps"),
    ]
    for a, b, key in pairs:
        if a in outputs and b in outputs:
            out[f"{a}_vs_{b}_{key}"] = map_agreement(outputs[a][key], outputs[b][key])
    if ours is not None and "gradcam" in outputs:  # a different method: how alike, not whether equal
        out["legrad_vs_gradcam_heatmaps_(different_method)"] = map_agreement(
            ours["heatmaps"], outputs["gradcam"]["heatmaps"]
        )
    logits = {k: v["logits"] for k, v in outputs.items() if "logits" in v}
    if "plain" in logits:
        out["logits_max_abs_diff_vs_plain"] = {
            k: float(np.abs(v - logits["plain"]).max()) for k, v in logits.items() if k != "plain"
        }
    if ours is not None:
        flat = ours["heatmaps"].reshape(-1, ours["heatmaps"].shape[-2] * ours["heatmaps"].shape[-1])
        out["legrad_heatmaps_min_per_map_std"] = float(flat.std(axis=1).min())  # > 0: no constant map
    return out


def table(report: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    rows = report["rows"]
    plain = rows.get("plain", {}).get("median_s")
    ours = rows.get("legrad", {}).get("median_s")
    lines = [
        "| method | median s | images/s | vs plain ONNX | vs LeGrad ONNX | peak RSS MB | steal % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, row in rows.items():
        s = row["median_s"]
        name = METHODS[key]
        if key == "legrad":
            name = f"**{name}**"
        vs_plain = f"{s / plain:.2f}×" if plain else "–"
        vs_ours = f"{s / ours:.2f}×" if ours and key not in ("plain", "legrad") else "–"
        steal = row.get("steal_fraction")
        cells = [f"{s:.3f}", f"{row['images_per_s']:.2f}", vs_plain, vs_ours]
        cells += [f"{row['rss_mb']['peak_workload']:.0f}", "?" if steal is None else f"{100 * steal:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    s, m = report["settings"], report["machine"]
    before, after = m["loadavg_1min_before_after"]
    print(
        f"\nmachine: {m['cpu']} ({m.get('cpu_family_model', '?')}), {m['nproc']} cores, "
        f"{m['memory_gb']} GB, {m['platform']}"
    )
    print(f"load average (1 min) before/after: {before:.2f}/{after:.2f}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(
        f"model: torchvision:{s['model']} at {s['image_size']}px (random weights, head N(0, 0.02²)), "
        f"layers {s['layers_resolved']}, B={s['batch']}, P={s['classes']} classes {s['class_ids']}, "
        f"median of {s['repeats']} after {s['warmups']} warm-up\n"
    )
    print(table(report))
    for key, why in report.get("skipped", {}).items():
        print(f"{METHODS[key]}: skipped ({why})")
    for key, why in report.get("errors", {}).items():
        print(f"{METHODS[key]}: FAILED ({why.strip().splitlines()[-1] if why.strip() else why})")
    stolen = {
        k: r["steal_fraction"] for k, r in report["rows"].items() if (r.get("steal_fraction") or 0) > 0.05
    }
    if stolen:
        print(
            "WARNING: the hypervisor took CPU time during "
            + ", ".join(f"{METHODS[k]} ({100 * f:.0f}%)" for k, f in stolen.items())
            + ": those rows are not comparable"
        )
    print("\nagreement:")
    for key, value in report.get("agreement", {}).items():
        if isinstance(value, dict) and "max_abs_diff" in value:
            print(
                f"  {key}: max abs diff {value['max_abs_diff']:.2e}, Pearson min {value['pearson_min']:.5f} "
                f"mean {value['pearson_mean']:.5f} ({value['maps']} maps)"
            )
        elif isinstance(value, dict):
            print(f"  {key}: " + ", ".join(f"{k} {v:.2e}" for k, v in value.items()))
        else:
            print(f"  {key}: {value:.4g}")


def cpu_details() -> dict[str, Any]:
    """/proc/cpuinfo's family and model numbers and the vector extensions (its model name can be just
    'AMD EPYC')."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {
        "cpu_family_model": f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} "
        f"model {info.get('model', '?')}",
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile"}),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench import machine, steal_fraction, steal_seconds, versions

    print(f"exporting torchvision:{args.model} (seeded random weights, layers {args.layers}) ...", flush=True)
    started = time.perf_counter()
    prepared = prepare(load_randomised(args.model), args.layers, work)
    export_s = time.perf_counter() - started
    arch = prepared["arch"]
    ids = class_ids(args.classes, arch["num_classes"])
    base = prepared | {
        "batch": args.batch,
        "class_ids": ids,
        "repeats": args.repeats,
        "warmups": args.warmups,
        "threads": args.threads,
        "seed": 0,
    }
    load_before = os.getloadavg()[0]
    rows: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for method in args.methods:
        site = {"torchcam": TORCHCAM_SITE, "torchcam_per_class": TORCHCAM_SITE, "gradcam": GRADCAM_SITE}.get(
            method
        )
        if site is not None and not site.is_dir():
            skipped[method] = f"{site.name}/ is missing; see benchmarks/README.md, 'Classifiers'"
            print(f"skipping {METHODS[method]}: {skipped[method]}")
            continue
        print(f"measuring {METHODS[method]} ...", flush=True)
        save = work / f"{method}.npz"
        try:
            steal_before, started = steal_seconds(), time.perf_counter()
            rows[method] = worker(dict(base, method=method, save=str(save)))
            rows[method]["steal_fraction"] = steal_fraction(steal_before, time.perf_counter() - started)
            with np.load(save) as data:
                outputs[method] = {k: data[k] for k in data.files}
        except RuntimeError as exc:  # one failing method must not lose the others' numbers
            print(exc)
            errors[method] = str(exc)[-1500:]
    load_after = os.getloadavg()[0]
    report: dict[str, Any] = {"rows": rows, "errors": errors, "skipped": skipped}
    plain = rows.get("plain", {}).get("median_s")
    ours = rows.get("legrad", {}).get("median_s")
    if plain:
        report["ratio_vs_plain"] = {k: r["median_s"] / plain for k, r in rows.items()}
    if ours:
        report["ratio_vs_legrad_onnx"] = {k: r["median_s"] / ours for k, r in rows.items()}
    report["agreement"] = agreement(outputs)
    report["export_s"] = export_s
    report["settings"] = {
        "model": args.model,
        "image_size": arch["image_size"],
        "batch": args.batch,
        "classes": args.classes,
        "class_ids": ids,
        "layers": args.layers,
        "layers_resolved": prepared["layers"],
        "methods": args.methods,
        "repeats": args.repeats,
        "warmups": args.warmups,
        "threads": args.threads,
        "weights": f"torch.manual_seed({WEIGHT_SEED}) torchvision init, head N(0, 0.02^2)",
        "pixels": "standard normal, numpy default_rng(0)",
        "gradcam_target_layer": f"encoder.layers[{arch['num_layers'] - 1}].ln_1",
        "onnxruntime_options": "legrad_runtime.session.session_options(threads)",
    }
    report["machine"] = machine(load_before, load_after) | cpu_details()
    peer_versions = {k: v for r in rows.values() for k, v in r.get("versions", {}).items()}
    import torchvision

    report["versions"] = versions() | {"torchvision": torchvision.__version__} | peer_versions
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="legrad-clsbench-")))
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
