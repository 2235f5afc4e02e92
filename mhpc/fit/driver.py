"""The one fit schedule (the contract is in mhpc/fit/state.py): map the statistics pass over the shards,
merge, finalize the projection; map the bank pass over the shards, merge, finalize the bank. ``update``
is the same schedule resumed from the saved state, with the saved bank re-mapped into the new space.

The mapping is an executor: :class:`InProcess` here (VANILLA: one shard held in memory; ONLINE: a
stream), or the Ray executor of :mod:`mhpc.distributed`. An executor maps a pass over its shards and
returns the shards' states in shard order; the merge and everything else happen here, once."""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mhpc.core import projection
from mhpc.core.reduction import PCAReduction
from mhpc.core.timing import stage_timer
from mhpc.errors import MHPCError
from mhpc.fit import passes
from mhpc.fit.state import BankState, FitState
from mhpc.mahalanobis import OnlineCovariance, Whitener

if TYPE_CHECKING:
    from mhpc.core.mh_patch_core import MHPatchCore


class Executor(Protocol):
    """Maps the passes over shards; results come back in shard order."""

    num_shards: int
    n_images: int | None  # the images of all shards, when known before reading them

    def statistics(self, model: "MHPatchCore", keep: str | None, fit_pca: bool, desc: str) -> list[FitState]: ...

    def bank(self, model: "MHPatchCore", resume: BankState | None, desc: str) -> list[FitState]: ...


class InProcess:
    """One shard, read in this process: a loader streamed batch by batch."""

    num_shards = 1

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.n_images = passes.dataset_len(loader)

    def statistics(self, model: "MHPatchCore", keep: str | None, fit_pca: bool, desc: str) -> list[FitState]:
        return [passes.statistics_pass(model, self.loader, keep, fit_pca, desc)]

    def bank(self, model: "MHPatchCore", resume: BankState | None, desc: str) -> list[FitState]:
        return [passes.bank_pass(model, self.loader, resume, self.n_images, desc=desc)]


def _merged(states: list[FitState]) -> FitState:
    merged = states[0]
    for state in states[1:]:
        merged.merge(state)
    return merged


def run(model: "MHPatchCore", executor: Executor, hold_in_memory: bool = False,
        resume: FitState | None = None) -> "MHPatchCore":
    """The schedule. ``hold_in_memory``: VANILLA, the first pass keeps the patches as one matrix;
    aggregation NONE keeps them batch by batch on every executor, so neither reads the images twice."""
    keep = "matrix" if hold_in_memory else "batches" if model.aggregation_.value == "NONE" else None
    bank_resume = resume.bank.copy() if resume is not None else None
    first, stats = None, None
    if keep is not None or passes.needs_statistics(model):
        n_passes = 1 if keep is not None else 2
        first = _merged(executor.statistics(model, keep, resume is None, f"Pass 1/{n_passes}: statistics"))
        stats = first.statistics
        model.grid_shape_ = first.grid
    if resume is None:
        finalize_statistics(model, stats)
    elif stats is not None or resume.statistics is not None:  # update: the basis stays, the whitening follows
        stats = OnlineCovariance.from_tensors(resume.statistics.to_tensors()).merge(stats)
        old = (model.space_.mean_, model.space_.cholesky_) if isinstance(model.space_, Whitener) else None
        refresh_whitening(model, stats, eigenbasis=False)
        finish_projection(model)
        if old is not None:  # every saved bank vector into the new whitened space, exactly
            bank_resume.remap(*model.space_.remap_from(*old))
    if first is not None and first.patches is not None:
        model.n_passes_ = 1
        states = [passes.bank_pass(model, first.patches, bank_resume)]
    else:
        model.n_passes_ = 2 if first is not None else 1
        states = executor.bank(model, bank_resume, f"Pass {model.n_passes_}/{model.n_passes_}: memory bank")
    bank = _merged(states)
    n_images = first.n_images if first is not None else bank.n_images
    model.grid_shape_ = bank.grid
    total = n_images + (resume.n_images if resume is not None else 0)
    finalize_bank(model, bank.bank, total * model.grid_shape_[0] * model.grid_shape_[1])
    model.n_train_images_ = total
    model.fit_state_ = FitState(stats, bank.bank, total)
    return model


def update(model: "MHPatchCore", loader: Iterable, calibration: Any = None, quantile: float = 0.99) -> "MHPatchCore":
    """``update`` on a working copy of the model, which replaces the model only when all of it succeeded
    (the calibration included): on any error the model is left exactly as it was."""
    state = getattr(model, "fit_state_", None)
    if state is None:
        raise MHPCError("this model has no fit state (saved with keep_fit_state=False); refit it to add images")
    work = _working_copy(model)
    run(work, InProcess(loader), hold_in_memory=work.algorithm_.value == "VANILLA", resume=state)
    if calibration is not None:
        work.calibrate(calibration, quantile)
    model.__dict__.clear()
    model.__dict__.update(work.__dict__)
    return model


