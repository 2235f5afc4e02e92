"""Issue 7: the second texture source, the new defect kinds, presets, the unpooled embedding and the
seeded ablation table (mean ± std, paired comparison, resume)."""

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mhpc.ablation import markdown_table, paired_comparison, run_ablation, summarise
from mhpc.cli import _model_config, build_parser, main
from mhpc.config import PRESETS, load_config_list
from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.data import textures
from mhpc.data.synthetic import (EXTRA_DEFECT_KINDS, DEFECT_KINDS, draw_defect, generate_benchmark, geometry,
                                 load_texture)
from mhpc.errors import MHPCError

from conftest import tiny_model


# ------------------------------------------------------------------ texture source
@pytest.fixture()
def fake_textures(tmp_path, monkeypatch):
    """Stand-ins for the ETR photographs (periodic colour noise), placed where the cache would be."""
    folder = tmp_path / "textures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (file, _) in textures.ETR_TEXTURES.items():
        img = (rng.uniform(0, 1, (256, 256, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / file)
    monkeypatch.setenv("MHPC_TEXTURES", str(folder))
    return folder


def test_etr_category_benchmark_is_deterministic_with_disjoint_bands(fake_textures, tmp_path):
    kw = dict(n_train=2, n_test_good=1, n_test_per_defect=1, seed=3, defect_kinds=("warp", "grain"))
    a = generate_benchmark(tmp_path / "a", ("slate",), **kw)
    b = generate_benchmark(tmp_path / "b", ("slate",), **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 + 1 + 2 * 2  # train, good test, two kinds with a mask each
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    crop, train_rows, test_rows = geometry("slate")
    assert train_rows[1] <= test_rows[0] and test_rows[1] - test_rows[0] >= crop and test_rows[1] <= 256
    assert load_texture("slate").shape == (512, 512, 3)  # 2x2 tiles of the periodic texture


def test_missing_etr_texture_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MHPC_TEXTURES", str(tmp_path / "empty"))
    with pytest.raises(MHPCError, match="mhpc setup-textures"):
        generate_benchmark(tmp_path / "out", ("rock",))
    assert not (tmp_path / "out").exists()  # checked before writing anything


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb (Debian) is needed to build a test package")
def test_setup_textures_extracts_and_verifies_a_deb(tmp_path, monkeypatch):
    """A tiny .deb laid out like extremetuxracer-data: the files are extracted and their SHA-256 checked."""
    pkg = tmp_path / "pkg"
    terrains = pkg / textures.ETR_TERRAINS
    terrains.mkdir(parents=True)
    fake = {}
    for name, (file, _) in textures.ETR_TEXTURES.items():
        Image.fromarray(np.full((4, 4, 3), len(name), np.uint8)).save(terrains / file)
        fake[name] = (file, hashlib.sha256((terrains / file).read_bytes()).hexdigest())
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text("Package: extremetuxracer-data\nVersion: 0.0-1\nArchitecture: all\n"
                                            "Maintainer: test <t@example.org>\nDescription: test\n")
    deb = tmp_path / "extremetuxracer-data_0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    monkeypatch.setattr(textures, "ETR_TEXTURES", fake)
    monkeypatch.setenv("MHPC_TEXTURES", str(tmp_path / "cache"))
    assert main(["setup-textures", "--deb", str(deb), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(f for f, _ in fake.values())
    monkeypatch.setattr(textures, "ETR_TEXTURES", {k: (f, "0" * 64) for k, (f, _) in fake.items()})
    monkeypatch.setenv("MHPC_TEXTURES", str(tmp_path / "cache2"))
    with pytest.raises(MHPCError, match="unexpected SHA-256"):
        textures.ensure_etr_textures(deb, quiet=True)
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").iterdir())


# ------------------------------------------------------------------ defect kinds
@pytest.mark.parametrize("kind", EXTRA_DEFECT_KINDS)
def test_new_defect_kinds_change_only_masked_pixels_and_are_deterministic(kind):
    assert kind not in DEFECT_KINDS  # not in the demo
    img = load_texture("gravel")[:256, :256]
    foreign = load_texture("brick")
    out, mask = draw_defect(img, kind, np.random.default_rng(7), 0.3, foreign)
    again, mask2 = draw_defect(img, kind, np.random.default_rng(7), 0.3, foreign)
    assert np.array_equal(out, again) and np.array_equal(mask, mask2)
    changed = np.abs(out - img).max(axis=2) > 1e-6
    assert mask.any() and not (changed & ~mask).any()
    assert changed[mask].mean() > 0.5


def test_unknown_defect_kind_is_refused(tmp_path):
    with pytest.raises(MHPCError, match="'dent'"):
        generate_benchmark(tmp_path, ("brick",), defect_kinds=("dent",))


# ------------------------------------------------------------------ presets
def test_from_preset_and_overrides():
    m = MHPatchCore.from_preset("proposed", distance="EUCLIDEAN", num_nn=3)
    assert (m.algorithm, m.aggregation, m.feature_reduction, m.distance) == ("ONLINE", "KMEANS", "PCA", "EUCLIDEAN")
    assert m.num_nn == 3
    paper = MHPatchCore.from_preset("paper")
    assert (paper.algorithm, paper.aggregation, paper.feature_reduction, paper.distance) == (
        "VANILLA", "GREEDY", "NONE", "EUCLIDEAN")
    assert set(PRESETS) == {"paper", "proposed", "best"}
    with pytest.raises(MHPCError, match="'fastest'"):
        MHPatchCore.from_preset("fastest")


def test_old_preset_name_seed_warns_once_and_means_proposed(monkeypatch, tmp_path):
    import warnings

    import mhpc.config as config
    import mhpc.params as params
    from mhpc.errors import MHPCWarning

    monkeypatch.setattr(params, "_warned_aliases", set())  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = MHPatchCore.from_preset("seed", num_nn=3)
        again = config.preset_params("seed")
        study = tmp_path / "s.yaml"
        study.write_text("configs:\n  - {name: a, preset: seed}\n")
        (entry,) = load_config_list(study)
    said = [str(w.message) for w in caught if issubclass(w.category, MHPCWarning)]
    assert said == ["preset 'seed' is now called 'proposed'; the old name will be removed"]
    assert old.get_config() == MHPatchCore.from_preset("proposed", num_nn=3).get_config()
    assert again == config.preset_params("proposed") == PRESETS["proposed"]
    assert entry == {**PRESETS["proposed"], "name": "a"}


def test_cli_preset_then_config_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agg: GREEDY\nnum_nn: 2\n")
    args = build_parser().parse_args(["fit", "--preset", "proposed", "--config", str(cfg), "--distance", "euclidean",
                                      "--out", "x", "--quiet"])
    c = _model_config(args)
    assert (c["algorithm"], c["feature_reduction"], c["aggregation"], c["distance"], c["num_nn"]) == (
        "ONLINE", "PCA", "GREEDY", "EUCLIDEAN", 2)


def test_cli_unknown_preset_is_one_line_naming_it(tmp_path, capsys):
    assert main(["evaluate", "--preset", "nope", "--data", str(tmp_path), "--category", "x", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and err.strip().count("\n") == 0


def test_preset_inside_a_study_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("seeds: [1, 2]\nconfigs:\n  - {name: a, preset: proposed, dist: EUCLIDEAN}\n  - {name: b, preset: paper}\n")
    a, b = load_config_list(f)
    assert a["algorithm"] == "ONLINE" and a["distance"] == "EUCLIDEAN" and b == {**PRESETS["paper"], "name": "b"}


# ------------------------------------------------------------------ unpooled embedding
def test_unpooled_embedding_is_3x3_average_of_all_channels(tiny_set):
    train, _, _ = tiny_set
    model = tiny_model(patch_embedding="unpooled", aggregation="NONE").fit(train[:1])
    x = train[0][:2]
    feats, grid = model.feature_extractor_(x)
    maps = model.feature_extractor_.body(x)
    l2 = F.avg_pool2d(maps["layer2"], 3, 1, 1)
    l3 = F.interpolate(F.avg_pool2d(maps["layer3"], 3, 1, 1), size=l2.shape[-2:], mode="bilinear", align_corners=False)
    want = torch.cat([l2, l3], 1).permute(0, 2, 3, 1).reshape(2, -1, 128 + 256)
    assert feats.shape == want.shape and torch.allclose(feats, want, atol=1e-5)
    assert model.memory_bank_.shape[1] == 384
    with pytest.raises(MHPCError, match="patch_embedding"):
        tiny_model(patch_embedding="flat").fit(train[:1])


# ------------------------------------------------------------------ ablation table
def _rows():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for cat, base in (("a", 0.5), ("b", 0.7)):
            rows.append(dict(config="ref", category=cat, seed=seed, image_auroc=base, pixel_aupro=0.5))
            rows.append(dict(config="new", category=cat, seed=seed, image_auroc=base + shift, pixel_aupro=0.5 - shift))
    for r in rows:
        r.update(pixel_auroc=0.9, f1_max=0.8, fit_seconds=1.0, predict_ms_per_image=2.0, peak_rss_mb=10.0,
                 memory_bank_size=5, memory_bank_dim=3)
    return rows


def test_summary_is_mean_and_std_over_seeds_and_paired_counts():
    table = summarise(_rows())
    mean_new = next(r for r in table if r["config"] == "new" and r["category"] == "mean")
    # per-seed means over categories: 0.6 and 0.7
    assert mean_new["image_auroc"] == pytest.approx(0.65)
    assert mean_new["image_auroc_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    cell = next(r for r in table if r["config"] == "new" and r["category"] == "a")
    assert cell["image_auroc"] == pytest.approx(0.55) and cell["pixel_aupro"] == pytest.approx(0.45)
    assert "0.650 ± 0.071" in markdown_table(table)
    (pair,) = paired_comparison(_rows(), "ref")
    assert (pair["image_auroc_wins"], pair["image_auroc_ties"], pair["image_auroc_losses"]) == (2, 2, 0)
    assert (pair["pixel_aupro_wins"], pair["pixel_aupro_losses"]) == (0, 2)
    assert pair["image_auroc_diff"] == pytest.approx(0.05)
    with pytest.raises(MHPCError, match="'other'"):
        paired_comparison(_rows(), "other")
    # the same ranking summed in another order (0.1 + 0.2 != 0.3 in floats) is a tie, not a win
    rows = [{"config": c, "category": "a", "seed": 0, "image_auroc": v, "pixel_aupro": 0.5}
            for c, v in (("ref", 0.3), ("new", 0.1 + 0.2))]
    (pair,) = paired_comparison(rows, "ref")
    assert (pair["image_auroc_wins"], pair["image_auroc_ties"], pair["image_auroc_losses"]) == (0, 1, 0)


def test_ablation_runs_every_seed_on_its_own_data_and_resumes(tmp_path):
    for seed in (0, 1):
        generate_benchmark(tmp_path / f"d{seed}", ("grass",), n_train=4, n_test_good=1, n_test_per_defect=1,
                           seed=seed, defect_kinds=("hole",))
    cfgs = [dict(name="tiny", backbone="resnet18", pretrained=False, input_shape=[64, 64], aggregation="KMEANS",
                 kmeans_clusters=20, target_embed_dimension=32, pretrain_embed_dimension=32, progress=False)]
    out = tmp_path / "ab"
    kw = dict(progress=False, seeds=[0, 1], report=False, batch_size=4)
    table = run_ablation(str(tmp_path / "d{seed}"), None, cfgs, out, **kw)
    rows = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["category"]) for r in rows] == [(0, "grass"), (1, "grass")]
    run0 = json.loads((out / "tiny" / "seed0" / "grass" / "run.json").read_text())
    assert run0["data_root"].endswith("d0") and run0["cfg"]["seed"] == 0
    assert json.loads((out / "tiny" / "seed1" / "grass" / "run.json").read_text())["data_root"].endswith("d1")
    assert "| tiny | grass |" in table
    stamp = (out / "tiny" / "seed1" / "grass" / "metrics.json").stat().st_mtime_ns
    old = out / "tiny" / "seed1" / "grass" / "run.json"  # as written before crop was a study setting
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "crop"}))
    assert run_ablation(str(tmp_path / "d{seed}"), None, cfgs, out, resume=True, **kw) == table
    assert (out / "tiny" / "seed1" / "grass" / "metrics.json").stat().st_mtime_ns == stamp  # not rerun


def test_shipped_study_files_cover_the_24_combinations_and_the_presets():
    from importlib.resources import files

    from mhpc.config import load_seeds

    combos = load_config_list(files("mhpc") / "configs" / "combinations.yaml")
    axes = {(c["algorithm"], c["feature_reduction"], c["aggregation"], c["distance"]) for c in combos}
    assert len(combos) == len(axes) == 24 and load_seeds(files("mhpc") / "configs" / "combinations.yaml") == [0, 1, 2]
    presets = {c["name"]: c for c in load_config_list(files("mhpc") / "configs" / "presets.yaml")}
    assert {"paper", "proposed", "best"} <= set(presets) and presets["best"]["patch_embedding"] == PRESETS["best"]["patch_embedding"]
    sweep = load_config_list(files("mhpc") / "configs" / "sweep.yaml")
    assert len({c["name"] for c in sweep}) == len(sweep)
    # round 2 of the 128 x 128 sweep is centred on the preset it confirmed (ABLATION.md), which the 224 x 224
    # study (issue 17) then changed in its shrinkage only: they must not drift apart otherwise
    sweep2 = {c["name"]: c for c in load_config_list(files("mhpc") / "configs" / "sweep2.yaml")}
    centre = {k: v for k, v in sweep2["best-kmeans5"].items() if k not in ("name", "backbone", "input_shape")}
    assert centre == {k: v for k, v in PRESETS["best"].items() if k != "covariance_shrinkage"}
    assert PRESETS["best"]["covariance_shrinkage"] == 0.1


def test_study_entry_crop_is_applied_and_equal_entries_run_once(tmp_path, monkeypatch):
    import mhpc.ablation as ablation

    generate_benchmark(tmp_path / "d", ("grass",), n_train=4, n_test_good=1, n_test_per_defect=1, seed=0,
                       defect_kinds=("hole",))
    tiny = dict(backbone="resnet18", pretrained=False, input_shape=[64, 64], target_embed_dimension=32,
                pretrain_embed_dimension=32, progress=False)
    cfgs = [dict(name="centre", **tiny), dict(name="whole", crop="none", **tiny), dict(name="twin", **tiny)]
    calls = []
    real = ablation.evaluate_in_subprocess
    monkeypatch.setattr(ablation, "evaluate_in_subprocess", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = tmp_path / "ab"
    run_ablation(str(tmp_path / "d"), None, cfgs, out, progress=False, report=False, batch_size=4)
    assert len(calls) == 2  # "twin" has centre's specification: copied, not rerun
    twin_run = json.loads((out / "twin" / "grass" / "run.json").read_text())
    assert twin_run["cfg"]["name"] == "twin" and twin_run["copied_from"] == str(out / "centre" / "grass")
    assert json.loads((out / "twin" / "grass" / "metrics.json").read_text())["config"] == "twin"
    crops = {n: json.loads((out / n / "grass" / "run.json").read_text())["crop"] for n in ("centre", "whole")}
    assert crops == {"centre": "center", "whole": "none"}
    scores = {n: (out / n / "grass" / "scores.csv").read_text() for n in ("centre", "whole", "twin")}
    assert scores["twin"] == scores["centre"] != scores["whole"]  # the whole image scores differently
    rows = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in rows] == ["centre", "whole", "twin"]
    # --crop none as the study default: now "centre" (no crop of its own) runs on the whole image too
    run_ablation(str(tmp_path / "d"), None, cfgs[:1], tmp_path / "ab2", progress=False, report=False, batch_size=4,
                 crop="none")
    assert (tmp_path / "ab2" / "centre" / "grass" / "scores.csv").read_text() == scores["whole"]


def test_crop_in_a_config_is_checked_and_refused_where_a_flag_sets_it(tmp_path):
    from mhpc.config import normalise_config

    with pytest.raises(MHPCError, match=r"entry: crop must be one of \['none', 'center'\], got 'diag'"):
        normalise_config({"crop": "diag"}, "entry")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("crop: none\n")
    args = build_parser().parse_args(["fit", "--folder", str(tmp_path), "--config", str(cfg), "--out", str(tmp_path / "m")])
    with pytest.raises(MHPCError, match=r"c.yaml: 'crop' belongs in an ablation study's entries; here use --crop"):
        _model_config(args)


def test_failed_study_keeps_finished_runs_and_resume_continues(tmp_path, monkeypatch, capsys):
    import mhpc.ablation as ablation

    generate_benchmark(tmp_path / "d", ("grass",), n_train=4, n_test_good=1, n_test_per_defect=1, seed=0,
                       defect_kinds=("hole",))
    study = tmp_path / "s.yaml"
    study.write_text("defaults: {backbone: resnet18, input_shape: [64, 64], target_embed_dimension: 32, "
                     "pretrain_embed_dimension: 32}\nconfigs:\n  - {name: a}\n  - {name: b, coreset_percentage: 0.2}\n")
    real = ablation.evaluate_in_subprocess

    def second_fails(cfg, *a, **k):
        if cfg["name"] == "b":  # as a real run: its folder and run.json exist when it fails
            (a[2]).mkdir(parents=True)
            (a[2] / "run.json").write_text("{}")
            raise MHPCError("run b on grass failed: boom")
        return real(cfg, *a, **k)

    monkeypatch.setattr(ablation, "evaluate_in_subprocess", second_fails)
    out = tmp_path / "ab"
    argv = ["ablation", "--configs", str(study), "--data", str(tmp_path / "d"), "--out", str(out), "--no-report",
            "--quiet", "--random-init", "--batch-size", "4"]
    assert main(argv) == 2
    assert "boom (finished runs are kept in" in capsys.readouterr().err
    done = out / "a" / "grass" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    monkeypatch.setattr(ablation, "evaluate_in_subprocess", real)
    assert not (out / "b").exists()  # the failed run's folder is removed
    assert main(argv + ["--resume"]) == 0
    capsys.readouterr()
    assert done.stat().st_mtime_ns == stamp and (out / "b" / "grass" / "metrics.json").is_file()
    # a study that fails before any run (an unknown category) leaves no folder behind and no resume hint
    assert main(argv + ["--out", str(tmp_path / "none"), "--categories", "nope"]) == 2
    err = capsys.readouterr().err
    assert "category 'nope' not found" in err and "--resume" not in err and not (tmp_path / "none").exists()
