"""Memory-bank strategies: how the training patches are summarised into the bank.

Every strategy has one interface for every fit path (``mhpc.memory_bank.base.MemoryBankStrategy``):
``partial_fit(features)`` takes the projected patches chunk by chunk (VANILLA's in-memory shard is one
chunk), ``state()`` returns a mergeable ``BankState`` (shards merge with ``BankState.merge``),
``finalize(state, n_patches)`` reduces the merged state to the bank, and ``resume(state)`` continues from
a saved state (``update``). The fit driver (``mhpc.fit.driver``) runs them in that order.
"""

from mhpc.memory_bank.base import MemoryBankStrategy
from mhpc.memory_bank.greedy import ApproximateGreedyCoreset, greedy_coreset_indices
from mhpc.memory_bank.identity import KeepAll
from mhpc.memory_bank.kmeans import KMeansBank

__all__ = ["MemoryBankStrategy", "ApproximateGreedyCoreset", "greedy_coreset_indices", "KMeansBank", "KeepAll"]
