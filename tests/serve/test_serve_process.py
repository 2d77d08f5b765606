"""A real `legrad serve` process on 127.0.0.1: concurrent load with no request lost or mixed up and a
flat RSS, and SIGTERM in the middle of a load (every request ends, the process exits). Bounded: each
test sends a fixed number of requests and gives up after a fixed time."""

from __future__ import annotations

import base64
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from legrad_runtime import load  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cat", "a dog"]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for the server's RSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24 + seed, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, folder: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "legrad_runtime.cli", "serve", str(folder), "--port", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        end = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not start in 60 s"
            time.sleep(0.1)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not exit within 20 s of SIGTERM") from None
        return self.proc.returncode, err


def _post(client, data: bytes, prompts: list[str]):
    return client.post(
        "/v1/explain",
        files=[("images", ("i.png", data, "image/png"))],
        data={"prompts": prompts, "maps": "npy", "overlays": "false"},
        timeout=30,
    )


def test_concurrent_load_loses_and_mixes_up_nothing_and_rss_stays_flat(model_folder):
    model = load(model_folder, device="cpu", threads=1)
    images = [_png(i) for i in range(6)]
    rng = random.Random(0)
    jobs = [(i % 6, rng.sample(PROMPTS, 1 + i % 3)) for i in range(96)]
    server = Server(model_folder, "--max-batch", "8", "--max-wait-ms", "5")
    try:
        rss = []
        with httpx.Client(base_url=server.url) as client, ThreadPoolExecutor(8) as pool:
            for round_ in range(4):
                part = jobs[round_ * 24 : (round_ + 1) * 24]
                responses = list(pool.map(lambda j: _post(client, images[j[0]], j[1]), part))
                for (i, prompts), r in zip(part, responses, strict=True):
                    assert r.status_code == 200, r.text
                    item = r.json()["images"][0]
                    alone = model.explain([Image.open(io.BytesIO(images[i]))], prompts)
                    want = np.stack([alone.heatmap_on_original(0, p) for p in range(len(prompts))])
                    got = np.load(io.BytesIO(base64.b64decode(item["heatmaps_npy"])))
                    np.testing.assert_allclose(got, want, atol=1e-6)
                    np.testing.assert_allclose(
                        item["scores"]["probability"], alone.probabilities[0], atol=1e-6
                    )
                rss.append(_rss_mb(server.proc.pid))
            metrics = client.get("/metrics").text
        assert 'legrad_requests_total{status="200"} 96.0' in metrics
        assert rss[-1] - rss[1] < 25, f"RSS grew from {rss[1]:.0f} MB to {rss[-1]:.0f} MB over the run"
    finally:
        server.stop()


def test_sigterm_mid_load_ends_every_request_cleanly_and_the_server_exits(model_folder):
    data = _png(1)
    server = Server(model_folder, "--max-batch", "4", "--max-wait-ms", "20")
    outcomes: list[str] = []

    def one(client) -> str:
        try:
            r = _post(client, data, ["a cat", "a dog"])
        except httpx.TransportError as exc:  # the connection closed: a clean failure, not a hang
            return type(exc).__name__
        assert r.status_code in (200, 503), r.text
        return str(r.status_code)

    with httpx.Client(base_url=server.url) as client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, client) for _ in range(40)]
        end = time.monotonic() + 30
        while sum(f.done() for f in futures) < 3:
            assert time.monotonic() < end
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        done, pending = wait(futures, timeout=30)
        assert not pending, "requests hung after SIGTERM"
        outcomes = [f.result() for f in futures]
    code, err = server.stop()
    assert code in (0, 143), err
    assert "Traceback" not in err
    assert outcomes.count("200") >= 3
