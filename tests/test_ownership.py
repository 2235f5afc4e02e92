"""Issue 19, part A: never delete what mhpc did not write, one writer per model, update keeps the signature
and is atomic, validation before the work, OS errors in one line. One test per numbered case; each asserts
the exit code, the one-line message and what is on disk afterwards."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mhpc.cli import main
from mhpc.errors import MHPCError
from mhpc.outputs import MARKER
from test_bad_inputs import TINY_CFG, assert_one_line, fit_argv, run, write_images

FAST = ["--random-init", "--quiet", "--input-size", "64", "64", "--batch-size", "4"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Good images, a config, and a model fitted from them by the CLI (with its fit state: it can be updated)."""
    root = tmp_path_factory.mktemp("own")
    write_images(root / "good", 7)
    write_images(root / "new", 3, seed=5)
    (root / "cfg.yaml").write_text(TINY_CFG)
    assert main(["fit", "--folder", str(root / "good"), "--config", str(root / "cfg.yaml"), "--out",
                 str(root / "model"), *FAST]) == 0
    return root


def copy_model(work: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(work / "model", dst)
    return dst


def digest(path: Path) -> bytes:
    return Path(path).read_bytes()


def marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def predict_argv(work: Path, out: Path, *images, model=None) -> list:
    return ["predict", "--model", model or work / "model", "--images", *images, "--out", out, "--quiet"]


# ------------------------------------------------------------------ 1. --overwrite removes the earlier run's files only
def test_overwrite_removes_exactly_the_earlier_runs_files(work, tmp_path, capsys):
    images = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "p"
    assert run(predict_argv(work, out, *images), capsys)[0] == 0
    record = marker(out)
    assert record["state"] == "done" and "scores.csv" in record["files"] and "maps" in record["dirs"]
    # The user adds a notebook, a labels/ folder and a note inside the run's own maps/ folder.
    (out / "notebook.ipynb").write_text("{}")
    (out / "labels").mkdir()
    (out / "labels" / "000.txt").write_text("ok")
    (out / "maps" / "mine.txt").write_text("mine")
    assert run(predict_argv(work, out, images[0], "--overwrite"), capsys)[0] == 0
    assert (out / "notebook.ipynb").read_text() == "{}" and (out / "labels" / "000.txt").read_text() == "ok"
    assert (out / "maps" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "maps").rglob("*.npy")) == ["000.npy"]  # the old second map is gone
    assert "notebook.ipynb" not in marker(out)["files"] and "labels/000.txt" not in marker(out)["files"]

    # update --out M --overwrite into an earlier update's model folder: the user's NOTES.txt and calib/ stay.
    m2 = tmp_path / "m2"
    assert run(["update", "--model", work / "model", "--folder", work / "new", "--out", m2, "--quiet"], capsys)[0] == 0
    (m2 / "NOTES.txt").write_text("notes")
    (m2 / "calib").mkdir()
    (m2 / "calib" / "a.png").write_bytes(b"x")
    old = digest(m2 / "model.safetensors")
    assert run(["update", "--model", work / "model", "--folder", work / "good", "--out", m2, "--overwrite",
                "--quiet"], capsys)[0] == 0
    assert digest(m2 / "model.safetensors") != old
    assert (m2 / "NOTES.txt").read_text() == "notes" and (m2 / "calib" / "a.png").read_bytes() == b"x"

    # predict --out <another model's folder> --overwrite: refused, that model untouched.
    stamp = digest(m2 / "model.safetensors")
    code, err = run(predict_argv(work, m2, images[0], "--overwrite"), capsys)
    assert_one_line(code, err, "--out", "holds the model", "model.safetensors")
    assert digest(m2 / "model.safetensors") == stamp and not (m2 / "scores.csv").exists()

    # A run killed before it recorded its files: what was there before it (recorded at its start) stays.
    killed = tmp_path / "killed"
    (killed / "maps").mkdir(parents=True)
    (killed / "maps" / "half.npy").write_bytes(b"partial")
    (killed / "mine.txt").write_text("mine")
    (killed / MARKER).write_text(json.dumps({"format": "mhpc-run", "state": "running", "pid": 1,
                                             "foreign_files": ["mine.txt"], "foreign_dirs": []}))
    assert run(predict_argv(work, killed, images[0], "--overwrite"), capsys)[0] == 0
    assert not (killed / "maps" / "half.npy").exists() and (killed / "mine.txt").read_text() == "mine"

    # A marker from an mhpc that did not record its files: --overwrite cannot tell, so it refuses.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / MARKER).write_text("pid 1\n")
    (legacy / "scores.csv").write_text("old")
    code, err = run(predict_argv(work, legacy, images[0], "--overwrite"), capsys)
    assert_one_line(code, err, "did not record its files")
    assert (legacy / "scores.csv").read_text() == "old"


