"""What ``mhpc predict`` writes: ``scores.csv``, ``maps/<input path>.npy`` and ``overlays/<input path>.png``.

One writer serves the single-process loop and the Ray Data scorer (``mhpc.distributed``), so both
produce the same files. Map and overlay paths mirror each input's path under the inputs' common folder,
without the image's extension (``test/good/000.png`` -> ``maps/good/000.npy``, ``overlays/good/000.png``;
``mhpc.outputs.output_stems``), so no two inputs share an output, and are recorded in ``scores.csv``.

Maps are in the image's own coordinates where the model saw the whole image: for a letterboxed model
(``crop="none"``) the padding is cropped off the input-size map and the rest resized to the original
image size, and the overlay is drawn on the original image; a tiled model's maps are already stitched
at full resolution. A centre-cropped model (``crop="center"``) never saw the border, so its map and
overlay stay those of the centre crop at the input size.
Rows are keyed by the image's index in the input list and written in that order, whatever order the
results arrive in; ``scores.csv`` is written atomically, last.

``load_scorer`` gives what `mhpc predict` and `mhpc serve` score with: a saved model (torch) or a file from
`mhpc export` (onnxruntime / OpenVINO) behind the same ``predict_images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mhpc.errors import MHPCError
from mhpc.outputs import atomic_write_csv, output_stems, save_npy, with_suffix_added, writing
from mhpc.report import overlay

COLUMNS = ["image_path", "score", "is_anomalous", "map_path", "overlay_path"]


def render_overlay(rgb: np.ndarray, amap: np.ndarray, threshold: float | None) -> np.ndarray:
    """The heat map over the image as ``mhpc predict`` and ``mhpc serve`` show it (uint8 H x W x 3).
    Colour scale: 0 .. 2x threshold, so the threshold sits mid-scale on every image."""
    vmax = 2 * threshold if threshold else float(amap.max())
    return overlay(rgb, amap, 0.0, vmax)


def in_image_coordinates(path: str | Path, rgb: np.ndarray, amap: np.ndarray,
                         preprocessing: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(image, map) as ``mhpc predict`` writes them: for a whole-image model without tiles, the original image
    (read from ``path``) and the map with the letterbox padding cropped off and resized to it; otherwise the
    ``rgb`` and ``amap`` the scorer gave (the centre crop, or a tiled model's stitched full-size map)."""
    pre = preprocessing or {}
    if pre.get("crop") == "none" and not pre.get("tile"):
        from mhpc.data.io import load_rgb
        from mhpc.data.tiling import untile_map

        rgb = np.asarray(load_rgb(Path(path), pre.get("bit_depth")))
        amap = untile_map(np.asarray(amap, dtype=np.float32), *rgb.shape[:2])
    return rgb, amap


