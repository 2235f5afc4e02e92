"""Parameter and input checks, run before any backbone does work. Each failure is one MHPCError line
naming the parameter; each doubtful-but-legal value is one ``MHPCWarning``.

``PARAMETERS`` is a table (name -> check), so a new constructor parameter gets its check by adding a row;
parameters without a row are not checked here.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from os import PathLike
from typing import Any

import torch

from mhpc.errors import MHPCError, MHPCWarning

SEED_MAX = 2**32 - 1  # numpy's RandomState (used by sklearn's random_state) takes seeds below 2**32


def warn(message: str) -> None:
    warnings.warn(message, MHPCWarning, stacklevel=3)


def _describe(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = " (YAML reads 1e3 as text: write 1000)" if isinstance(value, str) else ""
        raise MHPCError(f"{name} must be an integer, got {_describe(value)}{hint}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise MHPCError(f"{name} must be an integer {bound}, got {value}")


def _real(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)" if isinstance(value, str) else ""
        raise MHPCError(f"{name} must be a number, got {_describe(value)}{hint}")
    v = float(value)
    if not math.isfinite(v) or v < low or (low_open and v == low) or (high is not None and v > high):
        left = "(" if low_open else "["
        bound = f"in {left}{low:g}, {high:g}]" if high is not None else f"finite and {'>' if low_open else '>='} {low:g}"
        raise MHPCError(f"{name} must be {bound}, got {value}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise MHPCError(f"{name} must be true or false, got {_describe(value)}")


def _clusters(name: str, value: Any) -> None:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        _integer(name, value, 1)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        _real(name, value, 0.0, 1.0, low_open=True)
    else:
        raise MHPCError(f"{name} must be an int count or a float fraction in (0, 1], got {_describe(value)}")


def _input_shape(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise MHPCError(f"{name} must be (height, width), got {_describe(value)}")
    for v in value:
        _integer(name, v, 8, 8192)


def _layers(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, str) or not isinstance(value, (list, tuple))
                              or not value or not all(isinstance(v, str) for v in value)):
        raise MHPCError(f"{name} must be a non-empty list of layer names, got {_describe(value)}")


def _path(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, PathLike)):
        raise MHPCError(f"{name} must be a file path, got {_describe(value)}")


def _choice(*options: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in options:
            raise MHPCError(f"{name} must be one of {list(options)}, got {_describe(value)}")
    return check


def _int_at_least(low: int) -> Callable[[str, Any], None]:
    return lambda name, value: _integer(name, value, low)


PARAMETERS: dict[str, Callable[[str, Any], None]] = {
    "input_shape": _input_shape,
    "embedding_layers": _layers,
    "pretrain_embed_dimension": _int_at_least(1),
    "target_embed_dimension": _int_at_least(1),
    "patchsize": _int_at_least(1),
    "num_nn": _int_at_least(1),
    "reweight_num_support": _int_at_least(0),
    "pca_batch_size": _int_at_least(1),
    "kmeans_batch_size": _int_at_least(1),
    "coreset_chunk_size": _int_at_least(1),
    "seed": lambda name, value: _integer(name, value, 0, SEED_MAX),
    "coreset_percentage": lambda name, value: _real(name, value, 0.0, 1.0, low_open=True),
    "pca_variance_ratio": lambda name, value: _real(name, value, 0.0, 1.0, low_open=True),
    "covariance_shrinkage": lambda name, value: _real(name, value, 0.0, 1.0),
    "covariance_jitter": lambda name, value: _real(name, value, 0.0, 1.0),
    "blur_sigma": lambda name, value: _real(name, value, 0.0, 1000.0),
    "kmeans_clusters": _clusters,
    "squared_distances": _boolean,
    "pretrained": _boolean,
    "progress": _boolean,
    "weights_path": _path,
    "pca_solver": _choice("covariance", "incremental"),
    "patch_embedding": _choice("pooled", "unpooled"),
}


def check_params(params: dict[str, Any]) -> None:
    """Checks every known parameter's type and range (strings are never taken as numbers)."""
    for name, value in params.items():
        check = PARAMETERS.get(name)
        if check is not None:
            check(name, value)


def check_batch_size(value: Any, name: str = "--batch-size") -> int:
    _integer(name, value, 1, 1 << 16)
    return int(value)


def check_image_batch(batch: Any, input_shape: tuple[int, int]) -> torch.Tensor:
    """The image tensor of a batch (tensor, list/tuple whose first item is a tensor, or dict with 'image')."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise MHPCError(f"a batch dict must have an 'image' key; it has {sorted(map(str, batch))}")
        images = batch["image"]
    else:
        images = batch
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
        images = images[0]
    if not isinstance(images, torch.Tensor):
        raise MHPCError(f"a batch must be an image tensor or a dict with 'image'; got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise MHPCError(f"images must be [B, 3, H, W] (RGB, normalised); got shape {tuple(images.shape)}. "
                        "Convert grayscale or RGBA images to RGB first.")
    if images.shape[0] == 0:
        raise MHPCError("a batch holds no images (shape [0, 3, H, W])")
    if tuple(images.shape[-2:]) != tuple(input_shape):
        raise MHPCError(f"image size {tuple(images.shape[-2:])} does not match input_shape {tuple(input_shape)}")
    if not (images.is_floating_point()):
        raise MHPCError(f"images are {images.dtype}; mhpc expects float tensors normalised with the ImageNet mean "
                        "and std (use mhpc.data.transforms.build_transforms)")
    if not torch.isfinite(images).all():
        raise MHPCError("images contain NaN or Inf values")
    peak = float(images.abs().max())
    if peak > 50:
        raise MHPCError(f"images reach |{peak:.4g}|, which looks like 0..255 pixel values; mhpc expects them "
                        "normalised with the ImageNet mean and std (use mhpc.data.transforms.build_transforms)")
    return images
