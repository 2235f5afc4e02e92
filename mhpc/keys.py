"""The HMAC key that signs model files and exported models: one rule for both, in a module without torch
(the deployment engines read it too). Given as ``MHPC_MODEL_KEY`` or the CLI's ``--key-file``."""

from __future__ import annotations

import os

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
