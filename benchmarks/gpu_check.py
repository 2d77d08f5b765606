"""Helpers of benchmarks/gpu_check.sh and of bench.py's `--device cuda`: the GPU environment, device
memory from nvidia-smi, and the summary of a GPU check's JSON files.

    python benchmarks/gpu_check.py env --json OUT/env.json [--flags WORK/env.sh]
    python benchmarks/gpu_check.py report OUTDIR [MORE_DIRS_OR_JSON ...] [--stages FILE] [--md OUT.md]
    python benchmarks/gpu_check.py merge OUTDIR/bench-224.json WORK/torch-224.json

`env` prints the device, driver, CUDA, torch and onnxruntime versions (and whether onnxruntime's CUDA
provider really starts a session), lists the modules the export and the tests need that are missing,
writes all of it as JSON, and with `--flags` a file of shell assignments (HAS_CUDA=0|1,
HAS_ORT_CUDA=0|1, DEPS_OK=0|1) for the script to source. `report` turns the bench JSON files
(bench.py --device cuda --json) into one Markdown summary with the issue's targets; `merge` adds the
rows of other reports of the same settings to one (bench.py's --add-rows, after the fact).

Nothing here imports torch or onnxruntime at module level: bench.py's workers import it to read
nvidia-smi, and the ONNX rows' processes must stay free of torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# the targets (issue 19): H100/H200, ViT-B-16, fp16, P=1
TARGET_LEGRAD_OVER_PLAIN = 0.70  # LeGrad's throughput at least 70% of the plain forward's
TARGET_IMAGES_PER_S = {224: 1500.0, 448: 400.0}
PAPER_FRAMES_PER_S = 96.0  # the authors' code, as the paper reports it

# (import name, what needs it): the export side and the tests, on the GPU machine
REQUIRED_MODULES = (
    ("numpy", "runtime"),
    ("PIL", "runtime"),
    ("tokenizers", "runtime"),
    ("ftfy", "runtime (open_clip's tokenizer)"),
    ("tqdm", "runtime"),
    ("onnxruntime", "runtime"),
    ("torch", "export"),
    ("open_clip", "export"),
    ("timm", "export"),
    ("onnx", "export"),
    ("onnxscript", "export"),
    ("pytest", "tests"),
)
OPTIONAL_MODULES = ("transformers", "rich", "hypothesis", "cv2", "xdist", "torchvision", "safetensors")
PROJECT_MODULES = ("legrad_export", "legrad_runtime")


def nvidia_smi(fields: list[str], index: int = 0, timeout: float = 20.0) -> dict[str, str] | None:
    """`nvidia-smi --query-gpu=FIELDS` of GPU `index` as {field: value}; None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode or not proc.stdout.strip():
        return None
    values = [v.strip() for v in proc.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values)) if len(values) == len(fields) else None


def gpu_memory_used_mb(index: int = 0) -> float | None:
    """Device memory in use on GPU `index`, all processes together (MiB), or None."""
    out = nvidia_smi(["memory.used"], index)
    try:
        return float(out["memory.used"]) if out else None
    except ValueError:
        return None


