"""Whitening ``z = L^-1 (x - mu)``, so that Euclidean distance in z is the Mahalanobis distance."""

from __future__ import annotations

import torch

from mhpc.errors import MHPCError, NotFittedError
from mhpc.mahalanobis.cholesky import CovarianceCholesky
from mhpc.mahalanobis.covariance import OnlineCovariance, shrink_covariance
from mhpc.validation import warn


CONDITION_WARN = 1e10


def warn_if_ill_conditioned(cov: torch.Tensor) -> float:
    """Warns when the (shrunk) covariance's condition number exceeds ``CONDITION_WARN``: its whitening
    then amplifies rounding noise in the weakest directions. Returns the condition number."""
    eig = torch.linalg.eigvalsh(cov.double())
    cond = float(eig[-1] / eig[0]) if float(eig[0]) > 0 else float("inf")
    if cond > CONDITION_WARN:
        warn(f"the covariance has condition number {cond:.3g} (> {CONDITION_WARN:.0e}); raise covariance_shrinkage "
             "(e.g. 0.01), use PCA, or train on more images")
    return cond


class Whitener:
    """Fits mu and Sigma (streaming or at once), factorises Sigma and whitens rows.

    ``||z1 - z2||^2 == (x1 - x2)^T Sigma^-1 (x1 - x2)`` because ``Sigma^-1 = L^-T L^-1``.
    """

    def __init__(self, shrinkage: float = 0.01, jitter: float = 0.0) -> None:
        self.shrinkage = shrinkage
        self.jitter = jitter

    def partial_fit(self, features: torch.Tensor) -> "Whitener":
        if not hasattr(self, "_stats"):
            self._stats = OnlineCovariance(features.shape[1], dtype=torch.float64)
        self._stats.update(features.detach())
        return self

    def finalize(self) -> "Whitener":
        if not hasattr(self, "_stats") or self._stats.count < 2:
            raise MHPCError("the Mahalanobis distance needs at least 2 training patches")
        stats = self._stats
        del self._stats
        return self.fit_covariance(stats.mean, stats.covariance(unbiased=True))

    def fit_covariance(self, mean: torch.Tensor, cov: torch.Tensor) -> "Whitener":
        """From a known mean and (unbiased) covariance: shrink, then Cholesky."""
        self.mean_ = mean.double().clone()
        shrunk = shrink_covariance(cov.double(), self.shrinkage)
        warn_if_ill_conditioned(shrunk)
        self.cholesky_ = CovarianceCholesky(jitter=self.jitter).compute(shrunk)
        self.__dict__.pop("_cache", None)
        return self

    def fit_diagonal(self, variances: torch.Tensor) -> "Whitener":
        """Zero-mean features with a diagonal covariance (PCA scores): the shrunk Cholesky factor is
        the diagonal of standard deviations, so whitening is one scale per dimension, no factorisation."""
        var = variances.double()
        shrunk = torch.diagonal(shrink_covariance(torch.diag(var), self.shrinkage))
        if not bool((shrunk > 0).all()):
            raise MHPCError("the Mahalanobis distance needs a positive variance in every PCA direction")
        warn_if_ill_conditioned(torch.diag(shrunk))
        self.mean_ = torch.zeros_like(var)
        self.cholesky_ = torch.diag(shrunk.sqrt())
        self.__dict__.pop("_cache", None)
        return self

    def remap_from(self, old_mean: torch.Tensor, old_cholesky: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact map from an old whitened space to this one, z' = L'^-1 (L z + mu - mu'), as
        z' = A z + c (float64). Centroids of mapped points are mapped centroids, so it holds for
        k-means banks too."""
        chol = self.cholesky_
        a = torch.linalg.solve_triangular(chol, old_cholesky.to(chol), upper=False)
        c = torch.linalg.solve_triangular(chol, (old_mean.to(chol) - self.mean_)[:, None], upper=False)[:, 0]
        return a, c

    def fit(self, features: torch.Tensor) -> "Whitener":
        return self.partial_fit(features).finalize()

    def set_state(self, mean: torch.Tensor, cholesky: torch.Tensor) -> "Whitener":
        self.mean_, self.cholesky_ = mean.to(torch.float64), cholesky.to(torch.float64)
        self.__dict__.pop("_cache", None)
        return self

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as a model file stores it (``whiten_mean``, ``whiten_cholesky``)."""
        return {"whiten_mean": self.mean_.cpu().contiguous(), "whiten_cholesky": self.cholesky_.cpu().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> "Whitener":
        return self.set_state(tensors["whiten_mean"], tensors["whiten_cholesky"])

    def _factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and L in the features' device and dtype, cached (statistics stay float64)."""
        cache = self.__dict__.setdefault("_cache", {})
        key = (device, dtype)
        if key not in cache:
            # contiguous: a fitted factor may be a transposed view, and the solve's rounding follows the
            # layout, so a loaded model (contiguous tensors) would differ from the fitted one in the last bit
            cache[key] = (self.mean_.to(device, dtype).contiguous(), self.cholesky_.to(device, dtype).contiguous())
        return cache[key]

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "cholesky_"):
            raise NotFittedError("Whitener is not fitted yet")
        mean, chol = self._factors(features.device, features.dtype)
        # Triangular solve, never an explicit inverse: better conditioned and cheaper.
        return torch.linalg.solve_triangular(chol, (features - mean).T, upper=False).T

    def compose(self, matrix: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a preceding affine map x -> M x + o, returns (L^-1 M, L^-1 (o - mu)) by triangular solves."""
        chol = self.cholesky_
        a = torch.linalg.solve_triangular(chol, matrix.to(chol), upper=False)
        b = torch.linalg.solve_triangular(chol, (offset.to(chol) - self.mean_)[:, None], upper=False)[:, 0]
        return a, b
