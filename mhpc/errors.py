"""Exceptions shared across mhpc."""

from sklearn.exceptions import NotFittedError

__all__ = ["NotFittedError", "MHPCError", "ModelFileError"]


class MHPCError(ValueError):
    """A user-facing error: bad input, bad parameter or bad file. The CLI prints it as one line."""


class ModelFileError(MHPCError):
    """A model file that is truncated, tampered with, or from another format version."""
