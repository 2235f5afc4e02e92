"""Optional per-stage wall-clock accounting for benchmarks (off by default, near-zero cost)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class StageTimer:
    """``with timer("backbone"): ...`` adds the elapsed seconds to ``timer.seconds["backbone"]``.

    On CUDA the device is synchronised at both ends so that asynchronous kernels are counted.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - start


stage_timer = StageTimer()
