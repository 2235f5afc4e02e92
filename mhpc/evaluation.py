"""Fit, predict and score one configuration on one MVTec-layout category; runs of many configs."""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mhpc.config import config_name
from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.data.datasets import MVTecDataset, make_loader
from mhpc.errors import MHPCError
from mhpc.metrics import aupro, f1_max, image_auroc, pixel_auroc

METRIC_KEYS = ["image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "fit_seconds", "predict_ms_per_image",
               "peak_rss_mb", "memory_bank_size"]


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_model(cfg: dict[str, Any], device: str = "cpu", progress: bool = True, crop: int = 224) -> MHPatchCore:
    params = {k: v for k, v in cfg.items() if k != "name"}
    params["input_shape"] = tuple(params.get("input_shape", (crop, crop)))
    params.setdefault("device", device)
    params.setdefault("progress", progress)
    return MHPatchCore(**params)


def evaluate_category(cfg: dict[str, Any], data_root: str | Path, category: str, out_dir: str | Path,
                      device: str = "cpu", batch_size: int = 8, progress: bool = True, report: bool = True) -> dict:
    """Writes metrics.json, scores.csv, maps/*.npy, gt/*.npy (and report.html) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, device, progress)
    # PatchCore's resize-then-centre-crop, scaled to the model's input size (256 -> 224 at the default).
    crop = int(model.input_shape[0])
    resize = round(crop * 256 / 224)
    train = make_loader(MVTecDataset(data_root, category, "train", resize, crop), batch_size)
    test_ds = MVTecDataset(data_root, category, "test", resize, crop)
    test = make_loader(test_ds, batch_size)

    start = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps, labels, masks = model.predict(test)
    predict_ms = 1000.0 * (time.perf_counter() - start) / len(test_ds)

    f1, f1_threshold = f1_max(labels, scores)
    metrics = {
        "config": config_name(cfg),
        "category": category,
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_aupro": aupro(masks, maps),
        "f1_max": f1,
        "f1_threshold": f1_threshold,
        "fit_seconds": fit_seconds,
        "predict_ms_per_image": predict_ms,
        "peak_rss_mb": peak_rss_mb(),
        "memory_bank_size": int(model.memory_bank_.shape[0]),
        "memory_bank_dim": int(model.memory_bank_.shape[1]),
        "n_train": len(train.dataset),
        "n_test": len(test_ds),
        "model_config": model.get_config(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rel_names = []
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_path", "label", "score"])
        for sample, label, score in zip(test_ds.samples, labels, scores):
            writer.writerow([str(sample.image), int(label), repr(float(score))])
            rel = Path(sample.defect_type) / f"{sample.image.stem}.npy"
            rel_names.append(rel)
    for rel, amap, gt in zip(rel_names, maps, masks):
        for folder, array in (("maps", amap), ("gt", gt)):
            (out / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / folder / rel, array.astype(np.float32))
    if report:
        from mhpc.report import write_run_report

        images = [test_ds[i]["image"] for i in range(len(test_ds))]
        write_run_report(out / "report.html", metrics, labels, scores, masks, maps, images,
                         [str(s.image) for s in test_ds.samples])
    return metrics


def evaluate_in_subprocess(cfg: dict[str, Any], data_root, category: str, out_dir, device: str = "cpu",
                           batch_size: int = 8, progress: bool = True, report: bool = True) -> dict:
    """One run in a fresh Python process, so that its peak RSS is its own and not the max of all runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(cfg=cfg, data_root=str(data_root), category=category, out_dir=str(out), device=device,
                batch_size=batch_size, progress=progress, report=report)
    (out / "run.json").write_text(json.dumps(spec, indent=2))
    proc = subprocess.run([sys.executable, "-m", "mhpc.evaluation", str(out / "run.json")], stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise MHPCError(f"run {config_name(cfg)} on {category} failed: {lines[-1] if lines else proc.returncode}")
    return json.loads((out / "metrics.json").read_text())


def _main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if "input_shape" in spec["cfg"]:
        spec["cfg"]["input_shape"] = tuple(spec["cfg"]["input_shape"])
    try:
        evaluate_category(**spec)
    except MHPCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
