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

    With ``exact=True`` every emitted chunk has exactly ``min_rows`` rows, so the chunks depend only on
    the order of the rows, not on how they were batched: a matrix pushed at once and the same rows
    streamed batch by batch give the same chunks (the k-means bank relies on this).
    """

    def __init__(self, min_rows: int, exact: bool = False) -> None:
        self.min_rows = max(1, int(min_rows))
        self.exact = exact
        self._parts: list[torch.Tensor] = []
        self._rows = 0
        self.emitted_rows = 0

    def push(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        self._parts.append(rows)
        self._rows += rows.shape[0]
        if self._rows >= 2 * self.min_rows:
            # exact mode reads its chunks without changing them: a matrix pushed at once (VANILLA's patches)
            # is cut into views, not copied whole
            data = self._parts[0] if self.exact and len(self._parts) == 1 else torch.cat(self._parts)
            cut = data.shape[0] - self.min_rows
            if self.exact:
                cut -= cut % self.min_rows
            self._parts, self._rows = [data[cut:].clone()], data.shape[0] - cut
            self.emitted_rows += cut
            step = self.min_rows if self.exact else cut
            for start in range(0, cut, step):
                yield data[start : start + step]

    def flush(self) -> torch.Tensor | None:
        if not self._parts:
            return None
        data = torch.cat(self._parts)
        self._parts, self._rows = [], 0
        self.emitted_rows += data.shape[0]
        return data
