"""Fit wall time and peak RSS against the number of training images (MobileNetV2, 224x224).

Images are crops of the CC0 brick texture generated on the fly (the dataset holds no memory).
Each fit is a fresh subprocess, so ru_maxrss is its own peak.

    .venv/bin/python bench/fit_scaling.py [--sizes 50 100 200 400] [--vanilla-max 200] [--configs NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time

import _common

from mhpc.config import PRESETS

CONFIGS = {
    "VANILLA baseline (GREEDY 10%)": dict(algorithm="VANILLA", aggregation="GREEDY", feature_reduction="NONE",
                                          distance="EUCLIDEAN"),
    "ONLINE proposed (KMEANS 1%+PCA+MAHALANOBIS)": dict(algorithm="ONLINE", aggregation="KMEANS",
                                                        feature_reduction="PCA", distance="MAHALANOBIS"),
    "ONLINE+GREEDY 10%": dict(algorithm="ONLINE", aggregation="GREEDY", feature_reduction="NONE", distance="EUCLIDEAN"),
    # the recommended preset (a 5% k-means bank) against the same with the 10% greedy coreset (its runner-up)
    "preset best (KMEANS 5%)": dict(PRESETS["best"]),
    "best-greedy (GREEDY 10%)": {**PRESETS["best"], "aggregation": "GREEDY"},
}


def child(n: int, name: str) -> None:
    import torch

    from mhpc.core.mh_patch_core import MHPatchCore

    torch.set_num_threads(2)
    model = MHPatchCore(backbone="mobilenet_v2", progress=False, **CONFIGS[name])
    t0 = time.perf_counter()
    model.fit(_common.texture_loader(n, batch_size=8))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": _common.peak_rss_mb(),
                      "bank": list(model.memory_bank_.shape)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[50, 100, 200, 400])
    ap.add_argument("--vanilla-max", type=int, default=400, help="skip VANILLA above this N (its coreset is O(N^2))")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    print(_common.machine_line())
    print("| config | N | fit s | s per image | peak RSS MB | bank |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        for n in args.sizes:
            if name.startswith("VANILLA") and n > args.vanilla_max:
                continue
            r = _common.run_child(__file__, ["--child", str(n), name])
            print(f"| {name} | {n} | {r['seconds']:.1f} | {r['seconds'] / n:.3f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['bank'][0]} x {r['bank'][1]} |", flush=True)


if __name__ == "__main__":
    main()
