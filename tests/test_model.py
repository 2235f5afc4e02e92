import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_model
from mhpc.core.backbones import BackboneName, hub_checkpoint_dir, MOBILENET_V2_FILE
from mhpc.core.mh_patch_core import (
    MHPatchCore,
    PatchCoreAggregation,
    PatchCoreAlgorithm,
    PatchCoreDistance,
    PatchCoreFeatureReduction,
)
from mhpc.errors import MHPCError, ModelFileError, NotFittedError


def test_enums_indexable_by_name():
    assert PatchCoreAlgorithm["ONLINE"] is PatchCoreAlgorithm.ONLINE
    assert PatchCoreAggregation["KMEANS"] is PatchCoreAggregation.KMEANS
    assert PatchCoreFeatureReduction["PCA"] is PatchCoreFeatureReduction.PCA
    assert PatchCoreDistance["MAHALANOBIS"] is PatchCoreDistance.MAHALANOBIS
    assert BackboneName["wideresnet50"] is BackboneName.wideresnet50


@pytest.fixture(scope="module")
def fitted(tiny_set):
    train, _, _ = tiny_set
    model = tiny_model(feature_reduction="PCA", distance="MAHALANOBIS", aggregation="KMEANS", algorithm="ONLINE")
    return model.fit(train)


def test_save_load_bit_identical(fitted, tiny_set, tmp_path):
    _, test, _ = tiny_set
    fitted.calibrate([test[0]["image"][:4]])
    fitted.save(tmp_path / "m")
    loaded = MHPatchCore.load(tmp_path / "m")
    a, b = fitted.predict(test), loaded.predict(test)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.get_config() == fitted.get_config()
    assert not list(tmp_path.glob("m/.tmp-*"))  # no temporary file left behind


def test_save_before_fit_and_predict_before_fit(tmp_path, tiny_set):
    with pytest.raises(NotFittedError):
        tiny_model().save(tmp_path / "m")
    with pytest.raises(NotFittedError):
        tiny_model().predict(tiny_set[1])


