"""Run configurations: MHPatchCore keyword arguments, from YAML/JSON files or the seed's short terms.
The parameters and the presets are declared in :mod:`mhpc.params` (re-exported here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mhpc.errors import MHPCError
from mhpc.params import (BASELINE, PARAMS, PRESET_NOTES, PRESETS, defaults, preset_name,  # noqa: F401 - re-exported
                         preset_params)

# The seed's ablation terms, e.g. {"alg": "VANILLA", "agg": "GREEDY", "red": "NONE", "dist": "EUCLIDEAN"}.
ALIASES = {"alg": "algorithm", "agg": "aggregation", "red": "feature_reduction", "dist": "distance"}


def describe_config(cfg: dict[str, Any], name: str | None = None) -> str:
    """One line saying what a configuration is: the preset's note when ``name`` is a preset whose method it
    still has, then the four axes with their sizes, the embedding and the backbone."""
    c = {**defaults(), **cfg}

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


# Keys of a study entry that are not model parameters: its name, and how its images are cropped
# ("center": the MVTec protocol, "none": the whole image), so that crop can be an ablation axis.
RUN_KEYS = ("name", "crop")


def normalise_config(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Expands aliases and refuses unknown keys, naming the source. ``name`` and ``crop`` are kept aside."""
    if not isinstance(raw, dict):
        raise MHPCError(f"{source}: a configuration must be a mapping, got {type(raw).__name__}")
    keys = set(PARAMS) | set(RUN_KEYS)
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
