"""The hold-out split of good images that `mhpc fit` and `mhpc update` set the threshold on.

Imports no torch at module level: the command line reads ``MIN_HOLDOUT`` for its ``--help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mhpc.errors import MHPCError

MIN_HOLDOUT = 10  # held-out images for the threshold once the set has MIN_HOLDOUT_SET or more
MIN_HOLDOUT_SET = 30


def check_holdout(holdout: float, quantile: float) -> None:
    """``--holdout`` in [0, 1) and ``--threshold-quantile`` in (0, 1], as one-line errors."""
    if not 0.0 <= holdout < 1.0:
        raise MHPCError(f"--holdout must be in [0, 1), got {holdout}")
    if not 0.0 < quantile <= 1.0:
        raise MHPCError(f"--threshold-quantile must be in (0, 1], got {quantile}")


def holdout_split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(indices to fit on, held-out indices) of ``n`` images. Every k-th image is held out (deterministic,
    spread over the folder): the ``holdout`` fraction, at least one image, and at least MIN_HOLDOUT once
    the set has MIN_HOLDOUT_SET or more (a 0.99 quantile of 4 scores is one image's score)."""
    import torch

    n_hold = max(1, round(holdout * n)) if holdout > 0 else 0
    if n_hold and n >= MIN_HOLDOUT_SET:
        n_hold = max(n_hold, MIN_HOLDOUT)
    if n - n_hold < 1:
        raise MHPCError(f"need more training images: {n} found, {n_hold} held out for the threshold")
    hold_idx = sorted(set(torch.linspace(0, n - 1, n_hold).round().long().tolist())) if n_hold else []
    held = set(hold_idx)
    return [i for i in range(n) if i not in held], hold_idx


def good_images(folder: str | Path | None, data: str | Path | None, category: str | None,
                preprocessing: dict[str, Any], holdout: float) -> tuple[Any, list[int], list[int]]:
    """(validated dataset, indices to fit on, held-out indices) from a plain ``folder`` of good images or
    an MVTec-layout ``data`` root and ``category`` (its train split)."""
    from mhpc.data.datasets import FolderDataset, MVTecDataset

    if folder:
        full = FolderDataset(folder, preprocessing=preprocessing)
    elif data and category:
        full = MVTecDataset(data, category, "train", preprocessing=preprocessing)
    else:
        raise MHPCError("give --data ROOT --category C (MVTec layout) or --folder DIR_OF_GOOD_IMAGES")
    full.validate()
    fit_idx, hold_idx = holdout_split(len(full), holdout)
    return full, fit_idx, hold_idx
