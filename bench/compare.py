"""Side by side on the same data and weights: mhpc, the official greedy loop, anomalib PatchCore
and anomalib PaDiM. Run with the bench extra installed (``pip install -e '.[bench]'``).

Same synthetic benchmark (MVTec layout), torchvision's MobileNetV2 ImageNet weights from the local
hub file, layers features.6 + features.13, coreset ratio 0.1, CPU, 2 threads. Each run is a fresh
subprocess, so peak RSS is its own; anomalib PatchCore runs with and without
MALLOC_MMAP_THRESHOLD_=131072.

    .venv-bench/bin/python bench/compare.py [--data demo_data] [--categories brick grass gravel]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _common

LAYERS = ["features.6", "features.13"]
RUNS = ["mhpc baseline", "mhpc + official greedy loop", "mhpc proposed", "mhpc MAHALANOBIS (VANILLA, NONE, PCA)",
        "anomalib PatchCore", "anomalib PatchCore (MALLOC_MMAP_THRESHOLD_)", "anomalib PaDiM"]


def _loaders(data: str, category: str):
    from mhpc.data.datasets import MVTecDataset, make_loader

    return (make_loader(MVTecDataset(data, category, "train"), 8), make_loader(MVTecDataset(data, category, "test"), 8))


def _metrics(labels, scores, masks, maps) -> dict:
    from mhpc.metrics import aupro, image_auroc, pixel_auroc

    return {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps),
            "pixel_aupro": aupro(masks, maps)}


def run_mhpc(data: str, category: str, run: str) -> dict:
    from mhpc.core.mh_patch_core import MHPatchCore

    cfg = dict(algorithm="VANILLA", aggregation="GREEDY", feature_reduction="NONE", distance="EUCLIDEAN")
    if run == "mhpc proposed":
        cfg = dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS")
    elif run.startswith("mhpc MAHALANOBIS"):
        cfg = dict(algorithm="VANILLA", aggregation="NONE", feature_reduction="PCA", distance="MAHALANOBIS")
    elif run == "mhpc + official greedy loop":
        import numpy as np
        import torch

        import mhpc.memory_bank.greedy as greedy
        from coreset import official_loop

        def official(features, num, num_start_points=10, generator=None, progress=False):
            start = generator.choice(features.shape[0], min(num_start_points, features.shape[0]), replace=False)
            return official_loop(features, num, start)

        greedy.greedy_coreset_indices = official
    train, test = _loaders(data, category)
    model = MHPatchCore(backbone="mobilenet_v2", embedding_layers=LAYERS, coreset_percentage=0.1, progress=False, **cfg)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps, labels, masks = model.predict(test)
    pred_s = time.perf_counter() - t0
    return {"fit_s": fit_s, "img_per_s": len(scores) / pred_s, "bank": model.memory_bank_.shape[0],
            **_metrics(labels, scores, masks, maps)}


def run_anomalib(data: str, category: str, run: str) -> dict:
    import numpy as np
    import torch
    import torchvision

    torchvision_backbone = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")  # the local hub file
    train, test = _loaders(data, category)
    if "PaDiM" in run:
        from anomalib.models.image.padim.torch_model import PadimModel

        model = PadimModel(backbone=torchvision_backbone, layers=LAYERS, pre_trained=False, n_features=100)
    else:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(layers=LAYERS, backbone=torchvision_backbone, pre_trained=False, num_neighbors=9)
    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for batch in train:
            model(batch["image"])
    if "PaDiM" in run:
        model.fit()
    else:
        model.subsample_embedding(0.1)
    fit_s = time.perf_counter() - t0
    model.eval()
    scores, maps, labels, masks = [], [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in test:
            out = model(batch["image"])
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map.reshape(len(batch["image"]), *out.anomaly_map.shape[-2:]).numpy())
            labels += batch["is_anomaly"].tolist()
            masks.append(batch["mask"][:, 0].numpy())
    pred_s = time.perf_counter() - t0
    bank = int(model.memory_bank.shape[0]) if "PaDiM" not in run else 0
    return {"fit_s": fit_s, "img_per_s": len(labels) / pred_s, "bank": bank,
            **_metrics(labels, np.concatenate(scores), np.concatenate(masks), np.concatenate(maps))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="demo_data")
    ap.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    ap.add_argument("--runs", nargs="+", default=RUNS)
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(2)
        data, category, run = args.child
        res = run_anomalib(data, category, run) if run.startswith("anomalib") else run_mhpc(data, category, run)
        res["peak_rss_mb"] = _common.peak_rss_mb()
        print(json.dumps(res))
        return
    if not (Path(args.data) / "meta.json").is_file():
        from mhpc.data.synthetic import generate_benchmark

        generate_benchmark(args.data)
    print(_common.machine_line())
    print("| category | implementation | fit s | predict img/s | peak RSS MB | bank | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|---|")
    for category in args.categories:
        for run in args.runs:
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            if "MALLOC_MMAP_THRESHOLD_" in run:
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            else:
                env.pop("MALLOC_MMAP_THRESHOLD_", None)
            try:
                r = _common.run_child(__file__, ["--child", str(Path(args.data).resolve()), category, run], env)
            except RuntimeError as exc:
                print(f"| {category} | {run} | {str(exc)[-160:]} |", flush=True)
                continue
            print(f"| {category} | {run} | {r['fit_s']:.1f} | {r['img_per_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['bank']} | "
                  f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pixel_aupro']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
