"""The interface shared by memory-bank strategies."""

from __future__ import annotations

import torch

from mhpc.fit_state import BankState


class MemoryBankStrategy:
    """``run`` summarises all patches at once; ``partial_fit``/``finalize`` do it streaming.

    ``run_state`` / ``state`` return the same result as a mergeable :class:`BankState`, and
    ``resume(state)`` continues streaming from one (``update`` of a fitted model).
    """

    kind = ""

    def run(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def partial_fit(self, features: torch.Tensor) -> "MemoryBankStrategy":  # pragma: no cover
        raise NotImplementedError

    def finalize(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def resume(self, state: BankState) -> "MemoryBankStrategy":  # pragma: no cover - interface
        raise NotImplementedError

    def run_state(self, features: torch.Tensor) -> BankState:
        return BankState(self.kind, self.run(features))

    def state(self) -> BankState:
        return BankState(self.kind, self.finalize())
