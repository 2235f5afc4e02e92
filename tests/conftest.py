import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SIZE = 64


def _good(rng: np.random.Generator) -> np.ndarray:
    """A regular texture (diagonal stripes) with small shifts and noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    base = np.sin((xx + yy) * 0.6 + phase)
    img = np.stack([base, 0.5 * base, -base]) + rng.normal(0, 0.05, (3, SIZE, SIZE))
    return img.astype(np.float32)


def make_tiny_set(n_train: int = 12, n_good_test: int = 4, seed: int = 0):
    """Returns (train batches of tensors, test batches as PatchCore dicts, defect box)."""
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(np.stack([_good(rng) for _ in range(n_train)]))
    box = (20, 34, 36, 50)  # y0, y1, x0, x1
    test_imgs, masks, labels = [], [], []
    for _ in range(n_good_test):
        test_imgs.append(_good(rng))
        masks.append(np.zeros((1, SIZE, SIZE), np.float32))
        labels.append(0)
    bad = _good(rng)
    y0, y1, x0, x1 = box
    bad[:, y0:y1, x0:x1] = np.array([2.5, -2.5, 2.5], np.float32)[:, None, None]
    mask = np.zeros((1, SIZE, SIZE), np.float32)
    mask[:, y0:y1, x0:x1] = 1
    test_imgs.append(bad)
    masks.append(mask)
    labels.append(1)
    test = {
        "image": torch.from_numpy(np.stack(test_imgs)),
        "mask": torch.from_numpy(np.stack(masks)),
        "is_anomaly": torch.tensor(labels),
        "image_path": [f"img{i}.png" for i in range(len(labels))],
    }
    return list(train.split(4)), [test], box


@pytest.fixture(scope="session")
def tiny_set():
    return make_tiny_set()


def tiny_model(**kw):
    from mhpc.core.mh_patch_core import MHPatchCore

    params = dict(
        backbone="resnet18", embedding_layers=["layer2", "layer3"], pretrained=False, input_shape=(SIZE, SIZE),
        pretrain_embed_dimension=64, target_embed_dimension=48, coreset_percentage=0.25, kmeans_clusters=0.2,
        pca_batch_size=64, kmeans_batch_size=64, coreset_chunk_size=200, progress=False, seed=0,
    )
    params.update(kw)
    return MHPatchCore(**params)


def assert_reloads_identically(model, folder, images, keep_fit_state: bool = True):
    """save -> load -> predict gives bit-identical scores and maps; returns the loaded model."""
    from mhpc.core.mh_patch_core import MHPatchCore

    scores, maps = model.predict_images(images)
    loaded = MHPatchCore.load(model.save(folder, keep_fit_state=keep_fit_state))
    got_scores, got_maps = loaded.predict_images(images)
    np.testing.assert_array_equal(got_scores, scores)
    np.testing.assert_array_equal(got_maps, maps)
    assert loaded.get_config() == model.get_config()
    return loaded


def assert_updates_and_reloads(model, new_batches, folder, images):
    """update -> save -> load: the update is kept (more images, another bank) and reloads bit-identically."""
    n_before, bank_before = model.n_train_images_, model.memory_bank_.clone()
    model.update(new_batches)
    assert model.n_train_images_ > n_before
    assert model.memory_bank_.shape != bank_before.shape or not torch.equal(model.memory_bank_, bank_before)
    again = assert_reloads_identically(model, folder, images)
    assert again.n_train_images_ == model.n_train_images_ and again.fit_state_ is not None
    return again


def png_with_sbit(path, array: np.ndarray, bits: int) -> None:
    """A grey PNG of ``array`` with an sBIT chunk saying ``bits`` significant bits."""
    import struct
    import zlib

    from PIL import Image

    Image.fromarray(array).save(path)
    data = path.read_bytes()
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
    path.write_bytes(data[:33] + chunk + data[33:])  # right after the 8-byte signature and 25-byte IHDR
