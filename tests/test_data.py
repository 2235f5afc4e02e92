import numpy as np
import pytest
import torch
from PIL import Image

from mhpc.data.datasets import FolderDataset, ImageFilesDataset, MVTecDataset, collate
from mhpc.data.synthetic import DEFECT_KINDS, draw_defect, generate_benchmark, load_texture
from mhpc.errors import MHPCError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return generate_benchmark(root / "data", ("brick",), n_train=3, n_test_good=2, n_test_per_defect=1, seed=1)


def test_generator_layout_and_determinism(bench, tmp_path):
    cat = bench / "brick"
    assert len(list((cat / "train" / "good").glob("*.png"))) == 3
    for kind in DEFECT_KINDS:
        img = np.asarray(Image.open(cat / "test" / kind / "000.png"))
        mask = np.asarray(Image.open(cat / "ground_truth" / kind / "000_mask.png"))
        assert img.shape == (256, 256, 3) and mask.shape == (256, 256)
        assert 0 < (mask > 0).mean() < 0.3
    again = generate_benchmark(tmp_path / "again", ("brick",), n_train=3, n_test_good=2, n_test_per_defect=1, seed=1)
    for f in sorted((cat).rglob("*.png")):
        other = again / "brick" / f.relative_to(cat)
        assert f.read_bytes() == other.read_bytes()
    # Writes only inside its output folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_defects_change_exactly_the_masked_pixels():
    rng = np.random.default_rng(0)
    img = load_texture("gravel")[:256, :256]
    foreign = load_texture("brick")
    for kind in DEFECT_KINDS:
        out, mask = draw_defect(img, kind, rng, 0.5, foreign)
        changed = np.abs(out - img).max(axis=2) > 1e-6
        assert not (changed & ~mask).any(), kind
        assert changed[mask].mean() > 0.5, kind


def test_train_and_test_crops_are_disjoint():
    from mhpc.data.synthetic import TEST_ROWS, TRAIN_ROWS

    assert TRAIN_ROWS[1] <= TEST_ROWS[0]


def test_mvtec_dataset_items(bench):
    train = MVTecDataset(bench, "brick", "train")
    test = MVTecDataset(bench, "brick", "test")
    assert len(train) == 3 and len(test) == 2 + len(DEFECT_KINDS)
    item = test[len(test) - 1]
    assert item["image"].shape == (3, 224, 224) and item["mask"].shape == (1, 224, 224)
    assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
    assert item["is_anomaly"] == 1 and item["image_path"].endswith(".png")
    good = [test[i] for i in range(len(test)) if test.samples[i].defect_type == "good"]
    assert all(g["is_anomaly"] == 0 and g["mask"].sum() == 0 for g in good)
    batch = collate([test[0], test[1]])
    assert batch["image"].shape == (2, 3, 224, 224) and len(batch["image_path"]) == 2


def test_mask_geometry_follows_the_image(tmp_path):
    root = tmp_path / "cat"
    (root / "test" / "hole").mkdir(parents=True)
    (root / "ground_truth" / "hole").mkdir(parents=True)
    img = np.zeros((300, 400, 3), np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[140:160, 190:210] = 255  # centre square survives resize 256 + centre crop 224
    Image.fromarray(img).save(root / "test" / "hole" / "a.png")
    Image.fromarray(mask).save(root / "ground_truth" / "hole" / "a_mask.png")
    item = MVTecDataset(tmp_path, "cat", "test")[0]
    m = item["mask"][0]
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(ys.float().mean().item() - 111.5) < 2 and abs(xs.float().mean().item() - 111.5) < 2


def test_grayscale_and_rgba_are_converted(tmp_path):
    (tmp_path / "good").mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "good" / "g.png")
    Image.fromarray(np.full((64, 64, 4), 128, np.uint8)).save(tmp_path / "good" / "rgba.png")
    ds = FolderDataset(tmp_path / "good")
    for i in range(2):
        assert ds[i]["image"].shape == (3, 224, 224)


def test_bad_inputs_name_the_file(tmp_path, bench):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MHPCError, match="broken.png"):
        FolderDataset(tmp_path / "good")[0]
    # A mask whose size differs from its image names both files.
    root = tmp_path / "mv" / "cat"
    (root / "test" / "hole").mkdir(parents=True)
    (root / "ground_truth" / "hole").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "test" / "hole" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "ground_truth" / "hole" / "a_mask.png")
    with pytest.raises(MHPCError, match=r"a_mask.png.*a.png"):
        MVTecDataset(tmp_path / "mv", "cat", "test")[0]
    # A missing mask for a defect image is an error; a missing ground_truth for good is fine.
    (root / "ground_truth" / "hole" / "a_mask.png").unlink()
    with pytest.raises(MHPCError, match="missing mask"):
        MVTecDataset(tmp_path / "mv", "cat", "test")
    with pytest.raises(MHPCError, match="category"):
        MVTecDataset(tmp_path / "mv", "nope", "train")
    with pytest.raises(MHPCError, match="no images"):
        (root / "train" / "good").mkdir(parents=True)
        MVTecDataset(tmp_path / "mv", "cat", "train")


def test_folder_dataset_with_abnormal_and_masks(tmp_path):
    for d in ("good", "bad", "masks"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "good" / "a.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "bad" / "b.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "masks" / "b.png")
    ds = FolderDataset(tmp_path / "good", tmp_path / "bad", tmp_path / "masks")
    assert [ds[i]["is_anomaly"] for i in range(2)] == [0, 1]
    assert ds[1]["mask"].mean() == 1.0
    with pytest.raises(MHPCError, match="image path not found"):
        ImageFilesDataset([tmp_path / "missing.png"])
