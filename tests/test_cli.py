import csv
import json
import subprocess
import sys

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
    for cmd in ["demo", "fit", "predict", "evaluate", "ablation", "generate", "setup-weights", "setup-textures"]:
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
    assert [list(r) for r in rows[:1]] == [["image_path", "score", "is_anomalous"]]
    assert len(rows) == 3 and all(r["is_anomalous"] in ("0", "1") for r in rows)
    maps = sorted(p.name for p in (out / "maps").iterdir())
    assert len(maps) == 3 and len(list((out / "overlays").glob("*.png"))) == 3  # same stems made unique
    amap = np.load(out / "maps" / maps[0])
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
    assert list(rows[0]) == ["image_path", "label", "score"] and len(rows) == 8
    # The saved maps and masks recompute the same metrics.
    from mhpc.metrics import aupro, image_auroc

    maps, gts = [], []
    for r in rows:
        parts = r["image_path"].split("/")
        rel = f"{parts[-2]}/{parts[-1][:-4]}.npy"
        maps.append(np.load(out / "maps" / rel))
        gts.append(np.load(out / "gt" / rel))
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
