"""The decision threshold: a quantile of held-out good images' scores, with what it means for them."""

from __future__ import annotations

from typing import Any

import numpy as np

from mhpc.errors import MHPCError
from mhpc.validation import warn


def check_quantile(quantile: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise MHPCError(f"quantile must be in (0, 1], got {quantile}")


def threshold_from_scores(scores: Any, quantile: float) -> tuple[float, dict[str, Any]]:
    """(threshold, stats) from image scores of held-out good images; few images warn, none is an error."""
    check_quantile(quantile)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0 or not np.isfinite(scores).all():
        raise MHPCError(f"calibration needs finite scores of at least one image, got {scores.size} score(s)")
    if scores.size < 10:
        warn(f"the threshold comes from only {scores.size} held-out image(s); with fewer than 10 it is one "
             "image's score or close to it, so good images will be flagged. Hold out more good images "
             "(mhpc fit/update --holdout F; at least 10 are held out once the set has 30).")
    threshold = float(np.quantile(scores, quantile))
    # The held-out images' own false-positive rate: below quantile 1 at least the highest one is flagged.
    flagged = int((scores >= threshold).sum())
    return threshold, {
        "quantile": quantile, "count": int(scores.size), "mean": float(scores.mean()),
        "std": float(scores.std()), "max": float(scores.max()), "threshold": threshold,
        "holdout_flagged": flagged, "holdout_fpr": flagged / scores.size,
    }
