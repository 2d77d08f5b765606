"""`legrad serve`'s app through Starlette's TestClient: responses equal in-process explain calls,
concurrent requests batched yet each equal to its request run alone, every refusal a 4xx/5xx with a
JSON error naming the problem, the bounded queue's 503, and /metrics."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")
pytest.importorskip("multipart")

from starlette.testclient import TestClient  # noqa: E402

from legrad_runtime import load  # noqa: E402
from legrad_runtime.serve.app import create_app  # noqa: E402
from legrad_runtime.serve.limits import Limits  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cat"]


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _maps(item: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(item["heatmaps_npy"])))


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load(model_folder, device="cpu", threads=1)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_batch=8, max_wait_ms=5)) as c:
        yield c


def _alone(model, data: bytes, prompts: list[str]):
    return model.explain([Image.open(io.BytesIO(data))], prompts)


def test_form_request_gives_scores_overlays_and_maps_equal_to_in_process(client, model):
    data = _png(0)
    r = client.post(
        "/v1/explain",
        files=[("images", ("one.png", data, "image/png"))],
        data={"prompts": PROMPTS[:2], "maps": "npy"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    alone = _alone(model, data, PROMPTS[:2])
    assert body["prompts"] == PROMPTS[:2]
    (item,) = body["images"]
    assert item["name"] == "one.png"
    np.testing.assert_allclose(item["scores"]["similarity"], alone.similarities[0], atol=1e-6)
    np.testing.assert_allclose(item["scores"]["probability"], alone.probabilities[0], atol=1e-6)
    want = np.stack([alone.heatmap_on_original(0, p) for p in range(2)])
    np.testing.assert_allclose(_maps(item), want, atol=1e-6)
    assert len(item["overlays"]) == 2
    overlay = Image.open(io.BytesIO(base64.b64decode(item["overlays"][0])))
    assert overlay.size == (40, 30)


def test_json_request_with_base64_images_gives_json_maps_and_layer_figures(client, model):
    data = _png(1)
    r = client.post(
        "/v1/explain",
        json={
            "images": [{"name": "x.png", "data": base64.b64encode(data).decode()}],
            "prompts": ["a cat"],
            "maps": "json",
            "overlays": False,
            "layers_figure": True,
            "cmap": "viridis",
        },
    )
    assert r.status_code == 200, r.text
    (item,) = r.json()["images"]
    assert "overlays" not in item and len(item["layers_figures"]) == 1
    alone = _alone(model, data, ["a cat"])
    np.testing.assert_allclose(np.array(item["heatmaps"][0]), alone.heatmap_on_original(0, 0), atol=1e-6)


def test_concurrent_requests_with_different_prompts_batch_together_and_equal_running_alone(model):
    app = create_app(model, max_batch=16, max_wait_ms=300)
    jobs = [(_png(10 + i), PROMPTS[i % 4 : i % 4 + 1 + i % 3]) for i in range(8)]

    def send(c: TestClient, job: tuple[bytes, list[str]]) -> dict:
        r = c.post(
            "/v1/explain",
            files=[("images", (f"{len(job[1])}.png", job[0], "image/png"))],
            data={"prompts": job[1], "maps": "npy", "overlays": "false"},
        )
        assert r.status_code == 200, r.text
        return r.json()

    with TestClient(app) as c, ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda j: send(c, j), jobs))
        batches = app.state.metrics.batch.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count < len(jobs), "the concurrent requests were not batched"
    for (data, prompts), body in zip(jobs, bodies, strict=True):
        alone = _alone(model, data, prompts)
        assert body["prompts"] == prompts
        (item,) = body["images"]
        np.testing.assert_allclose(item["scores"]["probability"], alone.probabilities[0], atol=1e-6)
        np.testing.assert_allclose(item["scores"]["similarity"], alone.similarities[0], atol=1e-6)
        want = np.stack([alone.heatmap_on_original(0, p) for p in range(len(prompts))])
        np.testing.assert_allclose(_maps(item), want, atol=1e-6)


def test_a_corrupt_image_fails_only_its_own_request(model):
    app = create_app(model, max_batch=8, max_wait_ms=300)
    good, bad = _png(3), _png(4)[:120]  # a PNG header, then nothing: fails only when decoded

    def send(c: TestClient, name: str, data: bytes):
        return c.post(
            "/v1/explain", files=[("images", (name, data, "image/png"))], data={"prompts": ["a cat"]}
        )

    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        ok, broken = pool.map(lambda a: send(c, *a), [("good.png", good), ("bad.png", bad)])
    assert ok.status_code == 200
    assert broken.status_code == 422 and "bad.png" in broken.json()["error"]


def test_classifier_requests_name_classes_or_top_k(model_folders):
    model = load(model_folders["classifier"], device="cpu", threads=1)
    data = _png(5)
    names = list(model.classes or ())
    with TestClient(create_app(model, max_batch=4, max_wait_ms=1)) as c:
        r = c.post(
            "/v1/explain",
            files=[("images", ("c.png", data, "image/png"))],
            data={"classes": [names[1], "0"], "maps": "npy", "overlays": "false"},
        )
        assert r.status_code == 200, r.text
        alone = model.explain([Image.open(io.BytesIO(data))], classes=[1, 0])
        (item,) = r.json()["images"]
        np.testing.assert_allclose(item["scores"]["probability"], alone.probabilities[0], atol=1e-6)
        np.testing.assert_allclose(_maps(item)[0], alone.heatmap_on_original(0, 0), atol=1e-6)
        top = c.post(
            "/v1/explain", files=[("images", ("c.png", data, "image/png"))], data={"classes": "top-2"}
        )
        assert top.status_code == 200, top.text
        want = model.explain([Image.open(io.BytesIO(data))], classes="top-2")
        assert top.json()["images"][0]["labels"] == [want.label(0, 0), want.label(0, 1)]
        wrong = c.post("/v1/explain", files=[("images", ("c.png", data))], data={"prompts": "a cat"})
        assert wrong.status_code == 422 and "classes" in wrong.json()["error"]


@pytest.mark.parametrize(
    ("fields", "files", "status", "words"),
    [
        ({"prompts": "a cat"}, [], 422, "no images"),
        ({}, None, 422, "no prompts"),
        ({"prompts": ["p"] * 17}, None, 422, "at most 16"),
        ({"prompts": "x" * 301}, None, 422, "characters"),
        ({"prompts": "   "}, None, 422, "empty"),
        ({"prompts": "a cat", "classes": "1"}, None, 422, "prompts"),
        ({"prompts": "a cat", "cmap": "rainbow"}, None, 422, "cmap"),
        ({"prompts": "a cat", "alpha": "2"}, None, 422, "alpha"),
        ({"prompts": "a cat", "style": "blur"}, None, 422, "style"),
        ({"prompts": "a cat", "maps": "csv"}, None, 422, "maps"),
        ({"prompts": "a cat", "overlays": "maybe"}, None, 422, "boolean"),
        ({"prompts": "a cat"}, [("images", ("t.txt", b"hello", "text/plain"))], 415, "t.txt"),
        ({"prompts": "a cat"}, [("images", ("e.png", b"", "image/png"))], 422, "e.png"),
    ],
)
def test_every_bad_request_is_answered_with_a_json_error_naming_it(client, fields, files, status, words):
    files = [("images", ("ok.png", _png(6), "image/png"))] if files is None else files
    r = client.post("/v1/explain", files=files or None, data=fields)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_limits_on_body_pixels_images_and_content_type(model):
    limits = Limits(max_body_bytes=20_000, max_pixels=1000, max_images=2)
    with TestClient(create_app(model, limits=limits)) as c:
        big = c.post("/v1/explain", files=[("images", ("big.png", b"\0" * 30_000))], data={"prompts": "a"})
        assert big.status_code == 413 and "at most 20,000" in big.json()["error"]
        wide = c.post("/v1/explain", files=[("images", ("w.png", _png(7, (50, 30))))], data={"prompts": "a"})
        assert wide.status_code == 413 and "w.png" in wide.json()["error"]
        four = c.post(
            "/v1/explain",
            files=[("images", (f"{i}.png", _png(i, (8, 8)))) for i in range(4)],
            data={"prompts": "a"},
        )
        assert four.status_code == 413 and "at most 2" in four.json()["error"]
        many = c.post(
            "/v1/explain",
            files=[("images", (f"{i}.png", _png(i, (8, 8)))) for i in range(3)],
            data={"prompts": "a"},
        )
        assert many.status_code == 413 and "at most 2" in many.json()["error"]
        text = c.post("/v1/explain", content=b"hi", headers={"content-type": "text/plain"})
        assert text.status_code == 415
        bad_json = c.post("/v1/explain", content=b"{", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
        bad_b64 = c.post("/v1/explain", json={"images": ["%%%"], "prompts": ["a"]})
        assert bad_b64.status_code == 422 and "base64" in bad_b64.json()["error"]


def _gate(app):
    """Hold the batcher's explain calls until the returned event is set."""
    release = threading.Event()
    batcher = app.state.batcher
    run = batcher._run

    def held(jobs):
        release.wait(20)
        return run(jobs)

    batcher._run = held
    return release


