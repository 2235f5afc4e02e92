"""Feature reduction strategies: identity or PCA.

PCA has three ways in, all ending in the same state (``mean_``, ``components_``,
``explained_variance_ratio_``): ``fit_covariance`` (the default ``pca_solver="covariance"``: exact PCA
by float64 ``eigh`` of the streamed covariance, with sklearn ``PCA``'s component count and sign rules),
``partial_fit``/``finalize`` (``pca_solver="incremental"``: the seed's sklearn ``IncrementalPCA``), and
``fit`` (sklearn ``PCA(svd_solver="full")`` on a matrix, kept as the reference). The projection itself
runs in torch so that it stays on the model's device and avoids a host copy per batch.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA, IncrementalPCA

from mhpc.errors import MHPCError, NotFittedError
from mhpc.row_buffer import RowBuffer


class Identity:
    """A stage that passes features through: feature reduction NONE, and the EUCLIDEAN space."""

    def fit(self, features: torch.Tensor) -> "Identity":
        return self

    def partial_fit(self, features: torch.Tensor) -> "Identity":
        return self

    def finalize(self) -> "Identity":
        return self

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # nothing fitted, nothing stored

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> "Identity":
        return self


class PCAReduction:
    """Keeps the leading components that explain ``variance_ratio`` of the variance."""

    def __init__(self, variance_ratio: float = 0.99, batch_size: int = 2048) -> None:
        if not 0.0 < variance_ratio <= 1.0:
            raise MHPCError(f"pca_variance_ratio must be in (0, 1], got {variance_ratio}")
        self.variance_ratio = variance_ratio
        self.batch_size = batch_size

    def fit(self, features: torch.Tensor) -> "PCAReduction":
        data = features.detach().cpu().double().numpy()
        if data.shape[0] < 2:
            raise MHPCError("PCA needs at least 2 training patches")
        n_components = self.variance_ratio if self.variance_ratio < 1.0 else None
        pca = PCA(n_components=n_components, svd_solver="full").fit(data)
        return self._set(pca.mean_, pca.components_, pca.explained_variance_ratio_)

    def fit_covariance(self, mean: torch.Tensor, cov: torch.Tensor, count: int) -> "PCAReduction":
        """Exact PCA from the mean and (unbiased) covariance of ``count`` rows.

        The eigenvectors of the covariance are the right singular vectors of the centred data, so this
        is sklearn's ``PCA(svd_solver="full")`` without holding the data: same component count rule
        (smallest k whose cumulative ratio exceeds ``variance_ratio``; min(count, d) for 1.0) and
        same sign convention (the largest-magnitude entry of each component is positive, ``svd_flip``).
        """
        if count < 2:
            raise MHPCError("PCA needs at least 2 training patches")
        evals, evecs = torch.linalg.eigh(cov.double().cpu())
        evals, comps = evals.flip(0).clamp(min=0), evecs.flip(1).T.contiguous()
        top = comps.abs().argmax(dim=1)
        comps *= torch.sign(comps[torch.arange(comps.shape[0]), top])[:, None]
        ratios = evals / evals.sum()
        if self.variance_ratio < 1.0:
            keep = int(np.searchsorted(torch.cumsum(ratios, 0).numpy(), self.variance_ratio, side="right") + 1)
        else:
            keep = min(count, len(ratios))
        keep = min(keep, len(ratios))
        self._set(mean.double().cpu().numpy(), comps[:keep].numpy(), ratios[:keep].numpy())
        self.explained_variance_ = evals[:keep].clone()
        return self

    def partial_fit(self, features: torch.Tensor) -> "PCAReduction":
        if not hasattr(self, "_ipca"):
            dim = features.shape[1]
            # All components are kept while streaming; the cut to variance_ratio happens at the end.
            self._ipca = IncrementalPCA(n_components=dim)
            self._buffer = RowBuffer(max(dim, self.batch_size))
        for chunk in self._buffer.push(features.detach().cpu().double()):
            self._ipca.partial_fit(chunk.numpy())
        return self

    def finalize(self) -> "PCAReduction":
        if not hasattr(self, "_ipca"):
            raise MHPCError("PCA received no patches")
        rest = self._buffer.flush()
        if rest is not None:
            if self._buffer.emitted_rows < self._ipca.n_components:
                raise MHPCError(
                    f"IncrementalPCA needs at least as many training patches as feature dimensions "
                    f"({self._ipca.n_components}); got {self._buffer.emitted_rows}"
                )
            self._ipca.partial_fit(rest.numpy())
        ipca = self._ipca
        del self._ipca, self._buffer
        ratios = ipca.explained_variance_ratio_
        keep = int(np.searchsorted(np.cumsum(ratios), self.variance_ratio - 1e-12) + 1)
        keep = min(keep, len(ratios))
        self.explained_variance_ = torch.as_tensor(ipca.explained_variance_[:keep], dtype=torch.float64)
        return self._set(ipca.mean_, ipca.components_[:keep], ratios[:keep])

    def _set(self, mean: np.ndarray, components: np.ndarray, ratios: np.ndarray) -> "PCAReduction":
        self.mean_ = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        self.components_ = torch.as_tensor(np.ascontiguousarray(components), dtype=torch.float32)
        self.explained_variance_ratio_ = torch.as_tensor(np.asarray(ratios), dtype=torch.float64)
        return self

    def set_state(self, mean: torch.Tensor, components: torch.Tensor) -> "PCAReduction":
        self.mean_, self.components_ = mean.float(), components.float()
        return self

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as a model file stores it (``pca_mean``, ``pca_components``)."""
        return {"pca_mean": self.mean_.cpu().contiguous(), "pca_components": self.components_.cpu().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> "PCAReduction":
        return self.set_state(tensors["pca_mean"], tensors["pca_components"])

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection as x -> M x + o (float64)."""
        m = self.components_.double()
        return m, -(m @ self.mean_.double())

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "components_"):
            raise NotFittedError("PCA is not fitted yet")
        mean = self.mean_.to(features.device)
        comps = self.components_.to(features.device)
        return (features.float() - mean) @ comps.T
