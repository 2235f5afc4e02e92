"""The interface shared by memory-bank strategies."""

from __future__ import annotations

import torch


class MemoryBankStrategy:
    """``run`` summarises all patches at once; ``partial_fit``/``finalize`` do it streaming."""

    def run(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def partial_fit(self, features: torch.Tensor) -> "MemoryBankStrategy":  # pragma: no cover
        raise NotImplementedError

    def finalize(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
