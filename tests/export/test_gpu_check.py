"""The GPU check (benchmarks/gpu_check.sh) and bench.py's `--device cuda`, on a machine without a GPU.

The script must skip every GPU stage with one line and exit 0 after writing the environment; its dry
run must print commands that bench.py's and legrad-export's own parsers accept. The Python helpers
(nvidia-smi, the summary, the targets, merging rows, the worker's CUDA paths on the CPU) are unit
tested. What needs a GPU is run by the script itself on the GPU machine (benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import gpu_check  # noqa: E402
import worker  # noqa: E402

needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="bash"
)


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def run_script(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    (tmp_path / "wheels").mkdir(exist_ok=True)  # no wheels: nothing is pip-installed
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_CHECK_WORK=str(tmp_path / "work"),
        GPU_CHECK_WHEELS=str(tmp_path / "wheels"),
        GPU_CHECK_SITE=str(tmp_path / "site"),
        GPU_CARRY=str(tmp_path / "no-carry"),  # not this checkout's onnxruntime-gpu parts, if any
        **settings,
    )
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )


def test_the_script_is_valid_bash():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@needs_bash
def test_without_cuda_the_script_skips_the_gpu_stages_and_writes_the_environment(tmp_path):
    if _torch_has_cuda():
        pytest.skip("this machine has CUDA: the script would run the whole check")
    out = tmp_path / "out"
    proc = run_script(tmp_path, "out")  # relative to the caller's folder, tmp_path
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA: skipping the GPU stages" in proc.stdout
    assert "would run" not in proc.stdout and "export" not in (tmp_path / "work" / "stages.txt").read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["has_cuda"] is False and env["python"] and env["onnxruntime"]["version"]
    assert "torch" in env["gpu"] and env["modules"]["numpy"]
    assert "no CUDA: skipping the GPU stages" in (out / "summary.md").read_text()
    assert "no CUDA: skipping the GPU stages" in (out / "gpu_check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "gpu_check.log", "summary.md"]
    assert not list((tmp_path / "work").glob("*.complete"))  # nothing was exported


@needs_bash
def test_the_dry_run_prints_commands_the_tools_accept(tmp_path):
    out = tmp_path / "out"
    proc = run_script(tmp_path, "--dry-run", "--budget", "400", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "env.json").is_file() and (out / "summary.md").is_file()
    commands = [
        shlex.split(line.split("): ", 1)[1])
        for line in proc.stdout.splitlines()
        if "dry run: would run" in line
    ]
    benches = [c[c.index("benchmarks/bench.py") + 1 :] for c in commands if "benchmarks/bench.py" in c]
    exports = [c[c.index("legrad_export.cli") + 1 :] for c in commands if "legrad_export.cli" in c]
    tests = [c for c in commands if "pytest" in c]
    assert len(benches) == 6 and len(exports) in (2, 4, 6) and len(tests) == 1, proc.stdout
    for argv in benches:
        args = bench.parse_args(argv)
        assert args.device == "cuda" and args.model_folder is not None and args.json is not None
    torch_rows = [bench.parse_args(a) for a in benches if "reference" in " ".join(a)]
    assert [a.compile_dtype for a in torch_rows] == [["fp16"], ["fp16"]]
    assert ["compile" in a.methods for a in torch_rows] == [True, False]  # compile at 224 only
    onnx_p1 = [bench.parse_args(a) for a in benches if "runtime" in " ".join(a)]
    assert [a.batch for a in onnx_p1] == [256, 64] and all(a.add_rows for a in onnx_p1)
    if len(exports) >= 4:  # legrad-export has --dtype: fp16 exports, and fp16 rows from them
        assert sum("fp16" in a for a in exports) == len(exports) - 2
        for args in onnx_p1:
            assert args.dtype == ["fp32", "fp16"] and args.fp16_folder.name.endswith("__fp16")
            assert args.fp16_folder.name.startswith(args.model_folder.name)
    batched = [a for a in exports if "--prompts" in a]
    if len(exports) == 6:  # and --prompts: an fp16 export with its prompts batched, timed beside the default
        assert [a[a.index("--prompts") + 1] for a in batched] == ["batch", "batch"]
        onnx_rows = [bench.parse_args(a) for a in benches if "reference" not in " ".join(a)]
        for args in onnx_rows:
            ((label, folder),) = args.extra_legrad
            folder = Path(folder)
            assert label == "batch" and folder.name == args.fp16_folder.name and folder != args.fp16_folder
    assert {bench.parse_args(a).prompts for a in benches} == {1, 4}
    from legrad_export.cli import build_parser

    for argv in exports:
        args = build_parser().parse_args(argv)
        assert args.model == "ViT-B-16" and args.pretrained == "none" and args.no_verify
    assert {build_parser().parse_args(a).image_size for a in exports} == {"224", "448"}
    pytest_args = tests[0][tests[0].index("pytest") + 1 :]
    assert pytest_args[pytest_args.index("-m") + 1] == "gpu"
    assert any(a.startswith("LEGRAD_TEST_MODEL_DIR=") for a in tests[0])


@needs_bash
def test_a_first_run_without_onnxruntime_gpu_keeps_what_it_has_and_skips_the_rest_with_a_line(tmp_path):
    """The GPU path with a pretended CUDA: the torch rows measured before are kept (and returned), a
    size without an export is skipped, a stage past the budget is skipped, the onnxruntime stages
    are skipped because this onnxruntime has no CUDA provider."""
    if _ort_has_cuda():
        pytest.skip("this onnxruntime has the CUDA provider")
    work = tmp_path / "work"
    (work / "fp32").mkdir(parents=True)
    (work / "torch-224.json").write_text(json.dumps({"rows": {}}))
    (work / "fp32" / "ViT-B-16__none__448").mkdir()  # an export and its marker, no bench JSON yet
    (work / "fp32" / "ViT-B-16-448.done").write_text(str(work / "fp32" / "ViT-B-16__none__448") + "\n")
    out = tmp_path / "out"
    proc = run_script(
        tmp_path, "--budget", "0", str(out), GPU_CHECK_PRETEND_CUDA="1", GPU_CHECK_STAGES="test torch onnx"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = (work / "stages.txt").read_text()
    assert "no CUDA" not in stages
    assert "test: skipped, no onnxruntime CUDA provider" in stages
    assert "torch 224" not in stages and "torch-224.json already measured, kept" in proc.stdout
    assert "torch 448: skipped, out of the 0s budget" in stages
    assert "onnx: skipped, no onnxruntime CUDA provider" in stages
    assert sorted(p.name for p in out.iterdir()) == [
        "env.json",
        "gpu_check.log",
        "summary.md",
        "torch-224.json",
    ]
    assert "torch 448: skipped, out of the 0s budget" in (out / "summary.md").read_text()


@needs_bash
def test_bad_arguments_are_refused(tmp_path):
    assert run_script(tmp_path).returncode == 2
    assert run_script(tmp_path, "--budget", "soon", str(tmp_path / "o")).returncode == 2
    assert run_script(tmp_path, "--frobnicate", str(tmp_path / "o")).returncode == 2
    usage = run_script(tmp_path, "--help")
    assert usage.returncode == 0 and usage.stdout.startswith("The GPU check") and "OUTDIR" in usage.stdout


# ------------------------------------------------------------------------------ gpu_check.py


def fake_nvidia_smi(folder: Path, line: str, code: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho '{line}'\nexit {code}\n")
    exe.chmod(0o755)


def test_nvidia_smi_is_read_per_field_and_missing_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    fake_nvidia_smi(tmp_path / "bin", "NVIDIA H200, 580.159.03, 143771, 512")
    got = gpu_check.nvidia_smi(["name", "driver_version", "memory.total", "memory.used"])
    assert got == {
        "name": "NVIDIA H200",
        "driver_version": "580.159.03",
        "memory.total": "143771",
        "memory.used": "512",
    }
    fake_nvidia_smi(tmp_path / "bin", "1234")
    assert gpu_check.gpu_memory_used_mb() == 1234.0
    fake_nvidia_smi(tmp_path / "bin", "[N/A]")
    assert gpu_check.gpu_memory_used_mb() is None
    fake_nvidia_smi(tmp_path / "bin", "oops", code=9)
    assert gpu_check.nvidia_smi(["memory.used"]) is None
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert gpu_check.nvidia_smi(["memory.used"]) is None and gpu_check.gpu_memory_used_mb() is None


def test_versions_compare_numerically():
    assert gpu_check._version_tuple("1.0.9") < gpu_check._version_tuple("1.0.17")
    assert gpu_check._version_tuple("2.11.0+cu130") == (2, 11, 0)
    assert gpu_check._version_tuple("1.0.17.dev0") == (1, 0, 17)


def test_the_onnxruntime_probe_says_why_cuda_does_not_start():
    info = gpu_check.ort_info()
    assert info["version"] and isinstance(info["providers"], list)
    if not _ort_has_cuda():
        assert info["cuda_session"] is False and "CUDAExecutionProvider" in info["cuda_session_error"]


def cuda_report(**rows) -> dict:
    """A bench.py --device cuda report with the given rows {name: (median_s, batch)}."""
    built = {}
    for name, (median, batch) in rows.items():
        dtype = "fp16" if name.endswith("fp16") else "fp32"
        built[name] = {
            "median_s": median,
            "images_per_s": batch / median,
            "latency_b1_ms": {"p50": 1.5, "p95": 2.5},
            "rss_mb": {"peak_workload": 900.0},
            "gpu_memory_mb": {"max_allocated": None, "smi_delta": 1500.0},
            "dtype": dtype,
        }
    return {
        "rows": built,
        "skipped": {},
        "errors": {},
        "settings": {
            "model_name": "ViT-B-16",
            "image_size": [224, 224],
            "layers": [10, 11],
            "batch": 256,
            "prompts": 1,
            "device": "cuda",
            "repeats": 5,
            "warmups": 2,
        },
        "machine": {"cpu": "x", "nproc": 16},
        "versions": {"torch": "2.11.0"},
        "gpu": {"torch_device_name": "NVIDIA H200", "driver": "580.159.03", "memory_total_mb": 143771},
    }


M = bench.METHODS


def test_the_targets_compare_fp16_legrad_with_its_plain_forward_and_the_issues_rates():
    r = cuda_report(
        **{
            M["plain"] + " fp16": (0.100, 256),  # 2560 images/s
            M["legrad"] + " fp16": (0.125, 256),  # 2048 images/s: 80% of plain
            M["authors"]: (0.5, 32),  # 64 images/s
        }
    )
    t = bench.cuda_targets(r)
    assert t["legrad_over_plain_fp16"]["value"] == pytest.approx(0.8) and t["legrad_over_plain_fp16"]["met"]
    assert t["legrad_fp16_images_per_s"]["target"] == 1500 and t["legrad_fp16_images_per_s"]["met"]
    assert (
        t["authors_images_per_s"]["value"] == pytest.approx(64) and t["authors_images_per_s"]["paper"] == 96
    )
    r["settings"] |= {"image_size": [448, 448], "prompts": 4}
    r["rows"][M["legrad"] + " fp16"]["images_per_s"] = 300.0
    t = bench.cuda_targets(r)
    assert t["legrad_fp16_images_per_s"]["target"] == 400 and t["legrad_fp16_images_per_s"]["met"] is False
    assert "P=1" in t["legrad_over_plain_fp16"]["note"]
    assert "NOT met" in gpu_check.target_line("x", t["legrad_fp16_images_per_s"])
    r = cuda_report(**{M["plain"] + " fp16": (0.100, 256), M["legrad"] + " fp16 (batch)": (0.125, 256)})
    r["rows"][M["legrad"] + " fp16 (batch)"] |= {"dtype": "fp16", "variant": "batch"}
    t = bench.cuda_targets(r)["legrad_over_plain_fp16"]  # an --extra-legrad row: reported beside
    assert t["value"] is None and t["variants"] == {"batch": pytest.approx(0.8)}
    assert "the 'batch' export: 0.8 (met)" in gpu_check.target_line("x", t)
    t = bench.cuda_targets(cuda_report(**{M["legrad"]: (1.0, 256)}))  # no fp16 rows
    assert t["legrad_over_plain_fp16"]["met"] is None and t["legrad_fp16_images_per_s"]["met"] is None
    assert "n/a" in gpu_check.target_line("x", t["legrad_fp16_images_per_s"])


def test_ratios_use_the_same_dtypes_plain_forward_and_images_per_second_for_fewer_images():
    rows = cuda_report(
        **{
            M["plain"]: (0.2, 256),
            M["plain"] + " fp16": (0.1, 256),
            M["legrad"] + " fp16": (0.15, 256),
            M["reference"]: (0.4, 256),
            M["authors"]: (1.0, 32),
        }
    )["rows"]
    rows[M["authors"]]["images"] = 32
    ratios = bench.ratios_same_dtype(rows)
    assert ratios[M["legrad"] + " fp16"] == pytest.approx(1.5)
    assert ratios[M["reference"]] == pytest.approx(2.0)
    assert ratios[M["authors"]] == pytest.approx((256 / 0.2) / 32)  # images/s: 1280 vs 32
    assert bench.time_ratio(rows[M["reference"]], rows[M["plain"]]) == pytest.approx(2.0)


def test_added_rows_join_the_table_unless_measured_here_or_measured_otherwise(tmp_path):
    earlier = cuda_report(**{M["reference"]: (0.4, 256), M["plain"]: (9.9, 256)})
    earlier["skipped"] = {M["authors"]: "why"}
    path = tmp_path / "torch.json"
    path.write_text(json.dumps(earlier))
    rows = cuda_report(**{M["plain"]: (0.2, 256)})["rows"]
    key = {
        k: earlier["settings"][k]
        for k in ("model_name", "image_size", "layers", "batch", "prompts", "device")
    }
    skipped, errors = {}, {}
    assert bench.add_rows([path], rows, skipped, errors, key) == [str(path)]
    assert rows[M["plain"]]["median_s"] == 0.2  # measured here: kept
    assert rows[M["reference"]]["added_from"] == str(path) and skipped == {M["authors"]: "why"}
    with pytest.raises(SystemExit, match="batch"):
        bench.add_rows([path], {}, {}, {}, key | {"batch": 64})
    with pytest.raises(SystemExit, match="image_size"):
        bench.add_rows([path], {}, {}, {}, key | {"image_size": [448, 448]})
    path.write_text(json.dumps({"partial_rows": earlier["rows"]}))  # a run cut short: taken as it is
    rows = {}
    bench.add_rows([path], rows, {}, {}, key)
    assert set(rows) == {M["reference"], M["plain"]}


def test_torch_rows_measured_after_the_table_are_merged_into_it(tmp_path):
    table = cuda_report(**{M["plain"] + " fp16": (0.1, 256), M["legrad"] + " fp16": (0.125, 256)})
    table["targets"] = bench.cuda_targets(table)
    torch_rows = cuda_report(**{M["authors"]: (0.5, 32), M["plain"] + " fp16": (9.0, 256)})
    (tmp_path / "bench-224.json").write_text(json.dumps(table))
    (tmp_path / "torch-224.json").write_text(json.dumps(torch_rows))
    assert gpu_check.main(["merge", str(tmp_path / "bench-224.json"), str(tmp_path / "torch-224.json")]) == 0
    merged = json.loads((tmp_path / "bench-224.json").read_text())
    assert list(merged["rows"]) == [M["plain"] + " fp16", M["legrad"] + " fp16", M["authors"]]
    assert merged["rows"][M["plain"] + " fp16"]["median_s"] == 0.1  # the table's own row stays
    assert merged["targets"]["authors_images_per_s"]["value"] == pytest.approx(64)
    assert merged["ratio_vs_plain_same_dtype"][M["legrad"] + " fp16"] == pytest.approx(1.25)
    assert merged["rows_added_from"] == [str(tmp_path / "torch-224.json")]


def test_the_cuda_table_and_the_summary_show_rows_memory_and_targets(tmp_path, capsys):
    r = cuda_report(
        **{M["plain"] + " fp16": (0.1, 256), M["legrad"] + " fp16": (0.12, 256), M["reference"]: (0.4, 256)}
    )
    r["rows"][M["reference"]]["gpu_memory_mb"] = {"max_allocated": 2048.0, "smi_delta": 3000.0}
    r["skipped"] = {M["runtime"] + " fp16": "no fp16 export"}
    r["errors"] = {M["compile"]: "Traceback\nRuntimeError: boom"}
    r["ratio_vs_plain_same_dtype"] = bench.ratios_same_dtype(r["rows"])
    r["targets"] = bench.cuda_targets(r)
    bench.print_report(r)
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "driver 580.159.03" in out
    assert "~1500" in out and "2048" in out  # nvidia-smi's delta marked, torch's allocator peak plain
    assert "1.20x" in out and "RuntimeError: boom" in out and "no fp16 export" in out
    assert "targets (issue 19" in out and "met" in out
    (tmp_path / "bench-224.json").write_text(json.dumps(r))
    (tmp_path / "torch-448.json").write_text(
        json.dumps({"partial_rows": {M["reference"]: r["rows"][M["reference"]]}})
    )
    (tmp_path / "env.json").write_text(json.dumps({"python": "3.12"}))
    md = gpu_check.report_markdown(gpu_check.load_reports([tmp_path]), None, "torch 224: ok (3s)")
    assert "## bench-224.json" in md and "## torch-448.json" in md and "torch 224: ok (3s)" in md
    assert "| 1500 | nvidia-smi memory.used delta |" in md and "| 2048 | torch max_memory_allocated |" in md
    assert "FAILED: RuntimeError: boom" in md and "(target 1500): met" in md
    assert gpu_check.main(["report", str(tmp_path), "--md", str(tmp_path / "s.md")]) == 0
    assert (tmp_path / "s.md").read_text().startswith("# GPU check")


def test_the_cpu_table_is_unchanged_by_the_cuda_columns(capsys):
    r = cuda_report(**{M["plain"]: (0.2, 8)})
    r["settings"] |= {"device": "cpu", "ort_options": "tuned"}
    r["machine"] |= {"memory_gb": 23.5, "platform": "Linux", "loadavg_1min_before_after": [1.0, 1.0]}
    r["ratio_vs_plain"] = {M["plain"]: 1.0}
    bench.print_report(r)
    out = capsys.readouterr().out
    assert "steal %" in out and "GPU MB" not in out and "targets" not in out


def test_bench_arguments_for_the_gpu():
    args = bench.parse_args(["--model-folder", "m", "--device", "cuda", "--dtype", "fp16"])
    assert args.dtype == ["fp32", "fp16"] and args.compile_dtype == ["fp32", "fp16"]
    args = bench.parse_args(["--model-folder", "m", "--compile-dtype", "fp16", "--authors-images", "4"])
    assert args.device == "cpu" and args.dtype == ["fp32"] and args.compile_dtype == ["fp16"]
    assert bench.parse_args(["--model", "ViT-B-16"]).add_rows == []
    args = bench.parse_args(["--model-folder", "m", "--extra-legrad", "batch=a=b", "--extra-legrad", "x=y"])
    assert args.extra_legrad == [("batch", "a=b"), ("x", "y")]
    for bad in (
        ["--model-folder", "m", "--device", "cuda", "--dtype", "int8"],
        ["--model", "ViT-B-16", "--fp16-folder", "f"],
        ["--model-folder", "m", "--dtype", "bf16"],
        ["--model-folder", "m", "--compile-dtype", "int8"],
        ["--model-folder", "m", "--authors-images", "0"],
        ["--model-folder", "m", "--device", "tpu"],
        ["--model-folder", "m", "--extra-legrad", "models/x"],
        ["--model-folder", "m", "--extra-legrad", "batch="],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_device_cuda_without_cuda_stops_with_one_line(tmp_path):
    if _ort_has_cuda():
        pytest.skip("this onnxruntime has the CUDA provider")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model-folder", str(tmp_path / "none"),
         "--device", "cuda", "--methods", "plain,legrad"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "no CUDAExecutionProvider" in proc.stderr and "--methods reference,compile,authors" in proc.stderr


def test_the_exporters_dtype_field_is_detected():
    import dataclasses

    from legrad_export.onnx_export import ExportSettings

    assert bench.export_has_dtype() == ("dtype" in {f.name for f in dataclasses.fields(ExportSettings)})


# ------------------------------------------------------------------------------ worker.py


def tiny_graph(path: Path, dtype: str = "float") -> Path:
    """pixel_values (B, 3, 4, 4) [, text_embeds (P, 2)] → image_embeds (B, 3): a mean over the pixels."""
    from onnx import TensorProto, helper, save

    elem = {"float": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    nodes = [helper.make_node("ReduceMean", ["pixel_values"], ["image_embeds"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixel_values", elem, ["B", 3, 4, 4])],
        [helper.make_tensor_value_info("image_embeds", elem, ["B", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def test_the_worker_measures_an_onnx_row_on_the_cpu_as_before(tmp_path):
    spec = {
        "method": "plain_onnx",
        "graph": str(tiny_graph(tmp_path / "g.onnx")),
        "size": 4,
        "batch": 2,
        "prompts": 1,
        "embed_dim": 2,
        "repeats": 3,
        "warmups": 2,
        "latency_runs": 2,
        "threads": 1,
    }
    got = worker.measure(spec)
    assert len(got["seconds"]) == 3 and len(got["warmup_s"]) == 2 and got["latency_b1_ms"]["p50"] > 0
    assert got["gpu_memory_mb"] is None and got["device"] == "cpu"
    assert got["images_per_s"] == pytest.approx(2 / got["median_s"])


def test_fp16_inputs_are_cast_once_and_the_cpu_call_equals_a_plain_run(tmp_path):
    import onnxruntime as ort

    spec = {"threads": 1}
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    half = worker.ort_session(spec, str(tiny_graph(tmp_path / "h.onnx", "float16")))
    feeds = worker.cast_feeds(half, {"pixel_values": x})
    assert feeds["pixel_values"].dtype == np.float16
    (y,) = worker.ort_call(half, {"pixel_values": x})()
    assert y.dtype == np.float16 and np.allclose(y, x.mean((2, 3)), atol=1e-3)
    full = ort.InferenceSession(str(tiny_graph(tmp_path / "f.onnx")), providers=["CPUExecutionProvider"])
    assert worker.cast_feeds(full, {"pixel_values": x})["pixel_values"] is x
    assert np.array_equal(
        worker.ort_call(full, {"pixel_values": x})()[0], full.run(None, {"pixel_values": x})[0]
    )
    run = worker.make_runner(dict(spec, method="plain_onnx", graph=str(tmp_path / "h.onnx")))
    assert np.allclose(run(x, None)[0], x.mean((2, 3)), atol=1e-3)


def test_the_io_binding_path_gives_the_plain_runs_outputs(tmp_path):
    """The CUDA rows' IO binding, bound to the CPU here: same API calls, same outputs, repeatable."""
    session = worker.ort_session({"threads": 1}, str(tiny_graph(tmp_path / "g.onnx")))
    x = np.random.default_rng(2).standard_normal((3, 3, 4, 4), dtype=np.float32)
    call = worker.ort_call(session, {"pixel_values": x}, "cpu", bind=True)
    for _ in range(2):
        binding, _values = call()
        (got,) = binding.copy_outputs_to_cpu()
        assert np.array_equal(got, session.run(None, {"pixel_values": x})[0])


