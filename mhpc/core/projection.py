"""The projection: feature reduction (PCA or none), then the distance's space (whitening or none); the
vectors the bank and the search use. With both, fit folds them into one float32 affine map (L^-1 W by
triangular solves, computed once), so scoring needs one matrix product; ``affine`` gives any of the four
combinations as one map ``z = x @ A + b`` for the deployment graph."""

from __future__ import annotations

from typing import Any

import torch

from mhpc.core.reduction import PCAReduction
from mhpc.mahalanobis import Whitener

Folded = tuple[torch.Tensor, torch.Tensor]  # (A [D, R], b [R]), float32


def fold(reduction: Any, space: Any, device: torch.device) -> Folded | None:
    """PCA + whitening as one map on ``device`` once both are final; None for the other combinations,
    which ``project`` runs stage by stage."""
    if isinstance(reduction, PCAReduction) and isinstance(space, Whitener):
        a, b = space.compose(*reduction.affine())
        return a.float().T.contiguous().to(device), b.float().to(device)
    return None


def project(reduction: Any, space: Any, folded: Folded | None, features: torch.Tensor) -> torch.Tensor:
    if folded is not None:
        a_t, b = (t.to(features.device) for t in folded)
        return torch.addmm(b, features, a_t)
    return space.transform(reduction.transform(features))


def affine(reduction: Any, space: Any, folded: Folded | None) -> Folded | None:
    """The projection as one map on the CPU (float32; the folded one itself when there is one), or None
    when it is the identity."""
    if folded is not None:
        return tuple(t.cpu().contiguous() for t in folded)
    if isinstance(reduction, PCAReduction):
        matrix, offset = reduction.affine()
    elif isinstance(space, Whitener):
        width = space.mean_.shape[0]
        matrix, offset = torch.eye(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    else:
        return None
    if isinstance(space, Whitener):
        matrix, offset = space.compose(matrix, offset)
    return matrix.T.float().contiguous(), offset.float().contiguous()
