"""MiniBatchKMeans centroids as the memory bank."""

from __future__ import annotations

import numbers
import sys

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from mhpc.errors import MHPCError
from mhpc.memory_bank.base import MemoryBankStrategy
from mhpc.row_buffer import RowBuffer
from mhpc.validation import warn


def resolve_cluster_count(clusters: int | float, num_patches: int) -> int:
    """An int is a count; a float in (0, 1] is a fraction of the patches seen. Clipped to [1, N];
    a count above half the patches is warned about (k-means then runs long and compresses nothing)."""
    if isinstance(clusters, bool) or not isinstance(clusters, numbers.Real):
        raise MHPCError(f"kmeans_clusters must be an int count or a float fraction, got {clusters!r}")
    if not isinstance(clusters, numbers.Integral):
        if not 0.0 < float(clusters) <= 1.0:
            raise MHPCError(f"kmeans_clusters as a fraction must be in (0, 1], got {clusters}")
        count = int(round(float(clusters) * num_patches))
    else:
        if clusters < 1:
            raise MHPCError(f"kmeans_clusters must be >= 1, got {clusters}")
        count = int(clusters)
        if count > num_patches / 2:
            warn(f"kmeans_clusters={count} is more than half of the {num_patches} training patches; "
                 f"k-means will be slow and barely compress (using {min(count, num_patches)} clusters)")
    return max(1, min(count, num_patches))


class KMeansBank(MemoryBankStrategy):
    """VANILLA: ``MiniBatchKMeans.fit`` on all patches; ONLINE: ``partial_fit`` batch by batch.

    The streaming path must know the cluster count before the first batch, so a fractional count
    needs ``expected_patches`` (MHPatchCore passes it from the dataset length).
    """

    def __init__(
        self,
        clusters: int | float = 0.01,
        batch_size: int = 4096,
        seed: int = 0,
        expected_patches: int | None = None,
    ) -> None:
        self.clusters = clusters
        self.batch_size = batch_size
        self.seed = seed
        self.expected_patches = expected_patches

    def _model(self, n_clusters: int) -> MiniBatchKMeans:
        return MiniBatchKMeans(
            n_clusters=n_clusters, batch_size=self.batch_size, random_state=self.seed, n_init=1
        )

    def run(self, features: torch.Tensor) -> torch.Tensor:
        data = features.detach().cpu().float().numpy()
        k = resolve_cluster_count(self.clusters, data.shape[0])
        self.kmeans_ = self._model(k).fit(data)
        return torch.from_numpy(self.kmeans_.cluster_centers_.astype(np.float32))

    def partial_fit(self, features: torch.Tensor) -> "KMeansBank":
        if not hasattr(self, "_buffer"):
            if not isinstance(self.clusters, numbers.Integral) and self.expected_patches is None:
                raise MHPCError("a fractional kmeans_clusters needs the patch count; pass an int instead")
            # Without a patch count the int count is taken as it is (clipped to the patches in finalize).
            k = resolve_cluster_count(self.clusters, self.expected_patches or sys.maxsize)
            self.kmeans_ = self._model(k)
            # The first partial_fit initialises k centroids from its rows, so it needs >= k rows.
            self._buffer = RowBuffer(max(k, self.batch_size))
        for chunk in self._buffer.push(features.detach().cpu().float()):
            self.kmeans_.partial_fit(chunk.numpy())
        return self

    def finalize(self) -> torch.Tensor:
        if not hasattr(self, "_buffer"):
            raise MHPCError("k-means received no patches")
        rest = self._buffer.flush()
        if rest is not None:
            if not hasattr(self.kmeans_, "cluster_centers_") and rest.shape[0] < self.kmeans_.n_clusters:
                self.kmeans_.n_clusters = rest.shape[0]  # fewer patches than clusters: one per patch
            self.kmeans_.partial_fit(rest.numpy())
        del self._buffer
        return torch.from_numpy(self.kmeans_.cluster_centers_.astype(np.float32))
