"""Every model that fit can produce survives the model file: fit -> save -> load -> predict gives
bit-identical scores and maps; the loaded model exports and the engine agrees within 1e-4; update ->
save -> load works (or is refused in one line without fit state). Each preset, both embeddings, the
24 combinations, whole-image and tiled preprocessing, with and without fit state and an HMAC key."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_reloads_identically, assert_updates_and_reloads, tiny_model
from mhpc.config import PRESETS
from mhpc.core.mh_patch_core import MHPatchCore, PatchCoreAggregation, PatchCoreAlgorithm
from mhpc.data.datasets import FolderDataset, make_loader
from mhpc.data.tiling import TiledDataset
from mhpc.data.transforms import denormalize, make_preprocessing
from mhpc.deploy import DeployedModel
from mhpc.errors import MHPCError, ModelFileError


def assert_engine_agrees(model, folder, images: torch.Tensor) -> None:
    """The exported graph (onnxruntime) scores the same uint8 pixels within 1e-4 of the scale of the scores
    (near-zero distances of good patches carry float32 cancellation of that scale, in faiss and the graph
    alike) and of the range of the maps."""
    scores, maps = model.predict_images(images)
    pixels = np.stack([denormalize(img) for img in images])
    result = DeployedModel(model.export(folder / "m.onnx", head="conv"), engine="onnxruntime").predict(pixels)
    assert np.abs(result.scores - scores).max() <= 1e-4 * np.abs(scores).max()
    assert np.abs(result.maps - maps).max() <= 1e-4 * float(maps.max() - maps.min())


def round_trip(model, train, new, images: torch.Tensor, folder, keep_fit_state=True, export=True):
    """fit -> save -> load bit-identical -> export parity -> update -> save -> load (or a refused update)."""
    model.fit(train)
    loaded = assert_reloads_identically(model, folder / "m", images, keep_fit_state)
    if export:
        assert_engine_agrees(loaded, folder, images)
    if not keep_fit_state:
        with pytest.raises(MHPCError, match="no fit state"):
            loaded.update(new)
        return loaded
    return assert_updates_and_reloads(loaded, new, folder / "m2", images)


def _as_input(test_batches) -> torch.Tensor:
    """Test images as the model sees them, rounded through uint8 so the engine gets the same pixels."""
    from torchvision.transforms import v2 as T

    from mhpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    u8 = np.stack([denormalize(img) for img in test_batches[0]["image"]])
    norm = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return norm(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())


# The unpooled embedding (the layers' channels wide) where its width reaches a stored tensor (PCA basis,
# whitening factor), across both algorithms and the three banks; the 24 pooled combinations run the same
# contract in tests/test_deploy.py (test_onnxruntime_parity_all_combinations).
UNPOOLED = [(alg, red, agg, dist) for alg in PatchCoreAlgorithm for (red, dist), agg in zip(
    [("PCA", "MAHALANOBIS"), ("PCA", "EUCLIDEAN"), ("NONE", "MAHALANOBIS")], PatchCoreAggregation)]


@pytest.mark.parametrize("alg,red,agg,dist", UNPOOLED, ids=lambda e: getattr(e, "name", e))
def test_unpooled_embedding_round_trips(tiny_set, tmp_path, alg, red, agg, dist):
    train, test, _ = tiny_set
    model = tiny_model(algorithm=alg, feature_reduction=red, aggregation=agg, distance=dist, patch_embedding="unpooled")
    round_trip(model, train[:1], train[1:2], _as_input(test), tmp_path)


def _tiny_preset(name: str, **kw):
    params = dict(backbone="resnet18", embedding_layers=["layer2", "layer3"], pretrained=False, input_shape=(64, 64),
                  pretrain_embed_dimension=64, target_embed_dimension=48, coreset_percentage=0.25,
                  pca_batch_size=64, kmeans_batch_size=64, coreset_chunk_size=200, progress=False, seed=0)
    return MHPatchCore.from_preset(name, **{**params, **kw})


@pytest.fixture(scope="module")
def image_folders(tiny_set, tmp_path_factory):
    """Non-square PNGs (80 x 64) of the tiny textures: training, new good and test folders."""
    root = tmp_path_factory.mktemp("round_trip")
    train, test, _ = tiny_set
    all_train = torch.cat(train)
    folders = {}
    for name, tensors in [("train", all_train[:4]), ("new", all_train[4:6]), ("test", test[0]["image"][2:])]:
        folder = root / name
        folder.mkdir()
        for i, img in enumerate(tensors):
            rgb = denormalize(img)
            Image.fromarray(np.concatenate([rgb, rgb[:, :16]], axis=1)).save(folder / f"{i:03d}.png")
        folders[name] = folder
    return folders


def _loader(folder, pre, tile=None):
    ds = FolderDataset(folder, preprocessing=pre)
    return make_loader(TiledDataset(ds, *tile) if tile else ds, batch_size=4)


@pytest.mark.parametrize("tile", [None, (48, 8)], ids=["whole-image", "tiled"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_round_trips_whole_image_and_tiled(image_folders, tmp_path, preset, tile):
    pre = make_preprocessing((64, 64), "none")
    model = _tiny_preset(preset)
    train, new = _loader(image_folders["train"], pre, tile), _loader(image_folders["new"], pre, tile)
    images = torch.cat([b["image"] for b in _loader(image_folders["test"], pre, tile)])
    loaded = round_trip(model, train, new, images, tmp_path)
    assert loaded.preprocessing_["tile"] == (list(tile) if tile else None)
    assert loaded.preprocessing_["crop"] == "none"
    if preset == "best":  # the regression: unpooled width 128 + 256 (resnet18 layer2 + layer3), not 48
        assert loaded.reduction_.components_.shape[1] == 128 + 256


def test_a_wrong_width_is_still_refused(tiny_set, tmp_path):
    """The check is derived, not relaxed: a PCA basis of the pooled width in an unpooled model is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import mhpc.core.model_file as model_file

    train, _, _ = tiny_set
    model = tiny_model(feature_reduction="PCA", patch_embedding="unpooled").fit(train)
    path = model.save(tmp_path / "m")
    with safe_open(str(path), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["pca_components"] = tensors["pca_components"][:, :48].contiguous()
    tensors["pca_mean"] = tensors["pca_mean"][:48].contiguous()
    meta.pop("sha256")
    meta["sha256"] = model_file._digest(tensors, meta)  # re-hashed: only the schema can catch it
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=r"dimension F is 384 elsewhere|shape \(\d+, 48\)"):
        MHPatchCore.load(path)


@pytest.mark.parametrize("keep_fit_state", [True, False])
def test_signed_model_round_trips_with_and_without_fit_state(tiny_set, tmp_path, monkeypatch, keep_fit_state):
    train, test, _ = tiny_set
    monkeypatch.setenv("MHPC_MODEL_KEY", "line-7-secret")
    model = _tiny_preset("best")
    loaded = round_trip(model, train[:1], train[1:2], _as_input(test), tmp_path, keep_fit_state=keep_fit_state,
                        export=False)
    monkeypatch.setenv("MHPC_MODEL_KEY", "another-key")
    with pytest.raises(ModelFileError, match="signature does not match"):
        MHPatchCore.load(tmp_path / "m")
    assert loaded.is_fitted_
