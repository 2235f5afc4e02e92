"""An export laid out as a model repository for Triton Inference Server or OpenVINO Model Server.

Both servers speak the Open Inference Protocol v2, as `mhpc serve` does, and both read a folder per model
with a numbered version folder inside (``ROOT/NAME/1/``): ``model.onnx`` for Triton's ONNX Runtime backend,
``model.xml`` + ``model.bin`` for OpenVINO Model Server. Triton also wants ``ROOT/NAME/config.pbtxt``,
written here from the export's own description (input and outputs, names, types, shapes), so it cannot
disagree with the graph. The export's JSON stays next to the graph (the servers ignore it; `mhpc predict
--engine` and `mhpc serve` use it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mhpc.errors import MHPCError

CONFIG_MARK = "# written by mhpc export"  # an existing config.pbtxt is replaced only when it starts with this
VERSION = "1"
GRAPH_FILE = {"onnx": "model.onnx", "openvino": "model.xml"}  # the servers' default file names
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "bool": "TYPE_BOOL"}
OUTPUT_TYPES = {"scores": "float32", "maps": "float32", "is_anomaly": "bool"}


def repository_graph(root: str | os.PathLike, name: str, fmt: str) -> Path:
    """Where the graph goes: ``ROOT/NAME/1/model.onnx`` (Triton) or ``.../model.xml`` (OpenVINO Model Server).
    Refuses, before any work, a name that is not one folder name and a config.pbtxt mhpc did not write."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise MHPCError(f"--name {name!r}: a model repository's model name must be letters, digits, '_', '.', '-'")
    model_dir = Path(root) / name
    config = model_dir / "config.pbtxt"
    if fmt == "onnx" and os.path.lexists(config) and not _ours(config):
        raise MHPCError(f"{config} exists and was not written by mhpc export; choose another --repository or --name")
    return model_dir / VERSION / GRAPH_FILE[fmt]


def _ours(config: Path) -> bool:
    try:
        return config.is_file() and not config.is_symlink() and config.read_text().startswith(CONFIG_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def triton_config(name: str, info: dict[str, Any]) -> str:
    """Triton's ``config.pbtxt`` for an ONNX export described by ``info`` (its JSON). ``max_batch_size: 0``:
    the batch is the tensors' first dimension (-1), as in the graph; Triton then passes batches through as
    the client sends them."""
    h, w = info["input_shape"]
    dims = {"scores": [-1], "maps": [-1, h, w], "is_anomaly": [-1]}

    def tensor(tensor_name: str, dtype: str, shape: list[int]) -> str:
        return (f'  {{ name: "{tensor_name}" data_type: {TRITON_TYPES[dtype]} '
                f'dims: [ {", ".join(str(d) for d in shape)} ] }}')

    outputs = ",\n".join(tensor(o, OUTPUT_TYPES[o], dims[o]) for o in info["outputs"])
    return (f"{CONFIG_MARK} for {name}/{VERSION}/{GRAPH_FILE['onnx']}; exported graph sha256 "
            f"{info['files_sha256']['graph']}\n"
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            f"input [\n{tensor(info['input']['name'], info['input']['dtype'], [-1, h, w, 3])}\n]\n"
            f"output [\n{outputs}\n]\n")


def write_triton_config(graph: Path, name: str, info: dict[str, Any]) -> Path:
    """Writes ``config.pbtxt`` two folders above ``graph``, atomically and readable as the umask allows (a
    Triton running as another user must read it)."""
    from mhpc.outputs import atomic_write_text

    return atomic_write_text(graph.parent.parent / "config.pbtxt", triton_config(name, info))
