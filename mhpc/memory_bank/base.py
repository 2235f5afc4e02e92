"""The interface shared by memory-bank strategies."""

from __future__ import annotations

import torch

from mhpc.fit.state import BankState


class MemoryBankStrategy:
    """One interface for every executor: ``partial_fit`` takes the projected patches chunk by chunk
    (VANILLA's in-memory shard is one chunk), ``state`` returns what was accumulated as a mergeable
    :class:`BankState` (shards merge with ``BankState.merge``), and ``finalize`` reduces the merged
    state of all shards to the bank. ``resume(state)`` continues from a saved state (``update``)."""

    kind = ""

    def partial_fit(self, features: torch.Tensor) -> "MemoryBankStrategy":  # pragma: no cover - interface
        raise NotImplementedError

    def state(self) -> BankState:  # pragma: no cover - interface
        raise NotImplementedError

    def resume(self, state: BankState) -> "MemoryBankStrategy":  # pragma: no cover - interface
        raise NotImplementedError

    def finalize(self, state: BankState, n_patches: int) -> BankState:
        """The merged state of all shards (``n_patches`` patches in all) reduced to the bank."""
        return state

    def carry(self, state: BankState, bank: BankState, n_patches: int) -> BankState:
        """What the fit state keeps for ``update``: the bank itself, unless the strategy's merged state
        says more than its bank (k-means)."""
        return bank
