"""The greedy coreset alone: time and peak memory, ours beside the official loop.

The reference is a transcription of the official ApproximateGreedyCoresetSampler loop (one full
sqrt-distance update and a concatenate + min per step). Both run on the same projected features
and must select the same indices. Each case runs in its own subprocess for its peak RSS.

    .venv/bin/python bench/coreset.py [--sizes 100000 400000 1000000] [--ratios 0.01 0.1] [--max-steps 300]
"""

from __future__ import annotations

import argparse
import json
import time

import _common
import numpy as np
import torch


def official_loop(features: torch.Tensor, num: int, start: np.ndarray) -> np.ndarray:
    def dists(a, b):
        a_a = a.pow(2).sum(dim=-1).reshape(-1, 1)
        b_b = b.pow(2).sum(dim=-1).reshape(1, -1)
        return (-2 * a.mm(b.T) + a_a + b_b).clamp(0, None).sqrt()

    anchor = torch.mean(dists(features, features[start]), dim=-1).reshape(-1, 1)
    chosen = []
    for _ in range(num):
        idx = torch.argmax(anchor).item()
        chosen.append(idx)
        new = dists(features, features[idx : idx + 1])
        anchor = torch.min(torch.cat([anchor, new], dim=-1), dim=1).values.reshape(-1, 1)
    return np.array(chosen)


def child(n: int, ratio: float, impl: str, max_steps: int) -> None:
    from mhpc.memory_bank.greedy import greedy_coreset_indices

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(n, 128, generator=gen)  # already projected to 128 dimensions
    steps = min(int(n * ratio), max_steps)
    start = np.random.default_rng(0).choice(n, 10, replace=False)
    base_rss = _common.peak_rss_mb()
    t0 = time.perf_counter()
    if impl == "mhpc":
        idx = greedy_coreset_indices(features, steps, 10, np.random.default_rng(0))
    else:
        idx = official_loop(features, steps, start)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "steps": steps, "full_steps": int(n * ratio),
                      "peak_rss_mb": _common.peak_rss_mb(), "input_mb": base_rss, "head": idx[:20].tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[100_000, 400_000, 1_000_000])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.1])
    ap.add_argument("--max-steps", type=int, default=300, help="steps actually timed; the rest is extrapolated")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), float(args.child[1]), args.child[2], args.max_steps)
        return
    print(_common.machine_line())
    print("Per-step cost does not depend on the ratio, so each N is timed once over --max-steps steps and the")
    print("full selection time at each ratio is extrapolated (steps = ratio * N).")
    ratios = " | ".join(f"est. full time at {r:g} (official / mhpc)" for r in args.ratios)
    print(f"| N | steps timed | official ms/step | mhpc ms/step | speed-up | {ratios} | peak RSS MB official / mhpc | same picks |")
    print("|---|---|---|---|---|" + "---|" * len(args.ratios) + "---|---|")
    for n in args.sizes:
        res = {impl: _common.run_child(__file__, ["--max-steps", str(args.max_steps), "--child", str(n), "1.0", impl])
               for impl in ("official", "mhpc")}
        o, m = res["official"], res["mhpc"]
        per_o, per_m = o["seconds"] / o["steps"], m["seconds"] / m["steps"]
        est = " | ".join(f"{per_o * r * n:.0f} s / {per_m * r * n:.0f} s" for r in args.ratios)
        print(f"| {n:,} | {m['steps']} | {per_o * 1e3:.2f} | {per_m * 1e3:.2f} | {per_o / per_m:.2f}x | {est} | "
              f"{o['peak_rss_mb']:.0f} / {m['peak_rss_mb']:.0f} | {o['head'] == m['head']} |", flush=True)


if __name__ == "__main__":
    main()
