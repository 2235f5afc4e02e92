"""The two passes of a fit over one shard: a shard is an image loader (a DataLoader, a list of batches; a
Ray task makes one from its list of paths) or patches already held in memory (VANILLA's one shard, the
patches aggregation NONE kept). Each returns the shard's :class:`~mhpc.fit.state.FitState`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mhpc.core.reduction import PCAReduction
from mhpc.core.timing import stage_timer
from mhpc.errors import MHPCError
from mhpc.fit.state import BankState, FitState
from mhpc.mahalanobis import OnlineCovariance

if TYPE_CHECKING:
    from mhpc.core.mh_patch_core import MHPatchCore

BANK_STAGE = {"GREEDY": "greedy coreset", "KMEANS": "k-means", "NONE": "keep all"}


class Patches(list):
    """A shard of raw patch features held in memory: a list of [rows, D] tensors."""


def dataset_len(loader: Iterable) -> int | None:
    """The number of images of a DataLoader over a sized dataset, else None."""
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None


def stream(model: "MHPatchCore", loader: Iterable, desc: str, counter: list[int]) -> Iterator[torch.Tensor]:
    """Patch features [B*P, D] for each batch of ``loader``; ``counter[0]`` counts the images."""
    for batch in tqdm(loader, desc=desc, disable=not model.progress, leave=False):
        images = model._images(batch)
        counter[0] += images.shape[0]
        feats = model._embed(images)
        yield feats.reshape(-1, feats.shape[-1])
    if counter[0] == 0:
        raise MHPCError("the training data loader yielded no images")


def needs_statistics(model: "MHPatchCore") -> bool:
    return model.feature_reduction_.value == "PCA" or model.distance_.value == "MAHALANOBIS"


def statistics_pass(model: "MHPatchCore", loader: Iterable, keep: str | None = None, fit_pca: bool = True,
                    desc: str = "statistics") -> FitState:
    """One read of the shard: the raw-feature statistics (None when neither PCA nor MAHALANOBIS is on),
    the image count and grid, and with ``keep`` the raw patches too, so that no second read is needed:
    "batches" as they came (aggregation NONE), "matrix" as one [N*P, D] matrix (VANILLA), allocated once
    and filled when the dataset is sized, so the features are held once rather than twice.
    ``fit_pca=False`` leaves the incremental solver's PCA alone (update keeps the basis)."""
    incremental = fit_pca and model.pca_solver == "incremental" and isinstance(model.reduction_, PCAReduction)
    stats, counter = None, [0]
    parts: list[torch.Tensor] = []
    out, row, n_images = None, 0, dataset_len(loader) if keep == "matrix" else None
    for feats in stream(model, loader, desc, counter):
        if needs_statistics(model):
            with stage_timer("statistics"):
                if stats is None:
                    stats = OnlineCovariance(feats.shape[1])
                stats.update(feats)
                if incremental:
                    model.reduction_.partial_fit(feats)
        if n_images is not None and out is None:
            out = torch.empty(n_images * model.grid_shape_[0] * model.grid_shape_[1], feats.shape[1], dtype=feats.dtype)
        if out is not None and row + feats.shape[0] <= out.shape[0]:
            out[row : row + feats.shape[0]] = feats
            row += feats.shape[0]
        elif keep is not None:  # unsized loader, or a dataset that yields more than its length says
            parts.append(feats.cpu())
    kept = None
    if keep == "matrix":
        kept = Patches([torch.cat(parts) if out is None else torch.cat([out[:row], *parts]) if parts else out[:row]])
    elif keep == "batches":
        kept = Patches(parts)
    return FitState(stats, None, counter[0], kept, tuple(model.grid_shape_))


def bank_pass(model: "MHPatchCore", shard: Iterable | Patches, resume: BankState | None = None,
              n_images: int | None = None, alone: bool = True, desc: str = "memory bank") -> FitState:
    """One pass: the bank state of the shard's projected patches (continuing ``resume`` if given).
    Patches held in memory are one greedy-coreset chunk. ``n_images``: the images of the whole fit when known (an int
    k-means cluster count needs it), else the shard's loader length; ``alone``: the fit's only shard."""
    in_memory = isinstance(shard, Patches)
    aggregator, counter = None, [0]
    batches = shard if in_memory else stream(model, shard, desc, counter)
    for feats in batches:
        if aggregator is None:  # the first batch tells the patch grid
            per_image = model.grid_shape_[0] * model.grid_shape_[1]
            expected = sum(p.shape[0] for p in shard) if in_memory else None
            n_images = n_images if n_images is not None else (None if in_memory else dataset_len(shard))
            if expected is None and n_images is not None:
                expected = n_images * per_image
            # In memory, the greedy coreset runs on the whole shard at once (PatchCore's own algorithm);
            # k-means cuts the same fixed-size chunks as a stream would (mhpc/memory_bank/kmeans.py).
            whole = in_memory and model.aggregation_.value == "GREEDY"
            aggregator = model._make_aggregator(expected, sys.maxsize if whole else None, alone)
            if resume is not None:
                aggregator.resume(resume)
        with stage_timer("projection"):
            projected = model._project(feats.to(model.device_))
        with stage_timer(BANK_STAGE[model.aggregation_.value]):
            aggregator.partial_fit(projected)
    if aggregator is None:
        raise MHPCError("the training data loader yielded no images")
    with stage_timer(BANK_STAGE[model.aggregation_.value]):
        bank = aggregator.state()
    return FitState(None, bank, counter[0], None, tuple(model.grid_shape_))

