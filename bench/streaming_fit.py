"""ONLINE + KMEANS + PCA + MAHALANOBIS fit time as a multiple of the backbone, old code against new.

MobileNetV2 (ImageNet weights from the local file), 224x224 crops of the brick texture generated on
the fly, batch 8. Every fit is a fresh subprocess (its own peak RSS); ``--old`` points at a checkout
of the previous code, run with ``PYTHONPATH`` set to it, so both run side by side on the same machine
in the same script. The stage breakdown wraps the same functions in both (statistics = covariance
updates and IncrementalPCA), plus the library's own timers (backbone, patch aggregation, and k-means:
the bank's chunks and its final reduce; in the old code the streamed ``MiniBatchKMeans.partial_fit``).
With ``--old`` the last lines put the k-means and fit seconds of the two side by side.
``backbone x`` = fit seconds per image / backbone forward seconds per image (one pass), measured in
the same fit.

    .venv/bin/python bench/streaming_fit.py --old /path/to/old/checkout [--sizes 50 200 400] [--update 20]
        [--algorithm VANILLA|ONLINE] [--aggregation GREEDY|KMEANS|NONE] [--repeat R]  (default: ONLINE KMEANS, 1)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import _common

CONFIG = dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS")


def _wrap(cls, name: str, stage: str, timer) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        with timer(stage):
            return original(*args, **kwargs)

    setattr(cls, name, timed)


def child(n: int, update: int, overrides: dict) -> None:
    import torch

    from mhpc.core import reduction
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.core.timing import StageTimer, stage_timer
    from mhpc.mahalanobis import covariance

    torch.set_num_threads(2)
    ours = StageTimer()  # separate from the library's own timer, so no stage is counted twice
    ours.enabled = stage_timer.enabled = True
    _wrap(covariance.OnlineCovariance, "update", "statistics", ours)
    _wrap(reduction.PCAReduction, "partial_fit", "statistics", ours)
    _wrap(reduction.PCAReduction, "finalize", "statistics", ours)
    _wrap(MHPatchCore, "_project", "projection", ours)
    model = MHPatchCore(backbone="mobilenet_v2", progress=False, **{**CONFIG, **overrides})
    t0 = time.perf_counter()
    model.fit(_common.texture_loader(n, batch_size=8))
    seconds = time.perf_counter() - t0
    passes = getattr(model, "n_passes_", 3)
    # k-means: the library's own timer around the bank's partial_fit, state and (new code) the final reduce,
    # the same stage name in the old code and the new.
    stages = {"backbone": stage_timer.seconds["backbone"], "patch aggregation": stage_timer.seconds["patch aggregation"],
              "k-means": stage_timer.seconds["k-means"], **ours.seconds}
    out = {"seconds": seconds, "peak_rss_mb": _common.peak_rss_mb(), "bank": list(model.memory_bank_.shape),
           "passes": passes, "backbone_per_image": stage_timer.seconds["backbone"] / (passes * n), "stages": stages}
    if update and hasattr(model, "update"):
        extra = _common.texture_loader(update, batch_size=8, seed=1)
        t0 = time.perf_counter()
        model.update(extra)
        out["update_seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="checkout of the previous code (run with PYTHONPATH set to it)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[50, 200, 400])
    ap.add_argument("--update", type=int, default=20, help="images added by update() after the new fit")
    ap.add_argument("--algorithm", choices=["VANILLA", "ONLINE"], default=CONFIG["algorithm"])
    ap.add_argument("--aggregation", choices=["GREEDY", "KMEANS", "NONE"], default=CONFIG["aggregation"])
    ap.add_argument("--repeat", type=int, default=1, help="fits per code and size, order alternating; the median")
    ap.add_argument("--child", nargs=2, type=int)
    args = ap.parse_args()
    overrides = {"algorithm": args.algorithm, "aggregation": args.aggregation}
    if args.child:
        child(*args.child, overrides)
        return
    here = str(Path(__file__).resolve().parents[1])
    codes = {"new": here} | ({"old": str(Path(args.old).resolve())} if args.old else {})
    print(_common.machine_line())
    print("| code | N | fit s | s per image | backbone x | passes | peak RSS MB | bank | stages (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for n in args.sizes:
        runs: dict[str, list[dict]] = {code: [] for code in codes}
        for rep in range(args.repeat):  # alternating order: the first child also warms the file cache
            for code in (list(codes) if rep % 2 == 0 else list(codes)[::-1]):
                env = dict(os.environ, PYTHONPATH=codes[code])
                runs[code].append(_common.run_child(
                    __file__, ["--child", str(n), str(args.update if code == "new" else 0), "--algorithm",
                               args.algorithm, "--aggregation", args.aggregation], env=env))
        for code in codes:
            r = sorted(runs[code], key=lambda run: run["seconds"])[(len(runs[code]) - 1) // 2]  # the median run
            results[(code, n)] = r
            ratio = r["seconds"] / n / r["backbone_per_image"]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            print(f"| {code} | {n} | {r['seconds']:.1f} | {r['seconds'] / n:.3f} | {ratio:.1f} | {r['passes']} | "
                  f"{r['peak_rss_mb']:.0f} | {r['bank'][0]} x {r['bank'][1]} | {stages} |", flush=True)
    for code in codes:
        sizes = [n for n in args.sizes if (code, n) in results]
        if len(sizes) > 1:
            lo, hi = results[(code, sizes[0])]["peak_rss_mb"], results[(code, sizes[-1])]["peak_rss_mb"]
            print(f"{code}: peak RSS {lo:.0f} -> {hi:.0f} MB from N={sizes[0]} to {sizes[-1]} ({hi / lo - 1:+.1%})")
    for n in args.sizes:
        if ("old", n) in results:
            new, old = results[("new", n)], results[("old", n)]
            if args.aggregation == "KMEANS":
                print(f"N={n}: k-means new {new['stages']['k-means']:.2f} s, old {old['stages']['k-means']:.2f} s "
                      f"(new/old {new['stages']['k-means'] / old['stages']['k-means']:.2f})")
            print(f"N={n}: fit new {new['seconds']:.1f} s, old {old['seconds']:.1f} s "
                  f"(new/old {new['seconds'] / old['seconds']:.2f})")
    for n in args.sizes:
        r = results[("new", n)]
        if "update_seconds" in r:
            per_image_fit = r["seconds"] / n
            print(f"new, N={n}: update with {args.update} images {r['update_seconds']:.1f} s; a full refit on "
                  f"{n + args.update} images at this run's fit rate ~{per_image_fit * (n + args.update):.1f} s "
                  f"(update = {r['update_seconds'] / (per_image_fit * (n + args.update)):.1%} of a refit)")


if __name__ == "__main__":
    main()
