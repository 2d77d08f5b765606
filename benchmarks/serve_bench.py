"""Load test and benchmark of `legrad serve` (bounded, 127.0.0.1 only, stops by itself).

    .venv/bin/legrad-export --model assets/shapes-clip --out /tmp/srv_models
    .venv/bin/python benchmarks/serve_bench.py /tmp/srv_models/shapes-clip__open_clip_model__64

Starts `legrad serve` on a free port of 127.0.0.1, then for each concurrency (1, 8, 32) sends at
most --requests requests (one image, one of three prompt sets, maps as .npy) for at most --seconds,
and checks every answer against the same request explained alone in-process (no request lost or
mixed up). Prints throughput, p50/p95/p99 latency, the mean batch size (from /metrics) and the
server's RSS before and after each level; then an overload run (--overload concurrent clients
against a small queue) counting 503s with Retry-After; then the in-process runtime's images/s at
the server's batch size, and the ratio. SIGTERM ends the server at the end (or on any failure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from legrad_runtime import LeGradModel, load

HOST = "127.0.0.1"
PROMPT_SETS = [
    ["a red square", "a blue cross"],
    ["a green triangle"],
    ["an orange circle", "a red square", "a cat"],
]
SAMPLES = sorted((Path(__file__).parent.parent / "assets" / "sample" / "images").glob("*.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batch_stats(metrics: str) -> tuple[float, float]:
    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.M)
        return float(m.group(1)) if m else 0.0

    return value("legrad_batch_images_sum"), value("legrad_batch_images_count")


def start_server(folder: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "legrad_runtime.cli", "serve", folder, "--host", HOST, "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cmd += ["--max-queue", str(args.max_queue), "--timeout", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 60 s")


def request_bytes(image: bytes, name: str, prompts: list[str], maps: str) -> bytes:
    """A whole POST /v1/explain (multipart form), built once and sent as it is."""
    b = "legrad-bench-boundary"
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    ]
    for key, value in [*(("prompts", p) for p in prompts), ("maps", maps), ("overlays", "false")]:
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{b}--\r\n".encode()
    head = (
        f"POST /v1/explain HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/form-data; boundary={b}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(
    conn: list[asyncio.StreamReader | asyncio.StreamWriter], port: int, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept-alive connection (reopened when the server closed it)."""
    if not conn:
        conn[:] = await asyncio.open_connection(HOST, port)
    reader, writer = conn
    assert isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter)
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, value = line.decode("latin-1").split(":", 1)
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        writer.close()
        conn.clear()
    return status, headers, body


async def level(
    port: int,
    concurrency: int,
    n: int,
    seconds: float,
    images: list[bytes],
    expected: dict,
    check: bool,
    sets: int = len(PROMPT_SETS),
) -> dict:
    """Up to n requests from `concurrency` clients for at most `seconds`; latencies and outcomes.
    `sets`: how many of PROMPT_SETS the requests cycle through (1: all ask for the same prompts).

    A plain asyncio HTTP/1.1 client with prebuilt requests (as wrk does): on a 2-core machine an
    httpx client took about a core of its own from the server it measured."""
    maps = "npy" if check else "none"
    requests = {
        (i, p): request_bytes(images[i], f"{i}.png", PROMPT_SETS[p], maps)
        for i in range(len(images))
        for p in range(len(PROMPT_SETS))
    }
    latencies: list[float] = []
    codes: dict[int, int] = {}
    retry_after: list[str] = []
    mismatches = 0
    sent = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal sent, mismatches
        conn: list[asyncio.StreamReader | asyncio.StreamWriter] = []
        while sent < n and time.monotonic() < deadline:
            k = sent
            sent += 1
            i, p = k % len(images), k % sets
            t0 = time.perf_counter()
            status, headers, body = await exchange(conn, port, requests[i, p])
            codes[status] = codes.get(status, 0) + 1
            if status == 503:
                retry_after.append(headers.get("retry-after", ""))
                continue
            latencies.append(time.perf_counter() - t0)
            if check and status == 200:
                item = json.loads(body)["images"][0]
                got = np.load(io.BytesIO(base64.b64decode(item["heatmaps_npy"])))
                want = expected[i, p]
                if got.shape != want.shape or not np.allclose(got, want, atol=1e-6, rtol=0):
                    mismatches += 1
        if conn:
            conn[1].close()  # type: ignore[union-attr]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "latencies": latencies,
        "codes": codes,
        "wall": wall,
        "mismatches": mismatches,
        "retry": retry_after,
    }


