"""Recipe sweeps: train several `TrainConfig`s side by side and score each on validation cases.

    python -m legrad_shapes.cases VC --seed 20002 --count 200 --objects 2,3 --size 64
    python -m legrad_shapes.sweep runs.json OUT --cases VC --device cuda --parallel 8

runs.json maps a run name to `TrainConfig` fields over the shipped recipe, or over the one of
`train.RECIPES` that its "recipe" key names, e.g. {"wd2": {"recipe": "run4", "weight_decay": 0.2}}.
Each run is the `legrad_shapes.train --recipe ...` command in its own process (log in OUT/NAME.log,
model folder in OUT/NAME), then `legrad-evaluate` for each layer set, also `--parallel` processes at
a time. The table (zero-shot accuracy, LeGrad pointing and mIoU per layer set, shared-colour
pointing, the best baseline) is printed and written to OUT/results.json.

This is for choosing a recipe on a GPU, where one run takes minutes; the shipped model is trained by
the plain command on the CPU. On one GPU, start NVIDIA's MPS daemon first (`nvidia-cuda-mps-control
-d`): the runs' small kernels then share the GPU instead of taking turns, about 2.3 times the
throughput of 8 runs here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .train import FLAGS, make_config

__all__ = ["main", "train_arguments", "run_sweep", "summarise"]

BASELINES = ("cls-attention", "rollout", "centre-prior")


def train_arguments(fields: dict) -> list[str]:
    """A runs.json entry as the training command's arguments: `--recipe NAME,FIELD=VALUE,...`, and
    the operational fields (seed, steps, ...: a layer list has commas) as their own flags. Raises
    ValueError for a run that cannot train."""
    recipe, flags = [str(fields.get("recipe", "shipped"))], {}
    for key, value in fields.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if key in {name for name, _, _ in FLAGS}:
            flags[key] = text
        elif key != "recipe":
            recipe.append(f"{key}={text}")
    make_config(",".join(recipe), **{k: fields[k] for k in flags if k != "device"})
    return ["--recipe", ",".join(recipe)] + [a for key, text in flags.items() for a in (f"--{key}", text)]


def _train_command(name: str, fields: dict, out: Path, device: str) -> list[str]:
    args = [sys.executable, "-m", "legrad_shapes.train", "--out", str(out / name)]
    args += train_arguments(fields) + ["--device", device]  # refuses a bad run before any process starts
    if device != "cpu" and "threads" not in fields:
        args += ["--threads", "1"]  # the CPU only feeds the GPU
    return args


def _evaluate(folder: Path, cases: Path, layers: str) -> dict:
    scores = folder / f"scores{layers}.json"
    command = [
        sys.executable,
        "-m",
        "legrad_export.evaluate_cli",
        str(cases),
        "--model",
        f"local-dir:{folder}",
    ]
    done = subprocess.run(
        command + ["--layers", layers, "--json", str(scores)], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"legrad-evaluate --layers {layers} on {folder}: {done.stderr.strip()}")
    return json.loads(scores.read_text())


def run_sweep(
    runs: dict[str, dict], out: Path, cases: Path, device: str, parallel: int, layer_sets: list[str]
) -> dict[str, dict]:
    """Train every run (at most `parallel` at once), then score each; returns {name: result}."""
    out.mkdir(parents=True, exist_ok=True)
    commands = {name: _train_command(name, fields, out, device) for name, fields in runs.items()}
    pending, running, failed = list(commands), {}, set()
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            with (out / f"{name}.log").open("w") as log:  # the child keeps its own handle
                running[name] = subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    failed.add(name)
                    print(f"{name}: failed, see {out / name}.log")
                else:
                    print(f"{name}: trained")
    trained = [name for name in runs if name not in failed]
    jobs = [(name, layers) for name in trained for layers in layer_sets]
    with ThreadPoolExecutor(max_workers=parallel) as pool:  # each evaluation is its own process
        scores = dict(zip(jobs, pool.map(lambda job: _evaluate(out / job[0], cases, job[1]), jobs)))
    results = {}
    for name in trained:
        summary = json.loads((out / name / "training.json").read_text())
        result = {"config": runs[name], "zero_shot": summary["val_zero_shot"]["accuracy"]}
        result["train_seconds"] = summary["train_seconds"]
        for layers in layer_sets:
            for row in scores[name, layers]["rows"]:
                result[f"{layers}|{row['group']}|{row['method']}"] = [row["pointing"], row["miou"]]
        results[name] = result
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def summarise(results: dict[str, dict], layer_sets: list[str]) -> str:
    """One line per run: zero-shot, then pointing / mIoU / shared-colour pointing per layer set and the
    best baseline's pointing for the best layer set."""
    head = f"{'run':<16}{'zero-shot':>10}" + "".join(
        f"{'pt ' + ls:>10}{'mIoU':>7}{'shared':>8}" for ls in layer_sets
    )
    lines = [head + f"{'best baseline':>15}"]
    for name, r in results.items():
        line = f"{name:<16}{100 * r['zero_shot']:>9.1f}%"
        for ls in layer_sets:
            pointing, miou = r[f"{ls}|all|legrad"]
            shared = r.get(f"{ls}|shared colour|legrad", [math.nan])[0]  # a user's cases may have no groups
            line += f"{100 * pointing:>9.1f}%{miou:>7.3f}{100 * shared:>7.1f}%"
        best = max(layer_sets, key=lambda ls: r[f"{ls}|all|legrad"][0])
        baseline = max(r[f"{best}|all|{m}"][0] for m in BASELINES)
        lines.append(line + f"{100 * baseline:>14.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m legrad_shapes.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help='JSON: {run name: {"recipe": NAME, TrainConfig fields}}')
    p.add_argument("out", type=Path, help="folder for the runs' logs, model folders and results.json")
    p.add_argument(
        "--cases", type=Path, required=True, help="validation cases (python -m legrad_shapes.cases)"
    )
    p.add_argument("--device", default="cuda", help="torch device for training (default cuda)")
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="runs at once")
    p.add_argument("--layers", nargs="+", default=["-3", "-2", "all"], help="layer sets to score each with")
    args = p.parse_args(argv)
    try:
        runs = json.loads(args.runs.read_text())
        results = run_sweep(runs, args.out, args.cases, args.device, args.parallel, args.layers)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarise(results, args.layers))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
