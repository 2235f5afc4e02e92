"""Where the anomaly signal sits in the feature spectrum (ABLATION.md, "Variance spectrum").

Per benchmark and category: the patch features of the good training images (MobileNetV2, the
paper's pooled 1024-d embedding or anomalib's unpooled one, the study's 128x128 input), the eigen-spectrum of their covariance (shrunk as the
Whitener does by default), and the test scores of two Mahalanobis detectors restricted to the top-k
or the bottom-k principal components:
  gauss: distance of each patch to the Gaussian's mean (Rippel et al. 2020, one Gaussian);
  nn:    PatchCore's nearest-neighbour distance in whitened coordinates (our MAHALANOBIS + NONE).
Image score = max over patches, as everywhere in mhpc.

    PYTHONPATH=. python bench/spectrum.py --data STUDY/seed0 STUDY/seed1 STUDY/seed2 --embedding pooled \
        --out docs/ablation/spectrum
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mhpc.ablation import discover_categories  # noqa: E402
from mhpc.core.mh_patch_core import MHPatchCore  # noqa: E402
from mhpc.core.scoring import anomaly_maps  # noqa: E402
from mhpc.data.datasets import MVTecDataset, make_loader  # noqa: E402
from mhpc.metrics import image_auroc, pixel_auroc  # noqa: E402

KS = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
NN_KS = [16, 32, 128]  # those below the rank
SIZE = 128


def features(model: MHPatchCore, ds) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    feats, labels, masks = [], [], []
    for batch in make_loader(ds, 8):
        f, _ = model.feature_extractor_(batch["image"])
        feats.append(f)
        labels += batch["is_anomaly"].tolist()
        masks.append(batch["mask"][:, 0].numpy())
    return torch.cat(feats).double(), np.array(labels), np.concatenate(masks)


def scores(patch: torch.Tensor, grid: tuple[int, int], labels, masks) -> tuple[float, float]:
    """patch: [N, P] patch scores -> (image AUROC, pixel AUROC)."""
    maps = anomaly_maps(patch.float().reshape(-1, *grid), (SIZE, SIZE), 4.0)
    return image_auroc(labels, patch.max(1).values.numpy()), pixel_auroc(masks, maps)


def analyse(root: str, category: str, shrinkage: float, embedding: str) -> dict:
    model = MHPatchCore(backbone="mobilenet_v2", input_shape=(SIZE, SIZE), progress=False, patch_embedding=embedding)
    model._validate()
    model._build()
    # the study's preprocessing: resize 146, centre crop 128
    train, _, _ = features(model, MVTecDataset(root, category, "train", input_size=SIZE, crop="center"))
    test, labels, masks = features(model, MVTecDataset(root, category, "test", input_size=SIZE, crop="center"))
    n_img, p, d = test.shape
    grid = (int(round(p**0.5)),) * 2
    x = train.reshape(-1, d)
    mean = x.mean(0)
    cov = torch.cov(x.T)
    cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending: component 0 has the most variance
    raw = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0).clamp_min(0)
    ratio = (raw / raw.sum()).numpy()
    # The pooled embedding is a linear map of fewer unfolded dimensions (MobileNetV2: 32*9 -> 512 and
    # 96*9 -> 512 outputs, rank <= 288 + 512 = 800), so part of the spectrum is exactly zero; there a
    # test patch has only float rounding. Top-k and bottom-k are taken inside the numerical rank.
    rank = int((raw > raw[0] * 1e-9).sum())
    evals, evecs = evals[:rank], evecs[:, :rank]
    z_test = ((test.reshape(-1, d) - mean) @ evecs) / evals.sqrt()  # whitened coordinates
    sq = z_test**2
    top_cum, bottom_cum = sq.cumsum(1), sq.flip(1).cumsum(1)
    out = {"data": root, "category": category, "explained_variance_ratio": ratio.tolist(), "rank": rank,
           "components_for": {str(q): int(np.searchsorted(np.cumsum(ratio), q) + 1) for q in (0.9, 0.99, 0.999)},
           "gauss": {}, "nn": {}}
    for k in [k for k in KS if k < rank] + [rank]:
        for side, cum in (("top", top_cum), ("bottom", bottom_cum)):
            out["gauss"][f"{side}{k}"] = scores(cum[:, k - 1].sqrt().reshape(n_img, p), grid, labels, masks)
    z_train = ((x - mean) @ evecs) / evals.sqrt()
    for k in [k for k in NN_KS if k < rank]:
        for side, idx in (("top", slice(0, k)), ("bottom", slice(rank - k, rank))):
            bank, query = z_train[:, idx].float(), z_test[:, idx].float()
            nearest = torch.cat([torch.cdist(q, bank).min(1).values for q in query.split(4096)])
            out["nn"][f"{side}{k}"] = scores(nearest.reshape(n_img, p), grid, labels, masks)
    return out


def plot(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rank = min(r["rank"] for r in results)
    colours = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(r["category"] for r in results))}
    for i, r in enumerate(results):  # one colour and one legend entry per category, whatever the seeds
        first = all(q["category"] != r["category"] for q in results[:i])
        axes[0].semilogy(np.arange(1, len(r["explained_variance_ratio"]) + 1), r["explained_variance_ratio"],
                         color=colours[r["category"]], lw=0.8, label=r["category"] if first else None)
    axes[0].axvline(rank, color="k", lw=0.8, label=f"numerical rank {rank}")
    axes[0].set(xlabel="principal component", ylabel="explained variance ratio", title="Variance spectrum (train patches)")
    for q, style in (("0.9", ":"), ("0.99", "--"), ("0.999", "-.")):
        k = np.mean([r["components_for"][q] for r in results])
        axes[0].axvline(k, ls=style, color="grey", label=f"{float(q):.1%} variance: {k:.0f} comps (mean)")
    axes[0].legend(fontsize=7, ncol=2)
    ks = [k for k in KS if k < rank]
    for side, style in (("top", "-o"), ("bottom", "-s")):
        auc = [np.mean([r["gauss"][f"{side}{k}"][0] for r in results]) for k in ks]
        axes[1].semilogx(ks, auc, style, label=f"Gaussian Mahalanobis, {side}-k components")
    full = np.mean([r["gauss"][f"top{r['rank']}"][0] for r in results])
    axes[1].axhline(full, color="grey", ls="--", label=f"all {rank}+ non-null components")
    nn_ks = [k for k in NN_KS if k < rank]
    for side, marker in (("top", "^"), ("bottom", "v")):
        auc = [np.mean([r["nn"][f"{side}{k}"][0] for r in results]) for k in nn_ks]
        axes[1].semilogx(nn_ks, auc, marker, ms=9, ls="none", label=f"whitened nearest neighbour, {side}-k")
    axes[1].set(xlabel="k (components used, counted inside the rank)", ylabel="image AUROC (mean over categories)",
                title="Where the anomaly signal sits")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, nargs="+", help="one or more benchmark roots (e.g. one per seed)")
    ap.add_argument("--embedding", choices=["pooled", "unpooled"], default="pooled")
    ap.add_argument("--categories", nargs="+")
    ap.add_argument("--shrinkage", type=float, default=0.01)
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.json and PREFIX.png")
    ap.add_argument("--replot", action="store_true", help="redraw PREFIX.png from PREFIX.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        return
    torch.manual_seed(0)
    results = [analyse(root, c, args.shrinkage, args.embedding) for root in args.data
               for c in (args.categories or discover_categories(root))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results))
    plot(results, out.with_suffix(".png"))
    for r in results:
        print(r["data"], r["category"], r["rank"], r["components_for"], {k: round(v[0], 3) for k, v in r["gauss"].items()},
              {k: round(v[0], 3) for k, v in r["nn"].items()})


if __name__ == "__main__":
    main()
