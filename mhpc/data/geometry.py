"""The one image geometry, in uint8 with Pillow: what every path feeds the model.

Decode (``mhpc.data.io``), then resize + centre crop or letterbox with Pillow on 8-bit RGB, padding with
the ImageNet mean colour in uint8. Torch ``predict`` normalises these pixels in its transform, the
exported graph normalises them inside the graph, and Ray, ``update`` and the engines all start from the
same pixels, so every engine sees the same input (a float letterbox converted back to uint8 would
differ by a grey level, and a resize away from a different verdict). No torch here: the torch-free
deployment path (``mhpc.deploy.load_image``) uses this module too.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_RGB_U8 = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104): the letterbox padding


def letterbox_geometry(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): the image scaled to fit ``out_h x out_w`` with its aspect kept, centred."""
    scale = min(out_h / height, out_w / width)
    new_h, new_w = max(1, min(out_h, round(height * scale))), max(1, min(out_w, round(width * scale)))
    return new_h, new_w, (out_h - new_h) // 2, (out_w - new_w) // 2


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side at ``short``; the long side truncated as torchvision's Resize does."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred crop, rounded as torchvision's CenterCrop."""
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return left, top, left + crop_w, top + crop_h


def _fit(img: Image.Image, pre: dict[str, Any], resample: int, fill: Any) -> Image.Image:
    h, w = (int(s) for s in pre["input_size"])
    if pre["crop"] == "center":
        new_h, new_w = short_side_size(img.height, img.width, int(pre["resize"]))
        if (new_h, new_w) != (img.height, img.width):
            img = img.resize((new_w, new_h), resample)
        return img.crop(center_box(new_h, new_w, h, w))
    new_h, new_w, top, left = letterbox_geometry(img.height, img.width, h, w)
    if (new_h, new_w) != (img.height, img.width):
        img = img.resize((new_w, new_h), resample)
    if (new_h, new_w) == (h, w):
        return img
    canvas = Image.new(img.mode, (w, h), fill)
    canvas.paste(img, (left, top))
    return canvas


def prepare_image(img: Image.Image, pre: dict[str, Any]) -> Image.Image:
    """8-bit RGB image -> 8-bit RGB at the input size (bilinear, antialiased when shrinking, as Pillow's
    resize always is)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return _fit(img, pre, Image.BILINEAR, MEAN_RGB_U8)


def prepare_mask(mask: Image.Image, pre: dict[str, Any]) -> Image.Image:
    """Binary mask (L, 0/255) -> the same geometry as ``prepare_image`` (nearest, padding is background)."""
    return _fit(mask, pre, Image.NEAREST, 0)
