"""Dynamic batching with a bounded queue.

Requests put one job per image on a bounded ``asyncio.Queue`` (full: ``QueueFull``, which the app turns
into 503 + Retry-After). One worker takes the first job, gathers more until ``max_batch`` jobs or
``wait_s`` seconds, whichever comes first, runs them on the engine in a worker thread and hands each
job its own result. Every job carries the model it was preprocessed for, so a batch that straddles a
hot reload runs as two groups, each on its own model: an answer never mixes two models. If a batch
fails, its jobs run one by one, so one bad job fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Job:
    model: Any  # a ServedModel
    image: torch.Tensor  # [3, H, W], preprocessed for ``model``
    future: asyncio.Future = field(repr=False)


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` jobs already."""


class Batcher:
    def __init__(self, executor: Executor, max_batch: int = 8, wait_s: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.executor, self.max_batch, self.wait_s, self.max_queue = executor, max_batch, wait_s, max_queue
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue[Job] = asyncio.Queue(max_queue)
        self._task: asyncio.Task | None = None

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

    def submit(self, model: Any, images: list[torch.Tensor]) -> list[asyncio.Future]:
        """Queues one job per image, all or none: a request is never half queued."""
        if self.queue.qsize() + len(images) > self.max_queue:
            raise QueueFull(f"the queue holds {self.queue.qsize()} of at most {self.max_queue} images")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            job = Job(model, image, loop.create_future())
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


def _score(jobs: list[Job]) -> list[tuple[float, Any]]:
    scores, maps = jobs[0].model.score(torch.stack([job.image for job in jobs]))
    return [(float(s), m) for s, m in zip(scores, maps)]