def gpu_info() -> dict[str, Any]:
    """Device name, driver, CUDA and memory as nvidia-smi and torch see them (no torch import if absent)."""
    info: dict[str, Any] = {"nvidia_smi": shutil.which("nvidia-smi")}
    smi = nvidia_smi(["name", "driver_version", "memory.total", "memory.used"])
    if smi:
        info |= {
            "name": smi["name"],
            "driver": smi["driver_version"],
            "memory_total_mb": _number(smi["memory.total"]),
            "memory_used_mb": _number(smi["memory.used"]),
        }
    try:
        import torch
    except ImportError as exc:
        info["torch_error"] = str(exc)
        return info
    info |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": False}
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {
                "cuda_available": True,
                "torch_device_name": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "multiprocessors": props.multi_processor_count,
                "torch_memory_total_mb": props.total_memory / 2**20,
            }
    except Exception as exc:  # a broken driver must not stop the report
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def ort_info() -> dict[str, Any]:
    """onnxruntime's version and providers, and whether a CUDA session really starts (a one-node graph:
    the provider is listed even when its CUDA / cuDNN libraries cannot be loaded)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"error": str(exc), "cuda_session": False}
    info: dict[str, Any] = {
        "version": ort.__version__,
        "file": ort.__file__,
        "providers": ort.get_available_providers(),
        "cuda_session": False,
    }
    if "CUDAExecutionProvider" not in info["providers"]:
        info["cuda_session_error"] = "no CUDAExecutionProvider in this onnxruntime (the CPU build?)"
        return info
    try:
        preload_ort_dlls(ort)
        session = ort.InferenceSession(_identity_model(), providers=cuda_providers())
        info["cuda_session"] = session.get_providers()[0] == "CUDAExecutionProvider"
        if not info["cuda_session"]:
            info["cuda_session_error"] = f"the session fell back to {session.get_providers()}"
    except Exception as exc:
        info["cuda_session_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return info


def cuda_providers(device_id: int = 0) -> list[Any]:
    """The providers of every CUDA session here: CUDA first, CPU for what CUDA lacks."""
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def preload_ort_dlls(ort: Any) -> None:
    """onnxruntime-gpu ≥ 1.21 finds the CUDA / cuDNN of the nvidia-* pip packages (torch's) only after
    `preload_dlls()` (or `import torch`); a process that imports no torch calls it before a session."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()


def _identity_model() -> bytes:
    """A serialised one-node ONNX graph (y = x + x)."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        raise RuntimeError("onnx is missing: cannot build the probe graph") from None
    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def module_versions(names: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """{import name: version} (version 'present' when it has none, None when it fails to import)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # ImportError, or a package broken on this machine
            out[name] = None
            continue
        out[name] = str(getattr(module, "__version__", None) or "present")
    return out


def environment() -> dict[str, Any]:
    """Everything a GPU figure must be written with, and what this machine lacks for the check."""
    ort = ort_info()  # before torch: it must start CUDA the way a torch-free worker does
    required = module_versions([m for m, _ in REQUIRED_MODULES])
    optional = module_versions(list(OPTIONAL_MODULES))
    project = module_versions(list(PROJECT_MODULES))
    missing = [f"{m} ({why})" for m, why in REQUIRED_MODULES if required[m] is None]
    missing += [
        f"{m} (this project: install it, or put the symlink site on PYTHONPATH)"
        for m in PROJECT_MODULES
        if project[m] is None
    ]
    gpu = gpu_info()
    timm_version = required.get("timm")
    notes = []
    if timm_version and timm_version != "present" and _version_tuple(timm_version) < (1, 0, 17):
        notes.append(f"timm {timm_version} is older than open_clip 3.3's timm>=1.0.17: carry a timm wheel")
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _memory_gb(),
        "gpu": gpu,
        "onnxruntime": ort,
        "modules": required | optional,
        "project": project,
        "missing": missing,
        "notes": notes,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "has_cuda": bool(gpu.get("cuda_available")),
        "has_ort_cuda": bool(ort.get("cuda_session")),
        "deps_ok": not missing,
    }


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = piece[: len(piece) - len(piece.lstrip("0123456789"))]  # leading digits: 17rc1 → 17
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def describe(env: dict[str, Any]) -> list[str]:
    """The environment in a few lines, for the log."""
    g, o = env.get("gpu") or {}, env.get("onnxruntime") or {}
    lines = [
        f"python {env.get('python', '?')} ({env.get('executable', '?')}), {env.get('nproc', '?')} cores, "
        f"{env.get('memory_gb', '?')} GB"
    ]
    if g.get("name") or g.get("torch_device_name"):
        lines.append(
            f"GPU: {g.get('torch_device_name') or g.get('name')}, driver {g.get('driver', '?')}, "
            f"{g.get('memory_total_mb', '?')} MiB, compute capability {g.get('capability', '?')}"
        )
    else:
        lines.append(
            "GPU: none seen ("
            + ("no nvidia-smi" if not g.get("nvidia_smi") else "nvidia-smi answered nothing")
            + ")"
        )
    lines.append(
        f"torch {g.get('torch', 'missing')} (CUDA {g.get('torch_cuda')}), "
        f"cuda available: {g.get('cuda_available', False)}"
        + (f" ({g['cuda_error']})" if g.get("cuda_error") else "")
    )
    if "version" in o:
        lines.append(
            f"onnxruntime {o['version']}, providers {', '.join(o['providers'])}; CUDA session starts: "
            f"{o['cuda_session']}" + (f" ({o['cuda_session_error']})" if o.get("cuda_session_error") else "")
        )
    else:
        lines.append(f"onnxruntime: missing ({o.get('error')})")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("modules") or {}).items() if v is not None)
    lines.append(f"modules: {versions}")
    if env.get("missing"):
        lines.append("MISSING: " + "; ".join(env["missing"]))
    lines += [f"note: {n}" for n in env.get("notes", [])]
    return lines


# --- the summary of a GPU check's bench JSON files ---------------------------------------------