def _wait_for(cond, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_instead_of_growing(model):
    app = create_app(model, max_batch=1, max_wait_ms=0, limits=Limits(max_queue_images=1))
    release = _gate(app)
    data = _png(8)

    def send(c: TestClient):
        return c.post("/v1/explain", files=[("images", ("q.png", data))], data={"prompts": "a cat"})

    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        batcher = app.state.batcher
        running = pool.submit(send, c)  # taken by the worker, held at the gate
        _wait_for(lambda: batcher.queued_images == 0 and running.running())
        time.sleep(0.1)
        queued = pool.submit(send, c)  # fills the queue (1 image)
        _wait_for(lambda: batcher.queued_images == 1)
        refused = send(c)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1 and "busy" in refused.json()["error"]
        release.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        metrics = c.get("/metrics").text
    assert 'legrad_requests_total{status="503"} 1.0' in metrics
    assert 'legrad_requests_total{status="200"} 2.0' in metrics


def test_a_request_over_its_timeout_gets_504_and_leaves_the_queue(model):
    app = create_app(model, max_batch=1, max_wait_ms=0, limits=Limits(timeout_s=0.3))
    release = _gate(app)
    with TestClient(app) as c:
        r = c.post("/v1/explain", files=[("images", ("slow.png", _png(9)))], data={"prompts": "a cat"})
        release.set()
    assert r.status_code == 504 and "0.3 s" in r.json()["error"]


def test_model_health_and_metrics_endpoints(client, model):
    assert client.get("/v1/model").json()["model_name"] == model.metadata.model_name
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/explain", files=[("images", ("m.png", _png(11)))], data={"prompts": "a cat"})
    text = client.get("/metrics").text
    for name in (
        "legrad_requests_total",
        "legrad_request_seconds_bucket",
        "legrad_batch_images_sum",
        "legrad_queue_images",
    ):
        assert name in text


def test_an_internal_failure_is_a_json_500_and_the_server_keeps_serving(model):
    app = create_app(model, max_batch=1, max_wait_ms=0)
    batcher = app.state.batcher
    run = batcher._run

    def broken(jobs):
        raise RuntimeError("onnxruntime fell over")

    with TestClient(app, raise_server_exceptions=False) as c:
        batcher._run = broken
        r = c.post("/v1/explain", files=[("images", ("a.png", _png(12)))], data={"prompts": "a cat"})
        assert r.status_code == 500 and "onnxruntime fell over" in r.json()["error"]
        batcher._run = run
        ok = c.post("/v1/explain", files=[("images", ("a.png", _png(12)))], data={"prompts": "a cat"})
        assert ok.status_code == 200
