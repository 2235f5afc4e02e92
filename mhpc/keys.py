"""Integrity, in a module without torch (the deployment engines and the setup commands use it too): the
HMAC key that signs model files and exported models, one rule for both, given as ``MHPC_MODEL_KEY`` or
the CLI's ``--key-file``; and the SHA-256 of a file, read in blocks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mhpc.errors import MHPCError

KEY_ENV = "MHPC_MODEL_KEY"


def normalise_key(raw: bytes, source: str) -> bytes:
    """The key bytes without surrounding whitespace (a key file's trailing newline): one rule for
    ``--key-file`` and ``MHPC_MODEL_KEY``, so the same key signs and verifies whichever way it is given."""
    key = raw.strip()
    if not key:
        raise MHPCError(f"{source} is empty")
    return key


def model_key() -> bytes | None:
    """The HMAC key from ``MHPC_MODEL_KEY`` (None when unset or empty), stripped by ``normalise_key``."""
    key = os.environ.get(KEY_ENV, "")
    return normalise_key(os.fsencode(key), KEY_ENV) if key else None


def resolve_key(key: bytes | None) -> bytes | None:
    """``key`` as given (the CLI reads ``--key-file`` or ``MHPC_MODEL_KEY`` once and passes it down; an
    empty key means none), or, when None, the key from ``MHPC_MODEL_KEY`` (the Python API's default)."""
    return model_key() if key is None else (key or None)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks (a graph or weights file may be large)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