def load_reports(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{file name: bench report} of every bench*.json and torch*.json (the torch rows of a run without
    onnxruntime-gpu) in the given folders, or of the given files."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        files = sorted([*path.glob("bench*.json"), *path.glob("torch*.json")]) if path.is_dir() else [path]
        for f in files:
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                out[f.name] = {"load_error": str(exc)}
                continue
            if isinstance(data, dict):
                out[f.name] = data
    return out


def report_markdown(reports: dict[str, dict[str, Any]], env: dict[str, Any] | None, stages: str = "") -> str:
    lines = ["# GPU check", ""]
    if env:
        lines += [f"- {line}" for line in describe(env)] + [""]
    if stages.strip():
        lines += ["## Stages", "", "```", stages.strip(), "```", ""]
    for name, r in reports.items():
        lines += [f"## {name}", ""]
        if "load_error" in r:
            lines += [f"could not read it: {r['load_error']}", ""]
            continue
        rows = r.get("rows") or r.get("partial_rows") or {}
        s = r.get("settings", {})
        if s:
            size = s.get("image_size")
            lines.append(
                f"{s.get('model_name')} at {size}, layers {s.get('layers')}, B={s.get('batch')}, "
                f"P={s.get('prompts')}, {s.get('device')}, median of {s.get('repeats')}"
                + ("" if "rows" in r else " (partial: the run stopped early)")
            )
            lines.append("")
        same = r.get("ratio_vs_plain_same_dtype") or r.get("ratio_vs_plain") or {}
        lines += [
            "| method | median s | images/s | vs plain (same dtype) | B=1 p50 ms | B=1 p95 ms | GPU MB "
            "| how |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for method, row in rows.items():
            lat = row.get("latency_b1_ms") or {}
            mem, how = gpu_memory_cell(row)
            ratio = same.get(method)
            lines.append(
                f"| {method} | {row['median_s']:.4f} | {row['images_per_s']:.1f} | "
                + (f"{ratio:.2f}x" if ratio else "–")
                + f" | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {mem} | {how} |"
            )
        for method, why in (r.get("skipped") or {}).items():
            lines.append(f"| {method} | skipped: {why} | | | | | | |")
        for method, why in (r.get("errors") or {}).items():
            lines.append(
                f"| {method} | FAILED: {why.strip().splitlines()[-1] if why.strip() else '?'} | | | | | | |"
            )
        lines.append("")
        for key, t in (r.get("targets") or {}).items():
            lines.append(f"- {target_line(key, t)}")
        if r.get("targets"):
            lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def gpu_memory_cell(row: dict[str, Any]) -> tuple[str, str]:
    """(MiB, how it was read) of a row: torch's allocator peak, else nvidia-smi's delta, else '–'."""
    mem = row.get("gpu_memory_mb") or {}
    if mem.get("max_allocated") is not None:
        return f"{mem['max_allocated']:.0f}", "torch max_memory_allocated"
    if mem.get("smi_delta") is not None:
        return f"{mem['smi_delta']:.0f}", "nvidia-smi memory.used delta"
    return "–", "not read" if mem else ""


def target_line(key: str, t: dict[str, Any]) -> str:
    met = t.get("met")
    verdict = "n/a" if met is None else ("met" if met else "NOT met")
    what = t.get("what", key)
    value = t.get("value")
    text = f"{what}: {value:.3g}" if isinstance(value, (int, float)) else f"{what}: –"
    if t.get("target") is not None:
        text += f" (target {t['target']:g}): {verdict}"
    if t.get("paper") is not None:
        text += f" (the paper's code: about {t['paper']:g})"
    if t.get("note"):
        text += f"; {t['note']}"
    for label, ratio in (t.get("variants") or {}).items():  # bench.py --extra-legrad rows
        text += f"; the '{label}' export: {ratio:.3g}"
        if t.get("target") is not None:
            text += " (met)" if ratio >= t["target"] else " (NOT met)"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="print and write the GPU environment")
    e.add_argument("--json", type=Path, required=True)
    e.add_argument("--flags", type=Path, default=None, help="also write HAS_CUDA=.. lines for a shell")
    m = sub.add_parser("merge", help="add the rows of other bench JSON files to a bench JSON file")
    m.add_argument("report", type=Path, help="a bench.py --json report, rewritten with the rows added")
    m.add_argument("others", type=Path, nargs="+", help="reports of the same settings (the torch rows)")
    r = sub.add_parser("report", help="summarise bench JSON files as Markdown")
    r.add_argument("paths", type=Path, nargs="+", help="folders with bench*.json (and env.json), or files")
    r.add_argument("--stages", type=Path, default=None, help="a text file of stage results to include")
    r.add_argument("--md", type=Path, default=None, help="write the summary here (default: print only)")
    args = p.parse_args(argv)
    if args.cmd == "env":
        env = environment()
        for line in describe(env):
            print(line)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(env, indent=2), encoding="utf-8")
        if args.flags:
            args.flags.parent.mkdir(parents=True, exist_ok=True)
            args.flags.write_text(
                f"HAS_CUDA={int(env['has_cuda'])}\nHAS_ORT_CUDA={int(env['has_ort_cuda'])}\n"
                f"DEPS_OK={int(env['deps_ok'])}\n",
                encoding="utf-8",
            )
        return 0
    if args.cmd == "merge":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench import merge_into

        merged = merge_into(args.report, args.others)
        print(f"{args.report}: {len(merged['rows'])} rows, added from {', '.join(map(str, args.others))}")
        return 0
    env = None
    for path in args.paths:
        candidate = path / "env.json" if path.is_dir() else None
        if candidate and candidate.is_file():
            with contextlib.suppress(OSError, ValueError):
                env = json.loads(candidate.read_text(encoding="utf-8"))
    stages = args.stages.read_text(encoding="utf-8") if args.stages and args.stages.is_file() else ""
    text = report_markdown(load_reports(args.paths), env, stages)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
