"""What happens outside the exported graph: the resize / crop contract and the sidecar JSON. No torch here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mhpc.errors import MHPCError

SIDECAR_FORMAT = "mhpc-deploy"
SIDECAR_VERSION = 2  # 2: signed (mhpc.deploy.signing); version 1 files carried no hashes


def preprocessing_contract(model: Any) -> dict[str, Any]:
    """How a caller turns a picture into the graph's uint8 [B, H, W, 3] input.

    The one place that decides it: a model that records its preprocessing (``preprocessing_``) is
    taken at its word; otherwise it is the PatchCore default the datasets use (resize the short side
    to round(H * 256 / 224), bilinear with antialiasing, centre-crop H x W).
    """
    from mhpc.data.transforms import make_preprocessing  # export time only: torch is there

    h, w = (int(s) for s in model.input_shape)
    pre = getattr(model, "preprocessing_", None) or make_preprocessing((h, w), "center")
    if pre["crop"] == "center":
        contract = {
            "mode": "resize_short_side_then_center_crop",
            "resize_short_side": int(pre["resize"]),
            "crop": [h, w],
            "interpolation": "bilinear",
            "antialias": True,
        }
    else:
        contract = {
            "mode": "letterbox",
            "description": "scale the whole image to fit H x W keeping its aspect (Pillow bilinear on uint8, "
                           "antialiased), centre it, pad with the ImageNet mean colour (124, 116, 104)",
            "size": [h, w],
        }
        if pre.get("tile"):
            contract["tile"] = list(pre["tile"])  # [size, overlap] in original pixels, each tile letterboxed
    # The exact dict mhpc's own pipeline takes (mhpc.data.transforms), for `mhpc predict --engine`.
    contract["mhpc_preprocessing"] = dict(pre)
    contract.update({
        "input": "uint8 RGB, layout [B, H, W, 3], H x W = " f"{h} x {w}",
        "normalisation": "inside the graph: (x / 255 - ImageNet mean) / ImageNet std",
    })
    return contract


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def sidecar_text(info: dict[str, Any], key: bytes | None = None) -> str:
    """The sidecar's JSON: format header, ``info``, and its signature (``mhpc.deploy.signing``; ``key``:
    the HMAC key, default ``MHPC_MODEL_KEY``)."""
    from mhpc.deploy.signing import sign_sidecar

    header = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION}
    return json.dumps(sign_sidecar({**header, **info}, key), indent=2)


def read_sidecar(path: str | Path, key: bytes | None = None) -> dict[str, Any]:
    """The sidecar of the exported graph ``path``, checked before anything is loaded: its own SHA-256,
    its HMAC when a key is set (``key``, default ``MHPC_MODEL_KEY``), the graph files' SHA-256, then its
    schema. One-line errors."""
    from mhpc.deploy.signing import check_sidecar, verify_sidecar

    target = sidecar_path(path)
    if not target.is_file():
        raise MHPCError(f"{target} not found: an exported model needs the JSON that `mhpc export` writes next to it")
    try:
        info = json.loads(target.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MHPCError(f"{target} is not readable JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != SIDECAR_FORMAT:
        raise MHPCError(f"{target} is not an mhpc-deploy description")
    if info.get("format_version") != SIDECAR_VERSION:
        raise MHPCError(f"{target} has mhpc-deploy version {info.get('format_version')!r}; this mhpc reads version "
                        f"{SIDECAR_VERSION} (signed): export the model again")
    verify_sidecar(info, target, Path(path), key)
    return check_sidecar(info, target, Path(path))


def load_image(path: str | Path, contract: dict[str, Any]) -> np.ndarray:
    """One image file -> the graph's uint8 [H, W, 3] input, exactly as ``mhpc predict`` prepares it: the
    same decoding and the same uint8 Pillow geometry (``mhpc.data.geometry``), centre crop or letterbox.
    A tiled contract (``tile``) is refused: its tiles are cut from the original image first."""
    from mhpc.data.geometry import prepare_image
    from mhpc.data.io import load_rgb

    pre = contract.get("mhpc_preprocessing")
    if not isinstance(pre, dict) or pre.get("crop") not in ("none", "center") or "input_size" not in pre:
        raise MHPCError(f"load_image needs the sidecar's preprocessing contract with 'mhpc_preprocessing', got {contract}")
    if pre.get("tile"):
        raise MHPCError("load_image prepares whole images; a tiled model's images are cut into tiles first "
                        "(`mhpc predict --engine` does it)")
    img = load_rgb(Path(path), pre.get("bit_depth"))
    return np.asarray(prepare_image(img, pre), dtype=np.uint8)
