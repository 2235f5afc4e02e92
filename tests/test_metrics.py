import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from mhpc.errors import MHPCError
from mhpc.metrics import aupro, f1_max, image_auroc, pixel_auroc, pro_curve


def test_auroc_against_sklearn_and_hand_values():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    masks = rng.random((3, 8, 8)) > 0.8
    maps = rng.random((3, 8, 8)) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    with pytest.raises(MHPCError, match="both"):
        image_auroc([0, 0], [1, 2])


def test_f1_max_hand_computed():
    f1, thr = f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.35)


def test_aupro_perfect_map_is_one():
    gt = np.zeros((1, 8, 8), bool)
    gt[0, 2:4, 2:5] = True
    assert aupro(gt, gt.astype(float)) == pytest.approx(1.0)


def test_aupro_two_regions_one_found():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 0, 0:2] = True  # region A
    gt[0, 3, 2:4] = True  # region B
    maps = np.full((1, 4, 4), 2.0)
    maps[0, 0, 0:2] = 3.0
    maps[0, 3, 2:4] = 1.0
    # Curve (0,0) (0,.5) (1,.5) (1,1): area up to 0.3 is 0.15, normalised 0.5.
    assert aupro(gt, maps) == pytest.approx(0.5)


def test_aupro_partial_overlap_interpolated():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 0, :] = True  # one region of 4 pixels
    maps = np.zeros((1, 4, 4))
    maps[0, 0, :] = [5, 5, 1, 1]
    maps[0, 1, :3] = 4  # 3 of 12 background pixels
    # Curve (0,0) (0,.5) (.25,.5) (.25,1) (1,1): area to 0.3 = 0.125 + 0.05.
    assert aupro(gt, maps) == pytest.approx(0.175 / 0.3)


def brute_force_aupro(masks, maps, limit=0.3):
    """Threshold sweep with explicit per-region overlaps, then the same interpolation rule."""
    labeled = [ndimage.label(m, np.ones((3, 3)))[0] for m in masks]
    bg = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & bg).sum() / bg.sum()
        overlaps = [(pred[i][lab == k]).mean() for i, lab in enumerate(labeled) for k in range(1, lab.max() + 1)]
        points.append((fpr, np.mean(overlaps)))
    x, y = np.array(points).T
    area = 0.0
    for i in range(1, len(x)):
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


@pytest.mark.parametrize("seed", range(5))
def test_aupro_matches_brute_force_and_never_exceeds_one(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    for i in range(3):
        y, x = rng.integers(0, 9, 2)
        masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = np.round(rng.random((3, 12, 12)) + masks * rng.random(), 1)  # many ties
    value = aupro(masks, maps)
    assert value == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)
    assert 0.0 <= value <= 1.0
    assert aupro(masks, masks * 10.0 + 1.0) <= 1.0


def test_pro_curve_is_monotone_and_bounded():
    rng = np.random.default_rng(1)
    masks = rng.random((2, 10, 10)) > 0.7
    fpr, pro = pro_curve(masks, rng.random((2, 10, 10)))
    assert (np.diff(fpr) >= 0).all() and (np.diff(pro) >= 0).all()
    assert fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)


def test_aupro_errors():
    with pytest.raises(MHPCError, match="shape"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 5, 5)))
    with pytest.raises(MHPCError, match="anomalous regions"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
