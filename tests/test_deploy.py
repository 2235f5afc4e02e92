"""Export to ONNX / OpenVINO and the torch-free engine: parity with torch, input checks, the search bound."""

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from conftest import tiny_model
from mhpc.core.mh_patch_core import (
    MHPatchCore,
    PatchCoreAggregation,
    PatchCoreAlgorithm,
    PatchCoreDistance,
    PatchCoreFeatureReduction,
)
from mhpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mhpc.errors import MHPCError, ModelFileError, NotFittedError

pytest.importorskip("onnxruntime")
from mhpc.deploy import DeployedModel  # noqa: E402

COMBOS = list(itertools.product(PatchCoreAlgorithm, PatchCoreFeatureReduction, PatchCoreAggregation, PatchCoreDistance))
PROPOSED = dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS")


def as_model_input(u8: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> what the datasets feed the model (torchvision's own ToDtype + Normalize)."""
    norm = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return norm(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())


@pytest.fixture(scope="module")
def images(tiny_set):
    _, test, _ = tiny_set
    return np.stack([denormalize(img) for img in test[0]["image"]])  # 5 images, the last with a defect


def fitted(tiny_set, images, **kw):
    model = tiny_model(**kw).fit(tiny_set[0])
    scores, _ = model.predict_images(as_model_input(images))
    s = np.sort(scores)
    model.threshold_ = float((s[2] + s[3]) / 2)  # two images above, three below, none near it
    return model


def assert_parity(model, images, result, rtol=1e-4):
    scores, maps = model.predict_images(as_model_input(images))
    assert result.scores.shape == scores.shape and result.maps.shape == maps.shape
    np.testing.assert_allclose(result.scores, scores, rtol=rtol, atol=0)
    span = float(maps.max() - maps.min())
    assert np.abs(result.maps - maps).max() <= rtol * span, np.abs(result.maps - maps).max() / span
    np.testing.assert_array_equal(result.is_anomaly, scores >= model.threshold_)
    assert result.is_anomaly.any() and not result.is_anomaly.all()


@pytest.mark.parametrize("alg,red,agg,dist", COMBOS, ids=lambda e: e.name)
def test_onnxruntime_parity_all_combinations(tiny_set, images, tmp_path, alg, red, agg, dist):
    model = fitted(tiny_set, images, algorithm=alg, feature_reduction=red, aggregation=agg, distance=dist)
    path = model.export(tmp_path / "m.onnx")
    engine = DeployedModel(path)
    assert_parity(model, images, engine.predict(images))
    # dynamic batch: one image at a time gives the same scores
    single = np.concatenate([engine.predict(images[i : i + 1]).scores for i in range(len(images))])
    np.testing.assert_allclose(single, engine.predict(images).scores, rtol=1e-5)
