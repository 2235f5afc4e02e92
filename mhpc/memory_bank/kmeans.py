"""MiniBatchKMeans centroids as the memory bank."""

from __future__ import annotations

import numbers
import sys

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from tqdm.auto import tqdm

from mhpc.errors import MHPCError
from mhpc.fit_state import BankState
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


class _ProgressMiniBatchKMeans(MiniBatchKMeans):
    """``MiniBatchKMeans`` whose ``fit`` advances a tqdm bar once per mini-batch step. sklearn has no
    callback; the hook is its per-step convergence check, which runs unchanged, so the result is the
    same as the plain estimator's. Without the method (another sklearn) the bar just does not move."""

    def _mini_batch_convergence(self, step, n_steps, *args, **kwargs):
        bar = getattr(self, "_bar", None)
        if bar is not None:
            if bar.total != n_steps:  # the step count is known only once fit has initialised
                bar.reset(total=n_steps)
                bar.set_description("k-means steps (stops early once converged)")
            bar.update(1)
        return super()._mini_batch_convergence(step, n_steps, *args, **kwargs)


class KMeansBank(MemoryBankStrategy):
    """VANILLA: ``MiniBatchKMeans.fit`` on all patches; ONLINE: ``partial_fit`` batch by batch.

    The streaming path must know the cluster count before the first batch, so a fractional count
    needs ``expected_patches`` (MHPatchCore passes it from the dataset length).
    """

    kind = "KMEANS"

    def __init__(
        self,
        clusters: int | float = 0.01,
        batch_size: int = 4096,
        seed: int = 0,
        expected_patches: int | None = None,
        progress: bool = False,
    ) -> None:
        self.clusters = clusters
        self.batch_size = batch_size
        self.seed = seed
        self.expected_patches = expected_patches
        self.progress = progress

    def _model(self, n_clusters: int, compute_labels: bool = True) -> MiniBatchKMeans:
        return MiniBatchKMeans(
            n_clusters=n_clusters, batch_size=self.batch_size, random_state=self.seed, n_init=1,
            compute_labels=compute_labels,
        )

    def run(self, features: torch.Tensor) -> torch.Tensor:
        data = features.detach().cpu().float().numpy()
        k = resolve_cluster_count(self.clusters, data.shape[0])
        km = _ProgressMiniBatchKMeans(**self._model(k).get_params())
        with tqdm(desc=f"k-means: k-means++ initialisation of {k} centres", unit="step", leave=False,
                  disable=not self.progress) as km._bar:
            km.fit(data)
        del km._bar
        self.kmeans_ = km
        return torch.from_numpy(self.kmeans_.cluster_centers_.astype(np.float32))

    def run_state(self, features: torch.Tensor) -> BankState:
        centres = self.run(features)
        # The counts a continued partial_fit weighs the centres with: patches per final cluster.
        counts = np.bincount(self.kmeans_.labels_, minlength=centres.shape[0]).astype(np.float64)
        return BankState(self.kind, centres, torch.from_numpy(counts), int(self.kmeans_.n_steps_))

    def state(self) -> BankState:
        centres = self.finalize()
        return BankState(self.kind, centres, torch.from_numpy(self.kmeans_._counts.astype(np.float64)),
                         int(self.kmeans_.n_steps_))

    def resume(self, state: BankState) -> "KMeansBank":
        """Continues ``MiniBatchKMeans.partial_fit`` from saved centroids and counts.

        sklearn has no public warm start that keeps the counts (``init=centres`` restarts them at 0,
        so the first batch would overwrite the centres), hence the attributes ``partial_fit`` reads
        are restored here (sklearn 1.x names; tests/test_fit_state.py checks it against an
        uninterrupted ``partial_fit``).
        """
        from sklearn.utils import check_random_state
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

        centres = state.rows.detach().cpu().double().numpy().copy()
        k = centres.shape[0]
        km = self._model(k, compute_labels=False)
        km.cluster_centers_ = centres
        km._counts = state.counts.numpy().astype(np.float64)
        km.n_steps_ = int(state.n_steps)
        km._n_since_last_reassign = 0
        km._random_state = check_random_state(self.seed + int(state.n_steps))
        km._n_threads = _openmp_effective_n_threads()
        km._batch_size = km.batch_size  # what partial_fit sets from its first (>= batch_size rows) chunk
        km.n_features_in_ = centres.shape[1]
        km._n_features_out = k
        self.kmeans_ = km
        self._buffer = RowBuffer(max(k, self.batch_size))
        return self

    def partial_fit(self, features: torch.Tensor) -> "KMeansBank":
        if not hasattr(self, "_buffer"):
            if not isinstance(self.clusters, numbers.Integral) and self.expected_patches is None:
                raise MHPCError("a fractional kmeans_clusters needs the patch count; pass an int instead")
            # Without a patch count the int count is taken as it is (clipped to the patches in finalize).
            k = resolve_cluster_count(self.clusters, self.expected_patches or sys.maxsize)
            self.kmeans_ = self._model(k, compute_labels=False)  # per-batch labels are never used
            # The first partial_fit initialises k centroids from its rows, so it needs >= k rows.
            self._buffer = RowBuffer(max(k, self.batch_size))
        # float64 on purpose: for float32 input sklearn's distances (k-means++ init included) take a
        # chunked upcast-to-float64 path that measured ~5x slower than plain float64 input; the
        # chunks are small (a few thousand rows), so the copy costs little memory.
        for chunk in self._buffer.push(features.detach().cpu().double()):
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


def reduce_centroids(state: BankState, clusters: int, seed: int = 0) -> BankState:
    """Weighted k-means (sklearn ``KMeans``, counts as sample weights) of a union of centroids down to
    ``clusters`` centres; the new counts are the summed weights of each centre's members."""
    from sklearn.cluster import KMeans

    if state.rows.shape[0] <= clusters:
        return state
    data = state.rows.detach().cpu().float().numpy()
    weights = state.counts.numpy()
    km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(data, sample_weight=weights)
    counts = np.bincount(km.labels_, weights=weights, minlength=clusters)
    return BankState(state.kind, torch.from_numpy(km.cluster_centers_.astype(np.float32)),
                     torch.from_numpy(counts.astype(np.float64)), state.n_steps)
