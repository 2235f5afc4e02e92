"""Run configurations: MHPatchCore keyword arguments, from YAML/JSON files or the seed's short terms."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from mhpc.errors import MHPCError, MHPCWarning

# The seed's ablation terms, e.g. {"alg": "VANILLA", "agg": "GREEDY", "red": "NONE", "dist": "EUCLIDEAN"}.
ALIASES = {"alg": "algorithm", "agg": "aggregation", "red": "feature_reduction", "dist": "distance"}

BASELINE = {"algorithm": "VANILLA", "aggregation": "GREEDY", "feature_reduction": "NONE", "distance": "EUCLIDEAN"}
PROPOSED = {"algorithm": "ONLINE", "aggregation": "KMEANS", "feature_reduction": "PCA", "distance": "MAHALANOBIS"}

# Named method configurations (no backbone, data or runtime settings). ``paper``: PatchCore as published;
# ``proposed``: the seed's proposed configuration, as the seed defines it; ``best``: the recommendation
# from ABLATION.md (measured over both texture sources, 3 seeds, paired against ``paper``).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(BASELINE),
    "proposed": dict(PROPOSED),
    # ABLATION.md: the best of the 24 combinations (PCA + MAHALANOBIS), on anomalib's unpooled embedding,
    # with the one swept value that passed the study's rule (a 5% k-means bank instead of the 10% coreset):
    # 6 categories of two texture sources x 3 seeds, paired against `paper`.
    "best": {"algorithm": "VANILLA", "aggregation": "KMEANS", "feature_reduction": "PCA", "distance": "MAHALANOBIS",
             "patch_embedding": "unpooled", "kmeans_clusters": 0.05},
}


# What each preset is for, in a sentence (the demo's index page and `--help` say it).
PRESET_NOTES = {
    "paper": "PatchCore as published (Roth et al., CVPR 2022): all patches in memory, a greedy coreset of 10%, "
             "Euclidean nearest-neighbour distance",
    "proposed": "The seed's proposal: a streaming fit (memory bounded by the batch), a k-means bank of 1% of the "
            "patches, PCA keeping 99% of the variance, Mahalanobis distance",
    "best": "The recommendation of ABLATION.md: the unpooled (anomalib) patch embedding, PCA keeping 99% of the "
            "variance, Mahalanobis distance, a k-means bank of 5% of the patches",
}


def describe_config(cfg: dict[str, Any], name: str | None = None) -> str:
    """One line saying what a configuration is: the preset's note when ``name`` is a preset whose method it
    still has, then the four axes with their sizes, the embedding and the backbone."""
    import inspect

    from mhpc.core.mh_patch_core import MHPatchCore

    defaults = {k: p.default for k, p in inspect.signature(MHPatchCore.__init__).parameters.items() if k != "self"}
    c = {**defaults, **cfg}

    def axis(key: str) -> str:
        return str(getattr(c[key], "name", c[key])).upper()

    agg = axis("aggregation")
    size = {"GREEDY": c["coreset_percentage"], "KMEANS": c["kmeans_clusters"]}.get(agg)
    agg += "" if size is None else (f" ({float(size):.0%})" if isinstance(size, float) else f" ({size} centres)")
    red = axis("feature_reduction")
    red += f" ({float(c['pca_variance_ratio']):.0%})" if red == "PCA" else ""
    text = (f"{axis('algorithm')} + {agg} + {red} + {axis('distance')}, {c['patch_embedding']} embedding, "
            f"backbone {getattr(c['backbone'], 'value', c['backbone'])}")
    if name in PRESETS and all(str(getattr(cfg.get(k), "name", cfg.get(k))).upper() == str(v).upper()
                               for k, v in PRESETS[name].items() if isinstance(v, str)):
        text = f"{PRESET_NOTES[name]}. {text}"
    return text


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


def _model_keys() -> set[str]:
    import inspect

    from mhpc.core.mh_patch_core import MHPatchCore

    return set(inspect.signature(MHPatchCore.__init__).parameters) - {"self"}


# Keys of a study entry that are not model parameters: its name, and how its images are cropped
# ("center": the MVTec protocol, "none": the whole image), so that crop can be an ablation axis.
RUN_KEYS = ("name", "crop")


def normalise_config(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Expands aliases and refuses unknown keys, naming the source. ``name`` and ``crop`` are kept aside."""
    if not isinstance(raw, dict):
        raise MHPCError(f"{source}: a configuration must be a mapping, got {type(raw).__name__}")
    keys = _model_keys() | set(RUN_KEYS)
    # A ``preset`` entry lies under the entry's own keys, which override it.
    out: dict[str, Any] = preset_params(str(raw["preset"])) if "preset" in raw else {}
    for key, value in raw.items():
        if key == "preset":
            continue
        key = ALIASES.get(key, key)
        if key not in keys:
            raise MHPCError(f"{source}: unknown option {key!r}")
        out[key] = value
    if "input_shape" in out:
        out["input_shape"] = tuple(out["input_shape"])
    if "crop" in out:
        from mhpc.data.transforms import CROP_MODES

        if out["crop"] not in CROP_MODES:
            raise MHPCError(f"{source}: crop must be one of {list(CROP_MODES)}, got {out['crop']!r}")
    return out


def config_name(cfg: dict[str, Any]) -> str:
    if cfg.get("name"):
        return str(cfg["name"])
    parts = [str(cfg.get(k, BASELINE[k])).upper() for k in ("algorithm", "feature_reduction", "aggregation", "distance")]
    return "+".join(parts)


def read_config_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MHPCError(f"config file not found: {path}")
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MHPCError(f"cannot parse config file {path}: {exc}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    return normalise_config(read_config_file(path) or {}, str(path))


def load_seeds(path: str | Path) -> list[int] | None:
    """The ``seeds:`` list of a study file (a mapping with ``configs``), or None."""
    raw = read_config_file(path)
    seeds = raw.get("seeds") if isinstance(raw, dict) else None
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise MHPCError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    return seeds


def load_config_list(path: str | Path) -> list[dict[str, Any]]:
    """A list of configurations, or a mapping with ``defaults`` and ``configs``."""
    raw = read_config_file(path)
    defaults: dict[str, Any] = {}
    if isinstance(raw, dict):
        defaults, raw = raw.get("defaults", {}) or {}, raw.get("configs")
    if not isinstance(raw, list) or not raw:
        raise MHPCError(f"{path}: expected a non-empty list of configurations (or 'configs:' with a list)")
    return [normalise_config({**defaults, **item}, f"{path} entry {i + 1}") for i, item in enumerate(raw)]
