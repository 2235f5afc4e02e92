"""Exceptions shared across mhpc."""

from sklearn.exceptions import NotFittedError

__all__ = ["NotFittedError", "MHPCError", "ModelFileError", "MHPCWarning"]


class MHPCError(ValueError):
    """A user-facing error: bad input, bad parameter or bad file. The CLI prints it as one line."""


class ModelFileError(MHPCError):
    """A model file that is truncated, tampered with, or from another format version."""


class MHPCWarning(UserWarning):
    """A legal but doubtful input (few threshold images, a huge cluster count, an ill-conditioned covariance).
    The CLI prints it as one line."""
