"""Self-contained HTML reports: metrics table, ROC and PRO curves, and an image gallery.

Figures are matplotlib PNGs embedded as base64 data URIs, so one file opens offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

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
.card img{width:224px;height:224px;image-rendering:pixelated}"""


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
            cells.append(f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
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


def _gallery(title: str, indices, labels, scores, masks, maps, images, paths, vmin, vmax) -> str:
    cards = []
    for i in indices:
        rgb = denormalize(images[i] if isinstance(images[i], torch.Tensor) else torch.as_tensor(images[i]))
        cards.append(
            f'<div class="card"><img src="{_img_uri(overlay(rgb, maps[i], vmin, vmax))}" alt="overlay">'
            f'<img src="{_img_uri(mask_rgb(masks[i]))}" alt="ground truth"><br>'
            f"{html.escape(Path(paths[i]).parent.name)}/{html.escape(Path(paths[i]).name)} "
            f"&middot; label {int(labels[i])} &middot; score {scores[i]:.4g}</div>"
        )
    return f"<h3>{html.escape(title)}</h3><div class='gallery'>{''.join(cards)}</div>"


def write_run_report(path: str | Path, metrics: dict[str, Any], labels, scores, masks, maps, images, paths,
                     per_group: int = 4) -> Path:
    labels, scores = np.asarray(labels), np.asarray(scores)
    order = np.argsort(scores)
    anomalous = [i for i in order[::-1] if labels[i] == 1]
    normal = [i for i in order[::-1] if labels[i] == 0]
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    cols = ["config", "category", "image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "fit_seconds",
            "predict_ms_per_image", "peak_rss_mb", "memory_bank_size"]
    body = [
        f"<h1>mhpc run: {html.escape(str(metrics.get('config')))} on {html.escape(str(metrics.get('category')))}</h1>",
        metrics_table([metrics], cols),
        "<h2>Curves</h2>", _curves(labels, scores, masks, maps),
        "<h2>Gallery</h2><p>Left: heat map over the image (one colour scale for the whole run); right: ground truth.</p>",
        _gallery("Best: defects scored highest", anomalous[:per_group], labels, scores, masks, maps, images, paths, vmin, vmax),
        _gallery("Worst: defects scored lowest", anomalous[::-1][:per_group], labels, scores, masks, maps, images, paths, vmin, vmax),
        _gallery("Worst: good images scored highest", normal[:per_group], labels, scores, masks, maps, images, paths, vmin, vmax),
    ]
    return _write(path, f"mhpc report: {metrics.get('config')}", body)


def write_summary_report(path: str | Path, rows: list[dict[str, Any]], columns: Sequence[str], links: dict[str, str]) -> Path:
    items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(name)}</a></li>' for name, href in links.items())
    body = ["<h1>mhpc ablation</h1>", metrics_table(rows, columns), f"<h2>Runs</h2><ul>{items}</ul>"]
    return _write(path, "mhpc ablation", body)


def _write(path: str | Path, title: str, body: list[str]) -> Path:
    path = Path(path)
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
