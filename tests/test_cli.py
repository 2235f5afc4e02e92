import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mhpc.cli import main
from mhpc.data.synthetic import generate_benchmark

FAST = ["--backbone", "resnet18", "--random-init", "--quiet", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "data"
    return generate_benchmark(root, ("grass",), n_train=6, n_test_good=2, n_test_per_defect=1, seed=0)


def test_help_on_every_subcommand(capsys):
    for cmd in ["demo", "fit", "update", "predict", "export", "evaluate", "ablation", "generate", "setup-weights",
                "setup-textures"]:
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
    # Map and overlay names mirror the inputs' paths (good/000.png and hole/000.png stay apart).
    assert [r["map_path"] for r in rows] == ["maps/good/000.png.npy", "maps/good/001.png.npy", "maps/hole/000.png.npy"]
    assert all((out / r["overlay_path"]).is_file() for r in rows)
    amap = np.load(out / rows[0]["map_path"])
    assert amap.dtype == np.float32 and amap.shape == (224, 224)


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
    assert all(f"| {preset} | brick |" in printed for preset in ("paper", "seed", "best"))
    assert (tmp_path / "o" / "report.html").is_file()


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