# ------------------------------------------------------------------ 2. an --out that holds the run's inputs
def test_out_holding_the_runs_inputs_is_refused_for_every_command(work, tmp_path, capsys):
    out = tmp_path / "o"
    train = write_images(out / "train", 5)
    (out / MARKER).write_text(json.dumps({"format": "mhpc-run", "state": "done", "files": [], "dirs": []}))
    argv = fit_argv(work, out, "--overwrite")
    argv[2] = out / "train"
    assert_one_line(*run(argv, capsys), "--out", "holds the training image", "000.png")
    assert_one_line(*run(["update", "--model", work / "model", "--folder", out / "train", "--out", out, "--overwrite",
                          "--quiet"], capsys), "holds the training image")
    # update --out holding the model it reads: in place is done without --out.
    assert_one_line(*run(["update", "--model", work / "model", "--folder", work / "new", "--out", work / "model",
                          "--overwrite", "--quiet"], capsys), "holds the model", "omit --out")
    assert_one_line(*run(predict_argv(work, out, *train, "--overwrite"), capsys), "holds the image")
    data = out / "bench"
    write_images(data / "cat" / "train" / "good", 3)
    assert_one_line(*run(["evaluate", "--data", data, "--category", "cat", "--out", out, "--overwrite", *FAST],
                         capsys), "holds the category")
    assert_one_line(*run(["ablation", "--data", data, "--preset", "paper", "--out", out, "--overwrite", "--quiet",
                          "--random-init"], capsys), "holds the benchmark")
    assert all(p.is_file() for p in train) and len(list(out.rglob("*.png"))) == 8
    assert not (out / "model.safetensors").exists()


# ------------------------------------------------------------------ 3. export writes over nothing it did not write
def test_export_never_writes_over_a_file_it_did_not_write(work, tmp_path, capsys):
    m = copy_model(work, tmp_path / "m")
    stamp = digest(m / "model.safetensors")
    code, err = run(["export", "--model", m, "--out", m / "model.safetensors", "--quiet"], capsys)
    assert_one_line(code, err, "model.safetensors exists and was not written by mhpc export")
    assert digest(m / "model.safetensors") == stamp
    (m / "cfg.json").write_text("mine")  # export --out m/cfg would write m/cfg.json
    assert_one_line(*run(["export", "--model", m, "--out", m / "cfg", "--quiet"], capsys), "cfg.json exists")
    assert (m / "cfg.json").read_text() == "mine" and not (m / "cfg").exists()
    # Its own earlier export is replaced; nothing temporary is left.
    assert run(["export", "--model", m, "--out", m / "model.onnx", "--quiet"], capsys)[0] == 0
    assert run(["export", "--model", m, "--out", m / "model.onnx", "--quiet"], capsys)[0] == 0
    assert sorted(p.name for p in m.iterdir()) == [MARKER, "cfg.json", "model.onnx", "model.onnx.json",
                                                    "model.safetensors"]


