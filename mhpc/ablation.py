"""Ablation studies: every configuration on every category, one table with a mean row per config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mhpc.config import config_name, load_config_list, normalise_config
from mhpc.errors import MHPCError
from mhpc.evaluation import build_model, evaluate_in_subprocess
from mhpc.outputs import atomic_write_csv, atomic_write_text, safe_name

COLUMNS = ["config", "category", "image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds",
           "predict_ms_per_image", "peak_rss_mb", "memory_bank_size"]
_MEANED = COLUMNS[2:]


def discover_categories(data_root: str | Path) -> list[str]:
    root = Path(data_root)
    if not root.is_dir():
        raise MHPCError(f"data folder not found: {root}")
    cats = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    if not cats:
        raise MHPCError(f"no category folders with a train/ subfolder in {root}")
    return cats


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def with_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by config, each group followed by its mean over categories."""
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == name]
        out += group
        if len(group) > 1:
            out.append({"config": name, "category": "mean",
                        **{k: sum(float(r[k]) for r in group) / len(group) for k in _MEANED}})
    return out


def run_ablation(data_root: str | Path, categories: list[str] | None, configs: str | Path | list[dict],
                 out_dir: str | Path, device: str = "cpu", batch_size: int = 8, progress: bool = True,
                 overrides: dict[str, Any] | None = None) -> str:
    """Writes ``table.md``, ``table.csv``, ``results.json``, ``report.html`` and one folder per run."""
    from mhpc.report import write_summary_report

    cfgs = load_config_list(configs) if isinstance(configs, (str, Path)) else [normalise_config(c) for c in configs]
    # A run's folder name is one safe path component: a config named ../../x stays inside out_dir.
    names = [safe_name(config_name(c)) for c in cfgs]
    if len(set(names)) != len(names):
        raise MHPCError(f"configuration names must be unique (after making them safe folder names), got {names}")
    categories = categories or discover_categories(data_root)
    for category in categories:
        if safe_name(category) != category:
            raise MHPCError(f"category {category!r} is not a plain folder name")
    for cfg in cfgs:  # every parameter checked before the first run starts
        build_model({**cfg, **(overrides or {})})._validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, links = [], {}
    runs = [(cfg, name, category) for cfg, name in zip(cfgs, names) for category in categories]
    # One overall bar (runs done of all, with ETA); the runs themselves draw none.
    bar = tqdm(runs, desc="ablation runs", unit="run", disable=not progress)
    for cfg, name, category in bar:
        bar.set_postfix_str(f"{name} on {category}")
        cfg = {**cfg, **(overrides or {})}
        metrics = evaluate_in_subprocess(cfg, data_root, category, out / name / category, device, batch_size,
                                         progress=False)
        for message in metrics.get("warnings", []):
            tqdm.write(f"warning ({name} on {category}): {message}", file=sys.stderr)
        rows.append({c: metrics[c] for c in COLUMNS} | {"config": name})
        links[f"{name} / {category}"] = f"{name}/{category}/report.html"
    bar.close()
    table_rows = with_means(rows)
    table = markdown_table(table_rows)
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_csv(out / "table.csv", COLUMNS, [[r.get(c, "") for c in COLUMNS] for r in table_rows])
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    write_summary_report(out / "report.html", table_rows, COLUMNS, links)
    return table
