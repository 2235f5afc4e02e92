"""Accumulates rows so that streaming estimators always get batches of a minimum size."""

from __future__ import annotations

from typing import Iterator

import torch


class RowBuffer:
    """Yields chunks of at least ``min_rows`` rows and never drops rows.

    sklearn's ``IncrementalPCA.partial_fit`` needs at least ``n_components`` rows per call, and the
    k-means and greedy-coreset chunks are cut from it. The
    buffer holds at most ``2 * min_rows`` plus one incoming batch, so memory stays bounded.
    ``flush`` returns the remainder, which has ``>= min_rows`` rows whenever anything was emitted
    before (the buffer always keeps ``min_rows`` rows back for that).
    """

    def __init__(self, min_rows: int) -> None:
        self.min_rows = max(1, int(min_rows))
        self._parts: list[torch.Tensor] = []
        self._rows = 0
        self.emitted_rows = 0

    def push(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        self._parts.append(rows)
        self._rows += rows.shape[0]
        if self._rows >= 2 * self.min_rows:
            data = torch.cat(self._parts)
            cut = data.shape[0] - self.min_rows
            self._parts, self._rows = [data[cut:].clone()], self.min_rows
            self.emitted_rows += cut
            yield data[:cut]

    def flush(self) -> torch.Tensor | None:
        if not self._parts:
            return None
        data = torch.cat(self._parts)
        self._parts, self._rows = [], 0
        self.emitted_rows += data.shape[0]
        return data
