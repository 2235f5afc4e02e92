"""Keeps every training patch in the bank (aggregation NONE)."""

from __future__ import annotations

import torch

from mhpc.errors import MHPCError
from mhpc.memory_bank.base import MemoryBankStrategy


class KeepAll(MemoryBankStrategy):
    def run(self, features: torch.Tensor) -> torch.Tensor:
        return features.float()

    def partial_fit(self, features: torch.Tensor) -> "KeepAll":
        if not hasattr(self, "_parts"):
            self._parts: list[torch.Tensor] = []
        self._parts.append(features.float().cpu())
        return self

    def finalize(self) -> torch.Tensor:
        if not getattr(self, "_parts", None):
            raise MHPCError("the memory bank received no patches")
        bank = torch.cat(self._parts)
        del self._parts
        return bank
