"""Reading images and masks with errors that name the file.

Pixel values are read as they are: 8-bit modes convert to RGB; float images (mode F) in [0, 1] scale
to 8 bits; 16-bit images scale by a depth decided for each image on its own (``image_bit_depth``: its
PNG sBIT chunk, else the depth the model was fitted on, else the container's 16 bits), never from the
other images read with it. Any other mode is an error naming file and mode.
Sizes are guarded: more than ``MAX_PIXELS`` pixels or an aspect ratio over ``MAX_ASPECT`` is refused
from the header, before any decoding.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mhpc.data.transforms import binary_mask
from mhpc.errors import MHPCError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 100_000_000  # 100 MP: 10000 x 10000; Pillow's own bomb limit is 89 MP (warning) / 179 MP (error)
MAX_ASPECT = 20.0  # a 1 x 16000 strip would otherwise become a 256 x 4 million image
EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa", "RGBX", "CMYK", "YCbCr"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
FLOAT_TOLERANCE = 1e-3  # float pixels this far outside [0, 1] are still taken as [0, 1] (rounding)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def walk_images(folder: Path, skip_marker: str | None = None) -> list[Path]:
    """Images in ``folder`` and all its subfolders (``test/good``, ``test/defect``), sorted by path.
    Hidden files and folders are skipped, and so are folders holding ``skip_marker`` (an earlier mhpc
    output, whose overlays are images too)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (skip_marker and os.path.isfile(os.path.join(root, d, skip_marker))))
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.parts)


def _lazy_open(path: Path) -> Image.Image:
    """Opens the header only, with the size guards; the caller must close it."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise MHPCError(f"image {path} is too large to read safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MHPCError(f"cannot read image {path}: {exc}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise MHPCError(f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,}; "
                        "downscale or split it first")
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT:
        img.close()
        raise MHPCError(f"image {path} is {w}x{h}, an aspect ratio over {MAX_ASPECT:g}:1; crop it into parts first")
    return img


def _open(path: Path) -> Image.Image:
    img = _lazy_open(path)
    try:
        with img:
            img.load()
            return img.copy()
    except Image.DecompressionBombError as exc:
        raise MHPCError(f"image {path} is too large to read safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MHPCError(f"cannot read image {path}: {exc}") from None


def png_sbit(path: Path) -> int | None:
    """The largest significant-bit count of a PNG's sBIT chunk, or None.

    Pillow does not expose sBIT on reading, so the chunk list before the image data is walked here.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                data = fh.read(length)
                fh.seek(4, 1)  # CRC
                if kind == b"sBIT" and data:
                    return max(data)
    except OSError:
        return None


CONTAINER_BITS = 16  # a 16-bit image without an sBIT chunk is taken at its container's depth


def image_bit_depth(sbit: int | None, fitted: int | None = None) -> int:
    """The depth one 16-bit image is scaled by: its PNG sBIT chunk, else ``fitted`` (the depth the model
    recorded at fit), else the container's 16 bits. A function of the image and the model only."""
    return sbit or fitted or CONTAINER_BITS


@dataclass(frozen=True)
class ImageInfo:
    size: tuple[int, int]  # (width, height)
    mode: str
    max_value: float  # the largest pixel value, for 16-bit data (0 otherwise)


def inspect_image(path: Path) -> ImageInfo:
    """Reads and decodes one image (so a truncated file fails here) and checks its mode."""
    img = _open(path)
    _check_mode(img, path)
    peak = 0.0
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        peak = float(np.asarray(img).max()) if img.mode != "F" else 0.0
        if img.mode == "F":
            _float_to_8bit(np.asarray(img, dtype=np.float32), path)
    return ImageInfo(img.size, img.mode, peak)


def _check_mode(img: Image.Image, path: Path) -> None:
    if img.mode not in EIGHT_BIT_MODES | SIXTEEN_BIT_MODES | {"F"}:
        raise MHPCError(f"image {path} has mode {img.mode}, which mhpc cannot read; save it as 8-bit or 16-bit "
                        "RGB/grayscale, or 32-bit float in [0, 1]")


def _float_to_8bit(arr: np.ndarray, path: Path) -> np.ndarray:
    lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size else (0.0, 0.0)
    if not np.isfinite(arr).all() or lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
        raise MHPCError(f"image {path} is mode F (32-bit float) with values {lo:.4g}..{hi:.4g}; mhpc reads float "
                        "images with values in [0, 1] (NaN and Inf are refused)")
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def clipping_message(path: Path | str, peak: float, sbit: int | None, bits: int) -> str | None:
    """The warning for a 16-bit image with values above the ``bits`` range it is scaled by, else None."""
    if peak <= 2**bits - 1:
        return None
    where = "its sBIT chunk" if sbit else "the depth the model was fitted on"
    return f"image {path} has values up to {peak:.0f}, above the {bits}-bit range of {where}: clipped at {2**bits - 1}"


def load_rgb(path: Path, bit_depth: int | None = None) -> Image.Image:
    """Any supported mode becomes 8-bit RGB; alpha is dropped. 16-bit data scales by the PNG sBIT
    depth, else ``bit_depth`` (the model's), else 16 bits; values above that depth's range are clipped
    (``SampleDataset.validate`` warns about each such file)."""
    return read_rgb(path, bit_depth)[0]


def read_rgb(path: Path, bit_depth: int | None = None) -> tuple[Image.Image, str | None]:
    """``load_rgb``, and the clipping warning (``clipping_message``) when its 16-bit values were clipped:
    for a caller that reads each image once (`mhpc serve`) and so never runs ``validate``."""
    img = _open(path)
    warning = None
    _check_mode(img, path)
    if img.mode == "F":
        img = Image.fromarray(_float_to_8bit(np.asarray(img, dtype=np.float32), path), mode="L")
    elif img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise MHPCError(f"image {path} is mode {img.mode} with values {arr.min():.0f}..{arr.max():.0f}, "
                            "outside 16 bits")
        sbit = png_sbit(path)
        bits = image_bit_depth(sbit, bit_depth)
        top = float(2**bits - 1)
        warning = clipping_message(path, float(arr.max()) if arr.size else 0.0, sbit, bits)
        img = Image.fromarray((np.clip(arr, 0, top) * (255.0 / top)).round().astype(np.uint8), mode="L")
    return img.convert("RGB"), warning


def load_mask(path: Path) -> Image.Image:
    """A binary 0/255 mask: defect where the mask exceeds half its maximum."""
    return binary_mask(_open(path))
