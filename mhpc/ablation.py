"""Ablation studies: every configuration on every category and seed, one table with mean ± std.

A study is configs x seeds x categories, each run in its own process. With several seeds, every
cell of the table is the mean ± std over seeds, and each config's ``mean`` row is the mean over
categories computed per seed, then the mean ± std of those per-seed means. ``data_root`` may
contain ``{seed}`` so that each seed also draws its own benchmark (``mhpc generate --seed``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from mhpc.config import config_name, describe_config, load_config_list, load_seeds, normalise_config
from mhpc.errors import MHPCError
from mhpc.evaluation import build_model, evaluate_in_subprocess
from mhpc.outputs import atomic_write_csv, atomic_write_text, safe_name

COLUMNS = ["config", "category", "image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "fit_seconds",
           "predict_ms_per_image", "peak_rss_mb", "memory_bank_size", "memory_bank_dim"]
_MEANED = COLUMNS[2:]
PAIRED_METRICS = ("image_auroc", "pixel_aupro")
TIE = 1e-9  # a paired difference this small is a tie
STUDY_FILES = ("table.md", "table.csv", "results.json", "report.html")  # a run folder must not take these names


def discover_categories(data_root: str | Path) -> list[str]:
    root = Path(data_root)
    if not root.is_dir():
        raise MHPCError(f"data folder not found: {root}")
    cats = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    if not cats:
        raise MHPCError(f"no category folders with a train/ subfolder in {root}")
    return cats


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per row; a metric with a nonzero ``<metric>_std`` prints as ``mean ± std``."""
    def cell(r: dict[str, Any], c: str) -> str:
        std = r.get(f"{c}_std")
        return f"{_fmt(r.get(c, ''))} ± {_fmt(std)}" if std else _fmt(r.get(c, ""))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: one row per category (mean ± std over seeds), then the ``mean`` row over categories."""
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == name]
        categories = list(dict.fromkeys(r["category"] for r in group))
        seeds = list(dict.fromkeys(r.get("seed") for r in group))
        for category in categories:
            cell = [r for r in group if r["category"] == category]
            row: dict[str, Any] = {"config": name, "category": category}
            for k in _MEANED:
                row[k], row[f"{k}_std"] = (cell[0][k], 0.0) if len(cell) == 1 else _mean_std([float(r[k]) for r in cell])
            out.append(row)
        if len(categories) > 1:
            row = {"config": name, "category": "mean"}
            for k in _MEANED:
                per_seed = [np.mean([float(r[k]) for r in group if r.get("seed") == s]) for s in seeds]
                row[k], row[f"{k}_std"] = _mean_std(per_seed)
            out.append(row)
    return out


def paired_comparison(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Every config against ``reference`` on the same (category, seed): wins/ties/losses and mean difference."""
    ref = {(r["category"], r.get("seed")): r for r in rows if r["config"] == reference}
    if not ref:
        raise MHPCError(f"reference configuration {reference!r} is not in the study")
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        if name == reference:
            continue
        pairs = [(r, ref[(r["category"], r.get("seed"))]) for r in rows
                 if r["config"] == name and (r["category"], r.get("seed")) in ref]
        row: dict[str, Any] = {"config": name, "pairs": len(pairs)}
        for m in PAIRED_METRICS:
            diffs = np.array([float(a[m]) - float(b[m]) for a, b in pairs])
            # Metrics computed two ways can differ by float rounding (1e-16) on identical rankings: a tie.
            row[f"{m}_wins"], row[f"{m}_losses"] = int((diffs > TIE).sum()), int((diffs < -TIE).sum())
            row[f"{m}_ties"] = int((np.abs(diffs) <= TIE).sum())
            row[f"{m}_diff"] = float(diffs.mean()) if diffs.size else 0.0
        out.append(row)
    return out


