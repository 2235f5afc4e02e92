"""Datasets yielding the original PatchCore dict: ``image``, ``mask``, ``is_anomaly``, ``image_path``.

``MVTecDataset`` reads ``ROOT/<category>/{train/good, test/<defect>, ground_truth/<defect>}``.
``FolderDataset`` reads a folder of normal images with optional abnormal and mask folders.
Both check the layout when they are built (folders, one mask per defect image). ``validate()``
decodes every image and mask once (readable, within the size guards, masks matching their image and
not empty), so the CLI finds a bad file before any backbone runs. Folder datasets default to the
whole image (``crop="none"``); ``MVTecDataset`` defaults to the MVTec protocol (``crop="center"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mhpc.data.io import (SIXTEEN_BIT_MODES, clipping_message, image_bit_depth, inspect_image, list_images,
                          load_mask, load_rgb, png_sbit, walk_images)
from mhpc.data.transforms import build_transforms, make_preprocessing
from mhpc.errors import MHPCError, MHPCWarning
from mhpc.outputs import MARKER


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None
    is_anomaly: bool
    defect_type: str


class SampleDataset(torch.utils.data.Dataset):
    """Loads a list of ``Sample`` with the preprocessing dict of ``mhpc.data.transforms`` (default: the
    whole image at 224 x 224)."""

    def __init__(self, samples: list[Sample], preprocessing: dict | None = None) -> None:
        self.samples = samples
        self.preprocessing = dict(preprocessing or make_preprocessing(224, "none"))
        self.transform, self.mask_transform = build_transforms(self.preprocessing)
        self._validated = False

    def __len__(self) -> int:
        return len(self.samples)

    def validate(self) -> "SampleDataset":
        """Decodes every image and mask once: readable, size guards, masks matching and not empty.

        16-bit images: each is scaled by its own depth (``mhpc.data.io.image_bit_depth``). A set without
        a recorded ``bit_depth`` (a fit) records the deepest image's own depth, so a model knows what it
        was fitted on; an image whose values exceed its depth's range would be clipped: one warning per
        file, and its path in ``clipped_`` (``mhpc update`` refuses those)."""
        if self._validated:
            return self
        deep, sizes = [], []
        for s in self.samples:
            info = inspect_image(s.image)
            sizes.append(info.size)
            if info.mode in SIXTEEN_BIT_MODES:
                deep.append((s.image, info.max_value, png_sbit(s.image)))
            if s.mask is not None:
                mask = load_mask(s.mask)
                self._check_mask(s, mask, info.size)
        fitted = self.preprocessing.get("bit_depth")
        if deep and fitted is None:
            self.preprocessing["bit_depth"] = max(image_bit_depth(sbit) for _, _, sbit in deep)
        self.clipped_ = []
        for path, peak, sbit in deep:
            message = clipping_message(path, peak, sbit, image_bit_depth(sbit, fitted))
            if message is not None:
                self.clipped_.append(path)
                warnings.warn(MHPCWarning(message), stacklevel=2)
        self.sizes_ = sizes  # (width, height) of every image
        self._validated = True
        return self

    def subset(self, indices: list[int]) -> "SampleDataset":
        """The samples at ``indices`` with the same preprocessing (validated when this set was)."""
        sub = SampleDataset([self.samples[i] for i in indices], self.preprocessing)
        if self._validated:
            sub.sizes_, sub._validated = [self.sizes_[i] for i in indices], True
            kept = {s.image for s in sub.samples}
            sub.clipped_ = [p for p in self.clipped_ if p in kept]
        return sub

    @staticmethod
    def _check_mask(s: Sample, mask: Image.Image, size: tuple[int, int]) -> None:
        if mask.size != size:
            raise MHPCError(f"mask {s.mask} is {mask.size[0]}x{mask.size[1]} but image {s.image} is "
                            f"{size[0]}x{size[1]}")
        if s.is_anomaly and mask.getbbox() is None:
            raise MHPCError(f"mask {s.mask} of defect image {s.image} is empty (all zero)")

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        img = load_rgb(s.image, self.preprocessing.get("bit_depth"))
        if s.mask is not None:
            mask_img = load_mask(s.mask)
            self._check_mask(s, mask_img, img.size)
            mask = self.mask_transform(mask_img)
        else:
            mask = torch.zeros(1, *self.preprocessing["input_size"])
        return {"image": self.transform(img), "mask": mask, "is_anomaly": int(s.is_anomaly),
                "image_path": str(s.image), "defect_type": s.defect_type}


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MHPCError(f"{what} not found: {path}")
    return path


def _mask_for(gt_dir: Path, image: Path, same_name: bool = False) -> Path | None:
    """``<stem>_mask.png`` (MVTec), or with ``same_name`` also ``<stem>.png``."""
    names = [f"{image.stem}_mask.png", f"{image.stem}_mask{image.suffix}"] + ([f"{image.stem}.png"] if same_name else [])
    return next((gt_dir / n for n in names if (gt_dir / n).is_file()), None)


def mvtec_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    if split not in ("train", "test"):
        raise MHPCError(f"split must be 'train' or 'test', got {split!r}")
    base = _require_dir(Path(root) / category, f"category '{category}'")
    split_dir = _require_dir(base / split, f"{split} folder of '{category}'")
    samples = []
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        if split == "train" and defect != "good":
            continue
        for image in list_images(defect_dir):
            if defect == "good":
                samples.append(Sample(image, None, False, defect))
                continue
            mask = _mask_for(base / "ground_truth" / defect, image)
            if mask is None:
                raise MHPCError(f"missing mask for defect image {image} (expected "
                                f"{base / 'ground_truth' / defect / (image.stem + '_mask.png')})")
            samples.append(Sample(image, mask, True, defect))
    if not samples:
        raise MHPCError(f"no images found in {split_dir}")
    return samples


class MVTecDataset(SampleDataset):
    """The MVTec AD layout; by default the MVTec protocol (resize 256, centre crop 224)."""

    def __init__(self, root: str | Path, category: str, split: str = "train", input_size=224, crop: str = "center",
                 preprocessing: dict | None = None):
        super().__init__(mvtec_samples(root, category, split), preprocessing or make_preprocessing(input_size, crop))


def folder_samples(normal_dir: str | Path, abnormal_dir: str | Path | None = None,
                   mask_dir: str | Path | None = None) -> list[Sample]:
    """Normal images, then abnormal ones; a mask is ``mask_dir/<stem>_mask.png`` or ``<stem>.png``."""
    samples = [Sample(p, None, False, "good") for p in list_images(_require_dir(Path(normal_dir), "normal folder"))]
    if abnormal_dir is not None:
        mdir = _require_dir(Path(mask_dir), "mask folder") if mask_dir is not None else None
        for image in list_images(_require_dir(Path(abnormal_dir), "abnormal folder")):
            mask = None
            if mdir is not None:
                mask = _mask_for(mdir, image, same_name=True)
                if mask is None:
                    raise MHPCError(f"missing mask for abnormal image {image} in {mdir}")
            samples.append(Sample(image, mask, True, "abnormal"))
    if not samples:
        raise MHPCError(f"no images found in {normal_dir}")
    return samples


class FolderDataset(SampleDataset):
    """A folder of good images (optionally abnormal ones and masks); by default the whole image."""

    def __init__(self, normal_dir, abnormal_dir=None, mask_dir=None, input_size=224, crop: str = "none",
                 preprocessing: dict | None = None):
        super().__init__(folder_samples(normal_dir, abnormal_dir, mask_dir),
                         preprocessing or make_preprocessing(input_size, crop))


class ImageFilesDataset(SampleDataset):
    """Arbitrary image files for ``mhpc predict`` (no labels); a folder is walked with its subfolders
    (an earlier mhpc output folder inside it is skipped)."""

    def __init__(self, paths: list[str | Path], input_size=224, crop: str = "none", preprocessing: dict | None = None):
        samples = []
        for p in paths:
            p = Path(p)
            if p.is_dir():
                samples.extend(Sample(f, None, False, "") for f in walk_images(p, MARKER))
            elif p.is_file():
                samples.append(Sample(p, None, False, ""))
            else:
                raise MHPCError(f"image path not found: {p}")
        if not samples:
            raise MHPCError(f"no images found in {[str(p) for p in paths]}")
        super().__init__(samples, preprocessing or make_preprocessing(input_size, crop))


def collate(batch: list[dict]) -> dict:
    """Default collation, keeping paths and defect types as lists."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "is_anomaly": torch.tensor([b["is_anomaly"] for b in batch]),
        "image_path": [b["image_path"] for b in batch],
        "defect_type": [b["defect_type"] for b in batch],
    }


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int = 8, num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate)


def batch_targets(batch: Any) -> tuple[list[int] | None, Any]:
    """The ground truth a batch carries: its ``is_anomaly`` labels and ``mask`` arrays [B, H, W] (numpy),
    each None when the batch is not a dict holding it (a loader of plain tensors)."""
    if not isinstance(batch, dict):
        return None, None
    labels = masks = None
    if "is_anomaly" in batch:
        labels = [int(v) for v in torch.as_tensor(batch["is_anomaly"]).reshape(-1).tolist()]
    if "mask" in batch:
        gt = torch.as_tensor(batch["mask"])
        masks = gt.reshape(gt.shape[0], *gt.shape[-2:]).cpu().numpy()
    return labels, masks
