"""Integrity of an exported model: the sidecar JSON signs itself and the graph files beside it. No torch here.

The sidecar carries ``files_sha256`` (the SHA-256 of the graph file, and of the OpenVINO ``.bin`` or
the ONNX external ``.data`` file when there is one), ``sha256`` over its own canonical JSON (sorted
keys, no spaces) without the two signature fields, and, when a key is set (``MHPC_MODEL_KEY`` or the
CLI's ``--key-file``, the same key as model files), ``hmac_sha256`` over the same bytes. The engines
check, in this order, before loading anything: the sidecar's SHA-256, its HMAC when a key is set (a
sidecar without one is refused), every graph file's SHA-256, then the schema (``check_sidecar``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from pathlib import Path
from typing import Any

from mhpc.errors import MHPCError
from mhpc.keys import KEY_ENV, file_sha256, resolve_key

SIGNATURE_FIELDS = ("sha256", "hmac_sha256")
OUTPUTS = (["scores", "maps"], ["scores", "maps", "is_anomaly"])
FORMAT_KINDS = ("onnx", "openvino")



def companion_files(graph: Path, info: dict[str, Any]) -> dict[str, Path]:
    """The files an exported graph consists of, by role: ``graph``, and ``bin`` (OpenVINO weights, read
    from the .xml's name) or ``data`` (ONNX external data, named inside the graph)."""
    files = {"graph": graph}
    if info.get("format_kind") == "openvino":
        files["bin"] = graph.with_suffix(".bin")
    elif info.get("external_data"):
        files["data"] = graph.with_name(str(info.get("external_data_file") or graph.name + ".data"))
    return files


def _canonical(info: dict[str, Any]) -> bytes:
    body = {k: v for k, v in info.items() if k not in SIGNATURE_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_sidecar(info: dict[str, Any], key: bytes | None = None) -> dict[str, Any]:
    """``info`` with its ``sha256`` (and ``hmac_sha256`` with a key; default: ``MHPC_MODEL_KEY``, if set)."""
    key = resolve_key(key)
    body = _canonical(info)
    signed = {k: v for k, v in info.items() if k not in SIGNATURE_FIELDS}
    signed["sha256"] = hashlib.sha256(body).hexdigest()
    if key:
        signed["hmac_sha256"] = hmac.new(key, body, hashlib.sha256).hexdigest()
    return signed


def verify_sidecar(info: dict[str, Any], sidecar: Path, graph: Path, key: bytes | None = None) -> None:
    """The sidecar's own hash and HMAC (with ``key``; default: ``MHPC_MODEL_KEY``, if set), then every graph
    file's hash: one-line errors naming the file."""
    try:
        body = _canonical(info)
    except ValueError as exc:  # NaN / Infinity in the JSON
        raise MHPCError(f"{sidecar} is not a valid mhpc-deploy description: {exc}") from None
    if not (isinstance(info.get("sha256"), str) and hmac.compare_digest(info["sha256"], hashlib.sha256(body).hexdigest())):
        raise MHPCError(f"{sidecar} failed its integrity check: it was modified after `mhpc export` wrote it")
    key = resolve_key(key)
    claimed = info.get("hmac_sha256")
    if key and not (isinstance(claimed, str)
                    and hmac.compare_digest(claimed, hmac.new(key, body, hashlib.sha256).hexdigest())):
        raise MHPCError(f"{sidecar} is not signed with the configured model key ({KEY_ENV} / --key-file): "
                        f"{'it has no signature' if claimed is None else 'its signature does not match'}")
    hashes = info.get("files_sha256")
    if not isinstance(hashes, dict) or not isinstance(hashes.get("graph"), str):
        raise MHPCError(f"{sidecar} is not a valid mhpc-deploy description: files_sha256 must map 'graph' "
                        "(and 'bin' or 'data') to SHA-256 hex digests")
    for role, path in companion_files(graph, info).items():
        want = hashes.get(role)
        if not path.is_file():
            raise MHPCError(f"{path} not found: {sidecar} describes it as the exported model's {role} file")
        if not isinstance(want, str) or not hmac.compare_digest(want, file_sha256(path)):
            raise MHPCError(f"{path} does not match {sidecar} (SHA-256 differs): the file was modified, or it "
                            "belongs to another export; export again")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sidecar(info: dict[str, Any], sidecar: Path, graph: Path) -> dict[str, Any]:
    """The fields the engines use, with one-line errors naming the sidecar and the field."""
    def bad(message: str) -> MHPCError:
        return MHPCError(f"{sidecar} is not a valid mhpc-deploy description: {message}")

    for key in ("engine_file", "format_kind", "input", "outputs", "input_shape", "threshold", "preprocessing"):
        if key not in info:
            raise bad(f"missing key {key!r}")
    if info["format_kind"] not in FORMAT_KINDS:
        raise bad(f"format_kind must be one of {list(FORMAT_KINDS)}, got {info['format_kind']!r}")
    shape = info["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and 8 <= s <= 8192 for s in shape)):
        raise bad(f"input_shape must be [height, width], integers in 8..8192, got {shape!r}")
    threshold = info["threshold"]
    if threshold is not None and not _is_number(threshold):
        raise bad(f"threshold must be a finite number or null, got {threshold!r}")
    outputs = info["outputs"]
    want = OUTPUTS[1] if threshold is not None else OUTPUTS[0]
    if outputs != want:
        raise bad(f"outputs must be {want} (in this order) for a model {'with' if threshold is not None else 'without'} "
                  f"a threshold, got {outputs!r}")
    if not isinstance(info["input"], dict) or info["input"].get("dtype") != "uint8":
        raise bad(f"input must describe a uint8 tensor, got {info['input']!r}")
    pre = info["preprocessing"]
    if not isinstance(pre, dict) or not isinstance(pre.get("mhpc_preprocessing"), dict):
        raise bad("preprocessing must be a mapping with an 'mhpc_preprocessing' mapping")
    if not isinstance(info["engine_file"], str):
        raise bad(f"engine_file must be a file name, got {info['engine_file']!r}")
    return info


def write_pair(staged_graph: dict[str, Path], sidecar_text: str, graph: Path, sidecar: Path) -> None:
    """Moves a staged export into place so that a kill leaves the old pair, the new pair, or a mismatch
    the engines refuse (the old sidecar's hashes do not match a new graph): the sidecar is written to a
    temporary name beside its target, then the graph's companion files are renamed, then the graph,
    then the sidecar, last. ``staged_graph``: role -> staged file, in the target's folder."""
    from mhpc.outputs import current_umask

    tmp = sidecar.with_name(f".tmp-{os.getpid()}-{sidecar.name}")
    for staged in staged_graph.values():  # on disk before any rename makes them visible
        with open(staged, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        with open(tmp, "w") as fh:
            fh.write(sidecar_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        targets = companion_files(graph, json.loads(sidecar_text))
        for role in sorted(staged_graph, key=lambda r: r == "graph"):  # the graph after its companions
            os.replace(staged_graph[role], targets[role])
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