def test_inputs_are_prepared_once_per_array():
    made = []
    run = worker.cached_by_input(lambda x, t: made.append((x, t)) or (lambda: len(made)))
    a, b, t = np.zeros(2), np.ones(2), np.zeros(1)
    assert [run(a, t), run(a, t), run(b, t), run(a, t)] == [1, 1, 2, 2]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_a_cuda_row_without_the_cuda_provider_fails_instead_of_timing_the_cpu(tmp_path):
    if _ort_has_cuda():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(RuntimeError, match="CUDA provider did not start"):
        worker.ort_session({"device": "cuda", "threads": 1}, str(tiny_graph(tmp_path / "g.onnx")))


def test_under_compile_our_module_loops_over_prompts_and_nothing_else_changes(monkeypatch):
    torch = pytest.importorskip("torch")
    import legrad_export.legrad as legrad

    monkeypatch.setattr(legrad, "torch", torch)  # restored after the test
    worker.loop_prompts_when_compiled()
    shim = legrad.torch
    assert shim is not torch and shim.compiler.is_compiling() is False
    assert shim.stack is torch.stack and shim.Tensor is torch.Tensor and shim.onnx is torch.onnx
    assert torch.compiler.is_compiling is not shim.compiler.is_compiling  # torch itself untouched
    worker.loop_prompts_when_compiled()
    assert legrad.torch is shim  # once


