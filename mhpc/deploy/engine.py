"""Run an exported model with onnxruntime or OpenVINO. Imports neither torch nor faiss nor sklearn's estimators.

    from mhpc.deploy import DeployedModel
    engine = DeployedModel("model.onnx")              # or "model.xml" (OpenVINO IR)
    result = engine.predict(images_uint8)             # [B, H, W, 3] RGB uint8 at engine.input_shape
    result.scores, result.maps, result.is_anomaly     # [B], [B, H, W], [B] or None
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mhpc.deploy.contract import read_sidecar
from mhpc.errors import MHPCError

ENGINES = ("onnxruntime", "openvino")


@dataclass
class DeployResult:
    scores: np.ndarray  # [B] float32
    maps: np.ndarray  # [B, H, W] float32
    is_anomaly: np.ndarray | None  # [B] bool, when the model has a threshold


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MHPCError(f"engine {name!r} is not installed: pip install 'mhpc[deploy]'") from None


class DeployedModel:
    """An exported graph plus its JSON description. ``engine``: 'onnxruntime', 'openvino' or 'auto'
    (by suffix: .onnx -> onnxruntime, .xml -> openvino; an .onnx file also runs in OpenVINO).

    Before the graph is loaded, the description is verified (``mhpc.deploy.signing``): its own SHA-256,
    its HMAC when a key is set (``key``, default ``MHPC_MODEL_KEY``), the SHA-256 of the graph files, its
    schema. The verdict ``is_anomaly`` is the graph's own output, not recomputed from the JSON's threshold."""

    def __init__(self, path: str | os.PathLike, engine: str = "auto", threads: int | None = None,
                 spin: bool = True, key: bytes | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MHPCError(f"exported model not found: {self.path}")
        self.info = read_sidecar(self.path, key)
        if engine == "auto":
            engine = "openvino" if self.path.suffix == ".xml" else "onnxruntime"
        if engine not in ENGINES:
            raise MHPCError(f"engine must be one of {ENGINES} or 'auto', got {engine!r}")
        if engine == "onnxruntime" and self.path.suffix != ".onnx":
            raise MHPCError(f"engine onnxruntime needs an .onnx file, got {self.path} (export with --format onnx)")
        self.engine = engine
        self.input_shape = tuple(int(s) for s in self.info["input_shape"])
        self.outputs = list(self.info["outputs"])
        self.threshold = self.info.get("threshold")
        self.preprocessing = self.info["preprocessing"]
        self._run = self._onnxruntime(threads, spin) if engine == "onnxruntime" else self._openvino(threads)

    def _onnxruntime(self, threads: int | None, spin: bool):
        ort = _import("onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        if not spin:  # idle worker threads sleep instead of spinning: fair to other work on a shared CPU
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise MHPCError(f"onnxruntime cannot load {self.path}: {exc}") from None
        self._check_outputs([o.name for o in session.get_outputs()])
        name = session.get_inputs()[0].name
        return lambda images: session.run(self.outputs, {name: images})

    def _openvino(self, threads: int | None):
        ov = _import("openvino")
        core = ov.Core()
        # f32 inference: the CPU plugin would otherwise pick bf16 where the CPU has it
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as exc:  # noqa: BLE001
            raise MHPCError(f"OpenVINO cannot load {self.path}: {exc}") from None
        self._check_outputs([port.get_any_name() for port in compiled.outputs])
        request = compiled.create_infer_request()
        ports = [compiled.output(n) for n in self.outputs]

        def run(images: np.ndarray):
            result = request.infer({0: images})
            return [np.array(result[p]) for p in ports]

        return run

    def _check_outputs(self, names: list[str]) -> None:
        """The graph's own outputs are the ones its (verified) description lists, in that order."""
        if names != self.outputs:
            raise MHPCError(f"{self.path} has outputs {names}, but its JSON lists {self.outputs}: export it again")

    def check(self, images: Any) -> np.ndarray:
        """The input contract, with one-line errors: uint8 [B, H, W, 3] at the model's input size."""
        if not isinstance(images, np.ndarray):
            raise MHPCError(f"images must be a numpy uint8 array [B, H, W, 3], got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise MHPCError(f"images must be uint8 RGB pixels (0..255, normalisation is inside the graph), "
                            f"got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        h, w = self.input_shape
        if images.ndim != 4 or images.shape[-1] != 3 or tuple(images.shape[1:3]) != (h, w):
            raise MHPCError(f"images must be [B, {h}, {w}, 3] (RGB, resized as the model's JSON says), "
                            f"got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise MHPCError("images is an empty batch")
        return np.ascontiguousarray(images)

    def predict(self, images: np.ndarray) -> DeployResult:
        out = self._run(self.check(images))
        return DeployResult(
            scores=np.asarray(out[0], dtype=np.float32),
            maps=np.asarray(out[1], dtype=np.float32),
            is_anomaly=np.asarray(out[2], dtype=bool) if len(out) > 2 else None,
        )
