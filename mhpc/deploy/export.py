"""Export a fitted MHPatchCore to one ONNX graph (and from it an OpenVINO IR).

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The graph is a plain
trace (no data-dependent control flow), the tracer keeps the dynamic batch through reshapes, and it
exports a tiny model in seconds; the bank chunks become initializers as they are. Parity is tested
for all 24 configurations (``tests/test_deploy.py``).

Files over 2 GB (protobuf's limit) are written with ONNX external data: ``FILE`` holds the graph,
``FILE.data`` every tensor; keep the two together. ``external_data=True`` forces it for any size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mhpc._version import __version__
from mhpc.deploy.contract import preprocessing_contract, sidecar_path, sidecar_text
from mhpc.deploy.signing import write_pair
from mhpc.errors import MHPCError, NotFittedError
from mhpc.keys import file_sha256

PROTOBUF_LIMIT = 2**31 - 1
OPSET = 17
INPUT_NAME = "images"
HEADS = ("gather", "conv")


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MHPCError(f"export needs the optional package {module!r}: pip install 'mhpc[deploy]'") from None


# Folded convolutions win below this many multiply-adds per patch (C * p^2 * output dims, summed over
# layers), gathers above. Measured with bench/deploy.py (BENCHMARKS.md): MobileNetV2 baseline 1.2 M and
# proposed 0.44 M, WideResNet50 proposed 0.72 M ran faster folded; WideResNet50 baseline 14 M ran faster
# with gathers.
CONV_MACS_PER_PATCH_LIMIT = 4_000_000


def choose_head(model: Any) -> str:
    """'conv' when the folded per-layer convolutions are cheap enough (``CONV_MACS_PER_PATCH_LIMIT``)."""
    return "conv" if folded_macs_per_patch(model) <= CONV_MACS_PER_PATCH_LIMIT else "gather"


def folded_macs_per_patch(model: Any) -> int:
    """Multiply-adds per patch of the folded head: every layer's C * p * p inputs to every output dimension."""
    import torch

    ext = model.feature_extractor_
    with torch.no_grad():
        fmaps = ext.body(torch.zeros(1, 3, *model.input_shape, device=model.device_))
    out_dim = int(model.memory_bank_.shape[1])
    return sum(int(fmaps[layer].shape[1]) * ext.patchsize**2 * out_dim for layer in ext.layers)


def export_model(
    model: Any,
    path: str | os.PathLike,
    format: str = "onnx",
    head: str = "auto",
    max_intermediate_bytes: int | None = None,
    reference_batch: int | None = None,
    external_data: bool | None = None,
    key: bytes | None = None,
) -> Path:
    """Writes ``path`` (.onnx, or OpenVINO .xml + .bin) and ``path.json`` (input, resize contract, outputs,
    threshold, search chunking, and the SHA-256 of every graph file, signed: ``mhpc.deploy.signing``).
    Everything is written under temporary names first; the graph files are renamed into place, then the
    sidecar last. ``key``: the HMAC key that signs it (default: ``MHPC_MODEL_KEY``, if set). Returns the
    written model path."""
    import torch

    from mhpc.deploy.graph import DEFAULT_MAX_INTERMEDIATE_BYTES, DEFAULT_REFERENCE_BATCH, DeployGraph

    if not getattr(model, "is_fitted_", False):
        raise NotFittedError("cannot export an unfitted MHPatchCore; call fit() or MHPatchCore.load() first")
    fmt = str(format).lower()
    if fmt not in ("onnx", "openvino"):
        raise MHPCError(f"format must be 'onnx' or 'openvino', got {format!r}")
    if head == "auto":
        head = choose_head(model)
    if head not in HEADS:
        raise MHPCError(f"head must be 'auto', 'gather' or 'conv', got {head!r}")
    max_bytes = _positive_int(max_intermediate_bytes, DEFAULT_MAX_INTERMEDIATE_BYTES, "max_intermediate_bytes")
    ref_batch = _positive_int(reference_batch, DEFAULT_REFERENCE_BATCH, "reference_batch")
    onnx = _require("onnx")
    if fmt == "openvino":
        _require("openvino")
    target = Path(path)
    check_export_target(target, fmt)  # before the export: nothing is written over a file export did not write
    if fmt == "openvino" and target.suffix != ".xml":
        target = target.with_suffix(".xml")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MHPCError(f"cannot create the folder {target.parent}: {exc.strerror or exc}") from None
    _remove_stale_temp_folders(target.parent)

    graph = DeployGraph(model, head=head, max_intermediate_bytes=max_bytes, reference_batch=ref_batch).eval().cpu()
    h, w = graph.input_shape
    example = torch.zeros(1, h, w, 3, dtype=torch.uint8)
    outputs = ["scores", "maps"] + (["is_anomaly"] if graph.has_threshold else [])
    with _temp_folder(target.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), _quiet_export():
            torch.onnx.export(
                graph, (example,), str(raw), input_names=[INPUT_NAME], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
                opset_version=OPSET, dynamo=False, do_constant_folding=True,
            )
        proto = onnx.load(str(raw))  # also reads external data the exporter wrote for > 2 GB
        proto.doc_string = f"mhpc {__version__}: uint8 [B,{h},{w},3] RGB -> {', '.join(outputs)}"
        size = sum(len(t.raw_data) or int(np.prod(t.dims)) * 4 for t in proto.graph.initializer)
        external = fmt == "onnx" and (bool(external_data) if external_data is not None
                                      else size > PROTOBUF_LIMIT - 2**26)
        # Staged under the final names inside the temporary folder (ONNX external data is named in the graph).
        staged_dir = Path(tmp) / "staged"
        staged_dir.mkdir()
        if fmt == "onnx":
            staged = {"graph": staged_dir / target.name}
            _save_onnx(onnx, proto, staged["graph"], external)
            if external:
                staged["data"] = staged_dir / (target.name + ".data")
        else:
            onnx_file = Path(tmp) / "model.onnx"
            _save_onnx(onnx, proto, onnx_file, False)
            staged = {"graph": _save_openvino(onnx_file, staged_dir / target.name)}
            staged["bin"] = staged["graph"].with_suffix(".bin")
        del proto  # the staged files hold it now
        info = {
            "mhpc_version": __version__,
            "engine_file": target.name,
            "format_kind": fmt,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", h, w, 3]},
            "outputs": outputs,
            "input_shape": [h, w],
            "threshold": float(model.threshold_) if graph.has_threshold else None,  # the graph compares in float32
            "preprocessing": preprocessing_contract(model),
            "head": head,
            "opset": OPSET,
            "external_data": external,
            "search": {
                "bank_rows": int(graph.search.n), "bank_dim": int(graph.search.dim), "chunk_rows": graph.chunk_rows,
                "chunks": len(graph.search.offsets), "max_intermediate_bytes": max_bytes, "reference_batch": ref_batch,
            },
            "config": model.get_config(),
            "files_sha256": {role: file_sha256(f) for role, f in staged.items()},
        }
        if external:
            info["external_data_file"] = target.name + ".data"
        write_pair(staged, sidecar_text(info, key), target, sidecar_path(target))
    if not external and fmt == "onnx":
        target.with_name(target.name + ".data").unlink(missing_ok=True)  # an earlier export's external data
    return target


