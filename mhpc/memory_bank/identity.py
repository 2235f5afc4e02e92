"""Keeps every training patch in the bank (aggregation NONE)."""

from __future__ import annotations

import torch

from mhpc.errors import MHPCError
from mhpc.fit.state import BankState
from mhpc.memory_bank.base import MemoryBankStrategy


class KeepAll(MemoryBankStrategy):
    kind = "NONE"

    def resume(self, state: BankState) -> "KeepAll":
        """New patches are appended to the kept ones."""
        self._parts = [state.rows.float().cpu()]
        return self

    def partial_fit(self, features: torch.Tensor) -> "KeepAll":
        if not hasattr(self, "_parts"):
            self._parts: list[torch.Tensor] = []
        self._parts.append(features.float().cpu())
        return self

    def state(self) -> BankState:
        if not getattr(self, "_parts", None):
            raise MHPCError("the memory bank received no patches")
        bank = torch.cat(self._parts)
        del self._parts
        return BankState(self.kind, bank)
