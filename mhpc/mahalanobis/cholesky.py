"""Cholesky factor of a covariance matrix with bounded diagonal-jitter escalation."""

from __future__ import annotations

import math

import torch

from mhpc.errors import MHPCError


class SingularCovarianceError(MHPCError):
    """The covariance is not positive definite even after the largest allowed jitter."""


class CovarianceCholesky:
    """Computes lower-triangular ``L`` with ``L @ L.T ~= cov``.

    ``jitter`` is added to the diagonal first (relative to the mean variance). When the factorisation
    fails, the jitter grows tenfold, starting at ``1e-10`` of the mean variance, up to ``max_jitter``.
    The escalation takes at most ``MAX_STEPS`` factorisations whatever the inputs.
    """

    MAX_STEPS = 32

    def __init__(self, jitter: float = 0.0, max_jitter: float = 1e-2, symmetry_tol: float = 1e-6) -> None:
        self.jitter = jitter
        self.max_jitter = max_jitter
        self.symmetry_tol = symmetry_tol

    def compute(self, cov: torch.Tensor) -> torch.Tensor:
        cov = torch.as_tensor(cov)
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] == 0:
            raise MHPCError(f"covariance must be a non-empty square matrix, got shape {tuple(cov.shape)}")
        if not (cov.is_floating_point() and cov.dtype in (torch.float32, torch.float64)):
            cov = cov.to(torch.float64)  # integer and half inputs: LAPACK factorises float32/float64 only
        if not torch.isfinite(cov).all():
            raise MHPCError("covariance contains NaN or Inf")
        for name in ("jitter", "max_jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise MHPCError(f"{name} must be a finite number >= 0, got {value!r}")
        scale = float(torch.diagonal(cov).abs().mean()) or 1.0
        asym = float((cov - cov.T).abs().max())
        if asym > self.symmetry_tol * scale:
            raise MHPCError(f"covariance is not symmetric (max |C - C^T| = {asym:.3g})")
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        jitter = float(self.jitter)
        for _ in range(self.MAX_STEPS):
            factor, info = torch.linalg.cholesky_ex(cov + (jitter * scale) * eye)
            if int(info) == 0 and torch.isfinite(factor).all():
                self.jitter_used_ = jitter
                return factor
            jitter = 1e-10 if jitter == 0 else jitter * 10.0
            if jitter > self.max_jitter:
                break
        smallest = float(torch.linalg.eigvalsh(cov.double()).min())
        raise SingularCovarianceError(
            f"covariance is not positive definite: smallest eigenvalue {smallest:.3g} "
            f"(mean variance {scale:.3g}); relative jitter up to {self.max_jitter:g} did not help. "
            "Raise covariance_shrinkage, use PCA, or train on more images."
        )