def _positive_int(value: Any, default: int, name: str) -> int:
    if value is None:
        return int(default)
    try:
        ok = float(value) >= 1 and np.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MHPCError(f"{name} must be a positive number (None for the default {default}), got {value!r}")
    return int(value)


def export_files(target: Path, fmt: str) -> list[Path]:
    """Every file an export to ``target`` writes: the graph (.onnx, or .xml and .bin), ONNX external data, and
    the JSON description."""
    from mhpc.deploy.contract import sidecar_path

    if fmt == "openvino":
        target = target if target.suffix == ".xml" else target.with_suffix(".xml")
        return [target, target.with_suffix(".bin"), sidecar_path(target)]
    return [target, target.with_name(target.name + ".data"), sidecar_path(target)]


def check_export_target(target: Path, fmt: str) -> None:
    """``--out`` is a file name; an existing file among those the export writes is replaced only when an
    earlier export wrote it (its JSON description names the graph), so a model or any other file is never
    overwritten. Raises one MHPCError before any work."""
    from mhpc.deploy.contract import SIDECAR_FORMAT, sidecar_path

    files = export_files(target, fmt)
    if target.is_dir():
        example = target / ("model.xml" if fmt == "openvino" else "model.onnx")
        raise MHPCError(f"{target} is a folder; export writes a file (e.g. {example})")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise MHPCError(f"{target} cannot be created: {parent} is a file")
    existing = [f for f in files if os.path.lexists(f)]
    if not existing:
        return
    try:
        info = json.loads(sidecar_path(files[0]).read_text(encoding="utf-8"))
        ours = (isinstance(info, dict) and info.get("format") == SIDECAR_FORMAT
                and info.get("engine_file") == files[0].name)
    except (OSError, ValueError):
        ours = False
    for f in existing:
        if not ours or not f.is_file() or f.is_symlink():
            raise MHPCError(f"{f} exists and was not written by mhpc export; export to another file name")


TEMP_PREFIX = ".mhpc-export-"
TEMP_OWNER = ".mhpc-export-owner"  # inside each temporary folder: locked by the export that made it


@contextmanager
def _temp_folder(parent: Path):
    """A temporary folder for the export's intermediate files, removed at the end. It holds a file locked
    (flock) for as long as the export runs, so a later export can tell a killed export's folder (unlocked)
    from a running one's (locked) and remove only the former (``_remove_stale_temp_folders``)."""
    import fcntl

    with tempfile.TemporaryDirectory(dir=parent, prefix=TEMP_PREFIX) as tmp:
        fd = os.open(Path(tmp) / TEMP_OWNER, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
        finally:
            os.close(fd)


def _remove_stale_temp_folders(parent: Path) -> None:
    """Removes ``.mhpc-export-*`` folders left by a killed export: only folders with mhpc's owner file in
    them, and only when no running export holds it."""
    import fcntl

    for folder in parent.glob(TEMP_PREFIX + "*"):
        owner = folder / TEMP_OWNER
        if folder.is_symlink() or not folder.is_dir() or not owner.is_file():
            continue
        try:
            fd = os.open(owner, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a running export's folder
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def _save_onnx(onnx, proto, file: Path, external: bool) -> None:
    """``file`` (inside the staging folder), with external data in ``FILE.data`` when asked."""
    if external:
        onnx.save_model(proto, str(file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=file.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(file))


def _save_openvino(onnx_file: Path, target: Path) -> Path:
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_file))
    # fp32 weights: fp16 compression (save_model's default) would break parity with torch
    ov.save_model(ov_model, str(target), compress_to_fp16=False)
    return target


class _quiet_export:
    """The TorchScript exporter warns about every traced shape-to-int; the trace is valid (shapes the graph
    keeps fixed: channel counts, grid, input size), so those warnings are silenced during export only."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
