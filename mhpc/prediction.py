"""What ``mhpc predict`` writes: ``scores.csv``, ``maps/<stem>.npy`` and ``overlays/<stem>.png``.

One writer serves the single-process loop and the Ray Data scorer (``mhpc.distributed``), so both
produce the same files. Rows are keyed by the image's index in the input list and written in that
order, whatever order the results arrive in.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from mhpc.report import overlay


def unique_stems(paths: list[str]) -> list[str]:
    """File stems, with ``_2``, ``_3`` ... appended to repeats so that no output overwrites another."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


class PredictionWriter:
    """Writes one image's map and overlay as it comes; ``close`` writes ``scores.csv`` in input order."""

    def __init__(self, out: str | Path, paths: list[str], threshold: float | None) -> None:
        self.out = Path(out)
        self.paths = list(paths)
        self.stems = unique_stems(self.paths)
        self.threshold = threshold
        self.rows: dict[int, list] = {}
        (self.out / "maps").mkdir(parents=True, exist_ok=True)
        (self.out / "overlays").mkdir(parents=True, exist_ok=True)

    def write(self, index: int, rgb: np.ndarray, score: float, amap: np.ndarray) -> None:
        """``rgb``: the model's input image as uint8 H x W x 3; ``amap``: its anomaly map."""
        stem = self.stems[index]
        np.save(self.out / "maps" / f"{stem}.npy", np.asarray(amap, dtype=np.float32))
        # Colour scale: 0 .. 2x threshold, so the threshold sits mid-scale on every image.
        vmax = 2 * self.threshold if self.threshold else float(amap.max())
        Image.fromarray(overlay(rgb, amap, 0.0, vmax)).save(self.out / "overlays" / f"{stem}.png")
        anomalous = "" if self.threshold is None else int(score >= self.threshold)
        self.rows[int(index)] = [self.paths[index], repr(float(score)), anomalous]

    def close(self) -> list[list]:
        """Writes ``scores.csv`` (one row per input image, input order) and returns its rows."""
        missing = len(self.paths) - len(self.rows)
        if missing:
            raise RuntimeError(f"{missing} of {len(self.paths)} images were not scored")
        rows = [self.rows[i] for i in range(len(self.paths))]
        with open(self.out / "scores.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_path", "score", "is_anomalous"])
            writer.writerows(rows)
        return rows
