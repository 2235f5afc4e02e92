"""The built-in synthetic benchmark: MVTec-layout categories from photographed textures.

Two independent texture sources: scikit-image's CC0 textures (brick, grass, gravel; the demo) and
Extreme Tux Racer's colour terrain photographs (slate, rock, leaves; ``mhpc.data.textures``).
Train and test crops come from disjoint row bands of each texture (train: the top band, test: the
bottom band), with small natural variations (shifts, brightness and contrast). Defects are drawn
with exact pixel masks. The demo's kinds (``DEFECT_KINDS``): scratches, cracks, stains, holes,
pasted foreign texture and local blur. ``EXTRA_DEFECT_KINDS`` are defect models the demo does not
have: local geometric warping, clusters of small spots, a colour shift that keeps the texture, and
sensor-like grain. ``difficulty`` in [0, 1] makes defects smaller and fainter. Everything is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from mhpc.data.catalog import (  # noqa: F401 - re-exported: the names live in the light catalog module
    ALL_DEFECT_KINDS,
    ALL_TEXTURES,
    DEFAULT_DIFFICULTY,
    DEFECT_KINDS,
    ETR_CATEGORIES,
    EXTRA_DEFECT_KINDS,
    TEXTURES,
)
from mhpc.data.textures import ETR_TEXTURES, texture_path
from mhpc.errors import MHPCError

IMAGE_SIZE = 256
CROP = 160  # texture pixels per image side (upscaled to IMAGE_SIZE)
TRAIN_ROWS = (0, 330)  # disjoint bands of the 512-row textures
TEST_ROWS = (340, 512)
# ETR textures are 256x256 and tile seamlessly; tiled 2x2 to 512x512, the bands are taken inside the
# first tile's rows, so train and test never share texture pixels (x wraps around the period).
ETR_CROP = 96
ETR_TRAIN_ROWS = (0, 150)
ETR_TEST_ROWS = (156, 256)


def geometry(name: str) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(crop size, train rows, test rows) of a texture."""
    if name in ETR_CATEGORIES:
        return ETR_CROP, ETR_TRAIN_ROWS, ETR_TEST_ROWS
    return CROP, TRAIN_ROWS, TEST_ROWS


def load_texture(name: str) -> np.ndarray:
    """A 512x512x3 float texture in [0, 1]."""
    if name in ETR_CATEGORIES:
        rgb = np.asarray(Image.open(texture_path(name)).convert("RGB"), dtype=np.float32) / 255.0
        return np.tile(rgb, (2, 2, 1))
    if name not in TEXTURES:
        raise MHPCError(f"unknown texture {name!r}; choose from {list(ALL_TEXTURES)}")
    gray = getattr(skdata, name)().astype(np.float32) / 255.0
    return np.repeat(gray[..., None], 3, axis=2)  # grayscale texture as RGB


def foreign_texture(name: str) -> np.ndarray:
    """The texture pasted by 'foreign' defects: the next one of the same source."""
    group = ETR_CATEGORIES if name in ETR_CATEGORIES else TEXTURES
    return load_texture(group[(group.index(name) + 1) % len(group)])


