"""Inference speed against the physical floor, with a per-stage breakdown.

Floor = the backbone's own forward pass to the last used layer + the search written as one matrix
product of the same shape (queries x dims) @ (dims x bank) at torch.mm's speed. Both are timed in
the same run, interleaved with predict, and medians are reported.

    .venv/bin/python bench/inference.py [--n-train 200] [--backbones mobilenet_v2 wideresnet50]
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (sets HF_HUB_OFFLINE)
import torch

from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.core.timing import stage_timer

CONFIGS = {
    "baseline": dict(algorithm="VANILLA", aggregation="GREEDY", feature_reduction="NONE", distance="EUCLIDEAN",
                     coreset_percentage=0.1),
    "proposed": dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "wideresnet50"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(_common.machine_line())
    print("| backbone | config | batch | bank | predict img/s | floor img/s | predict/floor | backbone img/s |"
          " predict/backbone | breakdown (share of predict) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backbone in args.backbones:
        pretrained = backbone == "mobilenet_v2"  # no other ImageNet weights offline; timing is unaffected
        for name in args.configs:
            model = MHPatchCore(backbone=backbone, pretrained=pretrained, progress=False, **CONFIGS[name])
            model.fit(_common.texture_loader(args.n_train))
            bank = model.memory_bank_
            for batch in (1, 16):
                images = next(iter(_common.texture_loader(batch, batch_size=batch, seed=1)))
                with torch.no_grad():
                    feats = model.feature_extractor_(images)[0]
                queries = torch.randn(feats.shape[0] * feats.shape[1], bank.shape[1])
                bank_t = bank.T.contiguous()

                def floor():
                    with torch.no_grad():
                        model.feature_extractor_.body(images)
                    torch.mm(queries, bank_t)

                def backbone_only():
                    with torch.no_grad():
                        model.feature_extractor_.body(images)

                stage_timer.reset()
                stage_timer.enabled = True
                t = _common.interleaved({"predict": lambda: model.predict_images(images), "floor": floor,
                                         "backbone": backbone_only}, repeats=args.repeats)
                stage_timer.enabled = False
                total = sum(stage_timer.seconds.values())
                shares = ", ".join(f"{k} {v / total:.0%}" for k, v in stage_timer.seconds.items())
                print(f"| {backbone} | {name} | {batch} | {tuple(bank.shape)} | {batch / t['predict']:.2f} | "
                      f"{batch / t['floor']:.2f} | {t['predict'] / t['floor']:.2f} | {batch / t['backbone']:.2f} | "
                      f"{t['predict'] / t['backbone']:.2f} | {shares} |", flush=True)


if __name__ == "__main__":
    main()
