"""Issue 10: nothing hides, hangs or is lost. One test per case: the exit code is 2, the one-line message
names the file or parameter, nothing is half-written and an existing model is untouched. The edge-defect,
float-TIFF, 16-bit and collision cases assert on scores and files."""

import csv
import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_with_sbit, tiny_model
from mhpc.cli import main
from mhpc.errors import MHPCError, MHPCWarning, ModelFileError

TINY_CFG = ("backbone: resnet18\nembedding_layers: [layer2, layer3]\npretrain_embed_dimension: 64\n"
            "target_embed_dimension: 48\ncoreset_percentage: 0.25\n")
FAST = ["--random-init", "--quiet", "--input-size", "64", "64", "--batch-size", "4"]


def stripes(rng, h=64, w=64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.4 * np.sin((xx + yy) * 0.5 + rng.uniform(0, 6.28))
    img = np.stack([base, base * 0.8, 1 - base], -1) + rng.normal(0, 0.03, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_images(folder: Path, n: int, seed: int = 0, h: int = 64, w: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i:03d}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(stripes(rng, h, w)).save(p)
    return paths


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "warning:" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny folder of good images, a config, and a model fitted from them by the CLI."""
    root = tmp_path_factory.mktemp("bad")
    write_images(root / "good", 7)
    (root / "cfg.yaml").write_text(TINY_CFG)
    assert main(["fit", "--folder", str(root / "good"), "--config", str(root / "cfg.yaml"), "--out",
                 str(root / "model"), *FAST]) == 0
    return root


def fit_argv(work: Path, out: Path, *extra) -> list:
    return ["fit", "--folder", work / "good", "--config", work / "cfg.yaml", "--out", out, *FAST, *extra]


# ------------------------------------------------------------------ 1. the whole image is inspected
def test_edge_defect_of_a_wide_image_is_seen(tmp_path):
    from mhpc.data.datasets import FolderDataset, ImageFilesDataset, make_loader
    from mhpc.data.transforms import make_preprocessing

    write_images(tmp_path / "good", 6, h=128, w=384)
    rng = np.random.default_rng(9)
    clean = stripes(rng, 128, 384)
    bad = clean.copy()
    bad[44:84, 10:50] = [255, 0, 0]  # 40 x 40 at the left edge
    Image.fromarray(clean).save(tmp_path / "clean.png")
    Image.fromarray(bad).save(tmp_path / "bad.png")
    scores = {}
    for crop in ("none", "center"):
        pre = make_preprocessing(128, crop)
        model = tiny_model(input_shape=(128, 128)).fit(make_loader(FolderDataset(tmp_path / "good", preprocessing=pre), 6))
        ds = ImageFilesDataset([tmp_path / "bad.png", tmp_path / "clean.png"], preprocessing=pre)
        scores[crop], _ = model.predict_images(torch.stack([ds[0]["image"], ds[1]["image"]]))
    assert scores["none"][0] > 2 * scores["none"][1]  # default: the edge defect stands out
    assert scores["center"][0] == pytest.approx(scores["center"][1])  # the MVTec crop never sees it
    assert FolderDataset(tmp_path / "good").preprocessing["crop"] == "none"


def test_recorded_preprocessing_rebuilds_the_same_transform(work):
    """predict, export and a future Ray predict preprocess from ``model.preprocessing_`` alone."""
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.data.datasets import FolderDataset
    from mhpc.data.io import load_rgb
    from mhpc.data.transforms import build_transforms

    model = MHPatchCore.load(work / "model")
    assert model.preprocessing_ == {"crop": "none", "input_size": [64, 64], "resize": None, "bit_depth": None,
                                    "tile": None}
    image_tf, _ = build_transforms(model.preprocessing_)
    ds = FolderDataset(work / "good", input_size=64)
    assert torch.equal(image_tf(load_rgb(ds.samples[0].image)), ds[0]["image"])


def test_non_square_input_size_from_the_cli(work, tmp_path, capsys):
    write_images(tmp_path / "wide", 5, h=32, w=96)
    out = tmp_path / "m"
    argv = fit_argv(work, out)
    argv[2] = tmp_path / "wide"
    argv[argv.index("--input-size") + 1: argv.index("--input-size") + 3] = ["32", "96"]
    assert main([str(a) for a in argv]) == 0
    from mhpc.core.mh_patch_core import MHPatchCore

    model = MHPatchCore.load(out)
    assert tuple(model.input_shape) == (32, 96) and model.preprocessing_["input_size"] == [32, 96]
    pred = tmp_path / "p"
    assert main(["predict", "--model", str(out), "--images", str(tmp_path / "wide"), "--out", str(pred), "--quiet"]) == 0
    rows = list(csv.DictReader(open(pred / "scores.csv")))
    assert np.load(pred / rows[0]["map_path"]).shape == (32, 96)


# ------------------------------------------------------------------ 2. pixel values as they are
def test_float_tiff_scores_like_its_8bit_png(work, tmp_path):
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.data.datasets import ImageFilesDataset

    rgb = stripes(np.random.default_rng(3))
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(gray.astype(np.float32) / 255.0, mode="F").save(tmp_path / "a.tif")
    model = MHPatchCore.load(work / "model")
    ds = ImageFilesDataset([tmp_path / "a.png", tmp_path / "a.tif"], preprocessing=model.preprocessing_)
    assert torch.allclose(ds[0]["image"], ds[1]["image"])
    scores, _ = model.predict_images(torch.stack([ds[0]["image"], ds[1]["image"]]))
    assert scores[1] == pytest.approx(scores[0])  # not all-black, not flagged
    Image.fromarray(gray.astype(np.float32), mode="F").save(tmp_path / "b.tif")  # 0..255 floats
    with pytest.raises(MHPCError, match=r"b\.tif.*mode F"):
        ImageFilesDataset([tmp_path / "b.tif"]).validate()


def test_sixteen_bit_data_keeps_its_real_depth(tmp_path):
    from mhpc.data.datasets import FolderDataset
    from mhpc.data.io import load_rgb

    (tmp_path / "a").mkdir()
    twelve = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit data, 0..4095
    Image.fromarray(twelve).save(tmp_path / "a" / "x.png")
    ds = FolderDataset(tmp_path / "a").validate()
    assert ds.preprocessing["bit_depth"] == 16  # no sBIT: the container's depth, never guessed from the data
    levels = np.unique(np.asarray(load_rgb(tmp_path / "a" / "x.png", 12))[..., 0])  # a model fitted on 12 bits
    assert levels.min() == 0 and levels.max() == 255 and len(levels) == 256  # not 16 grey levels
    # The sBIT chunk wins over the data's maximum: 10 significant bits -> 1023 is white.
    ten = np.full((64, 64), 1023, np.uint16)
    png_with_sbit(tmp_path / "s.png", ten, 10)
    assert np.asarray(load_rgb(tmp_path / "s.png", 16)).max() == 255


def test_masks_threshold_at_half_their_maximum(tmp_path):
    from mhpc.data.io import load_mask

    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    mask[18:20, 18:42] = 40  # JPEG ringing around the defect
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert (np.asarray(load_mask(tmp_path / "m.png")) > 0).sum() == 400


def test_unreadable_mode_names_file_and_mode(tmp_path):
    from mhpc.data.io import load_rgb

    img = Image.new("I", (16, 16))
    img.putdata([70000] * 256)
    img.save(tmp_path / "big.tif")
    with pytest.raises(MHPCError, match=r"big\.tif.*mode I"):
        load_rgb(tmp_path / "big.tif")


# ------------------------------------------------------------------ 3. validated before the work
def test_threshold_from_few_images_warns_with_the_count(work, tmp_path, capsys):
    code, err = run(fit_argv(work, tmp_path / "m"), capsys)
    assert code == 0 and "warning: the threshold comes from only 1 held-out image(s)" in err
    assert "--holdout" in err  # the warning names the option that fixes it
    assert err.count("\n") == 1


@pytest.mark.parametrize("setting,needle", [
    ("coreset_percentage: abc", "coreset_percentage must be a number, got the string 'abc'"),
    ("coreset_percentage: 1e-1", "YAML reads 1e-3 as text"),
    ("seed: -1", "seed must be an integer in [0, 4294967295], got -1"),
    ("covariance_jitter: .nan", "covariance_jitter must be in [0, 1], got nan"),
    ("kmeans_clusters: abc", "kmeans_clusters must be an int count"),
])
def test_bad_config_values_are_one_line_before_the_fit(work, tmp_path, capsys, setting, needle):
    (tmp_path / "c.yaml").write_text(TINY_CFG + setting + "\n")
    argv = fit_argv(work, tmp_path / "m")
    argv[argv.index("--config") + 1] = tmp_path / "c.yaml"
    assert_one_line(*run(argv, capsys), needle)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_batch_size(work, tmp_path, capsys, value):
    assert_one_line(*run(fit_argv(work, tmp_path / "m", "--batch-size", value), capsys), "--batch-size")
    assert not (tmp_path / "m").exists()


def test_unwritable_out_is_found_before_the_fit(work, tmp_path, capsys, monkeypatch):
    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.setattr(MHPatchCore, "fit", lambda *a: pytest.fail("fit ran"))
    (tmp_path / "file").write_text("x")
    assert_one_line(*run(fit_argv(work, tmp_path / "file" / "sub"), capsys), "is a file", "file")


def test_bad_training_image_is_found_before_the_fit(work, tmp_path, capsys, monkeypatch):
    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.setattr(MHPatchCore, "fit", lambda *a: pytest.fail("fit ran"))
    write_images(tmp_path / "good", 3)
    data = (tmp_path / "good" / "002.png").read_bytes()
    (tmp_path / "good" / "002.png").write_bytes(data[: len(data) // 2])  # truncated
    argv = fit_argv(work, tmp_path / "m")
    argv[2] = tmp_path / "good"
    assert_one_line(*run(argv, capsys), "002.png")
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    from mhpc.data.synthetic import generate_benchmark

    return generate_benchmark(tmp_path_factory.mktemp("mv") / "d", ("grass",), n_train=3, n_test_good=1,
                              n_test_per_defect=1, seed=0)


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "cannot read image"), ("mask_size", "but image"), ("mask_empty", "is empty (all zero)"),
])
def test_evaluate_checks_the_test_set_before_the_fit(mvtec, tmp_path, capsys, monkeypatch, damage, needle):
    import shutil

    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.setattr(MHPatchCore, "fit", lambda *a: pytest.fail("fit ran"))
    data = tmp_path / "d"
    shutil.copytree(mvtec, data)
    image = data / "grass" / "test" / "hole" / "000.png"
    mask = data / "grass" / "ground_truth" / "hole" / "000_mask.png"
    if damage == "truncate":
        image.write_bytes(image.read_bytes()[:200])
    elif damage == "mask_size":
        Image.fromarray(np.full((10, 10), 255, np.uint8)).save(mask)
    else:
        Image.fromarray(np.zeros(Image.open(image).size[::-1], np.uint8)).save(mask)
    code, err = run(["evaluate", "--data", data, "--category", "grass", "--out", tmp_path / "o", *FAST], capsys)
    assert_one_line(code, err, needle, "000")
    assert not (tmp_path / "o").exists()


def test_size_guards_and_decompression_bomb_are_one_line(tmp_path):
    from mhpc.data.io import load_rgb

    Image.fromarray(np.zeros((1, 16000), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(MHPCError, match=r"strip\.png is 16000x1, an aspect ratio"):
        load_rgb(tmp_path / "strip.png")
    # A PNG header claiming 15000 x 12000 pixels (Pillow's DecompressionBombError territory).
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 15000, 12000, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    (tmp_path / "bomb.png").write_bytes(png + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
    with pytest.raises(MHPCError, match=r"bomb\.png is too large"):
        load_rgb(tmp_path / "bomb.png")


def test_jitter_escalation_is_bounded_whatever_its_inputs():
    from mhpc.mahalanobis import CovarianceCholesky
    from mhpc.mahalanobis.cholesky import SingularCovarianceError

    negative = -torch.eye(3, dtype=torch.float64)
    chol = CovarianceCholesky(jitter=0.0, max_jitter=1e300)
    chol.MAX_STEPS = 3  # 0, 1e-10, 1e-9: not enough, and the loop stops there
    with pytest.raises(SingularCovarianceError):
        chol.compute(negative)
    for kw in ({"max_jitter": math.nan}, {"jitter": math.nan}, {"jitter": math.inf}):
        with pytest.raises(MHPCError, match="jitter"):
            CovarianceCholesky(**kw).compute(torch.eye(3))


def test_covariance_inputs_of_any_dtype_or_empty():
    from mhpc.mahalanobis import CovarianceCholesky, OnlineCovariance

    for dtype in (torch.int64, torch.float16):
        factor = CovarianceCholesky().compute((4 * torch.eye(3)).to(dtype))
        assert torch.allclose(factor.double(), 2 * torch.eye(3, dtype=torch.float64))
    with pytest.raises(MHPCError, match="non-empty square"):
        CovarianceCholesky().compute(torch.zeros(0, 0))
    stats = OnlineCovariance(4).update(torch.zeros(0, 4))
    assert stats.count == 0


def test_warnings_for_huge_k_and_ill_conditioned_covariance():
    from mhpc.mahalanobis.whitening import warn_if_ill_conditioned
    from mhpc.memory_bank.kmeans import resolve_cluster_count

    with pytest.warns(MHPCWarning, match="more than half of the 1000 training patches"):
        assert resolve_cluster_count(100000, 1000) == 1000
    with pytest.warns(MHPCWarning, match="condition number"):
        warn_if_ill_conditioned(torch.diag(torch.tensor([1.0, 1e-12], dtype=torch.float64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_ill_conditioned(torch.eye(3, dtype=torch.float64))
        resolve_cluster_count(10, 1000)


def test_api_edge_cases_are_one_line_errors(work, tiny_set):
    from mhpc.core.mh_patch_core import MHPatchCore

    model = MHPatchCore.load(work / "model")
    cases = [
        (lambda: model.predict_images(torch.zeros(0, 3, 64, 64)), "no images"),
        (lambda: model.predict([{"mask": torch.zeros(1, 1, 64, 64)}]), "'image' key"),
        (lambda: model.predict_images((torch.rand(1, 3, 64, 64) * 255).to(torch.uint8)), "torch.uint8"),
        (lambda: model.predict_images(torch.rand(1, 3, 64, 64) * 255), "0..255"),
        (lambda: tiny_model(coreset_percentage="0.1")._validate(), "the string '0.1'"),
        (lambda: tiny_model(seed=2**64)._validate(), "seed"),
    ]
    for call, needle in cases:
        with pytest.raises(MHPCError, match=needle.replace("(", r"\(").replace(".", r"\.")):
            call()
    # numpy integers are integers: an np.int64 cluster count fits.
    fitted = tiny_model(aggregation="KMEANS", kmeans_clusters=np.int64(20), seed=np.int64(3)).fit(tiny_set[0])
    assert fitted.memory_bank_.shape[0] == 20 and json.dumps(fitted.get_config())


# ------------------------------------------------------------------ 4. outputs atomic and unambiguous
def test_map_names_never_collide(work, tmp_path, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.data.datasets import ImageFilesDataset

    rng = np.random.default_rng(5)
    files = [tmp_path / "cA" / "000.png", tmp_path / "cA" / "000_2.png", tmp_path / "cB" / "000.png"]
    for f in files:
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(stripes(rng)).save(f)
    out = tmp_path / "p"
    assert run(["predict", "--model", work / "model", "--images", tmp_path / "cA", tmp_path / "cB", "--out", out,
                "--quiet"], capsys)[0] == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["map_path"] for r in rows] == ["maps/cA/000.npy", "maps/cA/000_2.npy", "maps/cB/000.npy"]
    model = MHPatchCore.load(work / "model")
    ds = ImageFilesDataset(files, preprocessing=model.preprocessing_)
    for i, r in enumerate(rows):  # each map file holds its own image's map
        score, amap = model.predict_images(ds[i]["image"])
        assert np.allclose(np.load(out / r["map_path"]), amap[0], atol=1e-5)
        assert float(r["score"]) == pytest.approx(score[0])
        assert (out / r["overlay_path"]).is_file()


def test_evaluate_names_do_not_collide_across_suffixes():
    from mhpc.outputs import output_names

    names = output_names(["/d/good/000.png", "/d/good/000.jpg", "/d/hole/000.png"])
    assert [str(n) for n in names] == ["good/000.png", "good/000.jpg", "hole/000.png"]


def test_non_utf8_file_name_round_trips(work, tmp_path, capsys):
    folder = tmp_path / "imgs"
    paths = write_images(folder, 2)
    odd = os.path.join(os.fsencode(folder), b"lat\xe9in.png")
    os.rename(paths[1], odd)
    out = tmp_path / "p"
    assert run(["predict", "--model", work / "model", "--images", folder, "--out", out, "--quiet"], capsys)[0] == 0
    raw = (out / "scores.csv").read_bytes()
    assert raw.count(b"\n") == 3 and odd in raw  # the name's own bytes, every row written
    with open(out / "scores.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.DictReader(fh))
    assert os.fsencode(rows[1]["image_path"]) == odd and (out / rows[1]["map_path"]).is_file()


def test_second_run_into_one_out_is_refused_and_overwrite_replaces(work, tmp_path, capsys):
    out = tmp_path / "p"
    images = write_images(tmp_path / "a", 2)
    assert run(["predict", "--model", work / "model", "--images", *images, "--out", out, "--quiet"], capsys)[0] == 0
    before = (out / "scores.csv").read_bytes()
    code, err = run(["predict", "--model", work / "model", "--images", images[0], "--out", out, "--quiet"], capsys)
    assert_one_line(code, err, "is not empty", "--overwrite")
    assert (out / "scores.csv").read_bytes() == before
    assert run(["predict", "--model", work / "model", "--images", images[0], "--out", out, "--quiet",
                "--overwrite"], capsys)[0] == 0
    assert len(list((out / "maps").rglob("*.npy"))) == 1  # the old run's second map is gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, err = run(["predict", "--model", work / "model", "--images", images[0], "--out", tmp_path / "mine",
                     "--quiet", "--overwrite"], capsys)
    assert_one_line(code, err, "not written by mhpc")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # --overwrite into the model's own folder would delete the model: refused.
    code, err = run(["predict", "--model", work / "model", "--images", images[0], "--out", work / "model",
                     "--quiet", "--overwrite"], capsys)
    assert_one_line(code, err, "holds the model")
    assert (work / "model" / "model.safetensors").is_file()


def test_corrupt_last_image_leaves_no_output(work, tmp_path, capsys):
    images = write_images(tmp_path / "a", 3)
    images[-1].write_bytes(b"garbage")
    out = tmp_path / "p"
    code, err = run(["predict", "--model", work / "model", "--images", *images, "--out", out, "--batch-size", "1",
                     "--quiet"], capsys)
    assert_one_line(code, err, "002.png")
    assert not out.exists()


def test_out_is_always_a_folder_and_a_file_is_never_overwritten(work, tmp_path, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore

    assert run(fit_argv(work, tmp_path / "run.v2"), capsys)[0] == 0
    assert (tmp_path / "run.v2" / "model.safetensors").is_file()
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line(*run(fit_argv(work, tmp_path / "notes.txt"), capsys), "notes.txt", "not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    os.rename(tmp_path / "run.v2" / "model.safetensors", tmp_path / "modelfile")
    assert MHPatchCore.load(tmp_path / "modelfile").is_fitted_  # a file without suffix is a file


def test_refit_into_a_model_folder_keeps_the_old_model_until_the_new_one_is_saved(work, tmp_path, capsys):
    import shutil

    shutil.copytree(work / "model", tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert_one_line(*run(fit_argv(work, tmp_path / "m"), capsys), "is not empty")
    (tmp_path / "c.yaml").write_text(TINY_CFG + "seed: abc\n")
    argv = fit_argv(work, tmp_path / "m", "--overwrite")
    argv[argv.index("--config") + 1] = tmp_path / "c.yaml"
    assert_one_line(*run(argv, capsys), "seed")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_model_file_follows_umask_and_stale_temp_files_go(work, tmp_path):
    from mhpc.core.mh_patch_core import MHPatchCore

    model = MHPatchCore.load(work / "model")
    (tmp_path / "m").mkdir()
    stale = tmp_path / "m" / ".tmp-dead.safetensors"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not stale.exists()


def test_sigterm_is_handled_like_ctrl_c(work, tmp_path):
    images = write_images(tmp_path / "a", 12)
    out = tmp_path / "p"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mhpc", "predict", "--model", str(work / "model"), "--images",
                             *map(str, images), "--out", str(out), "--batch-size", "1", "--quiet"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not (out / "maps").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not out.exists()  # the run's partial maps were removed


def test_ablation_run_names_stay_inside_out(tmp_path, monkeypatch, capsys):
    import mhpc.ablation as ablation

    seen = []

    def fake(cfg, data_root, category, run_dir, *a, **k):
        seen.append(Path(run_dir))
        return {c: 1.0 for c in ablation.COLUMNS} | {"memory_bank_size": 1}

    monkeypatch.setattr(ablation, "evaluate_in_subprocess", fake)
    (tmp_path / "d" / "cat" / "train").mkdir(parents=True)
    ablation.run_ablation(tmp_path / "d", None, [{"name": "../../x"}, {"name": "ok", "seed": 1}], tmp_path / "o",
                          progress=True)  # two specifications: equal ones would run once
    assert [p.relative_to(tmp_path / "o").parts for p in seen] == [("_.._x", "cat"), ("ok", "cat")]
    err = capsys.readouterr().err
    assert "ablation runs: 100%" in err and "2/2" in err  # one overall bar, runs done of all


# ------------------------------------------------------------------ 5. model files validated, signed
def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copies a model file after ``edit(meta, tensors)``, recomputing its SHA-256 (as an attacker could)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mhpc.core.model_file import _digest

    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.pop("sha256")
    signature = meta.pop("hmac_sha256", None)  # kept as it was: without the key it cannot be recomputed
    config, state = json.loads(meta["config"]), json.loads(meta["state"])
    config, state = edit(config, state, tensors)
    meta["config"], meta["state"] = json.dumps(config), json.dumps(state)
    meta["sha256"] = _digest(tensors, meta)
    if signature:
        meta["hmac_sha256"] = signature
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set(d, key, value):
    d[key] = value
    return d


def _drop(d, key):
    d.pop(key)
    return d


EDITS = {
    "unknown config key": (lambda c, s, t: (_set(c, "colour", 1), s), "unknown key"),
    "no input_shape": (lambda c, s, t: (_drop(c, "input_shape"), s), "lacks ['input_shape']"),
    "config is a list": (lambda c, s, t: ([1, 2], s), "config is a list"),
    "no grid_shape": (lambda c, s, t: (c, _drop(s, "grid_shape")), "lacks ['grid_shape']"),
    "no bank": (lambda c, s, t: (c, s) if t.pop("memory_bank") is not None else None, "'memory_bank' is missing"),
    "bank of wrong width": (lambda c, s, t: (c, s) if t.update(memory_bank=torch.zeros(5, 7)) is None else None,
                            "dimension R is 48"),
    "NaN bank": (lambda c, s, t: (c, s) if t["memory_bank"].fill_(float("nan")) is not None else None, "NaN"),
    "NaN threshold": (lambda c, s, t: (c, _set(s, "threshold", float("nan"))), "threshold must be a finite number"),
    "bad fit_state": (lambda c, s, t: (c, s) if t.update({"fit_state.x": torch.tensor([math.inf])}) is None else None,
                      "'fit_state.x' contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_rehashed_bad_model_files_are_refused(work, tmp_path, capsys, case):
    edit, needle = EDITS[case]
    bad = _rewrite(work / "model" / "model.safetensors", tmp_path / "bad" / "model.safetensors", edit)
    code, err = run(["predict", "--model", bad, "--images", work / "good" / "000.png", "--out", tmp_path / "p",
                     "--quiet"], capsys)
    assert_one_line(code, err, "is not a valid mhpc model", needle)
    assert not (tmp_path / "p").exists()


def test_optional_fit_state_tensors_are_accepted(work, tmp_path):
    from mhpc.core.mh_patch_core import MHPatchCore

    ok = _rewrite(work / "model" / "model.safetensors", tmp_path / "m.safetensors",
                  lambda c, s, t: (c, s) if t.update({"fit_state.x": torch.ones(3)}) is None else None)
    assert MHPatchCore.load(ok).is_fitted_


def test_hmac_signing(work, tmp_path, monkeypatch, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore

    (tmp_path / "key").write_text("s3cret\n")
    signed = tmp_path / "signed"
    assert run(fit_argv(work, signed, "--key-file", tmp_path / "key"), capsys)[0] == 0
    monkeypatch.setenv("MHPC_MODEL_KEY", "s3cret")
    assert MHPatchCore.load(signed).is_fitted_
    with pytest.raises(ModelFileError, match="has no signature"):
        MHPatchCore.load(work / "model")  # unsigned, but a key is configured
    forged = _rewrite(signed / "model.safetensors", tmp_path / "f.safetensors",
                      lambda c, s, t: (c, _set(s, "threshold", 1e9)))  # SHA-256 recomputed, HMAC cannot be
    with pytest.raises(ModelFileError, match="signature does not match"):
        MHPatchCore.load(forged)
    monkeypatch.setenv("MHPC_MODEL_KEY", "other")
    with pytest.raises(ModelFileError, match="signature does not match"):
        MHPatchCore.load(signed)


# ------------------------------------------------------------------ tiling (images much larger than the input)
def test_tile_boxes_cover_every_pixel_flush_with_the_border():
    from mhpc.data.tiling import tile_boxes

    boxes = tile_boxes(100, 250, 64, 16)
    assert {(t, l) for t, l, _, _ in boxes} == {(t, l) for t in (0, 36) for l in (0, 48, 96, 144, 186)}
    cover = np.zeros((100, 250), int)
    for t, l, h, w in boxes:
        cover[t:t + h, l:l + w] += 1
    assert cover.min() >= 1 and all(h == w == 64 for _, _, h, w in boxes)
    assert tile_boxes(30, 40, 64, 16) == [(0, 0, 30, 40)]  # smaller than a tile: one tile, the whole image


def test_tiled_fit_and_predict_stitch_full_resolution_maps(work, tmp_path, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore

    write_images(tmp_path / "good", 5, h=96, w=144)
    rng = np.random.default_rng(11)
    bad = stripes(rng, 96, 144)
    bad[60:76, 120:136] = [255, 0, 0]  # in the last column of tiles
    Image.fromarray(bad).save(tmp_path / "bad.png")
    model_dir = tmp_path / "m"
    argv = fit_argv(work, model_dir, "--tile", "48", "--tile-overlap", "8")
    argv[2] = tmp_path / "good"
    argv[argv.index("--input-size") + 1: argv.index("--input-size") + 3] = ["48", "48"]
    assert run(argv, capsys)[0] == 0
    assert MHPatchCore.load(model_dir).preprocessing_["tile"] == [48, 8]
    out = tmp_path / "p"
    assert run(["predict", "--model", model_dir, "--images", tmp_path / "bad.png", tmp_path / "good" / "000.png",
                "--out", out, "--quiet"], capsys)[0] == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    amap = np.load(out / rows[0]["map_path"])
    assert amap.shape == (96, 144)  # the original resolution
    y, x = np.unravel_index(amap.argmax(), amap.shape)
    assert 52 <= y <= 84 and 112 <= x <= 143  # the peak sits on the defect
    assert float(rows[0]["score"]) > 1.5 * float(rows[1]["score"])
    assert Image.open(out / rows[0]["overlay_path"]).size == (144, 96)
    argv[argv.index("--tile-overlap") + 1] = "48"
    assert_one_line(*run(argv + ["--overwrite"], capsys), "--tile-overlap")
