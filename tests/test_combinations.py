import itertools

import numpy as np
import pytest

from conftest import tiny_model
from mhpc.core.mh_patch_core import (
    PatchCoreAggregation,
    PatchCoreAlgorithm,
    PatchCoreDistance,
    PatchCoreFeatureReduction,
)

COMBOS = list(itertools.product(PatchCoreAlgorithm, PatchCoreFeatureReduction, PatchCoreAggregation, PatchCoreDistance))


def test_there_are_24_combinations():
    assert len(COMBOS) == 24


# The 24 with the default PCA solver ("covariance"), and the 12 with PCA again with "incremental".
RUNS = [(*c, "covariance") for c in COMBOS] + [
    (*c, "incremental") for c in COMBOS if c[1] is PatchCoreFeatureReduction.PCA
]


@pytest.mark.parametrize("alg,red,agg,dist,solver", RUNS, ids=lambda e: getattr(e, "name", e))
def test_combination_end_to_end(tiny_set, alg, red, agg, dist, solver):
    train, test, (y0, y1, x0, x1) = tiny_set
    model = tiny_model(algorithm=alg, feature_reduction=red, aggregation=agg, distance=dist, pca_solver=solver)
    assert model.fit(train) is model
    scores, maps, labels, gt = model.predict(test)
    assert scores.shape == (5,) and maps.shape == (5, 64, 64) and gt.shape == (5, 64, 64)
    assert labels == [0, 0, 0, 0, 1]
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    # The planted defect scores above every good image ...
    assert scores[4] > scores[:4].max()
    # ... and its map peaks inside the defect.
    py, px = np.unravel_index(np.argmax(maps[4]), maps[4].shape)
    assert y0 <= py < y1 and x0 <= px < x1, (py, px)
    bank = model.memory_bank_
    n_patches = 12 * 8 * 8
    if agg is PatchCoreAggregation.NONE:
        assert bank.shape[0] == n_patches
    elif agg is PatchCoreAggregation.GREEDY:
        assert bank.shape[0] == pytest.approx(0.25 * n_patches, abs=3)
    else:
        assert bank.shape[0] == round(0.2 * n_patches)
    if red is PatchCoreFeatureReduction.PCA:
        assert bank.shape[1] < 48
    else:
        assert bank.shape[1] == 48
