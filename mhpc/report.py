"""Self-contained HTML reports: metrics table, ROC and PRO curves, score histogram, and image galleries.

Figures are matplotlib PNGs embedded as base64 data URIs, so one file opens offline. Every number is
printed with three significant digits (``sig3``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mhpc.data.transforms import denormalize  # noqa: E402
from mhpc.metrics import image_roc_curve, pro_curve  # noqa: E402

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}.fig{display:inline-block;margin:0 1em 1em 0}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px;font-size:12px;width:460px}
.card img{width:224px;height:224px;image-rendering:pixelated}.note{color:#555;font-size:13px;max-width:900px}
dt{font-weight:bold;margin-top:.5em}dd{margin-left:1.5em}"""


def sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept and no exponent for ordinary sizes:
    1 -> 1.00, 0.8 -> 0.800, 0.9066 -> 0.907, 1233.9 -> 1230."""
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0.00"
    v = round(v, 2 - math.floor(math.log10(abs(v))))
    if abs(v) < 1e-4:
        return f"{v:.2e}"
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}"


def _caption(label: int) -> str:
    return "Defect" if int(label) == 1 else "Good"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img_uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """Heat map (jet) blended over the image; the same vmin/vmax for every image of a run."""
    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = (plt.get_cmap("jet")(norm)[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * image_rgb.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def mask_rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat((np.asarray(mask) > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)


def metrics_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
                v = int(v)  # a count (a bank size averaged over equal ones) stays exact
            cells.append(f"<td>{sig3(v)}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _curves(labels, scores, masks, maps) -> str:
    fpr, tpr = image_roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Image ROC")
    roc = _png(fig)
    pfpr, pro = pro_curve(masks, maps)
    keep = pfpr <= 0.3
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(pfpr[keep], pro[keep])
    ax.set(xlabel="false-positive rate (pixels)", ylabel="per-region overlap", title="PRO curve (FPR <= 0.3)",
           xlim=(0, 0.3), ylim=(0, 1))
    prof = _png(fig)
    return f'<div class="fig"><img src="{roc}" alt="ROC curve"></div><div class="fig"><img src="{prof}" alt="PRO curve"></div>'


def _histogram(labels, scores, threshold: float | None, threshold_label: str) -> str:
    """Image scores of good and defect test images, one histogram each on shared bins, and the threshold."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, scores.size // 2)))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for value, name, colour in ((0, "Good", "tab:green"), (1, "Defect", "tab:red")):
        chosen = scores[labels == value]
        if chosen.size:
            ax.hist(chosen, bins=bins, alpha=0.55, color=colour, label=f"{name} ({chosen.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {sig3(threshold)} {threshold_label}")
    ax.set(xlabel="image score", ylabel="test images", title="Image scores: good against defect")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    return f'<div class="fig"><img src="{_png(fig)}" alt="histogram of good and defect image scores"></div>'


def _colour_bar(vmin: float, vmax: float) -> str:
    """The heat maps' one colour scale (jet, vmin .. vmax) as a horizontal bar with ticks."""
    fig, ax = plt.subplots(figsize=(6, 0.55))
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(vmin, vmax), cmap="jet"), cax=ax,
                 orientation="horizontal")
    ticks = np.linspace(vmin, vmax, 5)
    ax.set_xticks(ticks, [sig3(t) for t in ticks])
    ax.set_xlabel("anomaly map value (one scale for every heat map below)")
    return f'<div><img src="{_png(fig)}" alt="colour bar of the heat maps"></div>'