def test_bench_takes_an_fp16_folder_and_says_why_it_does_not_compare_its_maps(model_folder, tmp_path, capsys):
    """The fp16 rows' plumbing on the CPU (the fp32 folder stands in for an fp16 one: same graph)."""
    out = tmp_path / "r.json"
    bench.main(
        ["--model-folder", str(model_folder), "--fp16-folder", str(model_folder), "--dtype", "fp16",
         "--methods", "plain,legrad", "--batch", "1", "--prompts", "1", "--repeats", "1",
         "--latency-runs", "0", "--sweep-prompts", "", "--sweep-layers", "0", "--json", str(out)]
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert list(r["rows"]) == [M["plain"], M["plain"] + " fp16", M["legrad"], M["legrad"] + " fp16"]
    assert [row["dtype"] for row in r["rows"].values()] == ["fp32", "fp16", "fp32", "fp16"]
    assert "fp16_agreement" not in r and "other weights" in r["fp16_agreement_note"]
    assert "fp16 vs fp32 agreement: not measured" in capsys.readouterr().out
    assert "targets" not in r and r["settings"]["device"] == "cpu"


def test_bench_times_another_export_of_the_same_model_as_a_labelled_row(model_folder, tmp_path):
    out = tmp_path / "r.json"
    bench.main(
        ["--model-folder", str(model_folder), "--extra-legrad", f"batch={model_folder}",
         "--methods", "plain,legrad", "--batch", "1", "--prompts", "1", "--repeats", "1",
         "--latency-runs", "0", "--sweep-prompts", "", "--sweep-layers", "0", "--json", str(out)]
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert list(r["rows"]) == [M["plain"], M["legrad"], M["legrad"] + " (batch)"]
    row = r["rows"][M["legrad"] + " (batch)"]
    assert (row["key"], row["dtype"], row["variant"]) == ("legrad", "fp32", "batch") and row["median_s"] > 0
    assert r["ratio_vs_plain"][M["legrad"] + " (batch)"] > 0


def test_the_cuda_path_of_a_row_runs_through_io_binding_once_per_input(tmp_path, monkeypatch):
    """worker.measure with "device": "cuda", the session and the binding put on the CPU: the rows'
    CUDA plumbing (inputs bound once per array, device memory read, no torch) without a GPU."""
    graph = str(tiny_graph(tmp_path / "g.onnx"))
    cpu_session = worker.ort_session({"threads": 1}, graph)
    calls, ort_call = [], worker.ort_call

    def bound_on_cpu(session, feeds, device="cpu", bind=None):
        calls.append(device)
        return ort_call(session, feeds, "cpu", bind=True)

    monkeypatch.setattr(worker, "ort_session", lambda spec, path: cpu_session)
    monkeypatch.setattr(worker, "ort_call", bound_on_cpu)
    monkeypatch.setattr(gpu_check, "gpu_memory_used_mb", lambda index=0: 1000.0)
    spec = {"method": "plain_onnx", "graph": graph, "device": "cuda", "size": 4, "batch": 2, "prompts": 1,
            "embed_dim": 2, "repeats": 3, "warmups": 1, "latency_runs": 2}  # fmt: skip
    got = worker.measure(spec)
    assert calls == ["cuda", "cuda"]  # the workload's inputs and the B=1 inputs, each bound once
    assert got["device"] == "cuda" and got["gpu_memory_mb"]["smi_delta"] == 0.0
    assert got["gpu_memory_mb"]["max_allocated"] is None  # no torch on the GPU in an ONNX row
