"""Exceptions shared across mhpc. A leaf module: the command line imports it before anything heavy."""

__all__ = ["NotFittedError", "MHPCError", "ModelFileError", "MHPCWarning"]


class MHPCError(ValueError):
    """A user-facing error: bad input, bad parameter or bad file. The CLI prints it as one line."""


class ModelFileError(MHPCError):
    """A model file that is truncated, tampered with, or from another format version."""


class MHPCWarning(UserWarning):
    """A legal but doubtful input (few threshold images, a huge cluster count, an ill-conditioned covariance).
    The CLI prints it as one line."""


def __getattr__(name: str):
    # NotFittedError is scikit-learn's own (so `except sklearn.exceptions.NotFittedError` catches ours);
    # it is looked up on first use because importing sklearn costs seconds, and `mhpc --help` needs none.
    if name == "NotFittedError":
        from sklearn.exceptions import NotFittedError

        return NotFittedError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