def paired_table(pairs: list[dict[str, Any]], reference: str) -> str:
    head = ["config", "pairs"] + [f"{m} W/T/L" for m in PAIRED_METRICS] + [f"mean Δ {m}" for m in PAIRED_METRICS]
    lines = [f"Paired against `{reference}` (same category and seed; W = higher than the reference):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in pairs:
        cells = [r["config"], str(r["pairs"])]
        cells += [f"{r[f'{m}_wins']}/{r[f'{m}_ties']}/{r[f'{m}_losses']}" for m in PAIRED_METRICS]
        cells += [f"{r[f'{m}_diff']:+.4f}" for m in PAIRED_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_names(configs: str | Path | list[dict], reference: str | None = None) -> list[str]:
    """Each entry's run folder name (one safe path component), checked before any run starts: unique, none
    of the study's own files (``table.md``...), and ``reference`` one of them."""
    cfgs = load_config_list(configs) if isinstance(configs, (str, Path)) else [normalise_config(c) for c in configs]
    # A run's folder name is one safe path component: a config named ../../x stays inside out_dir.
    names = [safe_name(config_name(c)) for c in cfgs]
    if len(set(names)) != len(names):
        raise MHPCError(f"configuration names must be unique (after making them safe folder names), got {names}")
    for name in names:
        if name.lower() in STUDY_FILES:
            raise MHPCError(f"configuration name {name!r} is the name of one of the study's own files "
                            f"({', '.join(STUDY_FILES)}); rename the entry")
    if reference is not None and reference not in names:
        raise MHPCError(f"--reference {reference!r} is not a configuration of the study: choose one of {names}")
    return names


def _spec_key(spec: dict[str, Any]) -> str:
    """A run's specification without its name: equal keys give equal results."""
    return json.dumps({**spec, "cfg": {**spec["cfg"], "name": None}}, sort_keys=True, default=str)


def _remove_unfinished(run_dir: Path, out: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:  # the config/seed folders it leaves empty
        if parent == out or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def _copy_run(source: Path, run_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """``source``'s finished run as ``run_dir`` (under this entry's name), placed whole by one rename."""
    tmp = run_dir.with_name(run_dir.name + ".copying")
    for stale in (tmp, run_dir):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(source, tmp)
    metrics = json.loads((tmp / "metrics.json").read_text()) | {"config": config_name(spec["cfg"])}
    run = json.loads((tmp / "run.json").read_text()) | {"cfg": spec["cfg"], "out_dir": str(run_dir),
                                                        "copied_from": str(source)}
    (tmp / "run.json").write_text(json.dumps(run, indent=2))
    atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2))
    tmp.rename(run_dir)
    return metrics | {"warnings": []}


INPUTS_FILE = "inputs.json"  # a finished run's input fingerprint (``--resume`` compares it)
UNIT_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "f1_max")  # each in [0, 1]
COUNT_METRICS = ("memory_bank_size", "memory_bank_dim")  # positive integers


class ResumeError(MHPCError):
    """A finished run that ``--resume`` cannot reuse and must not silently replace (bad metrics.json)."""


def input_fingerprint(cfg: dict[str, Any], data_root: str | Path, category: str) -> list[list]:
    """[relative path, size, mtime_ns] of every file a run may read: everything under the category's
    folder (images, masks) and the backbone weights file when the config names one. Replacing an image
    at the same path changes its size or modification time."""
    root = Path(data_root)
    files = [f for f in (root / category).rglob("*") if f.is_file()]
    if cfg.get("weights_path") and Path(cfg["weights_path"]).is_file():
        files.append(Path(cfg["weights_path"]))
    rows = []
    for f in sorted(set(files)):
        st = f.stat()
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)
        rows.append([rel, st.st_size, st.st_mtime_ns])
    return rows


def _fingerprint_change(old: Any, new: list[list]) -> str | None:
    """Why ``old`` (a stored fingerprint) differs from ``new``, in a few words; None when equal."""
    if not isinstance(old, list):
        return f"it has no readable {INPUTS_FILE} (it ran before inputs were fingerprinted)"
    before = {r[0]: r[1:] for r in old if isinstance(r, list) and len(r) == 3}
    after = {r[0]: r[1:] for r in new}
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            return f"{path} was removed"
        if path not in before:
            return f"{path} was added"
        if list(before[path]) != list(after[path]):
            return f"{path} changed (size or modification time)"
    return None


def check_metrics(metrics: Any, file: Path) -> dict[str, Any]:
    """A finished run's metrics as read back from disk: every table column a finite number in range,
    or a one-line error naming the file."""
    import math

    if not isinstance(metrics, dict):
        raise ResumeError(f"{file} is not a JSON object of metrics; delete its run folder to rerun it")
    for key in COLUMNS[2:]:
        value = metrics.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if key in UNIT_METRICS:
            ok, want = ok and 0.0 <= value <= 1.0, "a number in [0, 1]"
        elif key in COUNT_METRICS:
            ok, want = ok and float(value).is_integer() and value >= 1, "a positive integer"
        else:
            ok, want = ok and value >= 0, "a finite number >= 0"
        if not ok:
            raise ResumeError(f"{file}: {key} is {value!r}, not {want}; delete its run folder to rerun it")
    return metrics


