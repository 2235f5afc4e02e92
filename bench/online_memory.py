"""Peak RSS of an ONLINE fit on N and 8*N images: it must not grow with the dataset size.

Each fit runs in a fresh subprocess so that ru_maxrss is its own peak. Images are random crops of
scikit-image's CC0 brick texture, generated on the fly, so the dataset itself holds no memory.

    .venv/bin/python bench/online_memory.py [--n 25] [--backbone mobilenet_v2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import _common

CONFIGS = {
    "proposed (ONLINE+KMEANS+PCA+MAHALANOBIS)": dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS"),
    "ONLINE+GREEDY (EUCLIDEAN)": dict(algorithm="ONLINE", aggregation="GREEDY", feature_reduction="NONE", distance="EUCLIDEAN"),
}


def child(n: int, config: str, backbone: str) -> None:
    import torch

    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.data.synthetic import TextureCropDataset

    torch.set_num_threads(2)
    loader = torch.utils.data.DataLoader(TextureCropDataset(n, size=224), batch_size=8)
    model = MHPatchCore(backbone=backbone, input_shape=(224, 224), progress=False, kmeans_clusters=1000,
                        coreset_chunk_size=20_000, **CONFIGS[config])
    start = time.perf_counter()
    model.fit(loader)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "seconds": seconds, "peak_rss_mb": peak_mb, "bank": list(model.memory_bank_.shape)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.backbone)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"| config | N | fit s | peak RSS MB | bank |\n|---|---|---|---|---|")
    for config in CONFIGS:
        rows = []
        for n in (args.n, 8 * args.n):
            rows.append(_common.run_child(__file__, ["--backbone", args.backbone, "--child", str(n), config], env))
            r = rows[-1]
            print(f"| {config} | {r['n']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['bank']} |", flush=True)
        ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        print(f"| {config} | peak RSS ratio 8N/N | | {ratio:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
