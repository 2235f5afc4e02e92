"""PatchCore's preprocessing: resize to 256, centre-crop to 224, ImageNet normalisation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(crop),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def mask_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """Same geometry as the image, nearest-neighbour so the mask stays binary."""
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=T.InterpolationMode.NEAREST),
        T.CenterCrop(crop),
    ])


def mask_to_tensor(mask: Image.Image, resize: int, crop: int) -> torch.Tensor:
    out = mask_transform(resize, crop)(mask)
    return (out > 0).to(torch.float32)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised [3, H, W] tensor -> uint8 H x W x 3 for display."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (image.cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
