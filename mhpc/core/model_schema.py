"""What a valid model file holds, checked after its checksum and before anything is built from it.

A checksum only proves the bytes are the ones that were hashed; a file edited and re-hashed (or written
by another tool) still needs its schema checked, so a bad file is one line, "`FILE` is not a valid mhpc
model: ...", instead of a KeyError at load or a NaN score at predict.

``TENSORS`` is a table of the known tensors with their shapes in named dimensions; a file is valid when
every dimension name binds to one size across all tensors:
  F: feature width, derived from the configuration (``target_embed_dimension`` for the pooled embedding,
  the embedding layers' channels summed for the unpooled one); R: width of the searched space (PCA
  components, at most F, else F); N: memory-bank rows. Tensors named ``fit_state.*`` are optional extra fitted state (checked
  only for finiteness). To add a tensor, add a row.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mhpc import params
from mhpc.errors import MHPCError, ModelFileError

Config = dict[str, Any]


def _is(key: str, value: str) -> Callable[[Config], bool]:
    return lambda cfg: str(cfg.get(key, "")).upper() == value


@dataclass(frozen=True)
class TensorSpec:
    dims: tuple[str, ...]
    required: Callable[[Config], bool]


TENSORS: dict[str, TensorSpec] = {
    "memory_bank": TensorSpec(("N", "R"), lambda cfg: True),
    "pca_mean": TensorSpec(("F",), _is("feature_reduction", "PCA")),
    "pca_components": TensorSpec(("R", "F"), _is("feature_reduction", "PCA")),
    "whiten_mean": TensorSpec(("R",), _is("distance", "MAHALANOBIS")),
    "whiten_cholesky": TensorSpec(("R", "R"), _is("distance", "MAHALANOBIS")),
}
OPTIONAL_PREFIXES = ("fit_state.",)

REQUIRED_STATE_KEYS = ("grid_shape", "n_train_images", "backbone_sha256")


def _fail(file: Path, reason: str) -> ModelFileError:
    return ModelFileError(f"`{file}` is not a valid mhpc model: {reason}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_config(file: Path, config: Any) -> Config:
    """The configuration checked against the parameter table (mhpc/params.py), no model built."""
    try:
        return params.check_config(config)
    except MHPCError as exc:
        raise _fail(file, str(exc)) from None


def check_state(file: Path, state: Any, config: Config) -> dict[str, Any]:
    from mhpc.data.transforms import check_preprocessing

    if not isinstance(state, dict):
        raise _fail(file, f"state is a {type(state).__name__}, not a mapping")
    missing = [k for k in REQUIRED_STATE_KEYS if k not in state]
    if missing:
        raise _fail(file, f"state lacks {missing}")
    grid = state["grid_shape"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(_positive_int(g) for g in grid)):
        raise _fail(file, f"grid_shape must be two positive integers, got {grid!r}")
    if not _positive_int(state["n_train_images"]):
        raise _fail(file, f"n_train_images must be a positive integer, got {state['n_train_images']!r}")
    if not (isinstance(state["backbone_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", state["backbone_sha256"])):
        raise _fail(file, "backbone_sha256 is not a SHA-256 hex digest")
    threshold = state.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not math.isfinite(threshold)):
        raise _fail(file, f"threshold must be a finite number or null, got {threshold!r}")
    # threshold_stats describe a calibration; a threshold set by hand has none (null).
    if state.get("threshold_stats") is not None and not isinstance(state["threshold_stats"], dict):
        raise _fail(file, f"threshold_stats must be a mapping or null, got {type(state['threshold_stats']).__name__}")
    if state.get("preprocessing") is not None:
        try:
            pre = check_preprocessing(state["preprocessing"], "preprocessing")
        except MHPCError as exc:
            raise _fail(file, str(exc)) from None
        if pre["input_size"] != list(config["input_shape"]):
            raise _fail(file, f"preprocessing input_size {pre['input_size']} differs from input_shape "
                              f"{config['input_shape']}")
    return state


def feature_width(config: Config) -> int:
    """The patch feature width a model of this configuration produces (no weights are loaded)."""
    from mhpc.core.backbones import default_layers, layer_channels
    from mhpc.core.feature_extractor import embedding_width

    layers = tuple(config.get("embedding_layers") or default_layers(config["backbone"]))
    channels = layer_channels(config["backbone"], layers)
    return embedding_width(channels, config.get("patch_embedding", "pooled"), int(config["target_embed_dimension"]))


def check_tensors(file: Path, tensors: dict[str, torch.Tensor], config: Config) -> None:
    try:
        sizes: dict[str, int] = {"F": feature_width(config)}
    except MHPCError as exc:
        raise _fail(file, f"config: {exc}") from None
    if str(config.get("feature_reduction", "")).upper() != "PCA":
        sizes["R"] = sizes["F"]
    for name, spec in TENSORS.items():
        if spec.required(config) and name not in tensors:
            raise _fail(file, f"tensor {name!r} is missing")
    for name, tensor in sorted(tensors.items()):
        spec = TENSORS.get(name)
        if spec is None and not name.startswith(OPTIONAL_PREFIXES):
            raise _fail(file, f"unexpected tensor {name!r}")
        # Fit-state tensors may be integer counters (e.g. the bank kind, k-means steps); the rest is float.
        if spec is not None and not tensor.is_floating_point():
            raise _fail(file, f"tensor {name!r} is {tensor.dtype}, not floating point")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise _fail(file, f"tensor {name!r} contains NaN or Inf")
        if spec is None:
            continue
        if tensor.ndim != len(spec.dims):
            raise _fail(file, f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {len(spec.dims)} dimensions")
        for dim, size in zip(spec.dims, tensor.shape):
            if size < 1:
                raise _fail(file, f"tensor {name!r} is empty (shape {tuple(tensor.shape)})")
            if sizes.setdefault(dim, int(size)) != size:
                raise _fail(file, f"tensor {name!r} has shape {tuple(tensor.shape)}, but dimension {dim} is "
                                  f"{sizes[dim]} elsewhere ({_DIM_NAMES.get(dim, dim)})")
    if sizes.get("R", 0) > sizes["F"]:
        raise _fail(file, f"the searched width R = {sizes['R']} exceeds the feature width F = {sizes['F']}")


_DIM_NAMES = {"F": "feature width, from the backbone layers and the patch embedding", "R": "searched width: PCA components or F",
              "N": "memory bank rows"}
