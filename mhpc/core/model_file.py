"""Model files: one safetensors file holding tensors plus JSON metadata. Never pickle.

Metadata keys: ``format`` ("mhpc-model"), ``format_version``, ``mhpc_version``, ``config`` (JSON of
the constructor arguments), ``state`` (JSON of small fitted values: grid, threshold, backbone
fingerprint, preprocessing), and ``sha256`` over all of the above and every tensor's bytes.

The plain SHA-256 catches accidental damage (truncation, bit rot, a hand edit that forgot to re-hash);
anyone can recompute it, so it proves nothing about who wrote the file. With a key (``MHPC_MODEL_KEY``
or the CLI's ``--key-file``) an ``hmac_sha256`` over the same bytes is added on save and required on load.
``read_model_file`` returns a file's parts, checked, and ``restore`` sets them on a model that
``MHPatchCore.load`` built from the file's config (this module never builds a model: it sits below
the model class). After the checksum the schema is checked (``mhpc.core.model_schema``). The file is written to a
temporary name, fsynced and renamed (atomic on POSIX), with the umask's permissions; temporary files
left by a killed earlier save are removed.
Optional tensors named ``fit_state.*`` hold the mergeable fit state that ``update`` needs
(mhpc/fit/state.py; the bank rows are not repeated, they are ``memory_bank``, except a k-means state's
merged centroids, ``fit_state.bank.rows``); files without them
load as before and only refuse ``update``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mhpc._version import __version__
from mhpc.core.backbones import state_fingerprint
from mhpc.core.model_schema import check_config, check_state, check_tensors
from mhpc.errors import MHPCError, ModelFileError, NotFittedError
from mhpc.fit.driver import set_stage_tensors, stage_tensors
from mhpc.fit.state import FitState, has_fit_state
from mhpc.keys import KEY_ENV, model_key, normalise_key, resolve_key  # noqa: F401 - re-exported for callers

if TYPE_CHECKING:
    from mhpc.core.mh_patch_core import MHPatchCore

FORMAT = "mhpc-model"
FORMAT_VERSION = 1
MODEL_FILENAME = "model.safetensors"
FIT_STATE_PREFIX = "fit_state."


_PROCESS_START = time.time()


def resolve_model_path(path: str | os.PathLike) -> Path:
    """For loading: an existing file is the model; otherwise a folder holding ``model.safetensors``
    (a path ending in ``.safetensors`` is always the file)."""
    path = Path(path)
    if path.is_file() or path.suffix == ".safetensors":
        return path
    return path / MODEL_FILENAME


def resolve_save_path(path: str | os.PathLike) -> Path:
    """For saving: ``X.safetensors`` is the file; anything else is a folder (``models/run.v2`` too)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    if path.exists() and not path.is_dir():
        raise ModelFileError(f"{path} is a file; save a model to a folder or to a .safetensors file")
    return path / MODEL_FILENAME


def _remove_stale_temp_files(folder: Path) -> None:
    """``.tmp-*.safetensors`` files last written before this process started are left by a killed save."""
    for tmp in folder.glob(".tmp-*.safetensors"):
        try:
            if tmp.stat().st_mtime < _PROCESS_START:
                tmp.unlink()
        except OSError:
            pass


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str], key: bytes | None = None) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256) if key else hashlib.sha256()
    for key in sorted(meta):
        h.update(key.encode() + b"\0" + meta[key].encode() + b"\0")
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_model(model: "MHPatchCore", path: str | os.PathLike, keep_fit_state: bool = True,
               key: bytes | None = None) -> Path:
    """Writes ``model`` to ``path`` atomically, signed with ``key`` (default: ``MHPC_MODEL_KEY``, if set)."""
    if not getattr(model, "is_fitted_", False):
        raise NotFittedError("cannot save an unfitted MHPatchCore")
    target = resolve_save_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(f"cannot create the model folder {target.parent}: {exc.strerror or exc}") from None
    _remove_stale_temp_files(target.parent)
    tensors = {"memory_bank": model.memory_bank_.detach().cpu().float().contiguous(), **stage_tensors(model)}
    if keep_fit_state and getattr(model, "fit_state_", None) is not None:
        # The bank rows are written once: only a k-means state's merged centroids differ from the bank.
        state = model.fit_state_
        tensors.update(state.to_tensors(FIT_STATE_PREFIX, rows=state.bank.rows is not model.memory_bank_))
    state = {
        "grid_shape": list(model.grid_shape_),
        "n_train_images": model.n_train_images_,
        "backbone_sha256": state_fingerprint(model.feature_extractor_),
        "threshold": getattr(model, "threshold_", None),
        "threshold_stats": getattr(model, "threshold_stats_", None),
        "preprocessing": getattr(model, "preprocessing_", None),
    }
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "mhpc_version": __version__,
        "config": json.dumps(model.get_config(), sort_keys=True),  # the JSON form of mhpc/params.py
        "state": json.dumps(state, sort_keys=True),
    }
    key = resolve_key(key)
    if key is None and getattr(model, "signed_", False):
        raise ModelFileError(f"cannot save to {target}: the model comes from a signed file, and without its key "
                             f"({KEY_ENV} / --key-file) it would be saved unsigned")
    signed = {**meta, "sha256": _digest(tensors, meta)}
    if key:
        signed["hmac_sha256"] = _digest(tensors, meta, key)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=target.parent)
    except OSError as exc:
        raise ModelFileError(f"cannot write the model to {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        from mhpc.outputs import current_umask

        save_file(tensors, tmp, metadata=signed)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a model file follows the umask
        os.replace(tmp, target)
        model.signed_ = key is not None
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, MHPCError):
            raise ModelFileError(f"cannot write the model to {target}: {exc}") from None
        raise
    return target


