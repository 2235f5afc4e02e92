"""Covariance estimation and whitening for the Mahalanobis distance."""

from mhpc.mahalanobis.cholesky import CovarianceCholesky, SingularCovarianceError
from mhpc.mahalanobis.covariance import OnlineCovariance, shrink_covariance
from mhpc.mahalanobis.whitening import Whitener

__all__ = [
    "OnlineCovariance",
    "CovarianceCholesky",
    "SingularCovarianceError",
    "Whitener",
    "shrink_covariance",
]
