"""Mergeable fit state: what a fit accumulates, as small objects that can be merged, sent and saved.

The fit contract (``MHPatchCore``). Every fit, VANILLA (one shard), ONLINE (a stream of batches) and a
distributed fit (many shards), and ``update`` run the same five steps:

1. ``model.begin_fit()``: validate the parameters and build the stages; reads no data.
2. ``stats = model.statistics_pass(loader)``: one pass over the data, returns an
   :class:`~mhpc.mahalanobis.OnlineCovariance` of the RAW patch features (count, mean, M2 in float64),
   or ``None`` when neither PCA nor MAHALANOBIS is on. ``stats.merge(other)`` returns ``stats``;
   merged shards equal one pass over their union (Chan et al.), to rounding.
3. ``model.finalize_statistics(stats)``: exact PCA by float64 ``eigh`` of Sigma (``pca_variance_ratio``
   kept); MAHALANOBIS after PCA as the diagonal scale z = D^-1/2 V_k^T (x - mu), shrunk towards
   (tr/k) I in the PCA basis; MAHALANOBIS without PCA as the Cholesky factor of the shrunk Sigma.
   Both are folded into one float32 affine map for scoring. (``pca_solver="incremental"`` feeds the
   seed's ``IncrementalPCA`` inside the same pass instead; that PCA lives on the model and is NOT
   part of the state, so it cannot be merged across shards: a distributed fit must use the default
   ``pca_solver="covariance"``.)
4. ``bank = model.bank_pass(loader)``: one pass, returns a :class:`BankState` in the final (projected)
   space: GREEDY the reduced chunks, KMEANS the centroids and their counts, NONE the kept patches.
   ``bank.merge(other)`` returns ``bank``. When no bank pass is needed (aggregation NONE with a
   statistics pass) the statistics pass keeps the patches and ``fit`` skips this step.
5. ``model.finalize_bank(bank, target_rows=None)``: sets ``memory_bank_``, the scorer and
   ``is_fitted_``. Merged GREEDY shards are concatenated coresets (already ``coreset_percentage`` of the
   total); ``target_rows`` reduces them once more by the same greedy selection. Merged KMEANS shards
   hold the union of their centroids; when it has more than the model's cluster count, a weighted
   k-means (sklearn ``KMeans`` with the counts as sample weights) reduces it to that count.

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
    counts: float64 [n], k-means only: patches assigned to each centroid (MiniBatchKMeans weight sums).
    n_steps: k-means mini-batch steps so far (continues sklearn's reassignment schedule).
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
    statistics stage is on), the bank state and the number of images seen."""

    statistics: OnlineCovariance | None
    bank: BankState
    n_images: int = 0

    def merge(self, other: "FitState") -> "FitState":
        if (self.statistics is None) != (other.statistics is None):
            raise MHPCError("cannot merge a fit state with statistics into one without")
        if self.statistics is not None:
            self.statistics.merge(other.statistics)
        self.bank.merge(other.bank)
        self.n_images += other.n_images
        return self

    def to_tensors(self, prefix: str = "fit_state.", rows: bool = True) -> dict[str, torch.Tensor]:
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
