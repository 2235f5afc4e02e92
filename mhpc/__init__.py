"""mhpc: PatchCore made flexible and memory-frugal.

``from mhpc import MHPatchCore`` works; the model (and torch) is imported on first use, so ``import mhpc``
and ``mhpc --help`` stay light. This module is the package's public face, the top of the import graph:
mhpc's own modules never import it (the version is in ``mhpc._version``).
"""

from mhpc._version import __version__

__all__ = ["MHPatchCore", "__version__"]


def __getattr__(name: str):
    if name == "MHPatchCore":
        from mhpc.core.mh_patch_core import MHPatchCore

        return MHPatchCore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
