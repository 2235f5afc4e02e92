"""Mergeable fit state: what a fit accumulates, as small objects that can be merged, sent and saved.

The fit contract. Every fit, VANILLA (one shard held in memory), ONLINE (a stream), a Ray fit (many
shards) and ``update``, runs the one schedule of :mod:`mhpc.fit.driver`:

1. ``model.begin_fit()``: validate the parameters and build the stages; reads no data.
2. The statistics pass, mapped over the shards (:func:`mhpc.fit.passes.statistics_pass`): a
   :class:`FitState` per shard with an :class:`~mhpc.mahalanobis.OnlineCovariance` of the RAW patch
   features (count, mean, M2 in float64; ``None`` when neither PCA nor MAHALANOBIS is on), the image
   count and the patch grid; with aggregation NONE (and for VANILLA's one shard) it also keeps the raw
   patches, so those need no second read. The shard states are merged in shard order
   (``FitState.merge``); merged statistics equal one pass over the union (Chan et al.), to rounding.
   The pass is skipped when it has nothing to do (ONLINE, no statistics, GREEDY/KMEANS).
3. Finalize the projection (``model.finalize_statistics(stats)``): exact PCA by float64 ``eigh`` of
   Sigma (``pca_variance_ratio`` kept); MAHALANOBIS after PCA as the diagonal scale
   z = D^-1/2 V_k^T (x - mu), shrunk towards (tr/k) I in the PCA basis; MAHALANOBIS without PCA as
   the Cholesky factor of the shrunk Sigma. Both are folded into one float32 affine map for scoring.
   (``pca_solver="incremental"`` feeds the seed's ``IncrementalPCA`` inside the same pass instead; that
   PCA lives on the model and is NOT part of the state, so it cannot be merged across shards: a Ray fit
   must use the default ``pca_solver="covariance"``.) ``update`` instead merges the saved statistics
   with the new ones, keeps the PCA basis, refreshes the whitening and re-maps the saved bank exactly.
4. The bank pass, mapped over the shards (:func:`mhpc.fit.passes.bank_pass`, or over the kept patches):
   a :class:`BankState` per shard in the final (projected) space, from the aggregation strategy's
   ``partial_fit``/``state`` (GREEDY the reduced chunks, KMEANS the chunk centroids and their counts,
   NONE the patches), merged in shard order (``BankState.merge``).
5. Finalize the bank (``model.finalize_bank(bank, n_patches)``): the strategy's ``finalize`` reduces the
   merged state once more (GREEDY to ``coreset_percentage`` of all patches by the same greedy selection,
   a no-op when the chunks are already that small; KMEANS by a weighted k-means of the centroids, counts
   as sample weights, to the cluster count of all patches), then sets ``memory_bank_``, the scorer and
   ``is_fitted_``.

After a fit the model keeps ``fit_state_`` (a :class:`FitState`: the statistics, the bank state's extra
tensors, the image count); ``model.save(path, keep_fit_state=True)`` stores it as tensors named
``fit_state.*`` in the model file, which ``update`` needs. Every state holds only tensors and plain
numbers, and has ``to_tensors(prefix)`` / ``from_tensors(tensors, prefix)``, so it can be pickled
between processes (Ray) or written to safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mhpc.errors import MHPCError
from mhpc.mahalanobis.covariance import OnlineCovariance

BANK_KINDS = ("GREEDY", "KMEANS", "NONE")


@dataclass
class BankState:
    """The memory bank as accumulated so far, in the projected (final) space.

    rows: float32 [n, d]: greedy-reduced chunks, k-means centroids, or kept patches.
    counts: float64 [n], k-means only: the patches each centroid stands for (its weight in the reduce).
    n_steps: the MiniBatchKMeans steps of model files written before the one k-means (kept so that they
      load and save unchanged; the chunked k-means leaves it 0).
    """

    kind: str
    rows: torch.Tensor
    counts: torch.Tensor | None = None
    n_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BANK_KINDS:
            raise MHPCError(f"unknown bank kind {self.kind!r}")
        if (self.counts is None) != (self.kind != "KMEANS"):
            raise MHPCError("a KMEANS bank state needs counts, and only a KMEANS one has them")

    def merge(self, other: "BankState") -> "BankState":
        """Union of the two banks (k-means: of the centroids with their counts). Returns self."""
        if other.kind != self.kind or other.rows.shape[1] != self.rows.shape[1]:
            raise MHPCError(f"cannot merge a {other.kind} bank of width {other.rows.shape[1]} into a "
                            f"{self.kind} bank of width {self.rows.shape[1]}")
        self.rows = torch.cat([self.rows, other.rows.to(self.rows)])
        if self.counts is not None:
            self.counts = torch.cat([self.counts, other.counts.to(self.counts)])
        self.n_steps += other.n_steps
        return self

    def copy(self) -> "BankState":
        return BankState(self.kind, self.rows.clone(), None if self.counts is None else self.counts.clone(),
                         self.n_steps)

    def remap(self, matrix: torch.Tensor, offset: torch.Tensor) -> "BankState":
        """Applies z -> matrix z + offset to every row (float64 product), in place. Returns self."""
        mapped = torch.addmm(offset.double()[None, :], self.rows.double(), matrix.double().T)
        self.rows = mapped.to(self.rows.dtype).contiguous()
        return self

    def to_tensors(self, prefix: str = "", rows: bool = True) -> dict[str, torch.Tensor]:
        """The state as CPU tensors. ``rows=False`` leaves out the rows (a model file already holds
        them as its memory bank)."""
        out = {f"{prefix}kind": torch.tensor([BANK_KINDS.index(self.kind)], dtype=torch.int64),
               f"{prefix}n_steps": torch.tensor([self.n_steps], dtype=torch.int64)}
        if rows:
            out[f"{prefix}rows"] = self.rows.detach().cpu().contiguous()
        if self.counts is not None:
            out[f"{prefix}counts"] = self.counts.detach().cpu().double().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "",
                     rows: torch.Tensor | None = None) -> "BankState":
        try:
            kind = BANK_KINDS[int(tensors[f"{prefix}kind"])]
            rows = tensors[f"{prefix}rows"] if rows is None else rows
            n_steps = int(tensors[f"{prefix}n_steps"])
        except (KeyError, IndexError) as exc:
            raise MHPCError(f"bank state is incomplete or invalid: {exc}") from None
        counts = tensors.get(f"{prefix}counts")
        if counts is not None and counts.shape[0] != rows.shape[0]:
            raise MHPCError(f"bank state has {rows.shape[0]} rows but {counts.shape[0]} counts")
        return cls(kind, rows.float(), None if counts is None else counts.double(), n_steps)


@dataclass
class FitState:
    """Everything ``update`` needs besides the fitted stages: the raw-feature statistics (or None when no
    statistics stage is on), the bank state and the number of images seen. A shard's result in the fit
    schedule is one too, before its bank pass (``bank`` None), with two fields that are never saved:
    ``patches``, the raw patches a statistics pass kept (aggregation NONE, VANILLA), and ``grid``."""

    statistics: OnlineCovariance | None
    bank: BankState | None = None
    n_images: int = 0
    patches: list[torch.Tensor] | None = None
    grid: tuple[int, int] | None = None

    def merge(self, other: "FitState") -> "FitState":
        """Union of two shards' states (in this order). Returns self."""
        if (self.statistics is None) != (other.statistics is None):
            raise MHPCError("cannot merge a fit state with statistics into one without")
        if (self.bank is None) != (other.bank is None) or (self.patches is None) != (other.patches is None):
            raise MHPCError("cannot merge fit states of different passes")
        if self.grid is not None and other.grid is not None and tuple(self.grid) != tuple(other.grid):
            raise MHPCError(f"cannot merge fit states of patch grids {self.grid} and {other.grid}")
        if self.statistics is not None:
            self.statistics.merge(other.statistics)
        if self.bank is not None:
            self.bank.merge(other.bank)
        if self.patches is not None:
            self.patches.extend(other.patches)
        self.n_images += other.n_images
        self.grid = self.grid or other.grid
        return self

    def to_tensors(self, prefix: str = "fit_state.", rows: bool = True) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise MHPCError("a fit state without a bank cannot be saved")
        out = {f"{prefix}n_images": torch.tensor([self.n_images], dtype=torch.int64)}
        if self.statistics is not None:
            out.update(self.statistics.to_tensors(f"{prefix}stats."))
        out.update(self.bank.to_tensors(f"{prefix}bank.", rows=rows))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "fit_state.",
                     rows: torch.Tensor | None = None) -> "FitState":
        if f"{prefix}n_images" not in tensors:
            raise MHPCError("no fit state in these tensors")
        stats = (OnlineCovariance.from_tensors(tensors, f"{prefix}stats.")
                 if f"{prefix}stats.m2" in tensors else None)
        bank = BankState.from_tensors(tensors, f"{prefix}bank.", rows=rows)
        return cls(stats, bank, int(tensors[f"{prefix}n_images"]))


def has_fit_state(tensors: dict[str, torch.Tensor], prefix: str = "fit_state.") -> bool:
    return any(key.startswith(prefix) for key in tensors)
