"""mhpc: PatchCore made flexible and memory-frugal."""

__version__ = "0.1.0"
