"""Streaming mean and covariance with Chan et al.'s parallel update.

torch has no streaming covariance, and sklearn's ``EmpiricalCovariance`` needs all rows at once,
so this small class is hand-written. Chan's pairwise formulas keep it stable for data with a large
mean offset (no E[x^2] - E[x]^2 cancellation) and let shards be merged exactly.

Cost: the per-batch Gram matrix of the centred batch is one GEMM in the batch's own dtype (float32 for
backbone features, on their device); only the D x D result is promoted to float64 for Chan's merge.
Promoting the whole batch to float64 first costs about twice as much; the float32 product of a
centred batch keeps the covariance within 1e-6 relative (tests/test_fit_state.py checks it on
real backbone features).
"""

from __future__ import annotations

import torch

from mhpc.errors import MHPCError


class OnlineCovariance:
    """Running mean and covariance of rows, updated batch by batch.

    ``update(batch)`` takes ``[batch, features...]`` and flattens the trailing dimensions.
    """

    def __init__(self, num_features: int, dtype: torch.dtype = torch.float64) -> None:
        if int(num_features) < 1:
            raise MHPCError(f"num_features must be >= 1, got {num_features}")
        self.num_features = int(num_features)
        self.dtype = dtype
        self._count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # sum of outer products of centred rows

    @property
    def count(self) -> int:
        return self._count

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            raise MHPCError("OnlineCovariance has seen no data yet")
        return self._mean

    def _check(self, batch: torch.Tensor) -> torch.Tensor:
        batch = torch.as_tensor(batch).detach()
        if batch.ndim < 2:
            raise MHPCError(f"OnlineCovariance.update expects [batch, features...], got shape {tuple(batch.shape)}")
        width = 1
        for d in batch.shape[1:]:
            width *= int(d)
        batch = batch.reshape(batch.shape[0], width)  # explicit width: -1 cannot be inferred for 0 rows
        if batch.shape[1] != self.num_features:
            raise MHPCError(f"OnlineCovariance expects {self.num_features} features, got {batch.shape[1]}")
        if not batch.is_floating_point():
            batch = batch.to(self.dtype)
        if not torch.isfinite(batch).all():
            raise MHPCError("OnlineCovariance.update received NaN or Inf values")
        return batch

    def update(self, batch: torch.Tensor) -> "OnlineCovariance":
        batch = self._check(batch)
        n_b = batch.shape[0]
        if n_b == 0:
            return self
        mean_b = batch.sum(dim=0, dtype=self.dtype) / n_b
        centred = batch - mean_b.to(batch.dtype)
        m2_b = (centred.T @ centred).to(self.dtype)  # GEMM in the batch's dtype, merged in float64
        self._combine(n_b, mean_b, m2_b)
        return self

    def merge(self, other: "OnlineCovariance") -> "OnlineCovariance":
        if other.num_features != self.num_features:
            raise MHPCError(f"cannot merge covariances of {self.num_features} and {other.num_features} features")
        if other._count:
            self._combine(other._count, other._mean.to(self.dtype), other._m2.to(self.dtype))
        return self

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self._count == 0:
            self._count, self._mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        if mean_b.device != self._mean.device:
            mean_b, m2_b = mean_b.to(self._mean.device), m2_b.to(self._mean.device)
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self._count = n

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """count, mean and M2 as CPU tensors (for safetensors files and for sending between processes)."""
        if self._count == 0:
            raise MHPCError("OnlineCovariance has seen no data yet")
        return {
            f"{prefix}count": torch.tensor([self._count], dtype=torch.int64),
            f"{prefix}mean": self._mean.detach().cpu().contiguous(),
            f"{prefix}m2": self._m2.detach().cpu().contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "OnlineCovariance":
        try:
            count, mean, m2 = (tensors[f"{prefix}{k}"] for k in ("count", "mean", "m2"))
        except KeyError as exc:
            raise MHPCError(f"covariance state lacks tensor {exc.args[0]!r}") from None
        d = mean.shape[0]
        if mean.ndim != 1 or tuple(m2.shape) != (d, d) or count.numel() != 1 or int(count) < 1:
            raise MHPCError(f"inconsistent covariance state: mean {tuple(mean.shape)}, M2 {tuple(m2.shape)}")
        state = cls(d, dtype=m2.dtype)
        state._count, state._mean, state._m2 = int(count), mean.clone(), m2.clone()
        return state

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        if self._count == 0:
            raise MHPCError("OnlineCovariance has seen no data yet")
        denom = self._count - 1 if unbiased else self._count
        if denom <= 0:
            raise MHPCError("covariance needs at least 2 rows for the unbiased estimate")
        cov = self._m2 / denom
        return 0.5 * (cov + cov.T)  # remove rounding asymmetry


def shrink_covariance(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Shrink towards a scaled identity: ``(1 - a) * cov + a * (trace(cov) / d) * I``.

    This is the Ledoit-Wolf target; it keeps the average variance and lifts small eigenvalues,
    which makes the whitening stable when features are nearly collinear.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise MHPCError(f"covariance_shrinkage must be in [0, 1], got {shrinkage}")
    d = cov.shape[0]
    target = torch.trace(cov) / d
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1.0 - shrinkage) * cov + shrinkage * target * eye
