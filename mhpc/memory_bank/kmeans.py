"""k-means centroids as the memory bank: per chunk over-clustered, then a weighted k-means of the union."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from tqdm.auto import tqdm

from mhpc.errors import MHPCError
from mhpc.fit.state import BankState
from mhpc.memory_bank.base import MemoryBankStrategy
from mhpc.params import check_params
from mhpc.row_buffer import RowBuffer
from mhpc.validation import warn


def check_cluster_count(clusters: int | float) -> None:
    """An int count >= 1 or a float fraction in (0, 1]; else a one-line error (the parameter table's check)."""
    check_params({"kmeans_clusters": clusters})


def resolve_cluster_count(clusters: int | float, num_patches: int) -> int:
    """An int is a count; a float in (0, 1] is a fraction of the patches seen. Clipped to [1, N];
    a count above half the patches is warned about (k-means then runs long and compresses nothing)."""
    check_cluster_count(clusters)
    if not isinstance(clusters, numbers.Integral):
        count = int(round(float(clusters) * num_patches))
    else:
        count = int(clusters)
        if count > num_patches / 2:
            warn(f"kmeans_clusters={count} is more than half of the {num_patches} training patches; "
                 f"k-means will be slow and barely compress (using {min(count, num_patches)} clusters)")
    return max(1, min(count, num_patches))


KMEANS_OVERSAMPLE = 4  # a chunk keeps this many times its share of the bank's centroids (the Ray rule's cap)
# Lloyd iterations per chunk after its seeding: 2 measured +0.009 image AUROC over none on the demo-like
# data (mean of 5 seeds) for about 1.5x the chunk time; the weighted reduce runs to convergence.
KMEANS_CHUNK_ITERATIONS = 2


class KMeansBank(MemoryBankStrategy):
    """k-means centroids as the memory bank, by merge and reduce, the same on every path.

    The projected patches are cut into chunks of exactly ``chunk_size`` rows (``kmeans_batch_size``), in
    the order the rows come, whether streamed (ONLINE) or held in memory (VANILLA), so both paths cut the
    same chunks and build the same bank; the last chunk takes the remainder (up to 2 chunks' rows), and a
    fit of fewer than two chunks' rows is one chunk. A chunk of n rows is over-sampled
    into ceil(4 f n) centroids, f being the bank's fraction of the patches (the ``kmeans_clusters``
    fraction, or an int count k over the expected patch count, and then at least k): k-means++ seeds,
    two Lloyd iterations, each centroid weighted by its patches. ``finalize`` reduces the union of all
    chunks and shards by a weighted k-means (sklearn ``KMeans``, counts as sample weights) to the
    cluster count of the total patch count. The only chunk of a fit that never held more is clustered straight to that count
    (``alone=False`` for a shard of several). So an in-process fit, a Ray fit and ``update`` cluster
    alike, and a fractional count grows with the data.

    Why chunks of ``kmeans_batch_size``: a chunk costs O(chunk x its centroids), so the whole
    pass costs O(N x 4 f chunk), linear in the patch count N, where a streamed ``MiniBatchKMeans``
    with f N centroids costs O(f N^2).
    """

    kind = "KMEANS"

    def __init__(
        self,
        clusters: int | float = 0.01,
        chunk_size: int = 4096,
        seed: int = 0,
        expected_patches: int | None = None,
        alone: bool = True,
        progress: bool = False,
    ) -> None:
        self.clusters = clusters
        self.chunk_size = chunk_size
        self.seed = seed
        self.expected_patches = expected_patches
        self.alone = alone
        self.progress = progress
        check_cluster_count(clusters)

    def _chunk_clusters(self, n: int) -> int:
        """A chunk's over-clustering count: 4 times its share of the bank."""
        if not isinstance(self.clusters, numbers.Integral):
            return max(1, min(n, math.ceil(KMEANS_OVERSAMPLE * float(self.clusters) * n)))
        # An int count: its share by the expected patches (else by the patches seen so far), and never
        # fewer than the count itself, so that a chunk can hold every cluster of the bank.
        share = int(self.clusters) * n / max(n, self.expected_patches or self._seen)
        return max(1, min(n, max(int(self.clusters), math.ceil(KMEANS_OVERSAMPLE * share))))

    def _cluster(self, rows: torch.Tensor, k: int, final: bool = False) -> None:
        """Summarises one chunk by ``k`` weighted centroids. A chunk of several: k-means++ seeds (D^2
        sampling, one trial per seed, the over-sampling step of k-means||, Bahmani et al. 2012), two
        Lloyd iterations, each centroid weighted by its patches; the weighted k-means of the union does
        the rest. The ``final`` chunk (the fit's only one) is the bank itself: a full
        ``KMeans``, run to convergence."""
        # float64 on purpose: for float32 input sklearn's distances take a chunked upcast path that
        # measured ~5x slower than plain float64 input; a chunk is a few thousand rows.
        data = rows.double().numpy()
        seed = self.seed + len(self._rows)
        if final:
            with tqdm(total=1, desc=f"k-means: {data.shape[0]} patches into {k} centres", leave=False,
                      disable=not self.progress):
                km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(data)
            centres, labels = km.cluster_centers_, km.labels_
        else:
            seeds, _ = kmeans_plusplus(data, k, random_state=seed, n_local_trials=1)
            km = KMeans(n_clusters=k, init=seeds, n_init=1, max_iter=KMEANS_CHUNK_ITERATIONS).fit(data)
            centres, labels = km.cluster_centers_, km.labels_
        self._rows.append(torch.from_numpy(centres.astype(np.float32)))
        self._counts.append(torch.from_numpy(np.bincount(labels, minlength=k).astype(np.float64)))

    def _start(self) -> None:
        if not hasattr(self, "_buffer"):
            self._buffer = RowBuffer(self.chunk_size, exact=True)  # chunks independent of the batching
            self._rows: list[torch.Tensor] = []
            self._counts: list[torch.Tensor] = []
            self._seen = 0

    def resume(self, state: BankState) -> "KMeansBank":
        """Continues from a saved bank: its centroids and counts join the union the new chunks add to."""
        self._start()
        self._rows.append(state.rows.detach().cpu().float())
        self._counts.append(state.counts.detach().cpu().double())
        return self

    def partial_fit(self, features: torch.Tensor) -> "KMeansBank":
        self._start()
        for chunk in self._buffer.push(features.detach().cpu()):
            self._seen += chunk.shape[0]
            self._cluster(chunk, self._chunk_clusters(chunk.shape[0]))
        return self

    def state(self) -> BankState:
        """The centroids of every chunk so far with their patch counts."""
        if not hasattr(self, "_buffer"):
            raise MHPCError("k-means received no patches")
        rest = self._buffer.flush()
        if rest is not None and rest.shape[0]:
            self._seen += rest.shape[0]
            alone = self.alone and not self._rows  # the fit's only chunk: straight to the bank's count
            k = resolve_cluster_count(self.clusters, rest.shape[0]) if alone else self._chunk_clusters(rest.shape[0])
            self._cluster(rest, k, final=alone)
        if not self._rows:
            raise MHPCError("k-means received no patches")
        state = BankState(self.kind, torch.cat(self._rows), torch.cat(self._counts))
        del self._buffer, self._rows, self._counts
        return state

    def carry(self, state: BankState, bank: BankState, n_patches: int) -> BankState:
        """The merged centroids, so that ``update`` reduces them with its new chunks as a refit would, rather
        than the k centres alone. A fractional count's union is about 4 k already (each chunk keeps 4 times
        its share); an int count's can be far larger (each chunk keeps at least k), and only a union above
        8 k is reduced, to 4 k: reducing a union barely above 4 k would cost a k-means as large as the fit's
        and save nothing."""
        k = resolve_cluster_count(self.clusters, max(1, int(n_patches)))
        return state if state.rows.shape[0] <= 2 * KMEANS_OVERSAMPLE * k else reduce_centroids(
            state, KMEANS_OVERSAMPLE * k, self.seed)

    def finalize(self, state: BankState, n_patches: int) -> BankState:
        """The union of all chunks' centroids reduced to the cluster count of ``n_patches``."""
        k = resolve_cluster_count(self.clusters, max(1, int(n_patches)))
        with tqdm(total=1, desc=f"k-means: {state.rows.shape[0]} centroids reduced to {k}", leave=False,
                  disable=not self.progress or state.rows.shape[0] <= k):
            return reduce_centroids(state, k, self.seed)


def reduce_centroids(state: BankState, clusters: int, seed: int = 0) -> BankState:
    """Weighted k-means (sklearn ``KMeans``, counts as sample weights) of a union of centroids down to
    ``clusters`` centres; the new counts are the summed weights of each centre's members."""
    if state.rows.shape[0] <= clusters:
        return state
    data = state.rows.detach().cpu().double().numpy()  # float64: sklearn's fast path (see KMeansBank._cluster)
    weights = state.counts.numpy()
    km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(data, sample_weight=weights)
    counts = np.bincount(km.labels_, weights=weights, minlength=clusters)
    return BankState(state.kind, torch.from_numpy(km.cluster_centers_.astype(np.float32)),
                     torch.from_numpy(counts.astype(np.float64)), state.n_steps)
