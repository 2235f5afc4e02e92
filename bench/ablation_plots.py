"""One PNG per axis for ABLATION.md, from the results.json of ``mhpc ablation`` runs.

Axis plots (the 24 combinations): for each axis, the paired differences of one level against the
reference level with every other axis held fixed, per category and seed (a box per level).
Sweep plots: mean ± std over categories of each swept parameter value.

    PYTHONPATH=. python bench/ablation_plots.py --configs mhpc/configs/combinations.yaml \
        --results runs/combinations/results.json --out docs/ablation
    PYTHONPATH=. python bench/ablation_plots.py --sweep mhpc/configs/sweep.yaml \
        --results runs/sweep/results.json --out docs/ablation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mhpc.ablation import COLUMNS, TIE, markdown_table, paired_comparison, paired_table, summarise  # noqa: E402
from mhpc.config import config_name, load_config_list  # noqa: E402
from mhpc.outputs import safe_name  # noqa: E402

AXES = {"algorithm": ("VANILLA", ["ONLINE"]), "feature_reduction": ("NONE", ["PCA"]),
        "aggregation": ("GREEDY", ["KMEANS", "NONE"]), "distance": ("EUCLIDEAN", ["MAHALANOBIS"])}
METRICS = (("image_auroc", "image AUROC"), ("pixel_aupro", "AUPRO"))


def axis_plots(configs: str, results: list[dict], out: Path) -> dict:
    cfgs = {safe_name(config_name(c)): c for c in load_config_list(configs)}
    by_key = {(tuple(cfgs[r["config"]][a] for a in AXES), r["category"], r.get("seed")): r for r in results
              if r["config"] in cfgs}
    summary = {}
    for axis, (ref, levels) in AXES.items():
        i = list(AXES).index(axis)
        fig, axs = plt.subplots(1, 2, figsize=(9, 3.6))
        for (metric, label), ax in zip(METRICS, axs):
            boxes = []
            for level in levels:
                diffs = []
                for (axes_vals, cat, seed), r in by_key.items():
                    if axes_vals[i] != level:
                        continue
                    other = by_key.get((axes_vals[:i] + (ref,) + axes_vals[i + 1:], cat, seed))
                    if other is not None:
                        diffs.append(float(r[metric]) - float(other[metric]))
                boxes.append(diffs or [np.nan])
                if not diffs:
                    continue
                summary[f"{axis}:{level}-{ref}:{metric}"] = dict(
                    mean=float(np.mean(diffs)), wins=int(np.sum(np.array(diffs) > TIE)),
                    losses=int(np.sum(np.array(diffs) < -TIE)), n=len(diffs))
            ax.boxplot(boxes, tick_labels=[f"{lv} − {ref}" for lv in levels])
            ax.axhline(0, color="grey", lw=0.8)
            ax.set(ylabel=f"Δ {label}", title=f"{axis}: {label}")
        fig.tight_layout()
        fig.savefig(out / f"axis_{axis}.png", dpi=100)
        plt.close(fig)
    return summary


def sweep_plots(sweep: str, results: list[dict], out: Path) -> None:
    """Entries named ``<param>=<value>`` or ``<param>=<series> <value>`` are grouped by parameter; others skipped."""
    groups: dict[str, list[str]] = {}
    for c in load_config_list(sweep):
        if "=" not in str(c["name"]):  # a reference entry (paper, best), not a swept value
            continue
        param = str(c["name"]).split("=")[0].split(" ")[0]
        groups.setdefault(param, []).append(safe_name(str(c["name"])))  # results name runs by folder
    for param, names in groups.items():
        # "<param>=<series>_<value>" (crop=paper_none) draws one line per series; "<param>=<value>" one line.
        parts = [n.split("=", 1)[-1].split("_", 1) if n.split("=", 1)[-1].count("_") == 1 else ["", n.split("=", 1)[-1]]
                 for n in names]
        values = list(dict.fromkeys(v for _, v in parts))
        fig, axs = plt.subplots(1, 2, figsize=(9, 3.6))
        for (metric, label), ax in zip(METRICS, axs):
            for series in dict.fromkeys(s for s, _ in parts):
                xs, means, stds = [], [], []
                for name, (s, v) in zip(names, parts):
                    if s != series:
                        continue
                    rows = [r for r in results if r["config"] == name]
                    seeds = sorted({r.get("seed") for r in rows}, key=str)
                    per_seed = [np.mean([float(r[metric]) for r in rows if r.get("seed") == sd]) for sd in seeds]
                    xs.append(values.index(v))
                    means.append(np.mean(per_seed) if per_seed else np.nan)
                    stds.append(np.std(per_seed, ddof=1) if len(per_seed) > 1 else 0.0)
                ax.errorbar(xs, means, yerr=stds, fmt="-o", capsize=3, label=series or None)
            ax.set_xticks(range(len(values)), values, rotation=20, fontsize=8)
            ax.set(ylabel=f"mean {label} (± std over seeds)", title=f"{param}: {label}")
            if any(s for s, _ in parts):
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{Path(sweep).stem}_{param}.png", dpi=100)  # sweep_*.png, sweep2_*.png
        plt.close(fig)


def collect(run_root: Path) -> list[dict]:
    """The rows of every finished run under an ``mhpc ablation`` output folder (also a partial one)."""
    rows = []
    for f in sorted(run_root.glob("*/seed*/*/metrics.json")):
        m = json.loads(f.read_text())
        rows.append({c: m.get(c) for c in COLUMNS} | {"config": f.parts[-4], "seed": int(f.parts[-3][4:])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", help="the 24-combination study file")
    ap.add_argument("--sweep", nargs="+", default=[], help="sweep study files (entries named param=value); "
                    "plots are named after the file: sweep_<param>.png")
    ap.add_argument("--results", nargs="+", default=[], help="results.json files of mhpc ablation")
    ap.add_argument("--collect", nargs="+", default=[], help="ablation output folders, read run by run (partial ok)")
    ap.add_argument("--reference", help="with --collect: write table.md (mean ± std, paired against this config)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [r for f in args.results for r in json.loads(Path(f).read_text())]
    order = [safe_name(config_name(c)) for f in [args.configs, *args.sweep] if f for c in load_config_list(f)]
    for folder in args.collect:
        rows = sorted(collect(Path(folder)), key=lambda r: (order.index(r["config"]) if r["config"] in order else
                                                            len(order), r["seed"]))
        results += rows
        if args.reference:
            table = markdown_table(summarise(rows)) + "\n\n" + paired_table(paired_comparison(rows, args.reference),
                                                                               args.reference)
            (out / f"{Path(folder).name}.md").write_text(table + "\n")
            (out / f"{Path(folder).name}.json").write_text(json.dumps(rows, indent=1))
    if args.configs:
        summary = axis_plots(args.configs, results, out)
        (out / "axes.json").write_text(json.dumps(summary, indent=2))
        for k, v in summary.items():
            print(f"{k}: mean {v['mean']:+.4f}, wins {v['wins']}/{v['n']}, losses {v['losses']}")
    for sweep in args.sweep:  # each sweep's plots from its own folder's runs (names repeat across sweeps)
        folder = [f for f in args.collect if Path(f).name == Path(sweep).stem]
        sweep_plots(sweep, collect(Path(folder[0])) if folder else results, out)


if __name__ == "__main__":
    main()