def in_process(model: LeGradModel, images: list[bytes], batch: int, seconds: float) -> float:
    """Images/s of the runtime itself: explain calls of `batch` images (decoded from PNG bytes, as
    the server does), for at least `seconds`."""
    data = [images[k % len(images)] for k in range(batch)]
    model.explain([Image.open(io.BytesIO(d)) for d in data], PROMPT_SETS[0], layer_maps=False)  # warm-up
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < seconds:
        model.explain(
            [Image.open(io.BytesIO(d)) for d in data], PROMPT_SETS[0], batch_size=batch, layer_maps=False
        )
        calls += 1
    return batch * calls / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--requests", type=int, default=300, help="most requests per level (default: 300)")
    p.add_argument("--seconds", type=float, default=30, help="most seconds per level (default: 30)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--max-queue", type=int, default=64, help="server's queue, in images (default: 64)")
    p.add_argument("--rounds", type=int, default=3, help="alternating in-process/served runs (default: 3)")
    p.add_argument("--overload", type=int, default=256, help="clients of the overload run (default: 256)")
    args = p.parse_args()

    images = [f.read_bytes() for f in SAMPLES]
    model = load(args.model_dir, device="cpu")
    expected = {}
    for i, data in enumerate(images):
        for k, prompts in enumerate(PROMPT_SETS):
            e = model.explain([Image.open(io.BytesIO(data))], prompts, layer_maps=False)
            expected[i, k] = np.stack([e.heatmap_on_original(0, j) for j in range(len(prompts))])

    port = free_port()
    url = f"http://{HOST}:{port}"
    server = start_server(args.model_dir, port, args)
    rows = []
    try:
        asyncio.run(level(port, 4, 20, 10, images, expected, False))  # warm-up
        for c in args.concurrency:
            before = batch_stats(httpx.get(f"{url}/metrics").text)
            rss0 = rss_mb(server.pid)
            res = asyncio.run(level(port, c, args.requests, args.seconds, images, expected, True))
            after = batch_stats(httpx.get(f"{url}/metrics").text)
            lat = np.array(res["latencies"]) * 1000
            ok = res["codes"].get(200, 0)
            mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            rows.append(
                (
                    c,
                    ok,
                    sum(res["codes"].values()),
                    ok / res["wall"],
                    *np.percentile(lat, [50, 95, 99]),
                    mean_batch,
                    rss0,
                    rss_mb(server.pid),
                    res["mismatches"],
                    dict(res["codes"]),
                )
            )
        # the ratio, on a machine whose load may drift: short in-process and served runs alternate,
        # each served run compared with the mean of the in-process runs around it; the median counts
        local = [in_process(model, images, args.max_batch, 4.0)]
        served: list[float] = []
        for _ in range(args.rounds):
            bench = asyncio.run(level(port, 32, 10_000, 4.0, images, expected, False, sets=1))
            served.append(bench["codes"].get(200, 0) / bench["wall"])
            local.append(in_process(model, images, args.max_batch, 4.0))
        rss0 = rss_mb(server.pid)
        overloads = []
        for _ in range(2):  # twice: the second run's RSS shows whether memory keeps growing
            over = asyncio.run(
                level(port, args.overload, 4 * args.overload, args.seconds, images, expected, False)
            )
            overloads.append((over, rss_mb(server.pid)))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    print(
        f"\nlegrad serve, {args.model_dir}, on {os.cpu_count()} CPU cores; --max-batch {args.max_batch} "
        f"--max-wait-ms {args.max_wait_ms:g} --max-queue {args.max_queue}; 1 image per request\n"
    )
    print(
        "| concurrency | answered 200 / sent | images/s | p50 ms | p95 ms | p99 ms | mean batch "
        "| RSS start→end MB | mixed up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c, ok, sent, tput, p50, p95, p99, mb, r0, r1, bad, _ in rows:
        print(
            f"| {c} | {ok} / {sent} | {tput:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {mb:.1f} "
            f"| {r0:.0f}→{r1:.0f} | {bad} |"
        )
    for n, (over, rss_over) in enumerate(overloads, 1):
        codes = over["codes"]
        retry_ok = all(v.isdecimal() for v in over["retry"])
        others = {k: v for k, v in codes.items() if k not in (200, 503)}
        print(
            f"\noverload run {n}: {args.overload} clients, {sum(codes.values())} requests "
            f"in {over['wall']:.1f} s: "
            f"{codes.get(200, 0)} answered 200, {codes.get(503, 0)} answered 503 "
            f"(Retry-After on each: {retry_ok}), other: {others}; server RSS after: {rss_over:.0f} MB "
            f"(before the overload runs: {rss0:.0f} MB)"
        )
    ratios = [served[r] / ((local[r] + local[r + 1]) / 2) for r in range(len(served))]
    print(
        f"\nlegrad serve at concurrency 32 (scores only) vs the in-process runtime at batch {args.max_batch}:"
    )
    for r, ratio in enumerate(ratios):
        print(
            f"  round {r + 1}: in-process {local[r]:.1f} → {local[r + 1]:.1f} images/s, "
            f"served {served[r]:.1f} "
            f"images/s: {100 * ratio:.0f}%"
        )
    print(f"  median: {100 * float(np.median(ratios)):.0f}% of in-process")
    lost = sum(r[2] - r[1] for r in rows) + sum(r[10] for r in rows)  # unanswered + mixed up
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