class PredictionWriter:
    """Writes one image's map and overlay as it comes; ``close`` writes ``scores.csv`` in input order.
    ``out`` is a folder already prepared by ``mhpc.outputs.output_folder``."""

    def __init__(self, out: str | Path, paths: list[str], threshold: float | None,
                 preprocessing: dict | None = None) -> None:
        self.out = Path(out)
        self.paths = list(paths)
        self.names = output_stems(self.paths)
        self.threshold = threshold
        self.rows: dict[int, list] = {}
        self.preprocessing = preprocessing

    def write(self, index: int, rgb: np.ndarray, score: float, amap: np.ndarray,
              anomalous: bool | None = None) -> None:
        """``rgb``: the image the map covers, as uint8 H x W x 3; ``amap``: its anomaly map; ``anomalous``:
        the verdict of an exported graph (its ``is_anomaly``), else score >= threshold."""
        index = int(index)
        # Whole-image models without tiles give input-size maps of the letterboxed image: undo the letterbox.
        rgb, amap = in_image_coordinates(self.paths[index], rgb, amap, self.preprocessing)
        map_rel = Path("maps") / with_suffix_added(self.names[index], ".npy")
        overlay_rel = Path("overlays") / with_suffix_added(self.names[index], ".png")
        for rel in (map_rel, overlay_rel):
            with writing((self.out / rel).parent):
                (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_npy(self.out / map_rel, np.asarray(amap, dtype=np.float32))
        with writing(self.out / overlay_rel):
            Image.fromarray(render_overlay(rgb, amap, self.threshold)).save(self.out / overlay_rel)
        if anomalous is not None:
            verdict = int(bool(anomalous))
        else:
            verdict = "" if self.threshold is None else int(score >= self.threshold)
        self.rows[index] = [self.paths[index], repr(float(score)), verdict, str(map_rel), str(overlay_rel)]

    def close(self) -> list[list]:
        """Writes ``scores.csv`` (one row per input image, input order) and returns its rows."""
        missing = len(self.paths) - len(self.rows)
        if missing:
            raise MHPCError(f"{missing} of {len(self.paths)} images were not scored")
        rows = [self.rows[i] for i in range(len(self.paths))]
        atomic_write_csv(self.out / "scores.csv", COLUMNS, rows)
        return rows


def saved_preprocessing(model: Any) -> dict[str, Any]:
    """The preprocessing a loaded model was fitted with; models saved before it was recorded were fitted
    with the MVTec protocol."""
    from mhpc.data.transforms import make_preprocessing

    return model.preprocessing_ or make_preprocessing(tuple(model.input_shape), "center")


class ExportedScorer:
    """An exported graph (onnxruntime / OpenVINO) behind MHPatchCore's ``predict_images``, so the one
    scoring loop (tiles included) and the one writer serve every engine."""

    def __init__(self, path: str, engine: str, key: bytes | None = None) -> None:
        from mhpc.data.transforms import check_preprocessing
        from mhpc.deploy import DeployedModel

        self.engine = DeployedModel(path, engine=engine, key=key)
        self.threshold = self.engine.threshold
        self.preprocessing = check_preprocessing(self.engine.preprocessing["mhpc_preprocessing"], f"{path}.json")

    def predict_images(self, images):
        from mhpc.data.transforms import denormalize

        # The graph takes uint8 pixels: the normalised tensors go back to exactly the uint8 pixels they were
        # made from (mhpc.data.geometry prepares every image in uint8, normalisation is inverted by rounding).
        result = self.engine.predict(np.stack([denormalize(img) for img in images]))
        return result.scores.astype(np.float64), result.maps, result.is_anomaly  # the graph's own verdict


def exported_file(model: str, engine: str) -> str:
    """--model of an exported engine: the file itself, or a folder holding exactly one export for it
    (an .onnx file for onnxruntime; an .xml, else an .onnx file, for OpenVINO), each with its FILE.json."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    suffixes = (".onnx",) if engine == "onnxruntime" else (".xml", ".onnx")
    for suffix in suffixes:
        found = sorted(f for f in folder.iterdir()
                       if f.suffix == suffix and f.is_file() and f.with_name(f.name + ".json").is_file())
        if len(found) == 1:
            return str(found[0])
        if found:
            raise MHPCError(f"--model {model} holds {len(found)} {suffix} exports ({', '.join(f.name for f in found)}); "
                            f"pass one of them as --model")
    fmt = "onnx" if engine == "onnxruntime" else "openvino"
    out = folder / ("model.onnx" if fmt == "onnx" else "model.xml")
    raise MHPCError(f"--model {model} is a folder without an exported {'/'.join(suffixes)} model (FILE and FILE.json) "
                    f"for --engine {engine}; export one first: mhpc export --model MODEL --format {fmt} --out {out}")


def load_scorer(model: str, engine: str = "torch", device: str = "cpu", progress: bool = False,
                key: bytes | None = None) -> tuple[Any, dict[str, Any], float | None]:
    """(scorer with ``predict_images``, its preprocessing dict, its threshold) for a model folder (torch)
    or a file from `mhpc export` (onnxruntime / openvino): what `mhpc predict` and `mhpc serve` score with.
    ``key``: the HMAC key the model must be signed with (default: ``MHPC_MODEL_KEY``, if set)."""
    if engine == "torch":
        from mhpc.core.mh_patch_core import MHPatchCore

        scorer = MHPatchCore.load(model, device=device, key=key)
        scorer.progress = progress
        return scorer, saved_preprocessing(scorer), getattr(scorer, "threshold_", None)
    exported = ExportedScorer(exported_file(model, engine), engine, key)  # fed by the same dataset pipeline as torch
    return exported, exported.preprocessing, exported.threshold
