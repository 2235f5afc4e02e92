"""Dynamic batching with a bounded queue.

Requests put one job per image on a bounded ``asyncio.Queue`` (full: ``QueueFull``, which the app turns
into 503 + Retry-After). One worker takes the first job and everything queued behind it, up to
``max_batch`` jobs; while other requests are still being read (``incoming``, counted by the app from the
start of a request until its images are queued) it waits up to ``wait_s`` seconds for theirs too. A lone
request is dispatched at once: nothing else can join it, so waiting would only add latency (the way
Triton's and TorchServe's dynamic batchers behave at low load). The batch runs on the engine in a worker
thread and each job gets its own result. Every job carries the model it was preprocessed for, so a batch that straddles a
hot reload runs as two groups, each on its own model: an answer never mixes two models. If a batch
fails, its jobs run one by one, so one bad job fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Job:
    model: Any  # a ServedModel
    image: np.ndarray  # uint8 [H, W, 3] at ``model``'s input size
    future: asyncio.Future = field(repr=False)
    map_size: tuple[int, int] | None = None  # (width, height): the map is wanted in the image's coordinates


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` jobs already."""


class Arrival:
    """One request being read: counted in ``Batcher.incoming`` until it is closed (idempotent)."""

    def __init__(self, batcher: "Batcher") -> None:
        self.batcher, self.open = batcher, True
        batcher.incoming += 1

    def close(self) -> None:
        if self.open:
            self.open = False
            self.batcher.incoming -= 1

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Batcher:
    def __init__(self, executor: Executor, max_batch: int = 8, wait_s: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.executor, self.max_batch, self.wait_s, self.max_queue = executor, max_batch, wait_s, max_queue
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue[Job] = asyncio.Queue(max_queue)
        self.incoming = 0  # requests being read whose images are not queued yet
        self._task: asyncio.Task | None = None

    def coming(self) -> "Arrival":
        """``with batcher.coming() as arrival:`` around reading a request; ``submit(..., arrival)`` ends it.
        A batch waits (up to ``wait_s``) only while some request is between the two."""
        return Arrival(self)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():  # nothing should be left after a graceful shutdown; never hang a caller
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def submit(self, model: Any, images: list[np.ndarray], map_sizes: list[tuple[int, int] | None] | None = None,
               arrival: "Arrival | None" = None) -> list[asyncio.Future]:
        """Queues one job per image, all or none: a request is never half queued. ``map_sizes``: per image,
        the (width, height) its map is wanted at (drawn on the engine thread: it uses torch), or None."""
        if arrival is not None:
            arrival.close()  # no await between this and the queueing: the batcher never sees a gap
        if self.queue.qsize() + len(images) > self.max_queue:
            raise QueueFull(f"the queue holds {self.queue.qsize()} of at most {self.max_queue} images")
        loop = asyncio.get_running_loop()
        futures = []
        for image, size in zip(images, map_sizes or [None] * len(images)):
            job = Job(model, image, loop.create_future(), size)
            self.queue.put_nowait(job)
            futures.append(job.future)
        return futures

    async def _gather(self) -> list[Job]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            if self.incoming <= 0:  # nothing else on its way: dispatch now
                break
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [job for job in batch if not job.future.done()]  # a timed-out caller's job is dropped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self.on_batch(len(batch))
            groups: dict[int, list[Job]] = {}
            for job in batch:
                groups.setdefault(id(job.model), []).append(job)
            for jobs in groups.values():
                try:
                    results = await loop.run_in_executor(self.executor, _score, jobs)
                except Exception:  # noqa: BLE001 - retried one by one below, so only the bad job fails
                    results = []
                    for job in jobs:
                        try:
                            results.extend(await loop.run_in_executor(self.executor, _score, [job]))
                        except Exception as exc:  # noqa: BLE001
                            results.append(exc)
                for job, result in zip(jobs, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)


def _score(jobs: list[Job]) -> list[tuple[float, np.ndarray, bool | None]]:
    """(score, map, verdict) per job; runs on the engine thread, the only one that runs torch."""
    model = jobs[0].model
    scores, maps, verdicts = model.score(np.stack([job.image for job in jobs]))
    return [(float(s), m if job.map_size is None else model.map_in_image(m, job.map_size), v)
            for job, s, m, v in zip(jobs, scores, maps, verdicts)]
