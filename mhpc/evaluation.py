"""Fit, predict and score one configuration on one MVTec-layout category; runs of many configs."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mhpc.config import RUN_KEYS, config_name
from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.data.datasets import MVTecDataset, make_loader
from mhpc.data.transforms import make_preprocessing
from mhpc.outputs import atomic_write_csv, atomic_write_text, output_names, save_npy, with_suffix_added, writing
from mhpc.errors import MHPCError
from mhpc.metrics import aupro, f1_max, image_auroc, pixel_auroc

METRIC_KEYS = ["image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "fit_seconds", "predict_ms_per_image",
               "peak_rss_mb", "memory_bank_size"]


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_model(cfg: dict[str, Any], device: str = "cpu", progress: bool = True, crop: int = 224) -> MHPatchCore:
    params = {k: v for k, v in cfg.items() if k not in RUN_KEYS}
    params["input_shape"] = tuple(params.get("input_shape", (crop, crop)))
    params.setdefault("device", device)
    params.setdefault("progress", progress)
    return MHPatchCore(**params)


def evaluate_category(cfg: dict[str, Any], data_root: str | Path, category: str, out_dir: str | Path,
                      device: str = "cpu", batch_size: int = 8, progress: bool = True, report: bool = True,
                      crop: str = "center") -> dict:
    """Writes metrics.json, scores.csv, maps/<defect>/<file>.npy, gt/... (and report.html) into ``out_dir``.

    The model's parameters and every train and test image and mask are checked before the fit.
    ``crop="center"`` is the MVTec protocol (resize 256, centre crop 224); ``"none"`` the whole image.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, device, progress)
    model._validate()
    pre = make_preprocessing(tuple(model.input_shape), crop)
    train_ds = MVTecDataset(data_root, category, "train", preprocessing=pre)
    test_ds = MVTecDataset(data_root, category, "test", preprocessing=pre)
    train_ds.validate()
    test_ds.preprocessing["bit_depth"] = train_ds.preprocessing["bit_depth"]  # the depth the model learnt
    test_ds.validate()
    train = make_loader(train_ds, batch_size)
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
    # Map names mirror the test image's path (good/000.png -> maps/good/000.png.npy): never two on one file.
    rel_names = [with_suffix_added(n, ".npy") for n in output_names([s.image for s in test_ds.samples])]
    for rel, amap, gt in zip(rel_names, maps, masks):
        for folder, array in (("maps", amap), ("gt", gt)):
            with writing((out / folder / rel).parent):
                (out / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            save_npy(out / folder / rel, array.astype(np.float32))
    atomic_write_csv(out / "scores.csv", ["image_path", "label", "score", "map_path", "gt_path"],
                     [[str(s.image), int(label), repr(float(score)), str(Path("maps") / rel), str(Path("gt") / rel)]
                      for s, label, score, rel in zip(test_ds.samples, labels, scores, rel_names)])
    if report:
        from mhpc.report import write_run_report

        images = [test_ds[i]["image"] for i in range(len(test_ds))]
        write_run_report(out / "report.html", metrics, labels, scores, masks, maps, images,
                         [str(s.image) for s in test_ds.samples])
    # Last: a run folder with metrics.json is complete (ablation --resume relies on it).
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def evaluate_in_subprocess(cfg: dict[str, Any], data_root, category: str, out_dir, device: str = "cpu",
                           batch_size: int = 8, progress: bool = True, report: bool = True,
                           crop: str = "center") -> dict:
    """One run in a fresh Python process, so that its peak RSS is its own and not the max of all runs.
    The run's warnings come back in the result's ``warnings`` list."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(cfg=cfg, data_root=str(data_root), category=category, out_dir=str(out), device=device,
                batch_size=batch_size, progress=progress, report=report, crop=crop)
    (out / "run.json").write_text(json.dumps(spec, indent=2))
    proc = subprocess.run([sys.executable, "-m", "mhpc.evaluation", str(out / "run.json")], stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise MHPCError(f"run {config_name(cfg)} on {category} failed: {lines[-1] if lines else proc.returncode}")
    warned = [line[len("warning: "):] for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    return json.loads((out / "metrics.json").read_text()) | {"warnings": warned}


def _main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if "input_shape" in spec["cfg"]:
        spec["cfg"]["input_shape"] = tuple(spec["cfg"]["input_shape"])
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        evaluate_category(**spec)
    except MHPCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
