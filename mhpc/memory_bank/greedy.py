"""PatchCore's approximate greedy coreset (Roth et al. 2022, Sec. 3.2; official sampler).

The official ``ApproximateGreedyCoresetSampler``: project with a random bias-free linear map to
128 dimensions, start from 10 random points, set every patch's distance to the mean of its
distances to the start points, then repeatedly pick the farthest patch and update each patch's
distance with a minimum. Memory is O(N): one distance vector, never an N x N matrix.
Squared norms are computed once instead of per step, which gives the same selection.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from mhpc.errors import MHPCError
from mhpc.fit.state import BankState
from mhpc.memory_bank.base import MemoryBankStrategy
from mhpc.row_buffer import RowBuffer


def _distances_to(features: torch.Tensor, sq_norms: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [N, len(points)], as the official ``_compute_batchwise_differences``."""
    sq = sq_norms[:, None] - 2.0 * (features @ points.T) + (points * points).sum(1)[None, :]
    return sq.clamp_(min=0).sqrt_()


def greedy_coreset_indices(
    features: torch.Tensor,
    num_samples: int,
    num_start_points: int = 10,
    generator: np.random.Generator | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Indices picked by the approximate greedy coreset on already-projected ``features``."""
    n = features.shape[0]
    num_samples = min(int(num_samples), n)
    rng = generator if generator is not None else np.random.default_rng(0)
    start = rng.choice(n, min(num_start_points, n), replace=False)
    sq_norms = (features * features).sum(1)
    # The official initialisation: mean Euclidean distance to the start points.
    min_sq = _distances_to(features, sq_norms, features[start]).mean(dim=1).square_()
    # From here on squared distances are tracked: sqrt is monotone, so the minimum and the argmax
    # are the same as the official loop's, and each step is one BLAS matrix-vector product.
    new_sq = torch.empty_like(min_sq)
    chosen = np.empty(num_samples, dtype=np.int64)
    for step in tqdm(range(num_samples), desc="Greedy coreset", disable=not progress, leave=False):
        idx = int(torch.argmax(min_sq))
        chosen[step] = idx
        torch.addmv(sq_norms, features, features[idx], alpha=-2.0, out=new_sq)
        new_sq.add_(sq_norms[idx]).clamp_(min=0)
        torch.minimum(min_sq, new_sq, out=min_sq)
    return chosen


class ApproximateGreedyCoreset(MemoryBankStrategy):
    """Keeps ``percentage`` of the patches by approximate greedy coreset selection.

    Merge-and-reduce with one level (VANILLA's in-memory shard is one chunk). Patches are buffered into chunks of
    ``chunk_size`` rows, each chunk is reduced by the same greedy selection to ``percentage`` of
    its rows, and the reduced chunks are merged (concatenated) into the bank. This is a composable
    coreset: memory is the bank plus one chunk, whatever the dataset size, and the bank has the same
    size as the batch version's.
    """

    kind = "GREEDY"

    def __init__(
        self,
        percentage: float = 0.1,
        projection_dim: int = 128,
        num_start_points: int = 10,
        chunk_size: int = 50_000,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> None:
        if not 0.0 < percentage <= 1.0:
            raise MHPCError(f"coreset_percentage must be in (0, 1], got {percentage}")
        self.percentage = percentage
        self.projection_dim = projection_dim
        self.num_start_points = num_start_points
        self.chunk_size = chunk_size
        self.seed = seed
        self.device = torch.device(device)
        self.progress = progress

    def _projection(self, dim: int) -> torch.Tensor | None:
        if dim <= self.projection_dim:
            return None  # the official sampler skips the projection in this case too
        if not hasattr(self, "projection_"):
            # Same distribution as torch.nn.Linear's default init (kaiming uniform, a=sqrt(5)).
            gen = torch.Generator().manual_seed(self.seed)
            bound = 1.0 / math.sqrt(dim)
            self.projection_ = (torch.rand(dim, self.projection_dim, generator=gen) * 2 - 1) * bound
        return self.projection_.to(self.device)

    def select(self, features: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Keeps ``percentage`` of the rows."""
        return self.reduce_to(features, max(1, int(features.shape[0] * self.percentage)), rng)

    def partial_fit(self, features: torch.Tensor) -> "ApproximateGreedyCoreset":
        if not hasattr(self, "_buffer"):
            self._buffer = RowBuffer(self.chunk_size // 2)
            self._rng = np.random.default_rng(self.seed)
            self._reduced: list[torch.Tensor] = []
        for chunk in self._buffer.push(features.float()):
            self._reduced.append(self.select(chunk, self._rng).cpu())
        return self

    def resume(self, state: BankState) -> "ApproximateGreedyCoreset":
        """Merge-and-reduce continues: new chunks are reduced by the same selection and appended."""
        self.partial_fit(state.rows[:0])
        self._reduced.append(state.rows.float().cpu())
        return self

    def reduce_to(self, features: torch.Tensor, rows: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The greedy selection of ``rows`` rows (also: merged shard coresets reduced once more)."""
        if rows >= features.shape[0]:
            return features
        rng = rng if rng is not None else np.random.default_rng(self.seed)
        with torch.no_grad():
            work = features.to(self.device, torch.float32)
            proj = self._projection(work.shape[1])
            if proj is not None:
                work = work @ proj
            idx = greedy_coreset_indices(work, rows, self.num_start_points, rng, self.progress)
        return features[torch.from_numpy(idx).to(features.device)]

    def state(self) -> BankState:
        """The reduced chunks so far (the last, partial chunk reduced too)."""
        if not hasattr(self, "_buffer"):
            raise MHPCError("the greedy coreset received no patches")
        rest = self._buffer.flush()
        if rest is not None and rest.shape[0]:
            self._reduced.append(self.select(rest, self._rng).cpu())
        bank = torch.cat(self._reduced).float()
        del self._buffer, self._reduced, self._rng
        return BankState(self.kind, bank)

    def finalize(self, state: BankState, n_patches: int) -> BankState:
        """Merged shard coresets reduced once more to the size one coreset of all ``n_patches`` has (a
        no-op for one shard: its chunks were each reduced to ``percentage`` already)."""
        state.rows = self.reduce_to(state.rows, max(1, int(n_patches * self.percentage)))
        return state
