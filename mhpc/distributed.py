"""Fit and score on a Ray cluster (optional extra: ``pip install 'mhpc[distributed]'``).

Ray is imported lazily, so the core package imports and works without it.

Fit: ``fit_distributed(model, ...)`` (``MHPatchCore.fit_distributed`` and ``mhpc fit --ray`` call it) is
the fit driver's schedule with a Ray executor, in :mod:`mhpc.fit.ray_executor` (re-exported here with
the Ray session and the path shards).

Scoring (``predict_distributed``; ``mhpc predict --ray``): Ray Data over (index, path) rows and
``map_batches`` with a pool of scorer actors. The model file's bytes go into the object store once;
each actor loads them through ``MHPatchCore.load`` with the caller's key (the same integrity, signature and
backbone checks as a local load). Results carry the row index, and ``mhpc.prediction.PredictionWriter``
writes the same files as the single-process command, in input order.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mhpc.fit.ray_executor import (DEFAULT_RAY_TIMEOUT, RayExecutor, check_ray_address,  # noqa: F401 - re-exported
                                   fit_distributed, image_batches, import_ray, ray_session, resolve_image_paths,
                                   shard_paths)

if TYPE_CHECKING:
    from mhpc.prediction import PredictionWriter


# ---------------------------------------------------------------- scoring
class _BatchScorer:
    """One Ray Data actor: loads the model once, then scores batches of (index, path) rows."""

    def __init__(self, model_blob: list, preprocessing: dict[str, Any], key: bytes | None = None) -> None:
        from mhpc.core.mh_patch_core import MHPatchCore

        ray = import_ray()
        blob = ray.get(model_blob[0])  # wrapped in a list so Ray Data passes the reference, not a copy
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "model.safetensors"
            file.write_bytes(blob)
            self.model = MHPatchCore.load(file, device="cpu", key=key)
        self.model.progress = False
        self.preprocessing = preprocessing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mhpc.data.transforms import denormalize

        loader = image_batches([str(p) for p in batch["path"]], self.preprocessing, len(batch["path"]))
        images = next(iter(loader))["image"]
        scores, maps = self.model.predict_images(images)
        return {"index": np.asarray(batch["index"]), "score": scores, "map": maps,
                "rgb": np.stack([denormalize(img) for img in images])}


def predict_distributed(model_path: str | os.PathLike, preprocessing: dict[str, Any], paths: Sequence[str],
                        writer: "PredictionWriter", ray_address: str | None = None, batch_size: int = 8,
                        num_workers: int | None = None, progress: bool = True,
                        ray_timeout: float = DEFAULT_RAY_TIMEOUT, key: bytes | None = None) -> None:
    """Scores ``paths`` on Ray with the saved model at ``model_path`` (already loaded once by the caller,
    which checked it); ``writer`` gets every result. ``key``: the HMAC key each actor checks the model
    with (default: the actor's ``MHPC_MODEL_KEY``, if set)."""
    from mhpc.core.model_file import resolve_model_path

    file = resolve_model_path(model_path)
    with ray_session(ray_address, ray_timeout) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        if not progress:
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run INFO lines with --quiet
        workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        blob = ray.put(file.read_bytes())
        rows = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])
        scored = rows.map_batches(
            _BatchScorer, fn_constructor_args=([blob], dict(preprocessing), key), batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(paths))), num_cpus=1,
        )
        for batch in scored.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for i, score, amap, rgb in zip(batch["index"], batch["score"], batch["map"], batch["rgb"]):
                writer.write(int(i), rgb, float(score), amap)
