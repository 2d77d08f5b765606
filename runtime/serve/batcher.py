"""Dynamic batching: concurrent requests run together in one `LeGradModel.explain` call.

    batcher = Batcher(model, max_batch=16, max_wait_ms=10, max_queue_images=64)
    await batcher.start()
    result = await batcher.submit(Job(images, names, prompts=("a cat", "a dog")))
    await batcher.close()    # refuses new jobs, finishes the queued ones

The queue is bounded in images: a job that would overflow it is refused at once (`QueueFull`, the
server's 503 with Retry-After) instead of growing memory. One worker task takes the first queued job
and every job of the same kind that arrives within `max_wait_ms`, up to `max_batch` images, and runs
them as ONE explain call in a worker thread (the event loop keeps taking requests meanwhile).

Jobs with different prompts share a call through the union of their prompts (or class ids): a LeGrad
map and a cosine depend only on their own (image, prompt) pair, so each job takes its own rows and
columns out of the batch's Explanation (`select`). The Explanation's own `probabilities` then runs
on those columns only: CLIP's softmax over a job's own prompts, as if the job had run alone. Images
are decoded inside the call with on_error='skip': an image that fails never fails its batch-mates;
its job gets the failure back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from ..session import Explanation, ImageFailure, LeGradModel

__all__ = ["Job", "JobResult", "Batcher", "QueueFull", "ShuttingDown", "select"]


class QueueFull(Exception):
    """The queue holds too many images to take this job now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping: no new jobs are taken."""


@dataclass
class Job:
    """One request's work: its images (opened, not yet decoded) and what to explain them for.

    Exactly one of `prompts` (a CLIP model's texts), `class_ids` (a classifier's named classes) or
    `top_k` (each image's K most likely classes) is set.
    """

    images: list[Image.Image]
    names: list[str]
    prompts: tuple[str, ...] | None = None
    class_ids: tuple[int, ...] | None = None
    top_k: int | None = None
    layer_maps: bool = False
    future: asyncio.Future[JobResult] | None = field(default=None, repr=False)
    cancelled: bool = False

    @property
    def kind(self) -> str:
        """Jobs batch together only with jobs of their kind (one explain call takes one kind)."""
        return "prompts" if self.prompts is not None else "classes" if self.class_ids is not None else "top"


@dataclass(frozen=True)
class JobResult:
    """A job's own Explanation (its readable images × its own prompts) and its images that failed
    (`ImageFailure.index`: the position in the job's `images`)."""

    explanation: Explanation
    failures: list[ImageFailure]
    batch_images: int  # how many images the explain call that ran this job held


def select(result: Explanation, rows: Sequence[int], cols: Sequence[int]) -> Explanation:
    """The Explanation of images `rows` × prompts `cols` of `result`, as if explained alone."""
    r, c = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    heat = result.heatmaps[r][:, c]
    layers = None if result.layer_maps is None else result.layer_maps[r][:, c]
    return replace(
        result,
        heatmaps=heat,
        layer_maps=layers,
        image_embeds=None if result.image_embeds is None else result.image_embeds[r],
        text_embeds=None if result.text_embeds is None else result.text_embeds[c],
        images=[result.images[i] for i in rows],
        placements=[result.placements[i] for i in rows],
        sources=[result.sources[i] for i in rows],
        prompts=[result.prompts[j] for j in cols],
        failures=[],
        logits=None if result.logits is None else result.logits[r],
        class_ids=None if result.class_ids is None else result.class_ids[r][:, c],
    )


class Batcher:
    """The bounded queue and the worker that empties it, one explain call per batch."""

    def __init__(
        self,
        model: LeGradModel,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        max_queue_images: int = 64,
        on_batch: Callable[[int], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_queue_images < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch ({max_batch}) and max_queue_images ({max_queue_images}) must be >= 1 and "
                f"max_wait_ms ({max_wait_ms}) >= 0"
            )
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch_seconds = 0.1

    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="legrad-batch")
        self._worker = asyncio.create_task(self._work(), name="legrad-batcher")

    async def close(self) -> None:
        """Refuse new jobs, finish every queued one, then stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, job: Job) -> asyncio.Future[JobResult]:
        """Queue a job; its future gives its result. QueueFull or ShuttingDown at once when refused."""
        if self._closing or self._wakeup is None:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        n = len(job.images)
        if self._queued_images + n > self.max_queue_images:
            batches = -(-self._queued_images // self.max_batch) + 1
            retry = max(1, round(batches * self._last_batch_seconds + 0.5))
            raise QueueFull(
                f"the server is busy: {self._queued_images} images are queued and this request's {n} would "
                f"pass the limit of {self.max_queue_images}; retry in {retry} s",
                retry_after=retry,
            )
        job.future = asyncio.get_running_loop().create_future()
        self._queue.append(job)
        self._set_queued(self._queued_images + n)
        self._wakeup.set()
        return job.future

    def cancel(self, job: Job) -> None:
        """Drop a job that nobody waits for any more (its request timed out or went away)."""
        job.cancelled = True
        if job in self._queue:
            self._queue.remove(job)
            self._set_queued(self._queued_images - len(job.images))

    def _set_queued(self, n: int) -> None:
        self._queued_images = n
        if self._on_queue is not None:
            self._on_queue(n)

    async def _work(self) -> None:
        assert self._wakeup is not None  # start() made it
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = time.monotonic() + self.max_wait
            while not self._closing and self._batchable_images() < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            jobs = self._take()
            if not jobs:
                continue
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as exc:  # the call failed for every job alike (broken weights, a bug)
                for job in jobs:
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self._last_batch_seconds = time.monotonic() - started
            for job, result in zip(jobs, results, strict=True):
                if job.future is not None and not job.future.done():
                    job.future.set_result(result)

    def _batchable_images(self) -> int:
        kind = self._queue[0].kind if self._queue else ""
        return sum(len(j.images) for j in self._queue if j.kind == kind)

    def _take(self) -> list[Job]:
        """The first queued job and the later ones of its kind, up to max_batch images in all."""
        jobs: list[Job] = []
        total = 0
        kind = self._queue[0].kind
        for job in list(self._queue):
            if job.kind != kind or (jobs and total + len(job.images) > self.max_batch):
                continue
            jobs.append(job)
            total += len(job.images)
            self._queue.remove(job)
        self._set_queued(self._queued_images - total)
        return [j for j in jobs if not j.cancelled]

    def _run(self, jobs: list[Job]) -> list[JobResult]:
        """One explain call for the jobs (in the worker thread); each job's own part of it."""
        images = [im for job in jobs for im in job.images]
        layer_maps = any(job.layer_maps for job in jobs)
        kw: dict[str, Any] = {
            "batch_size": max(self.max_batch, len(images)),
            "on_error": "skip",
            "layer_maps": layer_maps,
        }
        targets: list[str | int]
        if jobs[0].prompts is not None:
            texts = sorted({p for job in jobs for p in job.prompts or ()})
            result, targets = self.model.explain(images, texts, **kw), list(texts)
        elif jobs[0].class_ids is not None:
            ids = sorted({c for job in jobs for c in job.class_ids or ()})
            result, targets = self.model.explain(images, classes=ids, **kw), list(ids)
        else:
            k = max(job.top_k or 1 for job in jobs)
            targets = list(range(k))
            result = self.model.explain(images, classes=f"top-{k}", **kw)
        self._record_batch(len(images))
        failed = {f.index: f for f in result.failures}
        row_of: dict[int, int] = {}
        for i in range(len(images)):
            if i not in failed:
                row_of[i] = len(row_of)
        out, start = [], 0
        for job in jobs:
            own = range(start, start + len(job.images))
            start += len(job.images)
            rows = [row_of[i] for i in own if i in row_of]
            wanted: Sequence[str | int]
            wanted = job.prompts or job.class_ids or list(range(job.top_k or 1))
            cols = [targets.index(t) for t in wanted]
            fails = [replace(failed[i], index=i - own.start) for i in own if i in failed]
            out.append(JobResult(select(result, rows, cols), fails, len(images)))
        return out

    def _record_batch(self, n: int) -> None:
        if self._on_batch is not None:
            self._on_batch(n)