def _working_copy(model: "MHPatchCore") -> "MHPatchCore":
    """A copy that an update can change freely: the model and each of its fitted stages copied shallowly
    (the stages' fitted attributes are replaced, never changed in place; the backbone is shared)."""
    work = copy.copy(model)
    for key, value in vars(model).items():
        if key.endswith("_") and hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor,
                                                                                         enum.Enum)):
            setattr(work, key, copy.copy(value))
    return work


# ---------------------------------------------------------------- finalize
def finalize_statistics(model: "MHPatchCore", stats: OnlineCovariance | None) -> None:
    """PCA (exact, by eigh of Sigma; or the IncrementalPCA fed during the pass), then the whitening,
    folded into one affine map."""
    if model.feature_reduction_.value == "PCA":
        if model.pca_solver == "incremental":
            model.reduction_.finalize()
        else:
            if stats is None:
                raise MHPCError("PCA received no patches")
            model.reduction_.fit_covariance(stats.mean.cpu(), stats.covariance().cpu(), stats.count)
    refresh_whitening(model, stats, eigenbasis=model.pca_solver == "covariance")
    finish_projection(model)


def refresh_whitening(model: "MHPatchCore", stats: OnlineCovariance | None, eigenbasis: bool) -> None:
    """MAHALANOBIS: with PCA from the eigenbasis of these very statistics, the reduced covariance is
    diag(eigenvalues): one scale per dimension. Otherwise (no PCA, IncrementalPCA, or after update with
    a fixed basis) the statistics projected into the space, shrunk, Cholesky."""
    if model.distance_.value != "MAHALANOBIS":
        return
    if stats is None or stats.count < 2:
        raise MHPCError("the Mahalanobis distance needs at least 2 training patches")
    mean, cov = stats.mean.cpu(), stats.covariance().cpu()
    if not isinstance(model.reduction_, PCAReduction):
        model.space_.fit_covariance(mean, cov)
    elif eigenbasis:
        model.space_.fit_diagonal(model.reduction_.explained_variance_)
    else:
        matrix, offset = model.reduction_.affine()
        model.space_.fit_covariance(matrix @ mean + offset, matrix @ cov @ matrix.T)


def finish_projection(model: "MHPatchCore") -> None:
    """Once PCA and whitening are final, fold PCA + whitening into one float32 affine map (L^-1 W by
    triangular solve, computed once), so scoring needs one matrix product."""
    model.affine_ = projection.fold(model.reduction_, model.space_, model.device_)


def stage_tensors(model: "MHPatchCore") -> dict[str, torch.Tensor]:
    """The fitted projection stages (PCA, whitening), each as it stores itself: what a model file holds,
    and what a Ray fit sends to its bank tasks."""
    return {**model.reduction_.to_tensors(), **model.space_.to_tensors()}


def set_stage_tensors(model: "MHPatchCore", tensors: dict[str, torch.Tensor]) -> "MHPatchCore":
    """Sets the projection stages of a built model from ``stage_tensors`` and folds them into its map."""
    model.reduction_.load_tensors(tensors)
    model.space_.load_tensors(tensors)
    finish_projection(model)
    return model


def finalize_bank(model: "MHPatchCore", bank: BankState, n_patches: int | None = None) -> None:
    """The merged bank state reduced by the strategy's ``finalize`` (``n_patches``: all the fit's patches;
    None: a KMEANS bank's counts, and no further reduction for the others), then the bank and the scorer.
    ``bank`` becomes the state that ``fit_state_`` keeps: the bank itself, except for KMEANS, whose state
    keeps the merged centroids (``carry``), so that ``update`` reduces them with the new chunks as a refit
    would."""
    if n_patches is None and bank.counts is not None:
        n_patches = int(round(float(bank.counts.sum())))
    carried = bank
    if n_patches is not None:
        strategy = model._make_aggregator()
        with stage_timer(passes.BANK_STAGE[bank.kind]):
            reduced = strategy.finalize(bank, n_patches)
            carried = strategy.carry(bank, reduced, n_patches)
        bank.rows, bank.counts = reduced.rows, reduced.counts
    model.memory_bank_ = bank.rows.detach().cpu().float().contiguous()
    bank.rows = model.memory_bank_
    if carried is not bank:  # KMEANS: the merged centroids, which update continues from
        bank.rows, bank.counts = carried.rows.detach().cpu().float().contiguous(), carried.counts
    model.scorer_.fit(model.memory_bank_)
    model.is_fitted_ = True
