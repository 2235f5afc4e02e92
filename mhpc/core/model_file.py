"""Model files: one safetensors file holding tensors plus JSON metadata. Never pickle.

Metadata keys: ``format`` ("mhpc-model"), ``format_version``, ``mhpc_version``, ``config`` (JSON of
the constructor arguments), ``state`` (JSON of small fitted values: grid, threshold, backbone
fingerprint), and ``sha256`` over all of the above and every tensor's bytes, so that a tampered
file is refused. Optional tensors named ``fit_state.*`` hold the mergeable fit state that ``update``
needs (mhpc/fit_state.py; the bank rows are not repeated, they are ``memory_bank``); files without
them load as before and only refuse ``update``. The file is written to a temporary name, fsynced and renamed (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mhpc
from mhpc.core.backbones import state_fingerprint
from mhpc.errors import MHPCError, ModelFileError, NotFittedError
from mhpc.fit_state import FitState, has_fit_state

if TYPE_CHECKING:
    from mhpc.core.mh_patch_core import MHPatchCore

FORMAT = "mhpc-model"
FORMAT_VERSION = 1
MODEL_FILENAME = "model.safetensors"
FIT_STATE_PREFIX = "fit_state."


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A directory means ``DIR/model.safetensors``; anything else is the file itself."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        return path / MODEL_FILENAME
    return path


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(meta):
        h.update(key.encode() + b"\0" + meta[key].encode() + b"\0")
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def stage_tensors(model: "MHPatchCore") -> dict[str, torch.Tensor]:
    """The fitted projection stages (PCA, whitening) as tensors: what a model file stores, and what a
    distributed fit sends to its bank tasks."""
    tensors = {}
    if hasattr(model.reduction_, "components_"):
        tensors["pca_mean"] = model.reduction_.mean_.cpu().contiguous()
        tensors["pca_components"] = model.reduction_.components_.cpu().contiguous()
    if hasattr(model.space_, "cholesky_"):
        tensors["whiten_mean"] = model.space_.mean_.cpu().contiguous()
        tensors["whiten_cholesky"] = model.space_.cholesky_.cpu().contiguous()
    return tensors


def set_stage_tensors(model: "MHPatchCore", tensors: dict[str, torch.Tensor]) -> "MHPatchCore":
    """Sets the projection stages of a built model from ``stage_tensors`` and folds them into its map."""
    if "pca_components" in tensors:
        model.reduction_.set_state(tensors["pca_mean"], tensors["pca_components"])
    if "whiten_cholesky" in tensors:
        model.space_.set_state(tensors["whiten_mean"], tensors["whiten_cholesky"])
    model._finish_projection()
    return model


def save_model(model: "MHPatchCore", path: str | os.PathLike, keep_fit_state: bool = True) -> Path:
    if not getattr(model, "is_fitted_", False):
        raise NotFittedError("cannot save an unfitted MHPatchCore")
    target = resolve_model_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"memory_bank": model.memory_bank_.detach().cpu().float().contiguous(), **stage_tensors(model)}
    if keep_fit_state and getattr(model, "fit_state_", None) is not None:
        tensors.update(model.fit_state_.to_tensors(FIT_STATE_PREFIX, rows=False))
    state = {
        "grid_shape": list(model.grid_shape_),
        "n_train_images": model.n_train_images_,
        "backbone_sha256": state_fingerprint(model.feature_extractor_),
        "threshold": getattr(model, "threshold_", None),
        "threshold_stats": getattr(model, "threshold_stats_", None),
    }
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "mhpc_version": mhpc.__version__,
        "config": json.dumps(model.get_config(), sort_keys=True),
        "state": json.dumps(state, sort_keys=True),
    }
    meta["sha256"] = _digest(tensors, meta)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_model(path: str | os.PathLike, device: torch.device | str | None = None) -> "MHPatchCore":
    from mhpc.core.mh_patch_core import MHPatchCore

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
            f"{file} has model format version {version}; this mhpc ({mhpc.__version__}) reads version "
            f"{FORMAT_VERSION}. Refit the model or use the matching mhpc release."
        )
    claimed = meta.pop("sha256", None)
    if claimed != _digest(tensors, meta):
        raise ModelFileError(f"{file} failed its integrity check: its contents were modified after saving")
    try:
        config = json.loads(meta["config"])
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{file} has unreadable metadata: {exc}") from None
    if device is not None:
        config["device"] = str(device)
    config["input_shape"] = tuple(config["input_shape"])
    model = MHPatchCore(**config)
    model._validate()
    model._build()
    if state_fingerprint(model.feature_extractor_) != state["backbone_sha256"]:
        raise ModelFileError(
            f"{file} was fitted with different backbone weights than the ones loaded now "
            f"({model.backbone_.value}, pretrained={model.pretrained}, weights_path={model.weights_path})"
        )
    set_stage_tensors(model, tensors)
    model.memory_bank_ = tensors["memory_bank"]
    if has_fit_state(tensors, FIT_STATE_PREFIX):
        try:
            model.fit_state_ = FitState.from_tensors(tensors, FIT_STATE_PREFIX, rows=model.memory_bank_)
        except MHPCError as exc:
            raise ModelFileError(f"{file} has an unreadable fit state: {exc}") from None
    model.grid_shape_ = tuple(state["grid_shape"])
    model.n_train_images_ = state["n_train_images"]
    if state.get("threshold") is not None:
        model.threshold_ = state["threshold"]
        model.threshold_stats_ = state["threshold_stats"]
    model.scorer_.fit(model.memory_bank_)
    model.is_fitted_ = True
    return model
