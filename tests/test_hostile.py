"""Issue 19, part B: signed exports, per-image bit depth, ablation resume fingerprints, Ray timeouts and
SIGTERM, tiny images under a tiled model. One test per case: the exit code, the one-line message and what
is on disk afterwards."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_bad_inputs import FAST, assert_one_line, run, work, write_images  # noqa: F401 - work: the fitted-folder fixture

REPO = Path(__file__).parents[1]


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------ 11. --ray ADDRESS with nothing listening
def test_unreachable_ray_address_fails_in_one_line_within_the_timeout(work, tmp_path, capsys):
    start = time.monotonic()
    code, err = run(["fit", "--folder", work / "good", "--config", work / "cfg.yaml", "--out", tmp_path / "m",
                     *FAST, "--ray", "127.0.0.1:1", "--ray-timeout", "2"], capsys)
    assert_one_line(code, err, "mhpc fit: error:", "cannot reach Ray at 127.0.0.1:1 within 2 s")
    assert time.monotonic() - start < 20 and not (tmp_path / "m").exists()
    code, err = run(["predict", "--model", work / "model", "--images", work / "good", "--out", tmp_path / "p",
                     "--ray", "ray://127.0.0.1:1", "--ray-timeout", "2", "--quiet"], capsys)
    assert_one_line(code, err, "mhpc predict: error:", "cannot reach Ray at ray://127.0.0.1:1")
    assert not (tmp_path / "p").exists()
    for bad in ("0", "nan"):
        code, err = run(["fit", "--folder", work / "good", "--out", tmp_path / "m", *FAST, "--ray", "127.0.0.1:1",
                         "--ray-timeout", bad], capsys)
        assert_one_line(code, err, "--ray-timeout must be a positive number of seconds")
    code, err = run(["fit", "--folder", work / "good", "--out", tmp_path / "m", *FAST, "--ray-timeout", "5"], capsys)
    assert_one_line(code, err, "--ray-timeout needs --ray")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ 12. SIGTERM during a Ray fit
def test_sigterm_during_a_ray_fit_exits_130_without_a_native_dump(work, tmp_path):
    import psutil

    write_images(tmp_path / "imgs", 8, seed=3)
    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-m", "mhpc", "fit", "--folder", str(tmp_path / "imgs"), "--config",
                             str(work / "cfg.yaml"), "--out", str(out), *FAST, "--batch-size", "1", "--ray"],
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    parent, deadline = psutil.Process(proc.pid), time.time() + 90
    # Ray's own SIGTERM handler is installed when ray.init starts: wait for the local Ray's raylet.
    while time.time() < deadline and proc.poll() is None:
        if any(child.name().startswith("raylet") for child in parent.children(recursive=True)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the fit ended before it could be interrupted"
    time.sleep(2)  # ray.init returns (its handler is replaced by mhpc's) and the shard tasks start
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err and "SIGABRT" not in err and "*** " not in err, err
    assert not out.exists()  # the half-made model folder is removed


# ------------------------------------------------------------------ 13. an image at or below a tiled model's overlap
def test_tiled_model_scores_an_image_smaller_than_the_overlap_as_one_tile(work, tmp_path, capsys):
    import csv

    from mhpc.data.tiling import tile_boxes

    assert tile_boxes(12, 40, 32, 16) == [(0, 0, 12, 32), (0, 8, 12, 32)]  # 12 rows <= overlap 16: one row of tiles
    assert tile_boxes(10, 10, 32, 16) == [(0, 0, 10, 10)]
    code, err = run(["fit", "--folder", work / "good", "--config", work / "cfg.yaml", "--out", tmp_path / "m", *FAST,
                     "--tile", "48", "--tile-overlap", "16", "--holdout", "0"], capsys)
    assert code == 0, err
    small = tmp_path / "small"
    small.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (12, 40, 3), dtype=np.uint8)).save(small / "strip.png")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(small / "dot.png")
    code, err = run(["predict", "--model", tmp_path / "m", "--images", small, "--out", tmp_path / "p", "--quiet"], capsys)
    assert code == 0 and "Traceback" not in err, err
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert [Path(r["image_path"]).name for r in rows] == ["dot.png", "strip.png"]
    assert all(np.isfinite(float(r["score"])) for r in rows)
    shapes = [np.load(tmp_path / "p" / r["map_path"]).shape for r in rows]
    assert shapes == [(10, 10), (12, 40)]  # maps at the images' own resolution


# ------------------------------------------------------------------ 10. ablation --resume: changed inputs, bad metrics
def test_ablation_resume_reruns_changed_inputs_and_refuses_bad_metrics(tmp_path, monkeypatch, capsys):
    import mhpc.ablation as ablation
    from mhpc.data.synthetic import generate_benchmark

    generate_benchmark(tmp_path / "d", ("grass",), n_train=3, n_test_good=1, n_test_per_defect=1, seed=0,
                       defect_kinds=("hole",))
    calls = []

    def fake(cfg, data_root, category, run_dir, device, batch_size, progress, report, crop):
        # what a real run leaves: run.json (its specification), then metrics.json last
        calls.append(cfg["name"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(dict(cfg=cfg, data_root=str(data_root), category=category,
                                                          crop=crop)))
        metrics = {c: 0.5 for c in ablation.COLUMNS[2:]} | {"memory_bank_size": 10, "memory_bank_dim": 4}
        (run_dir / "metrics.json").write_text(json.dumps(metrics | {"config": cfg["name"], "category": category}))
        return metrics | {"warnings": []}

    monkeypatch.setattr(ablation, "evaluate_in_subprocess", fake)
    out = tmp_path / "ab"
    argv = ["ablation", "--preset", "paper", "--data", tmp_path / "d", "--out", out, "--no-report", "--quiet"]
    assert run(argv, capsys)[0] == 0 and calls == ["paper"]
    run_dir = out / "paper" / "grass"
    stored = json.loads((run_dir / "inputs.json").read_text())
    assert [r[0] for r in stored] == ["grass/ground_truth/hole/000_mask.png", "grass/test/good/000.png",
                                      "grass/test/hole/000.png"] + [f"grass/train/good/00{i}.png" for i in range(3)]
    code, err = run(argv + ["--resume"], capsys)
    assert code == 0 and calls == ["paper"]  # same inputs: reused
    # a training image replaced at the same path: rerun, saying which file and why
    image = tmp_path / "d" / "grass" / "train" / "good" / "000.png"
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(image)
    code, err = run(argv + ["--resume"], capsys)
    assert code == 0 and calls == ["paper", "paper"], err
    assert "warning (paper/grass): rerunning it: grass/train/good/000.png changed (size or modification time)" in err
    assert json.loads((run_dir / "inputs.json").read_text()) != stored
    # metrics read back that are not numbers in range: refused in one line naming the file, nothing rerun or lost
    good = (run_dir / "metrics.json").read_text()
    for bad, shown in (('"abc"', "'abc'"), ("7.5", "7.5"), ("NaN", "nan")):
        (run_dir / "metrics.json").write_text(good.replace('"image_auroc": 0.5', f'"image_auroc": {bad}'))
        code, err = run(argv + ["--resume"], capsys)
        assert_one_line(code, err, f"{run_dir / 'metrics.json'}: image_auroc is {shown}, not a number in [0, 1]")
        assert "finished runs are kept" not in err and calls == ["paper", "paper"]
        assert f'"image_auroc": {bad}' in (run_dir / "metrics.json").read_text() and (run_dir / "run.json").is_file()


# ------------------------------------------------------------------ 8. bit depth per image, clipping warned, update refuses
def _png16(path: Path, gray: np.ndarray, sbit: int | None = None) -> Path:
    Image.fromarray(gray.astype(np.uint16)).save(path)
    if sbit is not None:  # an sBIT chunk right after the signature and IHDR
        data, body = path.read_bytes(), b"sBIT" + bytes([sbit])
        path.write_bytes(data[:33] + struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body)) + data[33:])
    return path


def test_bit_depth_is_decided_per_image_and_clipping_is_warned_and_refused(work, tmp_path, capsys):
    import csv

    from mhpc.core.mh_patch_core import MHPatchCore

    def scores(out):
        return {Path(r["image_path"]).name: float(r["score"]) for r in csv.DictReader(open(out / "scores.csv"))}

    rng = np.random.default_rng(0)
    gray = [np.asarray(Image.open(p).convert("L"), np.float64) for p in sorted((work / "good").glob("*.png"))]
    # 1. a 12-bit PNG without sBIT scores the same alone and beside a full-range 16-bit PNG
    (tmp_path / "one").mkdir()
    twelve = _png16(tmp_path / "one" / "twelve.png", gray[0] * 4095 / 255)
    (tmp_path / "two").mkdir()
    Image.open(twelve).save(tmp_path / "two" / "twelve.png")
    _png16(tmp_path / "two" / "full.png", rng.integers(0, 65536, (64, 64)))
    for name in ("one", "two"):
        code, err = run(["predict", "--model", work / "model", "--images", tmp_path / name, "--out",
                         tmp_path / f"p{name}", "--quiet"], capsys)
        assert code == 0 and "warning" not in err, err
    # (batch composition moves float rounding only: before, the full-range neighbour changed the pixels)
    assert scores(tmp_path / "pone")["twelve.png"] == pytest.approx(scores(tmp_path / "ptwo")["twelve.png"], rel=1e-5)
    # 2. a model fitted on 12-bit data (sBIT 12) records 12 bits
    (tmp_path / "train12").mkdir()
    for i, g in enumerate(gray):
        _png16(tmp_path / "train12" / f"{i}.png", g * 4095 / 255, sbit=12)
    code, err = run(["fit", "--folder", tmp_path / "train12", "--config", work / "cfg.yaml", "--out", tmp_path / "m12",
                     *FAST], capsys)
    assert code == 0, err
    assert MHPatchCore.load(tmp_path / "m12").preprocessing_["bit_depth"] == 12
    # ... and warns, one line per file, about images it would clip at 4095
    (tmp_path / "bright").mkdir()
    for name in ("a.png", "b.png"):
        _png16(tmp_path / "bright" / name, gray[1] * 65535 / 255)  # full range, no sBIT
    _png16(tmp_path / "bright" / "ok.png", gray[2] * 4095 / 255)
    code, err = run(["predict", "--model", tmp_path / "m12", "--images", tmp_path / "bright", "--out", tmp_path / "pb",
                     "--quiet"], capsys)
    warned = [line for line in err.splitlines() if "warning:" in line]
    assert code == 0 and len(warned) == 2, err
    for line, name in zip(warned, ("a.png", "b.png")):
        assert line.startswith("mhpc predict: warning: image ") and str(tmp_path / "bright" / name) in line
        assert "above the 12-bit range of the depth the model was fitted on: clipped at 4095" in line
    # 3. update refuses the saturated images (model untouched) unless --allow-saturated
    model_file = tmp_path / "m12" / "model.safetensors"
    before = model_file.read_bytes()
    code, err = run(["update", "--model", tmp_path / "m12", "--folder", tmp_path / "bright", "--quiet"], capsys)
    assert_one_line(code, err, "mhpc update: error: 2 image(s) exceed the bit depth the model was fitted on",
                    str(tmp_path / "bright" / "a.png"), "--allow-saturated")
    assert model_file.read_bytes() == before
    code, err = run(["update", "--model", tmp_path / "m12", "--folder", tmp_path / "bright", "--quiet",
                     "--allow-saturated"], capsys)
    assert code == 0, err
    assert MHPatchCore.load(tmp_path / "m12").n_train_images_ > MHPatchCore.load(work / "model").n_train_images_


# ------------------------------------------------------------------ 5. signed exports
def _copy_pair(src: Path, dst: Path, graph: Path | None = None) -> Path:
    """``src`` and its sidecar copied to ``dst`` (with ``graph``'s bytes as the graph when given)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes((graph or src).read_bytes())
    Path(f"{dst}.json").write_text(Path(f"{src}.json").read_text())
    return dst


def _resigned(sidecar: Path, edit) -> None:
    """Edits a sidecar and recomputes its SHA-256 (as anyone can without the key)."""
    from mhpc.deploy.signing import sign_sidecar

    info = json.loads(sidecar.read_text())
    edit(info)
    sidecar.write_text(json.dumps(sign_sidecar(info, key=b"")))


def test_exports_are_signed_and_checked_before_loading(work, tmp_path, capsys, monkeypatch):
    import csv

    from mhpc.deploy import DeployedModel
    from mhpc.errors import MHPCError

    monkeypatch.delenv("MHPC_MODEL_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    images = sorted((work / "good").glob("*.png"))

    def predict(model, out, *extra):
        return run(["predict", "--engine", "onnxruntime", "--model", model, "--images", *images, "--out", out,
                    "--quiet", *extra], capsys)

    # signed with the key (a model fitted with it): hashes of the graph and of the sidecar itself, and an HMAC
    code, err = run(["fit", "--folder", work / "good", "--config", work / "cfg.yaml", "--out", tmp_path / "km", *FAST,
                     "--key-file", key], capsys)
    assert code == 0, err
    signed = tmp_path / "e" / "m.onnx"
    code, err = run(["export", "--model", tmp_path / "km", "--out", signed, "--key-file", key, "--quiet"], capsys)
    assert code == 0, err
    info = json.loads(Path(f"{signed}.json").read_text())
    from mhpc.keys import file_sha256
    assert info["files_sha256"] == {"graph": file_sha256(signed)} and len(info["hmac_sha256"]) == 64
    assert sorted(p.name for p in signed.parent.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temporary left
    code, err = predict(signed, tmp_path / "p", "--key-file", key)
    assert code == 0, err
    # the verdict is the graph's own is_anomaly
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    from mhpc.data.datasets import ImageFilesDataset
    from mhpc.data.transforms import denormalize
    ds = ImageFilesDataset(images, preprocessing=info["preprocessing"]["mhpc_preprocessing"])
    graph = DeployedModel(signed).predict(np.stack([denormalize(ds[i]["image"]) for i in range(len(ds))]))
    assert [r["is_anomalous"] for r in rows] == [str(int(v)) for v in graph.is_anomaly]

    def refused(model, needle, *extra):
        out = tmp_path / "refused"
        code, err = predict(model, out, *extra)
        assert_one_line(code, err, "mhpc predict: error:", needle)
        assert not out.exists()

    # a key that is set but missing from the file, or another key
    unsigned = tmp_path / "u" / "m.onnx"
    assert run(["export", "--model", work / "model", "--out", unsigned, "--quiet"], capsys)[0] == 0
    assert "hmac_sha256" not in json.loads(Path(f"{unsigned}.json").read_text())
    refused(unsigned, "is not signed with the configured model key (MHPC_MODEL_KEY / --key-file): it has no signature",
            "--key-file", key)
    other = tmp_path / "other"
    other.write_text("other")
    refused(signed, "its signature does not match", "--key-file", other)
    # one flipped byte in the graph
    flipped = _copy_pair(signed, tmp_path / "f" / "m.onnx")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    refused(flipped, f"{flipped} does not match {flipped}.json (SHA-256 differs)", "--key-file", key)
    # another model's graph next to this sidecar (another search chunking gives other bytes)
    assert run(["export", "--model", work / "model", "--out", tmp_path / "g" / "m.onnx", "--max-search-mb", "0.01",
                "--quiet"], capsys)[0] == 0
    swapped = _copy_pair(signed, tmp_path / "s" / "m.onnx", graph=tmp_path / "g" / "m.onnx")
    refused(swapped, "(SHA-256 differs)", "--key-file", key)
    # a sidecar edited without re-hashing; then edited and re-hashed (no key set): the schema, in one line
    edited = _copy_pair(unsigned, tmp_path / "x" / "m.onnx")
    sidecar = Path(f"{edited}.json")
    sidecar.write_text(sidecar.read_text().replace('"threshold": ', '"threshold": 1000.0, "was": '))
    refused(edited, "failed its integrity check: it was modified after `mhpc export` wrote it")
    for edit, needle in [
        (lambda i: i.update(threshold=str(i["threshold"])), "threshold must be a finite number or null, got '"),
        (lambda i: i.pop("outputs"), "missing key 'outputs'"),
        (lambda i: i.update(outputs=["maps", "scores", "is_anomaly"]), "outputs must be ['scores', 'maps', "
                                                                         "'is_anomaly'] (in this order)"),
        (lambda i: i.update(outputs=["scores", "maps", "is_anomaly", "extra"]), "outputs must be"),
    ]:
        _copy_pair(unsigned, edited)
        _resigned(sidecar, edit)
        refused(edited, f"{sidecar} is not a valid mhpc-deploy description: {needle}")
    # a re-hashed threshold of 1000 changes no verdict: they come from the graph
    _copy_pair(unsigned, edited)
    _resigned(sidecar, lambda i: i.update(threshold=1000.0))
    code, err = predict(edited, tmp_path / "p1000")
    assert code == 0, err
    assert [r["is_anomalous"] for r in csv.DictReader(open(tmp_path / "p1000" / "scores.csv"))] == \
        [r["is_anomalous"] for r in rows]
    # a re-export killed after the graph's rename, before the sidecar's: the old sidecar refuses the new graph
    import mhpc.deploy.signing as signing
    from mhpc.core.mh_patch_core import MHPatchCore

    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    pair = _copy_pair(signed, tmp_path / "k" / "m.onnx")
    monkeypatch.setattr(signing.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MHPatchCore.load(work / "model").export(pair, max_intermediate_bytes=int(0.01 * 2**20))
    monkeypatch.setattr(signing.os, "replace", real_replace)
    assert sorted(p.name for p in pair.parent.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temporary left
    assert pair.read_bytes() == (tmp_path / "g" / "m.onnx").read_bytes()  # the new graph, the old sidecar
    with pytest.raises(MHPCError, match=r"m\.onnx does not match .*m\.onnx\.json \(SHA-256 differs\)"):
        DeployedModel(pair)


def test_openvino_export_signs_the_bin_too(work, tmp_path, capsys, monkeypatch):
    from mhpc.deploy import DeployedModel
    from mhpc.errors import MHPCError

    monkeypatch.delenv("MHPC_MODEL_KEY", raising=False)
    xml = tmp_path / "m.xml"
    assert run(["export", "--model", work / "model", "--out", xml, "--format", "openvino", "--head", "conv",
                "--quiet"], capsys)[0] == 0
    assert set(json.loads(Path(f"{xml}.json").read_text())["files_sha256"]) == {"graph", "bin"}
    DeployedModel(xml)
    data = bytearray(xml.with_suffix(".bin").read_bytes())
    data[-3] ^= 0x01
    xml.with_suffix(".bin").write_bytes(bytes(data))
    with pytest.raises(MHPCError, match=r"m\.bin does not match .*m\.xml\.json \(SHA-256 differs\)"):
        DeployedModel(xml)
