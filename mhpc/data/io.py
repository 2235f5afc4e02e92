"""Reading images and masks with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mhpc.errors import MHPCError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MHPCError(f"cannot read image {path}: {exc}") from None


def load_rgb(path: Path) -> Image.Image:
    """Any mode (grayscale, palette, RGBA, 16-bit) becomes 8-bit RGB; alpha is dropped."""
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def load_mask(path: Path) -> Image.Image:
    """Any non-zero pixel is defect."""
    return _open(path).convert("L")
