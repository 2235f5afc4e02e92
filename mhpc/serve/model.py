"""The model a server scores with, loaded and checked through `mhpc predict`'s own code paths.

Nothing here imports FastAPI: loading, identity, preprocessing and scoring are plain functions, so the
HTTP layer (``mhpc.serve.app``) only moves bytes and JSON.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhpc.errors import MHPCError
from mhpc.keys import file_sha256

ENGINES = ("torch", "onnxruntime", "openvino")



def model_files(path: str | os.PathLike, engine: str) -> list[Path]:
    """The files that make up a served model: ``model.safetensors``, or the exported graph and its JSON
    (and its external data file, when there is one). The server watches these."""
    from mhpc.core.model_file import resolve_model_path
    from mhpc.deploy.contract import sidecar_path

    if engine == "torch":
        return [resolve_model_path(path)]
    files = [Path(path), sidecar_path(path)]
    data = Path(str(path) + ".data")
    return files + ([data] if data.is_file() else [])


def file_signature(files: list[Path]) -> tuple:
    """Changes whenever one of ``files`` is replaced or rewritten (an atomic rename changes the inode)."""
    sig = []
    for f in files:
        try:
            st = f.stat()
            sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append(None)
    return tuple(sig)


@dataclass
class Prepared:
    """One image read and preprocessed for a model."""

    image: torch.Tensor  # the model's input [3, H, W]
    size: tuple[int, int]  # the image's own (width, height)
    preprocessing: dict[str, Any]  # as the dataset settled it (bit depth of 16-bit images)
    path: Path | None = None  # the upload's temporary file while its map is still to be drawn


@dataclass
class ServedModel:
    """A loaded model and its identity. Checked on load as `mhpc predict` checks it (SHA-256, schema, the
    HMAC when a key is set: ``key``, default ``MHPC_MODEL_KEY``; the exported file's JSON), then hashed
    again: a file replaced while it was loading is loaded again, so identity and weights always belong
    together."""

    path: str
    engine: str = "torch"
    device: str = "cpu"
    key: bytes | None = field(default=None, repr=False)
    scorer: Any = field(init=False, repr=False)
    preprocessing: dict[str, Any] = field(init=False)
    threshold: float | None = field(init=False)
    sha256: str = field(init=False)
    saved: str = field(init=False)
    n_train_images: int | None = field(init=False)
    loaded_at: str = field(init=False)

    def __post_init__(self) -> None:
        from mhpc.prediction import exported_file, load_scorer

        if self.engine not in ENGINES:
            raise MHPCError(f"--engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.engine != "torch":  # a folder holding exactly one export, as for `mhpc predict --engine`
            self.path = exported_file(str(self.path), self.engine)
        files = model_files(self.path, self.engine)
        for attempt in range(3):
            before = self._hash(files)
            self.scorer, self.preprocessing, self.threshold = load_scorer(self.path, self.engine, self.device,
                                                                          key=self.key)
            if before is not None and self._hash(files) == before:
                break
        else:
            raise MHPCError(f"{files[0]} kept changing while it was loaded; try again when it is written")
        if self.preprocessing.get("tile"):
            raise MHPCError(f"{self.path} was fitted on tiles; mhpc serve scores whole images (use mhpc predict)")
        self.sha256 = before[0]
        mtime = files[0].stat().st_mtime
        self.saved = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds")
        self.n_train_images = getattr(self.scorer, "n_train_images_", None)
        self.loaded_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.input_shape = tuple(int(s) for s in self.preprocessing["input_size"])

    @staticmethod
    def _hash(files: list[Path]) -> list[str] | None:
        """None when a file cannot be read: the loader then names the problem as `mhpc predict` does."""
        try:
            return [file_sha256(f) for f in files]
        except OSError:
            return None

    def identity(self) -> dict[str, Any]:
        """What `/v2/models/{name}`, `/metrics` and every answer say about the live model."""
        return {"path": str(self.path), "engine": self.engine, "sha256": self.sha256, "saved": self.saved,
                "n_train_images": self.n_train_images, "threshold": self.threshold, "loaded_at": self.loaded_at}

    # ------------------------------------------------------------ preprocessing (mhpc predict's own)
    def preprocess_file(self, path: Path) -> Prepared:
        """One image file -> its model input, through the dataset class `mhpc predict` reads with: same
        decoding, size guards, bit depth and transform."""
        from mhpc.data.datasets import ImageFilesDataset

        ds = ImageFilesDataset([path], preprocessing=self.preprocessing).validate()
        return Prepared(ds[0]["image"], tuple(ds.sizes_[0]), dict(ds.preprocessing), Path(path))

    def preprocess_bytes(self, data: bytes, name: str, tmpdir: Path, keep: bool = False) -> Prepared:
        """An uploaded image: written to a private temporary file (the readers take paths), preprocessed
        by ``preprocess_file``; error messages name the upload, not the temporary file. ``keep``: the file
        stays (``Prepared.path``) for drawing the map on the original image; the caller removes it."""
        if not data:
            raise MHPCError(f"image {name} is empty (0 bytes)")
        fd, tmp = tempfile.mkstemp(prefix=f"{uuid.uuid4().hex}-", dir=tmpdir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            prepared = self.preprocess_file(Path(tmp))
        except MHPCError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise MHPCError(str(exc).replace(tmp, name)) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if not keep:
            Path(tmp).unlink(missing_ok=True)
            prepared.path = None
        return prepared

    def from_uint8(self, images: np.ndarray) -> torch.Tensor:
        """The exported graph's input (uint8 [B, H, W, 3] at the input size) -> the normalised tensors the
        scorers take, normalised as the graph normalises (x / 255 - ImageNet mean) / ImageNet std."""
        from mhpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (x - mean) / std

    # ------------------------------------------------------------ scoring
    def score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B] float64, maps [B, H, W] float32) for a batch of preprocessed images."""
        scores, maps = self.scorer.predict_images(images)[:2]  # an exported graph also gives its verdicts
        return np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(maps, dtype=np.float32)

    def is_anomaly(self, score: float) -> bool | None:
        return None if self.threshold is None else bool(score >= self.threshold)