def _crop(texture: np.ndarray, rows: tuple[int, int], rng: np.random.Generator, crop: int = CROP) -> np.ndarray:
    y = rng.integers(rows[0], rows[1] - crop + 1)
    x = rng.integers(0, texture.shape[1] - crop + 1)
    patch = texture[y : y + crop, x : x + crop]
    img = np.asarray(Image.fromarray((patch * 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    img = img.astype(np.float32) / 255.0
    # Mild natural variation: brightness and contrast.
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.92, 1.08) + mean * rng.uniform(0.93, 1.07)
    return np.clip(img, 0, 1)


def _blob(rng: np.random.Generator, radius: float) -> np.ndarray:
    """An irregular filled region: a noisy ellipse, as a boolean mask."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    cy, cx = rng.uniform(0.25, 0.75, 2) * IMAGE_SIZE
    ry, rx = radius * rng.uniform(0.6, 1.4, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6)) * rng.uniform(0.3, 1.0)
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= wobble**2


def _polyline(rng: np.random.Generator, length: float, width: int, jagged: bool) -> np.ndarray:
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    y, x = rng.uniform(0.25, 0.75, 2) * IMAGE_SIZE
    direction = rng.uniform(0, 2 * np.pi)
    for _ in range(int(length)):
        direction += rng.normal(0, 0.35 if jagged else 0.03)
        y, x = y + np.sin(direction), x + np.cos(direction)
        iy, ix = int(round(y)), int(round(x))
        if 0 <= iy < IMAGE_SIZE and 0 <= ix < IMAGE_SIZE:
            mask[iy, ix] = True
    return ndimage.binary_dilation(mask, iterations=max(0, width - 1)) if width > 1 else mask


def draw_defect(img: np.ndarray, kind: str, rng: np.random.Generator, difficulty: float,
                foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (defective image, boolean mask). Strength falls and size shrinks with difficulty."""
    strength = np.interp(difficulty, [0, 1], [0.9, 0.25])
    size = np.interp(difficulty, [0, 1], [1.0, 0.45])
    out = img.copy()
    if kind == "scratch":
        mask = _polyline(rng, 120 * size + 30, int(rng.integers(2, 4)), jagged=False)
        out[mask] = np.clip(out[mask] + strength * rng.choice([-1, 1]) * 0.8, 0, 1)
    elif kind == "crack":
        mask = _polyline(rng, 110 * size + 30, 2, jagged=True)
        out[mask] = out[mask] * (1 - strength)
    elif kind == "stain":
        mask = _blob(rng, 28 * size + 6)
        tint = np.array(rng.choice([[0.55, 0.35, 0.15], [0.2, 0.45, 0.2], [0.6, 0.2, 0.25]]), np.float32)
        out[mask] = (1 - 0.8 * strength) * out[mask] + 0.8 * strength * tint
    elif kind == "hole":
        mask = _blob(rng, 20 * size + 5)
        out[mask] = out[mask] * (1 - strength) + 0.02 * strength
    elif kind == "foreign":
        mask = _blob(rng, 26 * size + 6)
        y, x = rng.integers(0, foreign.shape[0] - IMAGE_SIZE), rng.integers(0, foreign.shape[1] - IMAGE_SIZE)
        patch = foreign[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]
        alpha = 0.35 + 0.65 * strength
        out[mask] = (1 - alpha) * out[mask] + alpha * patch[mask]
    elif kind == "blur":
        mask = _blob(rng, 30 * size + 8)
        blurred = ndimage.gaussian_filter(img, sigma=(1 + 5 * strength, 1 + 5 * strength, 0))
        out[mask] = blurred[mask]
    elif kind == "warp":  # the same material, locally displaced: structure changes, statistics do not
        mask = _blob(rng, 28 * size + 8)
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
        amp, freq, phase = 3 + 9 * strength, rng.uniform(0.06, 0.12), rng.uniform(0, 2 * np.pi, 2)
        coords = [yy + amp * np.sin(freq * xx + phase[0]), xx + amp * np.sin(freq * yy + phase[1])]
        warped = np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
        out[mask] = warped[mask]
    elif kind == "speckle":  # many small spots: several tiny regions instead of one blob
        region = _blob(rng, 34 * size + 10)
        ys, xs = np.nonzero(region)
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        mask = np.zeros_like(region)
        for i in rng.choice(len(ys), size=int(rng.integers(6, 14)), replace=False):
            mask |= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= rng.uniform(3, 6) ** 2
        tone = rng.choice([0.05, 0.95])
        out[mask] = (1 - strength) * out[mask] + strength * tone
    elif kind == "discolour":  # a colour cast that keeps the texture (per-channel gain)
        mask = _blob(rng, 30 * size + 8)
        gain = 1 + 0.45 * strength * rng.choice([-1, 1], 3) * rng.uniform(0.4, 1.0, 3)
        out[mask] = out[mask] * gain.astype(np.float32)
    elif kind == "grain":  # sensor-like noise on a region: texture kept, fine-scale statistics changed
        mask = _blob(rng, 28 * size + 8)
        out[mask] = out[mask] + rng.normal(0, 0.03 + 0.12 * strength, (int(mask.sum()), 1)).astype(np.float32)  # luminance grain
    else:
        raise MHPCError(f"unknown defect kind {kind!r}; choose from {list(ALL_DEFECT_KINDS)}")
    return np.clip(out, 0, 1), mask


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        Image.fromarray(array.astype(np.uint8) * 255).save(path)
    else:
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def generate_benchmark(
    out: str | Path,
    categories: tuple[str, ...] = TEXTURES,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_per_defect: int = 5,
    difficulty: float = DEFAULT_DIFFICULTY,
    seed: int = 0,
    defect_kinds: tuple[str, ...] = DEFECT_KINDS,
) -> Path:
    """Writes ``out/<texture>/{train/good, test/<kind>, ground_truth/<kind>}`` and ``out/meta.json``.

    Writes only inside ``out``. Deterministic for a given seed and arguments.
    """
    if not 0.0 <= difficulty <= 1.0:
        raise MHPCError(f"difficulty must be in [0, 1], got {difficulty}")
    unknown = [k for k in defect_kinds if k not in ALL_DEFECT_KINDS]
    if unknown or not defect_kinds:
        raise MHPCError(f"unknown defect kinds {unknown}; choose from {list(ALL_DEFECT_KINDS)}")
    textures = {name: load_texture(name) for name in categories}  # fails before writing on a missing texture
    out = Path(out)
    for c_index, name in enumerate(categories):
        rng = np.random.default_rng([seed, c_index])
        texture = textures[name]
        foreign = foreign_texture(name)
        crop, train_rows, test_rows = geometry(name)
        root = out / name
        for i in range(n_train):
            _save_png(_crop(texture, train_rows, rng, crop), root / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save_png(_crop(texture, test_rows, rng, crop), root / "test" / "good" / f"{i:03d}.png")
        for kind in defect_kinds:
            for i in range(n_test_per_defect):
                img, mask = draw_defect(_crop(texture, test_rows, rng, crop), kind, rng, difficulty, foreign)
                _save_png(img, root / "test" / kind / f"{i:03d}.png")
                _save_png(mask, root / "ground_truth" / kind / f"{i:03d}_mask.png")
    meta = dict(generator="mhpc.data.synthetic", categories=list(categories), n_train=n_train,
                n_test_good=n_test_good, n_test_per_defect=n_test_per_defect, difficulty=difficulty, seed=seed,
                defect_kinds=list(defect_kinds))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


class TextureCropDataset(torch.utils.data.Dataset):
    """Good crops generated on the fly (for benchmarks): image i is seeded by i, no files."""

    def __init__(self, n: int, size: int = 224, texture: str = "brick", seed: int = 0) -> None:
        from mhpc.data.transforms import image_transform, make_preprocessing

        self.n, self.seed = n, seed
        self.texture = load_texture(texture)
        self.transform = image_transform(make_preprocessing(size, "center"))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        img = _crop(self.texture, TRAIN_ROWS, np.random.default_rng([self.seed, i]))
        return self.transform(Image.fromarray((img * 255).round().astype(np.uint8)))
