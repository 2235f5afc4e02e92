"""`mhpc serve`: a fitted or exported model behind HTTP (REST, the Open Inference Protocol v2, Prometheus
metrics, a web page), with dynamic batching, a bounded queue and hot reload.

Needs the optional extra ``serve`` (FastAPI, uvicorn, python-multipart, prometheus_client); importing
``mhpc.serve`` itself needs none of them, so ``mhpc serve`` can say which extra is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mhpc.errors import MHPCError

REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart",
            "prometheus_client": "prometheus-client"}


def default_name(model: str, engine: str = "torch") -> str:
    """A served model's name (the protocol's, and a model repository's): the model folder's name, or the
    file's stem (an exported file, or a ``.safetensors`` file)."""
    p = Path(model).resolve()
    if engine != "torch" or p.suffix == ".safetensors":
        return p.stem
    return p.name


def require_serve() -> None:
    """One line naming the extra when any of its packages is missing."""
    missing = [pkg for module, pkg in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MHPCError(f"mhpc serve needs the optional extra 'serve': pip install 'mhpc[serve]' "
                        f"(missing: {', '.join(missing)})")
