"""Parameter and input checks, run before any backbone does work. Each failure is one MHPCError line
naming the parameter; each doubtful-but-legal value is one ``MHPCWarning``.

The parameter checks live in the one parameter table, ``mhpc.params.PARAMS`` (a new constructor parameter
gets its check by adding a row there); ``PARAMETERS`` and ``check_params`` are re-exported from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from mhpc.errors import MHPCError, MHPCWarning
from mhpc.params import PARAMS, SEED_MAX, check_integer, check_params  # noqa: F401 - re-exported


def warn(message: str) -> None:
    warnings.warn(message, MHPCWarning, stacklevel=3)


# name -> check, from the one parameter table (mhpc/params.py)
PARAMETERS: dict[str, Callable[[str, Any], None]] = {name: p.check for name, p in PARAMS.items()}


def check_batch_size(value: Any, name: str = "--batch-size") -> int:
    check_integer(name, value, 1, 1 << 16)
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
