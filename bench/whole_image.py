"""Issue 10 figures: (1) a defect at the left edge of a 128x384 image, whole-image preprocessing vs the MVTec
centre crop (defect score / clean score); (2) what the validate-before-work pass costs next to the fit.

MobileNetV2 ImageNet weights (``mhpc setup-weights``); images are striped textures with noise.
Run: .venv/bin/python bench/whole_image.py
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.data.datasets import FolderDataset, ImageFilesDataset, SampleDataset, make_loader
from mhpc.data.transforms import make_preprocessing

torch.set_num_threads(2)


def stripes(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.4 * np.sin((xx + yy) * 0.5 + rng.uniform(0, 6.28))
    img = np.stack([base, base * 0.8, 1 - base], -1) + rng.normal(0, 0.03, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def model():
    return MHPatchCore(backbone="mobilenet_v2", progress=False, coreset_percentage=0.1)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    (root / "good").mkdir()
    for i in range(20):
        Image.fromarray(stripes(rng, 128, 384)).save(root / "good" / f"{i:03d}.png")
    clean = stripes(rng, 128, 384)
    results = {}
    for where, x0 in (("left edge", 10), ("centre", 172)):
        bad = clean.copy()
        bad[44:84, x0:x0 + 40] = [255, 0, 0]
        Image.fromarray(bad).save(root / f"bad_{x0}.png")
    Image.fromarray(clean).save(root / "clean.png")
    for crop in ("none", "center"):
        pre = make_preprocessing(224, crop)
        ds = FolderDataset(root / "good", preprocessing=pre)
        t0 = time.perf_counter()
        SampleDataset(ds.samples, pre).validate()
        t_validate = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = model().fit(make_loader(ds, 8))
        t_fit = time.perf_counter() - t0
        test = ImageFilesDataset([root / "bad_10.png", root / "bad_172.png", root / "clean.png"], preprocessing=pre)
        s, _ = m.predict_images(torch.stack([test[i]["image"] for i in range(3)]))
        results[crop] = s
        print(f"crop={crop}: score left-edge defect / clean = {s[0] / s[2]:.2f}, centre defect / clean = "
              f"{s[1] / s[2]:.2f}; validate pass {t_validate:.2f} s = {100 * t_validate / t_fit:.1f}% of the fit "
              f"({t_fit:.1f} s, 20 images)")


if __name__ == "__main__":
    main()
