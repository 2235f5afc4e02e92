"""Shared helpers for the benchmark scripts: environment, timing and data."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def machine_line() -> str:
    import faiss
    import sklearn

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), faiss {faiss.__version__}, scikit-learn {sklearn.__version__}")


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """A B A B ... timing; returns the median seconds of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def texture_loader(n: int, batch_size: int = 16, seed: int = 0, size: int = 224):
    from mhpc.data.synthetic import TextureCropDataset

    return torch.utils.data.DataLoader(TextureCropDataset(n, size=size, seed=seed), batch_size=batch_size)


def run_child(script: str, args: list[str], env: dict | None = None) -> dict:
    """Runs ``python script args`` in a fresh process (its own peak RSS); returns its last JSON line."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{script} {' '.join(args)} failed: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
