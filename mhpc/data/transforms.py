"""Preprocessing: the whole image resized into the input size, or PatchCore's resize + centre crop.

A model records the preprocessing it was fitted with as a small JSON-able dict (``preprocessing_``);
``build_transforms`` turns that dict back into the image and mask transforms, so fit, predict and
export all preprocess from the same code:

  ``{"crop": "none", "input_size": [H, W], "resize": None, "bit_depth": None}``
    the whole image, scaled to fit H x W with its aspect ratio kept, padded with the mean colour in uint8
    (every pixel is inspected: a defect at the border is seen);
  ``{"crop": "center", "input_size": [H, W], "resize": R, ...}``
    the MVTec protocol: short side resized to R (256 for 224), centre crop H x W (drops the border).

``bit_depth`` is the depth 16-bit training data was fitted on (the deepest image's PNG sBIT chunk, else
16); each image is scaled by its own sBIT, else this depth (``mhpc.data.io.image_bit_depth``).
``tile`` ([size, overlap] or None) says the model was fitted on tiles of the original image
(``mhpc.data.tiling``); each tile then goes through the same whole-image transform.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from mhpc.data.geometry import IMAGENET_MEAN, IMAGENET_STD, letterbox_geometry, prepare_image, prepare_mask
from mhpc.errors import MHPCError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CROP_MODES", "letterbox_geometry", "make_preprocessing",
           "check_preprocessing", "build_transforms", "image_transform", "dataset_preprocessing", "denormalize",
           "binary_mask"]

CROP_MODES = ("none", "center")


def make_preprocessing(input_size: int | Sequence[int] = (224, 224), crop: str = "none",
                       bit_depth: int | None = None) -> dict[str, Any]:
    """The preprocessing dict; ``crop="center"`` resizes the short side to 256/224 of the input first."""
    size = [int(input_size), int(input_size)] if isinstance(input_size, (int, np.integer)) else list(input_size)
    pre = {"crop": crop, "input_size": size, "resize": None, "bit_depth": bit_depth, "tile": None}
    if crop == "center" and len(size) == 2:
        pre["resize"] = round(min(int(s) for s in size) * 256 / 224)
    return check_preprocessing(pre)


def check_preprocessing(pre: Any, source: str = "preprocessing") -> dict[str, Any]:
    """Validates a preprocessing dict (from a caller or a model file); returns it with plain ints."""
    if not isinstance(pre, dict):
        raise MHPCError(f"{source} must be a mapping, got {type(pre).__name__}")
    if pre.get("crop") not in CROP_MODES:
        raise MHPCError(f"{source}: crop must be one of {list(CROP_MODES)}, got {pre.get('crop')!r}")
    size = pre.get("input_size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 8 <= s <= 8192 for s in size)):
        raise MHPCError(f"{source}: input_size must be [height, width], integers in 8..8192, got {size!r}")
    resize = pre.get("resize")
    if pre["crop"] == "center" and not (isinstance(resize, int) and resize >= min(size)):
        raise MHPCError(f"{source}: centre crop needs an integer resize >= the input size, got {resize!r}")
    tile = pre.get("tile")
    if tile is not None and not (isinstance(tile, (list, tuple)) and len(tile) == 2
                                 and all(isinstance(t, int) and not isinstance(t, bool) for t in tile)
                                 and tile[0] >= 8 and 0 <= tile[1] < tile[0] and pre["crop"] == "none"):
        raise MHPCError(f"{source}: tile must be [size >= 8, overlap in [0, size)] with crop 'none', got {tile!r}")
    depth = pre.get("bit_depth")
    if depth is not None and not (isinstance(depth, int) and not isinstance(depth, bool) and 1 <= depth <= 16):
        raise MHPCError(f"{source}: bit_depth must be an integer in 1..16 or null, got {depth!r}")
    return {"crop": pre["crop"], "input_size": [int(s) for s in size], "resize": resize if pre["crop"] == "center" else None,
            "bit_depth": depth, "tile": list(tile) if tile is not None else None}


class PillowGeometry:
    """The uint8 geometry of ``mhpc.data.geometry`` as a transform step (image or mask)."""

    def __init__(self, pre: dict[str, Any], mask: bool = False) -> None:
        self.pre, self.mask = pre, mask

    def __call__(self, img: Image.Image) -> Image.Image:
        return prepare_mask(img, self.pre) if self.mask else prepare_image(img, self.pre)


def build_transforms(pre: dict[str, Any]) -> tuple[T.Compose, T.Compose]:
    """(image transform, mask transform) for a preprocessing dict. Images: PIL RGB -> normalised
    float [3, H, W]; masks: binary PIL L -> {0, 1} float [1, H, W] with the same geometry."""
    pre = check_preprocessing(pre)
    # The geometry in uint8 (Pillow), then the normalisation the exported graph also does: so denormalising
    # a transformed image and rounding gives back exactly the pixels the engines are fed.
    image_tf = T.Compose([PillowGeometry(pre), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    mask_tf = T.Compose([PillowGeometry(pre, mask=True), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    return image_tf, mask_tf


def image_transform(pre: dict[str, Any] | None = None) -> T.Compose:
    """The image transform of ``pre`` (default: the MVTec protocol at 224)."""
    return build_transforms(pre or make_preprocessing(224, "center"))[0]


def dataset_preprocessing(loader: Iterable, input_shape: Sequence[int]) -> dict[str, Any] | None:
    """The preprocessing of a DataLoader's dataset (None for plain tensors); it must match ``input_shape``."""
    dataset = getattr(loader, "dataset", None)
    pre = getattr(dataset, "preprocessing", None)
    if pre is None:
        return None
    if hasattr(dataset, "validate"):
        dataset.validate()  # settles the 16-bit depth before it is recorded
        pre = dataset.preprocessing
    if list(pre["input_size"]) != [int(s) for s in input_shape]:
        raise MHPCError(f"the dataset's input_size {pre['input_size']} does not match the model's input_shape "
                        f"{list(input_shape)}")
    return dict(pre)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised [3, H, W] tensor -> uint8 H x W x 3 for display."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (image.cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def binary_mask(mask: Image.Image) -> Image.Image:
    """Defect where the mask exceeds half its maximum (JPEG ringing stays background); 0/255 L image."""
    arr = np.asarray(mask if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F", "L") else mask.convert("L"))
    arr = arr.astype(np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    out = (arr > peak / 2) if peak > 0 else np.zeros(arr.shape, bool)
    return Image.fromarray(out.astype(np.uint8) * 255, mode="L")
