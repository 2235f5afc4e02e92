"""Evaluation metrics: image/pixel AUROC, MVTec AD's AUPRO, and the F1-optimal threshold.

AUROC and the precision-recall curve come from scikit-learn. AUPRO follows the MVTec AD
evaluation code (Bergmann et al.): connected ground-truth components (8-connectivity, via
``scipy.ndimage.label``), per-region overlap against the false-positive rate over background
pixels, integrated up to FPR 0.3 and divided by 0.3. scikit-learn has no PRO curve, and anomalib's
would pull in its whole stack, hence this short implementation of the reference algorithm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from mhpc.errors import MHPCError


def _check_binary(labels: np.ndarray, what: str) -> None:
    if np.unique(labels).size < 2:
        raise MHPCError(f"{what} needs both normal and anomalous examples")


def image_auroc(labels, scores) -> float:
    labels = np.asarray(labels).astype(int).ravel()
    _check_binary(labels, "image AUROC")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def pixel_auroc(masks, maps) -> float:
    gt = (np.asarray(masks) > 0).ravel()
    _check_binary(gt, "pixel AUROC")
    return float(roc_auc_score(gt, np.asarray(maps, dtype=np.float64).ravel()))


def image_roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int).ravel(), np.asarray(scores).ravel())
    return fpr, tpr


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) over all thresholds, from the highest score down, starting at (0, 0)."""
    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise MHPCError(f"mask shape {masks.shape} does not match anomaly map shape {maps.shape}")
    structure = np.ones((3, 3), dtype=int)
    fp_change = np.zeros(masks.shape, dtype=np.float64)
    pro_change = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, gt in enumerate(masks):
        labeled, n = ndimage.label(gt, structure)
        n_regions += n
        fp_change[i][labeled == 0] = 1.0
        if n:
            sizes = np.bincount(labeled.ravel())
            region = labeled > 0
            pro_change[i][region] = 1.0 / sizes[labeled[region]]
    n_ok = fp_change.sum()
    if n_regions == 0 or n_ok == 0:
        raise MHPCError("AUPRO needs anomalous regions and background pixels in the ground truth")
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / n_ok
    pros = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)  # one point per distinct threshold
    fprs = np.concatenate([[0.0], np.clip(fprs[keep], None, 1.0)])
    pros = np.concatenate([[0.0], np.clip(pros[keep], None, 1.0)])
    return fprs, pros


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) on [0, x_max], interpolating y at x_max."""
    mask = x <= x_max
    area = float(np.trapezoid(y[mask], x[mask]))
    if x_max not in x[mask] and mask.sum() < len(x):
        i = int(mask.sum())  # first point beyond x_max
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    return area


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``; always in [0, 1]."""
    fprs, pros = pro_curve(masks, maps)
    return float(np.clip(_area_up_to(fprs, pros, fpr_limit) / fpr_limit, 0.0, 1.0))


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over thresholds and the threshold that reaches it (score >= threshold is anomalous)."""
    labels = np.asarray(labels).astype(int).ravel()
    _check_binary(labels, "F1")
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores).ravel())
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best])
