"""What each preset costs, side by side in one run: fit seconds, predict ms per image, bank size and bytes.

MobileNetV2 (ImageNet weights), 224 x 224 brick crops generated on the fly; the presets are fitted in
alternating order (A B A B ...) and the medians reported, so the ratios hold on a noisy machine.

    .venv/bin/python bench/preset_cost.py [--n-train 60] [--n-test 32] [--repeats 2] [--presets paper best]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common
import torch

from mhpc.core.mh_patch_core import MHPatchCore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["paper", "best"])
    args = ap.parse_args()
    print(_common.machine_line())
    train = _common.texture_loader(args.n_train, batch_size=8, seed=0)
    test = [b for b in _common.texture_loader(args.n_test, batch_size=8, seed=1)]
    fit_s: dict[str, list[float]] = {p: [] for p in args.presets}
    pred_ms: dict[str, list[float]] = {p: [] for p in args.presets}
    banks: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):
        for preset in args.presets:
            model = MHPatchCore.from_preset(preset, backbone="mobilenet_v2", progress=False)
            start = time.perf_counter()
            model.fit(train)
            fit_s[preset].append(time.perf_counter() - start)
            model.predict_images(test[0])  # warm-up
            start = time.perf_counter()
            for batch in test:
                model.predict_images(batch)
            pred_ms[preset].append(1000 * (time.perf_counter() - start) / args.n_test)
            banks[preset] = tuple(model.memory_bank_.shape)
    ref = args.presets[0]
    print(f"{args.n_train} training images, {args.n_test} test images in batches of 8, medians of {args.repeats}")
    print("| preset | fit s | fit / " + ref + " | predict ms/image | predict / " + ref + " | bank | bank MB |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        f, p = statistics.median(fit_s[preset]), statistics.median(pred_ms[preset])
        f0, p0 = statistics.median(fit_s[ref]), statistics.median(pred_ms[ref])
        rows, dim = banks[preset]
        print(f"| {preset} | {f:.1f} | {f / f0:.2f} | {p:.1f} | {p / p0:.2f} | {rows} × {dim} | {rows * dim * 4 / 2**20:.1f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
