import numpy as np
import pytest
import torch

from mhpc.errors import MHPCError
from mhpc.mahalanobis import CovarianceCholesky, OnlineCovariance, SingularCovarianceError, Whitener


def _random_splits(x, rng, parts):
    cuts = np.sort(rng.choice(np.arange(1, len(x)), parts - 1, replace=False))
    return np.split(x, cuts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_covariance_matches_torch_cov_with_splits_and_merges(seed):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(500, 7)) @ rng.normal(size=(7, 7)) + 3.0)
    shards = []
    for piece in np.array_split(x.numpy(), 3):
        oc = OnlineCovariance(7)
        for part in _random_splits(piece, rng, 5):
            oc.update(torch.from_numpy(part))
        shards.append(oc)
    total = shards[0].merge(shards[1]).merge(shards[2])
    assert total.count == 500
    torch.testing.assert_close(total.mean, x.mean(0))
    torch.testing.assert_close(total.covariance(), torch.cov(x.T))
    torch.testing.assert_close(total.covariance(unbiased=False), torch.cov(x.T, correction=0))


def test_online_covariance_flattens_trailing_dims():
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    oc = OnlineCovariance(6).update(x)
    torch.testing.assert_close(oc.covariance(), torch.cov(x.reshape(10, 6).T))


def test_online_covariance_stable_with_large_offset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3)) + 1e8
    oc = OnlineCovariance(3)
    for part in np.array_split(x, 17):
        oc.update(torch.from_numpy(part))
    ref = np.cov((x - 1e8).T)
    np.testing.assert_allclose(oc.covariance().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_online_covariance_rejects_nan_and_wrong_width():
    oc = OnlineCovariance(3)
    with pytest.raises(MHPCError, match="NaN"):
        oc.update(torch.tensor([[1.0, float("nan"), 2.0]]))
    with pytest.raises(MHPCError, match="3 features"):
        oc.update(torch.zeros(2, 4))


def test_cholesky_reconstructs_and_is_lower_triangular():
    a = torch.randn(6, 6, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    chol = CovarianceCholesky().compute(cov)
    assert torch.equal(chol, torch.tril(chol))
    torch.testing.assert_close(chol @ chol.T, cov)


def test_cholesky_escalates_jitter_for_semidefinite():
    v = torch.randn(5, 2, dtype=torch.float64)
    cov = v @ v.T  # rank 2
    cc = CovarianceCholesky()
    chol = cc.compute(cov)
    assert cc.jitter_used_ > 0
    torch.testing.assert_close(chol @ chol.T, cov, atol=1e-3, rtol=1e-3)


def test_cholesky_errors():
    with pytest.raises(MHPCError, match="square"):
        CovarianceCholesky().compute(torch.zeros(2, 3))
    with pytest.raises(MHPCError, match="symmetric"):
        CovarianceCholesky().compute(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(MHPCError, match="NaN"):
        CovarianceCholesky().compute(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    neg = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(SingularCovarianceError, match="smallest eigenvalue -1"):
        CovarianceCholesky(max_jitter=1e-3).compute(neg)


def test_whitened_distance_equals_mahalanobis_form():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 2.0)
    w = Whitener(shrinkage=0.0).fit(x)
    sigma = torch.cov(x.T)
    x1, x2 = x[:10], x[10:20]
    z1, z2 = w.transform(x1), w.transform(x2)
    lhs = ((z1 - z2) ** 2).sum(1)
    d = x1 - x2
    rhs = torch.einsum("ni,ij,nj->n", d, torch.linalg.inv(sigma), d)
    torch.testing.assert_close(lhs, rhs)
    # Whitened training data has identity covariance.
    torch.testing.assert_close(torch.cov(w.transform(x).T), torch.eye(5, dtype=torch.float64))


def test_whitener_streaming_equals_batch():
    x = torch.randn(300, 4, dtype=torch.float64)
    a = Whitener(0.05).fit(x)
    b = Whitener(0.05)
    for part in x.split(37):
        b.partial_fit(part)
    b.finalize()
    torch.testing.assert_close(a.cholesky_, b.cholesky_)
    torch.testing.assert_close(a.transform(x), b.transform(x))
