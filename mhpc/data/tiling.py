"""Tiling for images much larger than the input: each tile is scored like a whole image and the tile maps
are stitched back to the image's full resolution (overlaps averaged); the image score is the tiles' maximum.

As anomalib's ``Tiler``: tiles of ``size`` pixels (of the original image) with ``overlap`` pixels shared
between neighbours, the last tile of a row or column flush with the border so every pixel is covered.
A side shorter than a tile (even one at or below the overlap) is one tile of that side's length.
Each tile goes through the model's own preprocessing (the whole tile into the input size), so a model
fitted on tiles predicts on tiles of the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mhpc.data.io import load_rgb
from mhpc.data.transforms import letterbox_geometry
from mhpc.errors import MHPCError


def check_tiling(size: int, overlap: int) -> None:
    """One-line errors for the CLI's --tile/--tile-overlap."""
    if not isinstance(size, int) or size < 8:
        raise MHPCError(f"--tile must be an integer >= 8 pixels, got {size!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < size:
        raise MHPCError(f"--tile-overlap must be an integer in [0, tile size {size}), got {overlap!r}")


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile offsets along one side. A side no longer than a tile (also one at or below the overlap) is
    one tile of its own length: a small image is scored whole, not refused."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, size - overlap))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tile_boxes(height: int, width: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of every tile, row by row."""
    th, tw = min(size, height), min(size, width)
    return [(top, left, th, tw) for top in tile_starts(height, size, overlap)
            for left in tile_starts(width, size, overlap)]


class TiledDataset(torch.utils.data.Dataset):
    """Every tile of every image of a ``SampleDataset`` (whole-image preprocessing), as one item each."""

    def __init__(self, base, size: int, overlap: int) -> None:
        check_tiling(size, overlap)
        if base.preprocessing["crop"] != "none":
            raise MHPCError("tiling needs the whole-image preprocessing (--crop none)")
        self.base = base.validate()
        self.preprocessing = {**base.preprocessing, "tile": [size, overlap]}
        self.index = [(i, box) for i, (w, h) in enumerate(base.sizes_) for box in tile_boxes(h, w, size, overlap)]
        self._cache: tuple[int, object] | None = None

    def validate(self) -> "TiledDataset":
        return self

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, (top, left, th, tw) = self.index[k]
        if self._cache is None or self._cache[0] != i:  # tiles of one image come in a row: decode once
            self._cache = (i, load_rgb(self.base.samples[i].image, self.base.preprocessing.get("bit_depth")))
        tile = self._cache[1].crop((left, top, left + tw, top + th))
        return {"image": self.base.transform(tile), "mask": torch.zeros(1, *self.preprocessing["input_size"]),
                "is_anomaly": 0, "image_path": str(self.base.samples[i].image), "defect_type": ""}


def untile_map(amap: np.ndarray, tile_h: int, tile_w: int) -> np.ndarray:
    """An input-size map of a letterboxed tile -> the tile's own size."""
    new_h, new_w, top, left = letterbox_geometry(tile_h, tile_w, *amap.shape)
    content = torch.from_numpy(np.ascontiguousarray(amap[top:top + new_h, left:left + new_w]))[None, None]
    return F.interpolate(content, size=(tile_h, tile_w), mode="bilinear", align_corners=False)[0, 0].numpy()


def _scored(out) -> tuple:
    """A scorer's (scores, maps) or (scores, maps, verdicts), as a triple (verdicts None when absent)."""
    return (out[0], out[1], out[2]) if len(out) > 2 and out[2] is not None else (out[0], out[1], None)


def predict_tiled(model, tiled: TiledDataset,
                  batch_size: int = 8) -> Iterator[tuple[int, float, np.ndarray, bool | None]]:
    """Yields (image index, image score = max over its tiles, full-resolution map, verdict) image by image.
    The verdict is any tile's own verdict when the scorer gives one (an exported graph), else None."""
    from mhpc.data.datasets import make_loader

    k = 0
    current, score, total, count, verdict = None, -np.inf, None, None, None
    for batch in make_loader(tiled, batch_size):
        scores, maps, verdicts = _scored(model.predict_images(batch["image"]))
        for j, (s, amap) in enumerate(zip(scores, maps)):
            i, (top, left, th, tw) = tiled.index[k]
            k += 1
            if i != current:
                if current is not None:
                    yield current, score, (total / count).astype(np.float32), verdict
                w, h = tiled.base.sizes_[i]
                current, score, verdict = i, -np.inf, None
                total, count = np.zeros((h, w), np.float64), np.zeros((h, w), np.float64)
            score = max(score, float(s))
            if verdicts is not None:
                verdict = bool(verdict) or bool(verdicts[j])
            total[top:top + th, left:left + tw] += untile_map(amap, th, tw)
            count[top:top + th, left:left + tw] += 1
    if current is not None:
        yield current, score, (total / count).astype(np.float32), verdict


def maybe_tiled(dataset, size: int | None, overlap: int = 0):
    """``dataset`` itself, or its tiles when a tile size is given."""
    return dataset if size is None else TiledDataset(dataset, size, overlap)


def score_dataset(model, dataset, batch_size: int = 8) -> Iterator[
        tuple[int, float, np.ndarray, Callable[[], np.ndarray], bool | None]]:
    """(index, image score, anomaly map, a function giving the RGB image the map covers, verdict) per image.
    A tiled dataset is scored tile by tile and its maps stitched at the image's full resolution; otherwise
    the map is at the input size, over the preprocessed image. The verdict is the scorer's own (an exported
    graph's ``is_anomaly``; tiled: any tile's), or None for a scorer that gives none (torch)."""
    from mhpc.data.datasets import make_loader
    from mhpc.data.transforms import denormalize

    if isinstance(dataset, TiledDataset):
        depth = dataset.preprocessing.get("bit_depth")
        for i, score, amap, verdict in predict_tiled(model, dataset, batch_size):
            path = dataset.base.samples[i].image
            yield i, score, amap, lambda path=path: np.asarray(load_rgb(path, depth)), verdict
        return
    k = 0
    for batch in make_loader(dataset, batch_size):
        scores, maps, verdicts = _scored(model.predict_images(batch["image"]))
        for j, (img, score, amap) in enumerate(zip(batch["image"], scores, maps)):
            yield k, float(score), amap, lambda img=img: denormalize(img), (
                None if verdicts is None else bool(verdicts[j]))
            k += 1
