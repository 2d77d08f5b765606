"""The `legrad serve` web app (Starlette): explain over HTTP, with dynamic batching.

    app = create_app(load("models/..."), max_batch=16, max_wait_ms=10)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/explain, GET /v1/model, GET /healthz, GET /metrics (Prometheus text), and the web
page's static folder at / and /static/ when it exists. Each app has its own metrics registry.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..session import Explanation, LeGradModel
from .batcher import Batcher, Job, JobResult, QueueFull, ShuttingDown
from .limits import HTTPProblem, Limits, Options, decode_base64, make_job, open_upload, parse_options

__all__ = ["create_app", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "legrad_requests", "explain requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.latency = Histogram("legrad_request_seconds", "explain request latency", registry=self.registry)
        self.batch = Histogram(
            "legrad_batch_images", "images per explain call", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.queue = Gauge("legrad_queue_images", "images waiting for a batch", registry=self.registry)


def create_app(
    model: LeGradModel,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    limits: Limits | None = None,
    static_dir: Path | None = STATIC_DIR,
) -> Starlette:
    """The app for one loaded model; its batcher starts and drains with the app's lifespan."""
    limits = limits or Limits()
    metrics = _Metrics()
    batcher = Batcher(
        model,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue_images=limits.max_queue_images,
        on_batch=metrics.batch.observe,
        on_queue=metrics.queue.set,
    )
    meta = model.metadata.to_dict()

    async def explain(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await _explain(request, model, batcher, limits)
        except HTTPProblem as exc:
            response = JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
        metrics.requests.labels(status=str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def model_info(request: Request) -> Response:
        return JSONResponse(meta)

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "model": model.metadata.model_name, "queue": batcher.queued_images}
        )

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes: list[Route | Mount] = [
        Route("/v1/explain", explain, methods=["POST"]),
        Route("/v1/model", model_info, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    if static_dir is not None and (static_dir / "index.html").is_file():
        index = static_dir / "index.html"

        async def home(request: Request) -> Response:
            return FileResponse(index)

        routes += [Route("/", home, methods=["GET"]), Mount("/static", StaticFiles(directory=static_dir))]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    async def internal_error(request: Request, exc: Exception) -> Response:
        metrics.requests.labels(status="500").inc()
        message = f"internal error: {type(exc).__name__}: {exc}; this is a bug or a broken model folder"
        return JSONResponse({"error": message}, 500)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={Exception: internal_error})
    app.state.batcher = batcher
    app.state.metrics = metrics
    return app


async def _explain(request: Request, model: LeGradModel, batcher: Batcher, limits: Limits) -> Response:
    length = request.headers.get("content-length")
    if length is None:
        raise HTTPProblem(411, "the request has no Content-Length; send the body with its length")
    if not length.isdecimal() or int(length) > limits.max_body_bytes:
        raise HTTPProblem(
            413, f"the request body is {length} bytes; this server takes at most {limits.max_body_bytes:,}"
        )
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        job, options = await _from_form(request, model, limits)
    elif kind == "application/json":
        job, options = await _from_json(request, model, limits)
    else:
        raise HTTPProblem(
            415, f"unsupported content type {kind or 'none'!r}; send multipart/form-data or application/json"
        )
    try:
        future = batcher.submit(job)
    except QueueFull as exc:
        raise HTTPProblem(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except ShuttingDown as exc:
        raise HTTPProblem(503, f"{exc}; retry on another instance", {"Retry-After": "1"}) from None
    try:
        result = await asyncio.wait_for(asyncio.shield(future), limits.timeout_s)
    except TimeoutError:
        batcher.cancel(job)
        raise HTTPProblem(
            504, f"the request took over {limits.timeout_s:g} s; send fewer images or prompts, or retry"
        ) from None
    if result.failures:
        named = "; ".join(f"{job.names[f.index]!r}: {_reason(f.error, f.source)}" for f in result.failures)
        raise HTTPProblem(422, f"image(s) cannot be decoded: {named}; upload readable image files")
    body = await asyncio.to_thread(_render, model, job, result, options)
    return Response(body, media_type="application/json")


def _reason(error: Exception, source: str) -> str:
    return str(error).replace(source, "the image", 1)


async def _from_form(request: Request, model: LeGradModel, limits: Limits) -> tuple[Job, Options]:
    try:
        form = await request.form(max_files=limits.max_images, max_fields=4 * limits.max_prompts + 16)
    except (HTTPException, MultiPartException) as exc:  # a malformed form, or over the counts
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
        if "Too many files" in detail:
            raise HTTPProblem(
                413, f"too many images in one request; this server takes at most {limits.max_images}"
            ) from None
        raise HTTPProblem(400, f"the multipart form cannot be read ({detail})") from None
    try:
        images, names = [], []
        for i, item in enumerate(form.getlist("images")):
            if not isinstance(item, UploadFile):
                raise HTTPProblem(422, f"field 'images' #{i} is text, not a file; upload image files")
            name = item.filename or f"image #{i}"
            images.append(open_upload(await item.read(), name, limits))
            names.append(name)
        prompts = [str(v) for v in form.getlist("prompts")]
        classes: list[str | int] = [str(v) for v in form.getlist("classes")]
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k not in ("prompts", "classes")}
        options = parse_options(dict(fields))
        return make_job(model, images, names, prompts, classes, options, limits), options
    finally:
        await form.close()


async def _from_json(request: Request, model: LeGradModel, limits: Limits) -> tuple[Job, Options]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPProblem(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise HTTPProblem(422, "the JSON body must be an object with 'images' and 'prompts' (or 'classes')")
    items = body.get("images")
    if not isinstance(items, list):
        raise HTTPProblem(422, "'images' must be a list of base64 strings or {'name', 'data'} objects")
    if len(items) > limits.max_images:
        raise HTTPProblem(
            413, f"{len(items)} images in one request; this server takes at most {limits.max_images}"
        )
    images, names = [], []
    for i, item in enumerate(items):
        name, data = (
            (str(item.get("name", f"image #{i}")), item.get("data"))
            if isinstance(item, dict)
            else (f"image #{i}", item)
        )
        images.append(open_upload(decode_base64(data, name), name, limits))
        names.append(name)
    prompts, classes = _strings(body, "prompts"), body.get("classes", [])
    if not isinstance(classes, list) or not all(
        isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes
    ):
        classes = [classes] if isinstance(classes, str) else None
    if classes is None:
        raise HTTPProblem(422, "'classes' must be a list of class names (strings) and ids (integers)")
    options = parse_options({k: v for k, v in body.items() if k not in ("images", "prompts", "classes")})
    return make_job(model, images, names, prompts, classes, options, limits), options


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HTTPProblem(422, f"'{key}' must be a list of strings")
    return value


def _render(model: LeGradModel, job: Job, result: JobResult, options: Options) -> bytes:
    """The response body: scores always; overlays, layer figures and maps when asked for."""
    e: Explanation = result.explanation
    sims, probs = e.similarities, e.probabilities
    out: list[dict[str, Any]] = []
    for b, name in enumerate(job.names):
        prompts = range(len(e.prompts))
        item: dict[str, Any] = {
            "name": name,
            "scores": {"similarity": sims[b].tolist(), "probability": probs[b].tolist()},
        }
        if e.is_classifier:
            item["labels"] = [e.label(b, p) for p in prompts]
        if options.overlays:
            item["overlays"] = [
                _png(e.overlay(b, p, cmap=options.cmap, alpha=options.alpha, style=options.style))
                for p in prompts
            ]
        if options.layers_figure:
            item["layers_figures"] = [_png(e.layer_figure(b, p, cmap=options.cmap)) for p in prompts]
        if options.maps != "none":
            maps = np.stack([e.heatmap_on_original(b, p) for p in prompts]).astype(np.float32)  # (P, H, W)
            if options.maps == "json":
                item["heatmaps"] = maps.tolist()
            else:
                buf = io.BytesIO()
                np.save(buf, maps, allow_pickle=False)
                item["heatmaps_npy"] = base64.b64encode(buf.getvalue()).decode("ascii")
        out.append(item)
    body = {"model": model.metadata.model_name, "prompts": list(e.prompts), "images": out}
    return json.dumps(body, allow_nan=False).encode()


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