def _cached(run_dir: Path, spec: dict[str, Any], fingerprint: list[list]) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None) of an earlier run with exactly this specification (its name aside) and these inputs;
    (None, why) when it must be rerun; (None, None) when there is no finished run to reuse."""
    try:
        old = json.loads((run_dir / "run.json").read_text())
        text = (run_dir / "metrics.json").read_text()
    except (OSError, json.JSONDecodeError):
        return None, None
    old.setdefault("crop", "center")  # runs from before crop was a study setting were centre-cropped
    if not isinstance(old, dict) or not isinstance(old.get("cfg"), dict):
        return None, None
    if _spec_key({k: old.get(k) for k in spec}) != _spec_key(spec):
        return None, None
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResumeError(f"{run_dir / 'metrics.json'} is not valid JSON ({exc}); delete its run folder to rerun "
                          "it") from None
    check_metrics(metrics, run_dir / "metrics.json")
    try:
        stored = json.loads((run_dir / INPUTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        stored = None
    why = _fingerprint_change(stored, fingerprint)
    return (None, why) if why else (metrics, None)


def run_ablation(data_root: str | Path, categories: list[str] | None, configs: str | Path | list[dict],
                 out_dir: str | Path, device: str = "cpu", batch_size: int = 8, progress: bool = True,
                 overrides: dict[str, Any] | None = None, seeds: list[int] | None = None,
                 reference: str | None = None, report: bool = True, resume: bool = False,
                 base: dict[str, Any] | None = None, crop: str = "center", title: str | None = None) -> str:
    """Writes ``table.md``, ``table.csv``, ``results.json`` (one row per run), ``report.html`` and one
    folder per run. ``seeds``: run every config once per seed (default: the config file's ``seeds``,
    else once with each config's own seed). ``base``: parameters under every config (a preset);
    ``overrides``: parameters over every config. ``resume``: reuse runs already done with the same spec.
    ``crop``: "center" (the MVTec protocol) or "none" (the whole image); a config's own ``crop`` wins.
    ``title``: the index page's heading (default: what was run on what).
    """
    from mhpc.report import write_summary_report

    if isinstance(configs, (str, Path)):
        cfgs = load_config_list(configs)
        seeds = seeds or load_seeds(configs)
    else:
        cfgs = [normalise_config(c) for c in configs]
    names = study_names(cfgs, reference)
    if categories:
        for category in categories:
            if safe_name(category) != category:
                raise MHPCError(f"category {category!r} is not a plain folder name")
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    runs = []
    described: dict[str, str] = {}
    for seed in seed_list:
        root = str(data_root).format(seed=seed) if seed is not None and "{seed}" in str(data_root) else str(data_root)
        cats = categories or discover_categories(root)
        for category in cats:  # before any run: a typo must not fail the study hours in
            if not (Path(root) / category / "train").is_dir():
                raise MHPCError(f"category {category!r} not found: no folder {Path(root) / category / 'train'}")
        for cfg, name in zip(cfgs, names):
            cfg = {**(base or {}), **cfg, **(overrides or {})}
            if seed is not None:
                cfg["seed"] = seed
            build_model(cfg)._validate()  # every parameter checked before the first run starts
            run_crop = cfg.pop("crop", crop)
            described.setdefault(name, f"{describe_config(cfg, name)}; {'whole image' if run_crop == 'none' else 'centre crop'}")
            runs += [(seed, root, cfg, name, category, run_crop) for category in cats]
    out = Path(out_dir)
    # Every earlier run is judged before any new one starts: a bad metrics.json stops the study at once,
    # and a run whose inputs changed since it ran (same path, new file) is rerun, saying why.
    plan, fingerprints = [], {}
    for seed, root, cfg, name, category, run_crop in runs:
        rel = f"{name}/seed{seed}/{category}" if seed is not None else f"{name}/{category}"
        spec = {"cfg": cfg, "data_root": root, "category": category, "crop": run_crop}
        fp_key = (root, category, cfg.get("weights_path"))
        if fp_key not in fingerprints:
            fingerprints[fp_key] = input_fingerprint(cfg, root, category)
        cached, why = _cached(out / rel, spec, fingerprints[fp_key]) if resume else (None, None)
        plan.append((seed, name, rel, spec, fingerprints[fp_key], cached, why))
    out.mkdir(parents=True, exist_ok=True)
    rows, links, done = [], {}, {}
    # One overall bar (runs done of all, with ETA); the runs themselves draw none.
    bar = tqdm(plan, desc="ablation runs", unit="run", disable=not progress)
    for seed, name, rel, spec, fingerprint, metrics, why in bar:
        cfg, root, category, run_crop = spec["cfg"], spec["data_root"], spec["category"], spec["crop"]
        bar.set_postfix_str(rel)
        run_dir = out / rel
        key = _spec_key(spec)
        if why:
            tqdm.write(f"warning ({rel}): rerunning it: {why}", file=sys.stderr)
            shutil.rmtree(run_dir)  # an mhpc run folder (--resume keeps only those): no stale maps stay
        twin = done.get(key)
        if metrics is None and twin is not None:
            # Two entries with one specification (a sweep's default value under two names) run once.
            metrics = _copy_run(twin, run_dir, spec)
        if metrics is None:
            try:
                metrics = evaluate_in_subprocess(cfg, root, category, run_dir, device, batch_size, False, report,
                                                 run_crop)
                # The inputs as they were before the run: a file replaced during it makes --resume rerun it.
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / INPUTS_FILE, json.dumps(fingerprint))
            except BaseException:  # the unfinished run goes; the finished ones stay for --resume
                _remove_unfinished(run_dir, out)
                raise
        done.setdefault(key, run_dir)
        for message in metrics.get("warnings", []):
            tqdm.write(f"warning ({rel}): {message}", file=sys.stderr)
        # the run's own config, seed and category label its row (never what a metrics file says they were)
        rows.append({c: metrics.get(c) for c in COLUMNS} | {"config": name, "seed": seed, "category": category})
        links[rel] = f"{rel}/report.html"
    bar.close()
    table_rows = summarise(rows)
    table = markdown_table(table_rows)
    if reference:
        table += "\n\n" + paired_table(paired_comparison(rows, reference), reference)
    atomic_write_text(out / "table.md", table + "\n")
    fields = COLUMNS + [f"{k}_std" for k in _MEANED]
    atomic_write_csv(out / "table.csv", fields, [[r.get(c, "") for c in fields] for r in table_rows])
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    cats_run = list(dict.fromkeys(r["category"] for r in rows))
    title = title or f"mhpc ablation: {len(cfgs)} configurations on {', '.join(cats_run)}"
    write_summary_report(out / "report.html", table_rows, COLUMNS, links if report else {}, title, described)
    return table


def run_study(data_root: str | Path, categories: list[str] | None, configs: str | Path | list[dict],
              out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
              reference: str | None = None, seeds: list[int] | None = None, **options: Any) -> str:
    """``run_ablation`` into ``out_dir`` as `mhpc ablation` runs it: names and ``reference`` are checked
    before anything is cleared; ``out_dir`` must not lie inside a benchmark; ``resume`` keeps the earlier
    runs of this (mhpc-written) folder, ``overwrite`` starts afresh; a failed or interrupted study keeps
    its finished runs (hours of work) and says that ``--resume`` continues it."""
    from mhpc.outputs import MARKER, output_folder, refuse_inputs_inside

    study_names(configs, reference)  # names and --reference checked before --overwrite clears anything
    all_seeds = seeds or (load_seeds(configs) if isinstance(configs, (str, Path)) else None) or []
    root = str(data_root)
    roots = {root.format(seed=s) for s in all_seeds} if "{seed}" in root and all_seeds else {root}
    refuse_inputs_inside(out_dir, sorted(roots), "benchmark")
    out = Path(out_dir)
    keep = tuple(p.name for p in out.iterdir() if p.name != MARKER) if resume and out.is_dir() else ()
    opened = False
    try:
        with output_folder(out_dir, overwrite or resume, keep=keep, keep_written=True) as folder:
            opened = True
            return run_ablation(data_root, categories, configs, folder, seeds=seeds, reference=reference,
                                resume=resume, **options)
    except MHPCError as exc:
        if opened and not isinstance(exc, ResumeError) and any(out.glob("**/metrics.json")):
            raise MHPCError(f"{exc} (finished runs are kept in {out}: rerun with --resume to continue)") from None
        raise


DEMO_PRESETS = ("paper", "proposed", "best")


def run_demo(data: str | Path, out_dir: str | Path, categories: list[str], n_train: int = 60,
             n_test_good: int = 15, n_test_per_defect: int = 5, progress: bool = True,
             announce: Callable[[str], None] = print) -> str:
    """`mhpc demo`: the synthetic benchmark in ``data`` (generated when absent), the three presets with
    MobileNetV2 on each category, the table and the report in ``out_dir``. Returns the table."""
    from mhpc.data.synthetic import generate_benchmark
    from mhpc.outputs import output_folder
    from mhpc.weights import ensure_mobilenet_v2_weights

    data = Path(data)
    if not (data / "meta.json").is_file():
        announce(f"generating the synthetic texture benchmark in {data} ...")
        generate_benchmark(data, tuple(categories), n_train, n_test_good, n_test_per_defect)
    ensure_mobilenet_v2_weights(quiet=True)
    configs = [dict(name=name, preset=name, backbone="mobilenet_v2") for name in DEMO_PRESETS]
    # The demo replaces its own earlier output (only a folder mhpc wrote; anything else is refused).
    with output_folder(out_dir, overwrite=True) as out:
        title = (f"mhpc demo: the {', '.join(DEMO_PRESETS[:-1])} and {DEMO_PRESETS[-1]} presets on "
                 f"{', '.join(categories)} (synthetic textures)")
        return run_ablation(data, list(categories), configs, out, progress=progress, title=title)