def _gallery(title: str, indices, labels, scores, masks, maps, images, paths, vmin, vmax) -> str:
    cards = []
    for i in indices:
        rgb = denormalize(images[i] if isinstance(images[i], torch.Tensor) else torch.as_tensor(images[i]))
        cards.append(
            f'<div class="card"><img src="{_img_uri(overlay(rgb, maps[i], vmin, vmax))}" alt="overlay">'
            f'<img src="{_img_uri(mask_rgb(masks[i]))}" alt="ground truth"><br>'
            f"{html.escape(Path(paths[i]).parent.name)}/{html.escape(Path(paths[i]).name)} "
            f"&middot; <b>{_caption(labels[i])}</b> &middot; score {sig3(scores[i])}</div>"
        )
    if not cards:
        return f"<h3>{html.escape(title)}</h3><p class='note'>none</p>"
    return f"<h3>{html.escape(title)}</h3><div class='gallery'>{''.join(cards)}</div>"


def split_galleries(labels, scores, per_group: int = 4) -> tuple[list[int], list[int], list[int]]:
    """(best defects: scored highest, worst defects: scored lowest, good images scored highest). The two
    defect galleries never share an image: with fewer than 2 x per_group defects they split them."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    defects = [int(i) for i in order if labels[i] == 1]
    good = [int(i) for i in order if labels[i] == 0]
    n_best = min(per_group, (len(defects) + 1) // 2)
    best = defects[:n_best]
    worst = defects[n_best:][::-1][:per_group]
    return best, worst, good[:per_group]


def write_run_report(path: str | Path, metrics: dict[str, Any], labels, scores, masks, maps, images, paths,
                     per_group: int = 4, threshold: float | None = None, threshold_label: str | None = None) -> Path:
    """One run's report. ``threshold`` is drawn on the score histogram; by default the run's F1-optimal
    threshold (``metrics["f1_threshold"]``), which is chosen on the test scores themselves."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if threshold is None and metrics.get("f1_threshold") is not None:
        threshold = float(metrics["f1_threshold"])
        threshold_label = "(F1-optimal, chosen on these test scores)"
    best, worst, good = split_galleries(labels, scores, per_group)
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    cols = ["config", "category", "image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "fit_seconds",
            "predict_ms_per_image", "peak_rss_mb", "memory_bank_size"]
    gallery = (labels, scores, masks, maps, images, paths, vmin, vmax)
    body = [
        f"<h1>mhpc run: {html.escape(str(metrics.get('config')))} on {html.escape(str(metrics.get('category')))}</h1>",
        metrics_table([metrics], cols),
        "<h2>Scores</h2>", _histogram(labels, scores, threshold, threshold_label or ""),
        "<h2>Curves</h2>", _curves(labels, scores, masks, maps),
        "<h2>Gallery</h2><p class='note'>Left: heat map over the image; right: the ground-truth defect mask "
        "(white). Every heat map uses the colour scale below.</p>", _colour_bar(vmin, vmax),
        _gallery("Best: the defects scored highest", best, *gallery),
        _gallery("Worst: the defects scored lowest", worst, *gallery),
        _gallery("Worst: the good images scored highest", good, *gallery),
    ]
    return _write(path, f"mhpc report: {metrics.get('config')} on {metrics.get('category')}", body)


def write_summary_report(path: str | Path, rows: list[dict[str, Any]], columns: Sequence[str], links: dict[str, str],
                         title: str = "mhpc ablation", configs: dict[str, str] | None = None) -> Path:
    """The index page: ``title``, what each configuration is (``configs``: name -> description), the table
    (means over categories and seeds) and a link to every run's report."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if configs:
        items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>" for name, text in configs.items())
        body.append(f"<h2>Configurations</h2><dl>{items}</dl>")
    body.append("<h2>Results</h2><p class='note'>Image AUROC, pixel AUROC, pixel AUPRO (up to 30% pixel "
                "false-positive rate) and F1-max on the test images; times in seconds and milliseconds; peak RSS "
                "in MB. Rows named mean average the categories.</p>")
    body.append(metrics_table(rows, columns))
    if links:
        items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(name)}</a></li>' for name, href in links.items())
        body.append(f"<h2>Runs</h2><ul>{items}</ul>")
    return _write(path, title, body)


def _write(path: str | Path, title: str, body: list[str]) -> Path:
    path = Path(path)
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