def test_truncated_tampered_future_files(fitted, tmp_path):
    path = tmp_path / "model.safetensors"
    fitted.save(path)
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match="trunc.safetensors"):
        MHPatchCore.load(tmp_path / "trunc.safetensors")

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tampered = dict(tensors)
    tampered["memory_bank"] = tensors["memory_bank"].clone()
    tampered["memory_bank"][0, 0] += 1.0
    save_file(tampered, str(tmp_path / "tamper.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="integrity"):
        MHPatchCore.load(tmp_path / "tamper.safetensors")

    cfg = json.loads(meta["config"])
    cfg["coreset_percentage"] = 0.5
    save_file(tensors, str(tmp_path / "cfg.safetensors"), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(ModelFileError, match="integrity"):
        MHPatchCore.load(tmp_path / "cfg.safetensors")

    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={**meta, "format_version": "99"})
    with pytest.raises(ModelFileError, match="version 99"):
        MHPatchCore.load(tmp_path / "future.safetensors")

    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelFileError):
        MHPatchCore.load(tmp_path / "pickle.safetensors")


def test_load_refuses_other_backbone_weights(fitted, tmp_path, monkeypatch):
    fitted.save(tmp_path / "m")
    import mhpc.core.mh_patch_core as core

    real = core.load_backbone
    monkeypatch.setattr(core, "load_backbone", lambda name, pretrained, path, seed: real(name, pretrained, path, seed + 1))
    with pytest.raises(ModelFileError, match="different backbone weights"):
        MHPatchCore.load(tmp_path / "m")


def test_same_seed_same_results(tiny_set):
    train, test, _ = tiny_set
    kw = dict(algorithm="ONLINE", aggregation="GREEDY", feature_reduction="PCA", distance="MAHALANOBIS")
    a = tiny_model(**kw).fit(train).predict(test)
    b = tiny_model(**kw).fit(train).predict(test)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_bad_inputs(tiny_set):
    train, test, _ = tiny_set
    with pytest.raises(MHPCError, match="no images"):
        tiny_model().fit([])
    with pytest.raises(MHPCError, match="3, H, W"):
        tiny_model().fit([torch.zeros(2, 1, 64, 64)])
    with pytest.raises(MHPCError, match="3, H, W"):
        tiny_model().fit([torch.zeros(2, 4, 64, 64)])
    with pytest.raises(MHPCError, match="NaN"):
        bad = train[0].clone()
        bad[0, 0, 0, 0] = float("nan")
        tiny_model().fit([bad])
    with pytest.raises(MHPCError, match="input_shape"):
        tiny_model().fit([torch.zeros(2, 3, 32, 32)])
    with pytest.raises(MHPCError, match="invalid algorithm"):
        tiny_model(algorithm="FAST").fit(train)
    with pytest.raises(MHPCError, match="invalid distance"):
        tiny_model(distance="cosine").fit(train)
    with pytest.raises(MHPCError, match="coreset_percentage"):
        tiny_model(coreset_percentage=0).fit(train)
    with pytest.raises(MHPCError, match="coreset_percentage"):
        tiny_model(coreset_percentage=1.2).fit(train)
    with pytest.raises(MHPCError, match="pca_variance_ratio"):
        tiny_model(pca_variance_ratio=0).fit(train)
    with pytest.raises(MHPCError, match="unknown backbone"):
        tiny_model(backbone="vgg").fit(train)


def test_nan_features_are_reported(tiny_set, monkeypatch):
    model = tiny_model()
    model._validate()
    model._build()
    monkeypatch.setattr(model.feature_extractor_, "forward", lambda x: (torch.full((x.shape[0], 4, 48), float("nan")), (2, 2)))
    with pytest.raises(MHPCError, match="features contain NaN"):
        model._embed(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize(
    "red,dist,agg,expected",
    [("NONE", "EUCLIDEAN", "GREEDY", 1), ("PCA", "EUCLIDEAN", "GREEDY", 2), ("PCA", "MAHALANOBIS", "KMEANS", 2),
     ("PCA", "MAHALANOBIS", "NONE", 1), ("NONE", "MAHALANOBIS", "NONE", 1), ("NONE", "EUCLIDEAN", "KMEANS", 1)],
)
def test_online_runs_the_backbone_no_more_than_needed(tiny_set, red, dist, agg, expected):
    train = tiny_set[0]
    model = tiny_model(algorithm="ONLINE", feature_reduction=red, distance=dist, aggregation=agg)
    calls = []
    original = MHPatchCore._embed

    def counting(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    MHPatchCore._embed = counting
    try:
        model.fit(train)
    finally:
        MHPatchCore._embed = original
    assert model.n_passes_ == expected
    assert sum(calls) == expected * 12


def test_dict_batches_and_plain_tensors(tiny_set):
    train, test, _ = tiny_set
    model = tiny_model().fit([{"image": t, "is_anomaly": torch.zeros(len(t))} for t in train])
    scores, maps, labels, masks = model.predict([test[0]["image"]])
    assert labels is None and masks is None and scores.shape == (5,)


def test_squared_and_num_nn_and_reweighting(tiny_set):
    train, test, _ = tiny_set
    plain = tiny_model().fit(train).predict(test)[0]
    squared = tiny_model(squared_distances=True).fit(train).predict(test)[0]
    np.testing.assert_allclose(squared, plain**2, rtol=1e-4)
    knn = tiny_model(num_nn=3).fit(train).predict(test)[0]
    assert (knn >= plain - 1e-6).all()
    rew = tiny_model(reweight_num_support=5).fit(train).predict(test)[0]
    assert (rew <= plain + 1e-6).all() and (rew > 0).all()
    assert rew[4] > rew[:4].max()


def test_pretrained_mobilenet_from_offline_file(tiny_set):
    # The test command runs `mhpc setup-weights` first, so the file must be there.
    assert (hub_checkpoint_dir() / MOBILENET_V2_FILE).is_file()
    train, test, _ = tiny_set
    model = tiny_model(backbone="mobilenet_v2", embedding_layers=None, pretrained=True)
    scores = model.fit(train).predict(test)[0]
    assert scores[4] > scores[:4].max()


def test_folded_projection_equals_pca_then_whitening(fitted, tiny_set):
    assert fitted.affine_ is not None
    feats = fitted._embed(tiny_set[0][0]).reshape(-1, 48)
    two_step = fitted.space_.transform(fitted.reduction_.transform(feats).double())
    torch.testing.assert_close(fitted._project(feats).double(), two_step, rtol=1e-3, atol=1e-3)


def test_sized_loader_collects_the_same_features_as_a_list(tiny_set):
    train = tiny_set[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(train)), batch_size=5)
    as_loader = tiny_model(aggregation="NONE").fit([b[0] for b in loader])
    from mhpc.fit.passes import statistics_pass

    sized = tiny_model(aggregation="NONE").begin_fit()
    feats = statistics_pass(sized, torch.utils.data.DataLoader(torch.cat(train), batch_size=5), keep="matrix").patches[0]
    assert torch.equal(feats, as_loader.memory_bank_)


def test_weights_path_loads_a_local_state_dict(tmp_path):
    from mhpc.core.backbones import load_backbone, state_fingerprint

    reference = load_backbone("resnet18", pretrained=False, seed=7)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    loaded = load_backbone("resnet18", weights_path=tmp_path / "w.pth")
    assert state_fingerprint(loaded) == state_fingerprint(reference)
    assert state_fingerprint(load_backbone("resnet18", pretrained=False, seed=8)) != state_fingerprint(reference)
    with pytest.raises(MHPCError, match="not found"):
        load_backbone("resnet18", weights_path=tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(MHPCError, match="bad.pth"):
        load_backbone("resnet18", weights_path=tmp_path / "bad.pth")


def test_blur_sigma_zero_gives_the_upsampled_patch_scores(tiny_set):
    import torch.nn.functional as F

    train, test, _ = tiny_set
    images = test[0]["image"]
    model = tiny_model(blur_sigma=0).fit(train)
    scores, maps = model.predict_images(images)
    feats = model._embed(images)
    patch, _ = model.scorer_.patch_scores(model._project(feats.reshape(-1, feats.shape[-1])))
    patch = torch.from_numpy(patch).reshape(5, 1, *model.grid_shape_)
    expected = F.interpolate(patch, size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    np.testing.assert_allclose(scores, patch.reshape(5, -1).max(dim=1).values.numpy(), rtol=1e-6)
    blurred = tiny_model().fit(train).predict_images(images)[1]
    assert not np.allclose(blurred, maps)