@dataclass
class ModelFileParts:
    """What a model file holds, read and checked (checksum, signature, schema): ``config`` in the JSON
    form of mhpc/params.py, ``state`` the small fitted values, ``tensors`` by name."""

    file: Path
    config: dict[str, Any]
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    signed: bool


def read_model_file(path: str | os.PathLike, key: bytes | None = None) -> ModelFileParts:
    """The parts of a model file (``MHPatchCore.load`` builds the model from them), checked before use; its
    HMAC with ``key`` (default: ``MHPC_MODEL_KEY``, if set)."""
    file = resolve_model_path(path)
    if not file.is_file():
        raise ModelFileError(f"model file not found: {file}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ModelFileError(f"{file} is not a readable mhpc model file (truncated or corrupt?): {exc}") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{file} is not an mhpc model file")
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{file} has model format version {version}; this mhpc ({__version__}) reads version "
            f"{FORMAT_VERSION}. Refit the model or use the matching mhpc release."
        )
    claimed = meta.pop("sha256", None)
    claimed_hmac = meta.pop("hmac_sha256", None)
    if claimed != _digest(tensors, meta):
        raise ModelFileError(f"{file} failed its integrity check: its contents were modified after saving")
    key = resolve_key(key)
    if key and not (isinstance(claimed_hmac, str)
                    and hmac.compare_digest(claimed_hmac, _digest(tensors, meta, key))):
        raise ModelFileError(f"{file} is not signed with the configured model key ({KEY_ENV} / --key-file): "
                             f"{'it has no signature' if claimed_hmac is None else 'its signature does not match'}")
    try:
        config = json.loads(meta["config"])
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"`{file}` is not a valid mhpc model: unreadable metadata ({exc})") from None
    check_config(file, config)
    check_state(file, state, config)
    check_tensors(file, tensors, config)
    return ModelFileParts(file, config, state, tensors, claimed_hmac is not None)


def restore(model: "MHPatchCore", parts: ModelFileParts) -> "MHPatchCore":
    """Sets the fitted state of ``model``, built from ``parts.config``, from the file's parts."""
    file, state, tensors = parts.file, parts.state, parts.tensors
    if state_fingerprint(model.feature_extractor_) != state["backbone_sha256"]:
        raise ModelFileError(
            f"{file} was fitted with different backbone weights than the ones loaded now "
            f"({model.backbone_.value}, pretrained={model.pretrained}, weights_path={model.weights_path})"
        )
    set_stage_tensors(model, tensors)
    model.memory_bank_ = tensors["memory_bank"]
    if has_fit_state(tensors, FIT_STATE_PREFIX):
        try:
            own_rows = f"{FIT_STATE_PREFIX}bank.rows" in tensors
            model.fit_state_ = FitState.from_tensors(tensors, FIT_STATE_PREFIX,
                                                     rows=None if own_rows else model.memory_bank_)
        except MHPCError as exc:
            raise ModelFileError(f"{file} has an unreadable fit state: {exc}") from None
    model.grid_shape_ = tuple(state["grid_shape"])
    model.n_train_images_ = state["n_train_images"]
    model.preprocessing_ = state.get("preprocessing")
    model.signed_ = parts.signed  # kept on save: a signed model is saved only with its key
    if state.get("threshold") is not None:
        model.threshold_ = state["threshold"]
        model.threshold_stats_ = state["threshold_stats"]
    model.scorer_.fit(model.memory_bank_)
    model.is_fitted_ = True
    return model
