"""Exported engines against torch predict, side by side in one run (interleaved, medians).

For each backbone and configuration: fit on synthetic textures, export ONNX with both feature heads
(pooling gathers, folded per-layer convolutions) and OpenVINO IR, then time img/s at batch 1 and 8
of torch ``predict_images``, onnxruntime (gather head, conv head) and OpenVINO, all on 2 threads,
on the same uint8 pixels. Prints a Markdown table and the exported file sizes.

    .venv/bin/python bench/deploy.py [--n-train 40] [--backbones mobilenet_v2 wideresnet50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sets HF_HUB_OFFLINE)
import numpy as np
import torch
from torchvision.transforms import v2 as T

from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mhpc.deploy import DeployedModel
from mhpc.deploy.export import choose_head

CONFIGS = {
    "baseline": dict(algorithm="VANILLA", aggregation="GREEDY", feature_reduction="NONE", distance="EUCLIDEAN",
                     coreset_percentage=0.1),
    "proposed": dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS"),
}
THREADS = 2


def file_mb(path: Path) -> float:
    """The exported file with its companion: FILE.data (ONNX external data) or the IR's .bin."""
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return sum(f.stat().st_size for f in (path, extra) if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "wideresnet50"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    norm = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    print(_common.machine_line(), f"; engines on {THREADS} threads")
    header = ("| backbone | config | bank | batch | torch img/s | ORT gather img/s | ORT conv img/s | OpenVINO img/s |"
              " ORT best / torch | OpenVINO / torch | auto head | ONNX MB | IR MB |")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            pretrained = backbone == "mobilenet_v2"  # no other ImageNet weights offline; timing is unaffected
            for name in args.configs:
                model = MHPatchCore(backbone=backbone, pretrained=pretrained, progress=False, **CONFIGS[name])
                model.fit(_common.texture_loader(args.n_train))
                base = Path(tmp) / f"{backbone}-{name}"
                files = {
                    "gather": model.export(base.with_suffix(".gather.onnx"), head="gather"),
                    "conv": model.export(base.with_suffix(".conv.onnx"), head="conv"),
                }
                auto = choose_head(model)
                files["openvino"] = model.export(base.with_suffix(".xml"), format="openvino", head=auto)
                # no spinning: an idle onnxruntime pool would otherwise steal the CPU from the interleaved torch runs
                engines = {k: DeployedModel(v, threads=THREADS, spin=False) for k, v in files.items()}
                for batch in args.batches:
                    images = next(iter(_common.texture_loader(batch, batch_size=batch, seed=1)))
                    u8 = np.stack([denormalize(img) for img in images])
                    x = norm(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())
                    fns = {"torch": lambda: model.predict_images(x)}
                    fns.update({k: (lambda e=e: e.predict(u8)) for k, e in engines.items()})
                    t = _common.interleaved(fns, repeats=args.repeats)
                    ips = {k: batch / v for k, v in t.items()}
                    best = max(ips["gather"], ips["conv"])
                    rows.append(
                        f"| {backbone} | {name} | {tuple(model.memory_bank_.shape)} | {batch} | {ips['torch']:.2f} | "
                        f"{ips['gather']:.2f} | {ips['conv']:.2f} | {ips['openvino']:.2f} | "
                        f"{best / ips['torch']:.2f} | {ips['openvino'] / ips['torch']:.2f} | {auto} | "
                        f"{file_mb(files[auto]):.1f} | {file_mb(files['openvino']):.1f} |"
                    )
                    print(rows[-1], flush=True)
                del engines
    print()
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
