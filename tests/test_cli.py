import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from mhpc.cli import main
from mhpc.data.synthetic import generate_benchmark

FAST = ["--backbone", "resnet18", "--random-init", "--quiet", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "data"
    return generate_benchmark(root, ("grass",), n_train=6, n_test_good=2, n_test_per_defect=1, seed=0)


def test_help_on_every_subcommand(capsys):
    for cmd in ["demo", "fit", "update", "predict", "export", "evaluate", "ablation", "generate", "setup-weights",
                "setup-textures", "serve"]:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: mhpc " + cmd in capsys.readouterr().out


def test_fit_then_predict(data, tmp_path):
    model = tmp_path / "model"
    assert main(["fit", "--data", str(data), "--category", "grass", "--out", str(model), *FAST]) == 0
    assert (model / "model.safetensors").is_file()
    out = tmp_path / "pred"
    test_dir = data / "grass" / "test"
    images = [str(test_dir / "good"), str(test_dir / "hole" / "000.png")]
    assert main(["predict", "--model", str(model), "--images", *images, "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [list(r) for r in rows[:1]] == [["image_path", "score", "is_anomalous", "map_path", "overlay_path"]]
    assert len(rows) == 3 and all(r["is_anomalous"] in ("0", "1") for r in rows)
    # Map and overlay names mirror the inputs' paths without the extension (good/000 and hole/000 stay apart).
    assert [r["map_path"] for r in rows] == ["maps/good/000.npy", "maps/good/001.npy", "maps/hole/000.npy"]
    assert [r["overlay_path"] for r in rows] == ["overlays/good/000.png", "overlays/good/001.png",
                                                 "overlays/hole/000.png"]
    # A whole-image model's maps and overlays are in the image's own pixels (256 x 256 here, input 224).
    amap = np.load(out / rows[0]["map_path"])
    assert amap.dtype == np.float32 and amap.shape == (256, 256)
    assert all(Image.open(out / r["overlay_path"]).size == (256, 256) for r in rows)


@pytest.mark.parametrize("flag,value", [("--threshold-quantile", "1.5"), ("--holdout", "1.2")])
def test_fit_rejects_bad_threshold_options_before_fitting(data, tmp_path, flag, value, capsys):
    model = tmp_path / "m"
    argv = ["fit", "--data", str(data), "--category", "grass", "--out", str(model), flag, value, *FAST]
    assert main(argv) == 2
    assert flag in capsys.readouterr().err
    assert not model.exists()


def test_fit_with_config_file_and_folder(data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("alg: ONLINE\nagg: KMEANS\nred: PCA\ndist: MAHALANOBIS\nkmeans_clusters: 50\ntarget_embed_dimension: 64\n")
    model = tmp_path / "m"
    assert main(["fit", "--folder", str(data / "grass" / "train" / "good"), "--config", str(cfg), "--out", str(model), *FAST]) == 0
    from mhpc.core.mh_patch_core import MHPatchCore

    loaded = MHPatchCore.load(model)
    assert loaded.get_config()["algorithm"] == "ONLINE" and loaded.memory_bank_.shape[0] == 50
    assert loaded.threshold_stats_["count"] == 1  # 10% of 6 images, at least one


def test_evaluate_writes_everything(data, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--category", "grass", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "fit_seconds", "predict_ms_per_image",
                "peak_rss_mb", "memory_bank_size"]:
        assert isinstance(metrics[key], (int, float))
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert list(rows[0]) == ["image_path", "label", "score", "map_path", "gt_path"] and len(rows) == 8
    # The saved maps and masks recompute the same metrics.
    from mhpc.metrics import aupro, image_auroc

    maps, gts = [], []
    for r in rows:
        maps.append(np.load(out / r["map_path"]))
        gts.append(np.load(out / r["gt_path"]))
        assert maps[-1].shape == gts[-1].shape == (224, 224)
    assert image_auroc([int(r["label"]) for r in rows], [float(r["score"]) for r in rows]) == pytest.approx(metrics["image_auroc"])
    assert aupro(np.stack(gts), np.stack(maps)) == pytest.approx(metrics["pixel_aupro"])
    assert "<img" in (out / "report.html").read_text()


def test_ablation_table(data, tmp_path):
    cfgs = tmp_path / "ab.yaml"
    cfgs.write_text("defaults: {backbone: resnet18, kmeans_clusters: 30}\nconfigs:\n"
                    "  - {name: base, alg: VANILLA, agg: GREEDY, red: NONE, dist: EUCLIDEAN}\n"
                    "  - {name: prop, alg: ONLINE, agg: KMEANS, red: PCA, dist: MAHALANOBIS, target_embed_dimension: 64}\n")
    out = tmp_path / "ab"
    assert main(["ablation", "--data", str(data), "--configs", str(cfgs), "--out", str(out), "--random-init", "--quiet"]) == 0
    table = (out / "table.md").read_text()
    assert "| base | grass |" in table and "| prop | grass |" in table
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["config"] for r in rows] == ["base", "prop"] and rows[1]["memory_bank_size"] == "30"
    assert (out / "base" / "grass" / "report.html").is_file() and (out / "report.html").is_file()


def test_shipped_ablation_configs_parse():
    from importlib.resources import files

    from mhpc.config import load_config_list

    cfgs = load_config_list(files("mhpc") / "configs" / "ablation.yaml")
    names = [c["name"] for c in cfgs]
    assert names[:3] == ["baseline", "proposed", "proposed-batch"] and len(set(names)) == len(names)


def test_demo_on_tiny_data(tmp_path, capsys):
    argv = ["demo", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--categories", "brick",
            "--n-train", "4", "--n-test-good", "2", "--n-test-per-defect", "1", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"| {preset} | brick |" in printed for preset in ("paper", "proposed", "best"))
    index = (tmp_path / "o" / "report.html").read_text()
    assert "<title>mhpc demo: the paper, proposed and best presets on brick" in index
    assert all(note in index for note in ("PatchCore as published", "The seed&#x27;s proposal",
                                          "The recommendation of ABLATION.md"))


def test_user_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mhpc", "evaluate", "--data", str(tmp_path), "--category", "x",
                           "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "category 'x' not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mhpc", "predict", "--model", str(tmp_path / "nope"), "--images",
                           str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "model file not found" in proc.stderr


def test_update_cli_writes_atomically_and_refuses_without_fit_state(data, tmp_path, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore

    model = tmp_path / "model"
    assert main(["fit", "--data", str(data), "--category", "grass", "--out", str(model), "--holdout", "0.3",
                 "--aggregation", "NONE", *FAST]) == 0
    before = MHPatchCore.load(model)
    new = tmp_path / "new"
    new.mkdir()
    for src in sorted((data / "grass" / "train" / "good").iterdir())[:2]:
        (new / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "updated"  # --out is always a folder, as for fit
    assert main(["update", "--model", str(model), "--folder", str(new), "--out", str(out), "--quiet"]) == 0
    assert "2 images" in capsys.readouterr().out
    after = MHPatchCore.load(out)
    assert after.n_train_images_ == before.n_train_images_ + 2
    assert after.memory_bank_.shape[0] == before.memory_bank_.shape[0] + 2 * 28 * 28  # NONE appends the patches
    assert after.threshold_ == before.threshold_  # kept without --holdout
    # In place (no --out): the file is replaced atomically, no temporary file is left behind.
    assert main(["update", "--model", str(model), "--folder", str(new), "--quiet"]) == 0
    assert MHPatchCore.load(model).n_train_images_ == before.n_train_images_ + 2
    assert (model / "model.safetensors").is_file() and not list(model.glob(".tmp-*"))
    # A model saved without its fit state is refused in one line, and the file is left alone.
    before.save(tmp_path / "bare.safetensors", keep_fit_state=False)
    stamp = (tmp_path / "bare.safetensors").read_bytes()
    assert main(["update", "--model", str(tmp_path / "bare.safetensors"), "--folder", str(new), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "without its fit state" in err and len(err.splitlines()) == 1
    assert (tmp_path / "bare.safetensors").read_bytes() == stamp


def test_help_and_argument_errors_import_no_torch():
    """`mhpc --help`, every subcommand's --help and an argument error parse without importing torch,
    scikit-learn or numpy (they took ~6 s of CPU before anything was printed)."""
    code = textwrap.dedent("""
        import sys
        from mhpc.cli import build_parser, main
        commands = [a for a in build_parser()._subparsers._group_actions[0].choices]
        for argv in [["--help"], *[[c, "--help"] for c in commands], ["fit", "--no-such-flag"]]:
            try:
                main(argv)
            except SystemExit:
                pass
        print(len(commands), sorted(m for m in ("torch", "sklearn", "numpy", "scipy") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_commands, heavy = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(n_commands) >= 10 and heavy == "[]"


# ------------------------------------------------------------------ a new user's path, for every preset
def _stripes(rng, h, w, defect=False) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.4 * np.sin((xx + yy) * 0.5 + rng.uniform(0, 6.28))
    img = np.stack([base, base * 0.8, 1 - base], -1) + rng.normal(0, 0.03, (h, w, 3))
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if defect:
        img[16:28, 24:36] = [255, 0, 0]
    return img


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory):
    """32 good 48x64 training images (not square: the letterbox pads them), 4 more for update, and a test
    folder with subfolders whose files share names (test/good/000.png, test/defect/000.png)."""
    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    for folder, n, defect in (("good", 32, False), ("new", 4, False), ("test/good", 3, False),
                              ("test/defect", 2, True)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_stripes(rng, 48, 64, defect)).save(root / folder / f"{i:03d}.png")
    return root


def _scores(folder):
    return {r["image_path"]: r for r in csv.DictReader(open(folder / "scores.csv"))}


@pytest.mark.parametrize("preset", ["paper", "proposed", "best"])
def test_user_path_fit_predict_export_engine_update(user_folders, tmp_path, preset, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore

    root, test = user_folders, user_folders / "test"
    fast = ["--backbone", "resnet18", "--random-init", "--quiet", "--input-size", "64", "64"]
    model = tmp_path / "m"
    assert main(["fit", "--folder", str(root / "good"), "--preset", preset, "--out", str(model), *fast]) == 0
    printed = capsys.readouterr().out
    # 32 good images: 10 held out (not 3 = 10%), and the threshold is reported with their false-positive rate.
    stats = MHPatchCore.load(model).threshold_stats_
    assert stats["count"] == 10 and "fitted on 22 images" in printed
    assert stats["holdout_flagged"] >= 1 and stats["holdout_fpr"] == stats["holdout_flagged"] / 10
    fpr = f"{stats['holdout_flagged'] * 10}%"
    assert f"quantile of 10 held-out good images; it flags {stats['holdout_flagged']} of them: false-positive rate {fpr}" in printed

    # predict a folder with subfolders; the output goes inside it, and a later walk skips it.
    first = test / f"p-{preset}"
    assert main(["predict", "--model", str(model), "--images", str(test), "--out", str(first), "--quiet"]) == 0
    torch_rows = _scores(first)
    assert sorted(r["map_path"] for r in torch_rows.values()) == [
        "maps/defect/000.npy", "maps/defect/001.npy", "maps/good/000.npy", "maps/good/001.npy", "maps/good/002.npy"]
    for r in torch_rows.values():  # the image's own 64 x 48 pixels, not the padded 64 x 64 input
        assert np.load(first / r["map_path"]).shape == (48, 64)
        assert Image.open(first / r["overlay_path"]).size == (64, 48)

    # export, then the engine on the export's folder (exactly one .onnx there): the same scores.
    exported = tmp_path / "exported"
    exported.mkdir()
    assert main(["export", "--model", str(model), "--out", str(exported / "model.onnx"), "--quiet"]) == 0
    engine_out = tmp_path / "engine"
    assert main(["predict", "--engine", "onnxruntime", "--model", str(exported), "--images", str(test),
                 "--out", str(engine_out), "--quiet"]) == 0
    engine_rows = _scores(engine_out)
    assert engine_rows.keys() == torch_rows.keys()
    for path, r in torch_rows.items():
        assert float(engine_rows[path]["score"]) == pytest.approx(float(r["score"]), rel=1e-4)
        assert engine_rows[path]["is_anomalous"] == r["is_anomalous"]
        theirs, ours = np.load(engine_out / r["map_path"]), np.load(first / r["map_path"])
        assert np.abs(theirs - ours).max() <= 1e-4 * np.ptp(ours)  # the README's measure: a fraction of the range

    # update with new good images, then predict with the updated model.
    updated = tmp_path / "m2"
    assert main(["update", "--model", str(model), "--folder", str(root / "new"), "--out", str(updated), "--quiet"]) == 0
    assert MHPatchCore.load(updated).n_train_images_ == 22 + 4
    again = tmp_path / "again"
    capsys.readouterr()
    assert main(["predict", "--model", str(updated), "--images", str(test), "--out", str(again)]) == 0
    bar = capsys.readouterr().err
    assert "predict: 100%" in bar and "5/5" in bar  # a progress bar over the images (off with --quiet)
    assert _scores(again).keys() == torch_rows.keys()  # test/p-<preset> (an mhpc output) was not walked


def test_engine_model_folder_must_hold_exactly_one_export(tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    argv = ["predict", "--engine", "onnxruntime", "--model", str(folder), "--images", str(tmp_path),
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mhpc export --model MODEL --format onnx" in err and len(err.strip().splitlines()) == 1
    for name in ("a.onnx", "b.onnx"):
        (folder / name).write_bytes(b"")
        (folder / f"{name}.json").write_text("{}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 .onnx exports (a.onnx, b.onnx); pass one of them as --model" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ backbone weights offline
def test_offline_fit_error_names_the_cli_routes(data, tmp_path, monkeypatch, capsys):
    import urllib.error

    import torch

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: torchvision must download
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    argv = ["fit", "--folder", str(data / "grass" / "train" / "good"), "--out", str(tmp_path / "m"), "--quiet",
            "--backbone", "resnet18"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mhpc fit: error: cannot load ImageNet weights for resnet18")
    for route in ("mhpc setup-weights --backbone resnet18 --file resnet18-f37072fd.pth", "--weights FILE",
                  "--backbone mobilenet_v2"):
        assert route in err
    assert not (tmp_path / "m").exists()


class _NotATensor:
    def __reduce__(self):  # unpickling this would call print: weights_only=True must refuse it
        return (print, ("code ran",))


def test_setup_weights_places_torchvisions_file_and_weights_flag_takes_any(data, tmp_path, monkeypatch, capsys):
    import hashlib

    import torch
    from safetensors.torch import save_file

    import mhpc.weights
    from mhpc.core.backbones import load_backbone, state_fingerprint
    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    own = load_backbone("resnet18", pretrained=False, seed=7)
    pth = tmp_path / "resnet18-own.pth"
    torch.save(own.state_dict(), pth)
    # Not torchvision's file (its SHA-256 does not match the name's prefix): refused, pointing to --weights.
    assert main(["setup-weights", "--backbone", "resnet18", "--file", str(pth)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not torchvision's ImageNet file resnet18-f37072fd.pth" in err and f"--weights {pth}" in err
    # A pickle that would run code is never executed: weights_only refuses it, naming the file.
    torch.save({"conv1.weight": _NotATensor()}, tmp_path / "code.pth")
    assert main(["setup-weights", "--backbone", "resnet18", "--file", str(tmp_path / "code.pth")]) == 2
    assert "cannot read backbone weights from" in capsys.readouterr().err
    # A file of another architecture: refused, saying so.
    assert main(["setup-weights", "--backbone", "resnet50", "--file", str(pth)]) == 2
    assert "does not load into resnet50" in capsys.readouterr().err
    assert not (tmp_path / "torch").exists()
    # A file whose hash matches the name's prefix (here: ours, declared as torchvision's) goes in the hub cache,
    # where pretrained=True (the default) then finds it.
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    monkeypatch.setattr(mhpc.weights, "imagenet_file", lambda name: ("resnet18-f37072fd.pth", digest[:8]))
    assert main(["setup-weights", "--backbone", "resnet18", "--file", str(pth), "--quiet"]) == 0
    placed = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert placed.read_bytes() == pth.read_bytes()
    assert state_fingerprint(load_backbone("resnet18")) == state_fingerprint(own)
    # --weights FILE: any state dict of the architecture, .pth or .safetensors; the model records it.
    st = tmp_path / "own.safetensors"
    save_file(own.state_dict(), str(st))
    model = tmp_path / "m"
    assert main(["fit", "--folder", str(data / "grass" / "train" / "good"), "--out", str(model), "--quiet",
                 "--backbone", "resnet18", "--weights", str(st), "--input-size", "64", "64"]) == 0
    loaded = MHPatchCore.load(model)
    assert loaded.weights_path == str(st)
    assert torch.equal(loaded.feature_extractor_.body.conv1.weight, own.conv1.weight)
