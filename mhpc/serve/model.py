"""The model a server scores with, loaded and checked through `mhpc predict`'s own code paths.

Nothing here imports FastAPI: loading, identity, preprocessing and scoring are plain functions, so the
HTTP layer (``mhpc.serve.app``) only moves bytes and JSON.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import threading
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


def load_model(path: str, engine: str = "torch", device: str = "cpu", key: bytes | None = None) -> "ServedModel":
    """``ServedModel(path, engine, device, key)``, loaded in a thread of its own that ends with the load.

    Why: torch's OpenMP workers spin between the many small parallel regions of a forward pass only while
    the process has no more OpenMP threads than cores; every thread that once ran a parallel torch op keeps
    a team of workers until it exits. A model loaded on the main thread (or any long-lived thread) would
    leave such a team, and the engine thread's workers would then sleep and be woken for every region:
    measured, about 480 voluntary context switches per batch-1 forward instead of about 6, which is most of
    the gap between the server's one-client latency and `mhpc predict`'s batch-1 time. So the server runs
    torch on the engine thread only (``ServedModel.score``); loading happens here and leaves nothing behind."""
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["model"] = ServedModel(path, engine, device, key)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=load, name="mhpc-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["model"]


@dataclass
class Prepared:
    """One image read and preprocessed for a model."""

    image: np.ndarray  # the model's input pixels, uint8 [H, W, 3] at the input size (mhpc.data.geometry)
    size: tuple[int, int]  # the image's own (width, height)
    preprocessing: dict[str, Any]  # the model's
    original: np.ndarray | None = None  # the decoded image (uint8 RGB), kept when its map is to be drawn on it
    boxes: list[tuple[int, int, int, int]] | None = None  # a tiled model: (top, left, h, w) of each tile;
    # ``image`` then holds the tiles' pixels, [T, H, W, 3]
    warning: str | None = None  # what `mhpc predict` warns about this file (16-bit values clipped), else None


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
        self.sha256 = before[0]
        mtime = files[0].stat().st_mtime
        self.saved = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds")
        self.n_train_images = getattr(self.scorer, "n_train_images_", None)
        self.loaded_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.input_shape = tuple(int(s) for s in self.preprocessing["input_size"])
        if self.engine == "torch":  # predict's own transform, less its first step (the uint8 geometry, done above)
            from torchvision.transforms import v2 as T

            from mhpc.data.transforms import PillowGeometry, build_transforms

            steps = build_transforms(self.preprocessing)[0].transforms
            if not isinstance(steps[0], PillowGeometry):  # the server does that step itself, in preprocess_file
                raise RuntimeError("mhpc.data.transforms.build_transforms no longer starts with PillowGeometry")
            self._normalise = T.Compose(steps[1:])

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
    def preprocess_file(self, path: Path, keep: bool = False) -> Prepared:
        """One image file -> its model input pixels, as `mhpc predict` reads it, decoded once: its reader
        (``load_rgb``: the size guards before decoding, the modes, a 16-bit image scaled by its sBIT depth,
        else the model's, else 16 bits: the depth ``ImageFilesDataset.validate`` settles for a single image),
        then the uint8 geometry that is the first step of predict's transform. The rest of that transform
        (to float, normalise) runs in ``score``, on the engine thread: no torch here, so preprocessing
        threads never start OpenMP teams of their own (see ``load_model``). ``keep``: the decoded image is
        kept (``Prepared.original``) for drawing the map on it."""
        from mhpc.data.geometry import prepare_image
        from mhpc.data.io import read_rgb

        img, warning = read_rgb(Path(path), self.preprocessing.get("bit_depth"))
        original = np.asarray(img) if keep else None
        tile = self.preprocessing.get("tile")
        if tile:  # as mhpc.data.tiling.TiledDataset: every tile of the original image through the same geometry
            from mhpc.data.tiling import tile_boxes

            boxes = tile_boxes(img.height, img.width, *tile)
            pixels = np.stack([np.asarray(prepare_image(img.crop((left, top, left + tw, top + th)), self.preprocessing),
                                          dtype=np.uint8) for top, left, th, tw in boxes])
            return Prepared(pixels, img.size, dict(self.preprocessing), original, boxes, warning)
        pixels = np.asarray(prepare_image(img, self.preprocessing), dtype=np.uint8)
        return Prepared(pixels, img.size, dict(self.preprocessing), original, warning=warning)

    def preprocess_bytes(self, data: bytes, name: str, tmpdir: Path, keep: bool = False) -> Prepared:
        """An uploaded image: written to a private temporary file (the readers take paths; it is removed
        before this returns), preprocessed by ``preprocess_file``; error messages name the upload, not the
        temporary file."""
        if not data:
            raise MHPCError(f"image {name} is empty (0 bytes)")
        fd, tmp = tempfile.mkstemp(prefix=f"{uuid.uuid4().hex}-", dir=tmpdir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            prepared = self.preprocess_file(Path(tmp), keep)
            if prepared.warning is not None:
                prepared.warning = prepared.warning.replace(tmp, name)
            return prepared
        except MHPCError as exc:
            raise MHPCError(str(exc).replace(tmp, name)) from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    # ------------------------------------------------------------ scoring (on the engine thread)
    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[bool | None]]:
        """(scores [B] float64, maps [B, H, W] float32, verdicts [B]) for a batch of input pixels, uint8
        [B, H, W, 3] at the input size (what ``preprocess_file`` gives and what the v2 protocol sends).

        torch: the pixels go through the rest of `mhpc predict`'s transform (to float, normalise) image by
        image, so the model sees exactly predict's tensors. An exported graph takes the pixels themselves
        (it normalises inside, as `mhpc predict --engine` feeds it). The verdicts are `mhpc predict`'s:
        the exported graph's own ``is_anomaly`` output (it compares in float32), else score >= threshold."""
        from mhpc.core.feature_extractor import FX_TRACE_LOCK

        pixels = np.require(pixels, np.uint8, ['C', 'W'])  # torch refuses to share read-only arrays
        if self.engine == "torch":
            with FX_TRACE_LOCK:  # a reload building a model in another thread must not trace these module calls
                images = torch.stack([self._normalise(p) for p in pixels])
                scores, maps = self.scorer.predict_images(images)[:2]
            graph_verdicts = None
        else:
            result = self.scorer.engine.predict(pixels)
            scores, maps, graph_verdicts = result.scores, result.maps, result.is_anomaly
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if graph_verdicts is not None:
            verdicts = [bool(v) for v in np.asarray(graph_verdicts).reshape(-1)]
        else:
            verdicts = [self.is_anomaly(s) for s in scores]
        return scores, np.asarray(maps, dtype=np.float32), verdicts

    def is_anomaly(self, score: float) -> bool | None:
        """`mhpc predict`'s verdict for a torch model's score (an exported graph gives its own: ``score``)."""
        return None if self.threshold is None else bool(score >= self.threshold)

    def map_in_image(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """An input-size map -> the map `mhpc predict` writes (``mhpc.prediction.in_image_coordinates``): for a
        whole-image model the letterbox padding cropped off and resized to the (width, height) ``size`` of the
        image (or, for a tiled model, of the tile: ``mhpc.data.tiling.predict_tiled``); a centre-cropped
        model's map stays over the crop. It uses torch: call it on the engine thread."""
        if self.preprocessing.get("crop") == "none":
            from mhpc.data.tiling import untile_map

            return untile_map(np.asarray(amap, dtype=np.float32), size[1], size[0])
        return amap
