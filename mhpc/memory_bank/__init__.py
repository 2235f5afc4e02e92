"""Memory-bank strategies: how the training patches are summarised into the bank.

Each strategy has the same small interface, mirroring the official PatchCore samplers:
``run(features)`` for the batch (VANILLA) path, and ``partial_fit(features)`` + ``finalize()``
for the streaming (ONLINE) path. Both return the bank as a float32 tensor.
"""

from mhpc.memory_bank.base import MemoryBankStrategy
from mhpc.memory_bank.greedy import ApproximateGreedyCoreset, greedy_coreset_indices
from mhpc.memory_bank.identity import KeepAll
from mhpc.memory_bank.kmeans import KMeansBank

__all__ = ["MemoryBankStrategy", "ApproximateGreedyCoreset", "greedy_coreset_indices", "KMeansBank", "KeepAll"]