# ------------------------------------------------------------------ 4. one writer per model
SLOW_UPDATE = """
import pathlib, sys, time
from mhpc.core.mh_patch_core import MHPatchCore
real = MHPatchCore.update
def held(self, *a, **k):  # the lock is held here: say so, then wait for the test's go-ahead
    pathlib.Path(sys.argv[1]).write_text("locked")
    deadline = time.time() + 120
    while not pathlib.Path(sys.argv[2]).exists() and time.time() < deadline:
        time.sleep(0.05)
    return real(self, *a, **k)
MHPatchCore.update = held
from mhpc.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_one_writer_per_model_two_processes(work, tmp_path, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.outputs import lock_folder

    m = copy_model(work, tmp_path / "m")
    before = MHPatchCore.load(m).n_train_images_
    more = write_images(tmp_path / "more", 2, seed=9)
    locked, go = tmp_path / "locked", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", SLOW_UPDATE, str(locked), str(go), "update", "--model", str(m),
                              "--folder", str(work / "new"), "--quiet"], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not locked.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert locked.exists(), first.stderr.read() if first.poll() is not None else "first update never started"
        second = subprocess.run([sys.executable, "-m", "mhpc", "update", "--model", str(m), "--folder",
                                 str(tmp_path / "more"), "--quiet"], env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr
        assert "is being written by another mhpc process" in second.stderr and str(m) in second.stderr
    finally:
        go.write_text("go")
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert MHPatchCore.load(m).n_train_images_ == before + 3  # the first writer's images are all there
    # The refused writer was told; run again, its images are added too: none is ever lost.
    assert run(["update", "--model", m, "--folder", tmp_path / "more", "--quiet"], capsys)[0] == 0
    assert MHPatchCore.load(m).n_train_images_ == before + 3 + len(more)
    # fit --overwrite onto a model folder takes the same lock.
    fd = lock_folder(m, "test")
    try:
        stamp = digest(m / "model.safetensors")
        assert_one_line(*run(fit_argv(work, m, "--overwrite"), capsys), f"--out {m}", "another mhpc process")
        assert digest(m / "model.safetensors") == stamp
    finally:
        os.close(fd)


def test_lock_falls_back_to_a_lock_file_where_a_folder_cannot_be_locked(tmp_path, monkeypatch):
    import fcntl

    from mhpc.outputs import LOCK_FILE, lock_folder

    real = fcntl.flock

    def no_folder_locks(fd, op):  # as on network file systems that lock only files opened for writing
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_folder_locks)
    fd = lock_folder(tmp_path, "here")
    try:
        assert (tmp_path / LOCK_FILE).is_file()
        with pytest.raises(MHPCError, match="here is being written by another mhpc process"):
            lock_folder(tmp_path, "here")
    finally:
        os.close(fd)
    os.close(lock_folder(tmp_path, "here"))  # released with its descriptor


# ------------------------------------------------------------------ 6-7. update keeps the signature; one key rule
def test_update_of_a_signed_model_needs_the_key_and_stays_signed(work, tmp_path, monkeypatch, capsys):
    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.delenv("MHPC_MODEL_KEY", raising=False)
    (tmp_path / "key").write_text("s3cret\n")
    signed = tmp_path / "signed"
    assert run(fit_argv(work, signed, "--key-file", tmp_path / "key"), capsys)[0] == 0
    stamp = digest(signed / "model.safetensors")
    code, err = run(["update", "--model", signed, "--folder", work / "new", "--quiet"], capsys)
    assert_one_line(code, err, "model.safetensors is signed (HMAC)", "--key-file or MHPC_MODEL_KEY")
    assert digest(signed / "model.safetensors") == stamp
    assert_one_line(*run(["update", "--model", signed, "--folder", work / "new", "--out", tmp_path / "u", "--quiet"],
                         capsys), "is signed (HMAC)")
    assert not (tmp_path / "u").exists()
    assert run(["update", "--model", signed, "--folder", work / "new", "--quiet", "--key-file", tmp_path / "key"],
               capsys)[0] == 0
    monkeypatch.setenv("MHPC_MODEL_KEY", "s3cret")
    assert MHPatchCore.load(signed).n_train_images_ == 7 - 1 + 3  # verified with the key: still signed
    # The API refuses too: a model loaded from a signed file is not saved unsigned.
    model = MHPatchCore.load(signed)
    monkeypatch.delenv("MHPC_MODEL_KEY")
    with pytest.raises(MHPCError, match="comes from a signed file"):
        model.save(tmp_path / "copy")
    assert not (tmp_path / "copy" / "model.safetensors").exists()


@pytest.mark.parametrize("env_key", ["s3cret\n", "  s3cret\t"])
def test_environment_key_is_stripped_like_the_key_file(work, tmp_path, monkeypatch, capsys, env_key):
    from mhpc.core.mh_patch_core import MHPatchCore

    (tmp_path / "key").write_text("s3cret")
    monkeypatch.setenv("MHPC_MODEL_KEY", env_key)
    assert run(fit_argv(work, tmp_path / "env"), capsys)[0] == 0  # signed with the environment's key
    monkeypatch.delenv("MHPC_MODEL_KEY")
    out = tmp_path / "p"
    assert run(predict_argv(work, out, work / "good" / "000.png", model=tmp_path / "env") + ["--key-file",
               tmp_path / "key"], capsys)[0] == 0
    monkeypatch.setenv("MHPC_MODEL_KEY", "s3cret")
    assert MHPatchCore.load(tmp_path / "env").signed_
    monkeypatch.setenv("MHPC_MODEL_KEY", " \n")
    with pytest.raises(MHPCError, match="MHPC_MODEL_KEY is empty"):
        MHPatchCore.load(tmp_path / "env")


def test_the_key_is_a_parameter_not_the_environment(work, tmp_path, monkeypatch):
    import mhpc.cli as cli
    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.delenv("MHPC_MODEL_KEY", raising=False)
    MHPatchCore.load(work / "model").save(tmp_path / "signed", key=b"s3cret")
    assert MHPatchCore.load(tmp_path / "signed", key=b"s3cret").signed_
    with pytest.raises(MHPCError, match="its signature does not match"):
        MHPatchCore.load(tmp_path / "signed", key=b"other")
    # The CLI reads --key-file once and hands it to the command; the environment stays untouched.
    seen = {}
    monkeypatch.setattr(cli, "_cmd_export",
                        lambda args: seen.update(key=args.key, env=os.environ.get("MHPC_MODEL_KEY")))
    (tmp_path / "key").write_text("s3cret\n")
    assert cli.main(["export", "--model", str(tmp_path / "signed"), "--out", str(tmp_path / "x.onnx"),
                     "--key-file", str(tmp_path / "key")]) == 0
    assert seen == {"key": b"s3cret", "env": None}


# ------------------------------------------------------------------ 9. atomic update
def test_failed_calibration_leaves_the_model_as_it_was(work, tmp_path, monkeypatch, capsys):
    import torch

    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.data.datasets import FolderDataset, make_loader

    model = MHPatchCore.load(work / "model")
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(model).items()
              if k in ("memory_bank_", "n_train_images_", "threshold_", "threshold_stats_")}
    state = model.fit_state_
    image = torch.stack([FolderDataset(work / "new", preprocessing=model.preprocessing_)[0]["image"]])
    scores = model.predict_images(image)[0]
    new = make_loader(FolderDataset(work / "new", preprocessing=model.preprocessing_), 4)
    with pytest.raises(MHPCError, match="yielded no images"):
        model.update(new, calibration_loader=[])  # the pass succeeds, the calibration fails
    assert torch.equal(model.memory_bank_, before["memory_bank_"])
    assert model.n_train_images_ == before["n_train_images_"] and model.fit_state_ is state
    assert model.threshold_ == before["threshold_"] and model.threshold_stats_ == before["threshold_stats_"]
    assert np.array_equal(model.predict_images(image)[0], scores)
    # On disk: the CLI's in-place update with a failing calibration leaves the file as it was.
    m = copy_model(work, tmp_path / "m")
    stamp = digest(m / "model.safetensors")

    def fail(self, *a, **k):
        raise MHPCError("calibration failed")

    monkeypatch.setattr(MHPatchCore, "calibrate", fail)
    code, err = run(["update", "--model", m, "--folder", work / "new", "--holdout", "0.5", "--quiet"], capsys)
    assert_one_line(code, err, "calibration failed")
    assert digest(m / "model.safetensors") == stamp and not list(m.glob(".tmp-*"))


# ------------------------------------------------------------------ 14. export --max-search-mb
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_export_max_search_mb_is_refused_in_one_line(work, tmp_path, capsys, value):
    code, err = run(["export", "--model", work / "model", "--out", tmp_path / "m.onnx", "--max-search-mb", value,
                     "--quiet"], capsys)
    assert_one_line(code, err, "--max-search-mb must be a positive number of MiB", value)
    assert list(tmp_path.iterdir()) == []


def test_export_api_refuses_a_zero_bound(work, tmp_path):
    from mhpc.core.mh_patch_core import MHPatchCore

    with pytest.raises(MHPCError, match="max_intermediate_bytes must be a positive number"):
        MHPatchCore.load(work / "model").export(tmp_path / "m.onnx", max_intermediate_bytes=0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 15. validation before the work
def test_fit_flags_are_checked_before_the_fit(work, tmp_path, capsys, monkeypatch):
    from mhpc.core.mh_patch_core import MHPatchCore

    monkeypatch.setattr(MHPatchCore, "fit", lambda *a, **k: pytest.fail("fit ran"))
    assert_one_line(*run(fit_argv(work, tmp_path / "m", "--ray", "--shards", "0"), capsys),
                    "--shards must be an integer >= 1, got 0")
    assert_one_line(*run(fit_argv(work, tmp_path / "m", "--tile-overlap", "8"), capsys), "--tile-overlap needs --tile")
    assert not (tmp_path / "m").exists()


def test_study_names_and_reference_are_checked_before_any_run(tmp_path, capsys, monkeypatch):
    import mhpc.ablation as ablation

    monkeypatch.setattr(ablation, "evaluate_in_subprocess", lambda *a, **k: pytest.fail("a run started"))
    (tmp_path / "d" / "cat" / "train").mkdir(parents=True)
    out = tmp_path / "o"
    out.mkdir()
    (out / "table.md").write_text("earlier study")
    (out / MARKER).write_text(json.dumps({"format": "mhpc-run", "state": "done", "files": ["table.md"], "dirs": []}))
    study = tmp_path / "s.yaml"
    study.write_text("- name: table.md\n- name: b\n")
    argv = ["ablation", "--data", tmp_path / "d", "--configs", study, "--out", out, "--overwrite", "--quiet"]
    assert_one_line(*run(argv, capsys), "configuration name 'table.md' is the name of one of the study's own files")
    study.write_text("- name: a\n- name: b\n")
    assert_one_line(*run(argv + ["--reference", "c"], capsys), "--reference 'c' is not a configuration of the study")
    assert (out / "table.md").read_text() == "earlier study"  # nothing cleared by --overwrite


def test_update_target_is_checked_before_the_pass(work, tmp_path, capsys, monkeypatch):
    import tempfile

    from mhpc.core.mh_patch_core import MHPatchCore

    m = copy_model(work, tmp_path / "m")
    stamp = digest(m / "model.safetensors")
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **k):  # the model folder is on a read-only file system
        if dir is not None and Path(dir) == m:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(MHPatchCore, "update", lambda *a, **k: pytest.fail("the pass ran"))
    code, err = run(["update", "--model", m, "--folder", work / "new", "--quiet"], capsys)
    assert_one_line(code, err, "cannot be updated in place", "is not writable (Read-only file system)")
    assert digest(m / "model.safetensors") == stamp


def test_export_out_folder_is_refused_first_and_stale_temp_folders_go(work, tmp_path, capsys):
    import fcntl

    from mhpc.deploy.export import TEMP_OWNER

    (tmp_path / "dir").mkdir()
    assert_one_line(*run(["export", "--model", work / "model", "--out", tmp_path / "dir", "--quiet"], capsys),
                    "is a folder; export writes a file")
    assert list(tmp_path.iterdir()) == [tmp_path / "dir"] and list((tmp_path / "dir").iterdir()) == []
    # Left by a killed export (mhpc's owner file, unlocked): removed by the next export. A running export's
    # folder (locked) and a folder that only looks like one (no owner file) stay.
    for name in ("dead", "running", "lookalike"):
        (tmp_path / f".mhpc-export-{name}").mkdir()
        (tmp_path / f".mhpc-export-{name}" / "raw.onnx").write_bytes(b"x" * 1000)
    (tmp_path / ".mhpc-export-dead" / TEMP_OWNER).write_text("")
    (tmp_path / ".mhpc-export-running" / TEMP_OWNER).write_text("")
    fd = os.open(tmp_path / ".mhpc-export-running" / TEMP_OWNER, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert run(["export", "--model", work / "model", "--out", tmp_path / "m.onnx", "--quiet"], capsys)[0] == 0
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mhpc-export-lookalike", ".mhpc-export-running", "dir",
                                                         "m.onnx", "m.onnx.json"]


# ------------------------------------------------------------------ 16. errors from the OS
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_while_writing_name_the_file_and_the_cause(work, tmp_path, capsys, monkeypatch, code):
    import builtins

    import mhpc.outputs as outputs

    class Full:  # a file on a disk that fills up after 4 KiB, as the kernel reports it
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 4096:
                raise OSError(code, os.strerror(code))
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(outputs, "open", lambda path, mode="r", *a, **k: Full(builtins.open(path, mode, *a, **k)),
                        raising=False)
    write_images(tmp_path / "big", 1, h=96, w=96)
    out = tmp_path / "p"
    argv = predict_argv(work, out, tmp_path / "big" / "000.png")
    code_, err = run(argv, capsys)
    assert_one_line(code_, err, f"cannot write {out / 'maps' / '000.npy'}: {os.strerror(code)}")
    assert "requested" not in err and not out.exists()  # cleaned up
    # An OSError from anywhere else names its file too.
    monkeypatch.undo()
    from mhpc.prediction import PredictionWriter

    def close(self):
        raise OSError(code, os.strerror(code), str(self.out / "scores.csv"))

    monkeypatch.setattr(PredictionWriter, "close", close)
    assert_one_line(*run(argv, capsys), f"{out / 'scores.csv'}: {os.strerror(code)}")
    assert not out.exists()
