"""The projection as one affine map (mhpc/core/projection.py), which the deployment graph reads instead
of probing the model."""

import pytest
import torch

from conftest import tiny_model


@pytest.mark.parametrize("reduction,distance", [("NONE", "EUCLIDEAN"), ("PCA", "EUCLIDEAN"),
                                                ("NONE", "MAHALANOBIS"), ("PCA", "MAHALANOBIS")])
def test_affine_is_the_projection(tiny_set, reduction, distance):
    """``model.affine()``, which the deployment graph reads, is the model's own projection as one map."""
    model = tiny_model(algorithm="ONLINE", aggregation="NONE", feature_reduction=reduction, distance=distance)
    model.fit(tiny_set[0][:1])
    feats = model._embed(tiny_set[0][1]).reshape(-1, 48)
    affine = model.affine()
    if (reduction, distance) == ("NONE", "EUCLIDEAN"):
        assert affine is None
        return
    a, b = affine
    assert a.dtype == b.dtype == torch.float32 and a.shape == (48, model.memory_bank_.shape[1])
    torch.testing.assert_close(feats @ a + b, model._project(feats).float(), rtol=1e-4, atol=1e-4)
