"""The FastAPI application of `mhpc serve`.

Endpoints: ``POST /predict`` (multipart images), the Open Inference Protocol v2 (``/v2/health/*``,
``/v2/models/{name}[/ready|/infer]``), ``GET /metrics`` (Prometheus), ``POST /admin/reload`` and the page
at ``GET /``. Every error is JSON ``{"error": "one line"}``; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mhpc._version import __version__
from mhpc.errors import MHPCError
from mhpc.serve import default_name
from mhpc.serve.batching import Batcher, QueueFull
from mhpc.serve.metrics import ServerMetrics
from mhpc.serve.model import ServedModel, file_signature, load_model, model_files

log = logging.getLogger("mhpc.serve")
INPUT_NAME = "images"  # the exported graph's input (mhpc.deploy.export.INPUT_NAME)
MAP_FORMATS = ("png", "npy")


@dataclass
class ServeSettings:
    model: str
    engine: str = "torch"
    device: str = "cpu"
    name: str | None = None
    host: str = "127.0.0.1"
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_upload_mb: float = 64.0
    admin_token: str | None = None
    watch_s: float = 1.0  # 0: do not watch the model file
    key: bytes | None = field(default=None, repr=False)  # the HMAC key the model must be signed with

    def check(self) -> "ServeSettings":
        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 1)):
            if not isinstance(value, int) or value < low:
                raise MHPCError(f"{flag} must be an integer >= {low}, got {value!r}")
        for flag, value in (("--batch-wait-ms", self.batch_wait_ms), ("--watch-s", self.watch_s)):
            if not value >= 0:
                raise MHPCError(f"{flag} must be >= 0, got {value!r}")
        for flag, value in (("--timeout-s", self.timeout_s), ("--max-upload-mb", self.max_upload_mb)):
            if not value > 0:
                raise MHPCError(f"{flag} must be > 0, got {value!r}")
        if self.max_queue < self.max_batch:
            raise MHPCError(f"--max-queue ({self.max_queue}) must be at least --max-batch ({self.max_batch})")
        return self


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(Exception):
    """An answer other than 200: a status and a one-line message (plus headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, " ".join(str(message).split()), headers or {}


class BodyTooLarge(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class ServerState:
    """The live model, the batcher and the metrics of one app. ``peers``: the other replicas of the same
    deployment (``mhpc.serve.ray_serve.RayPeers``), when there are any: a reload on one replica then
    reaches them all, and ``/metrics`` shows them all."""

    def __init__(self, settings: ServeSettings, model: ServedModel | None = None, peers: Any = None) -> None:
        self.settings = settings.check()
        self.peers = peers
        self.generation: int | None = None  # the peers' reload generation this replica has caught up with
        self.model = model or load_model(settings.model, settings.engine, settings.device, settings.key)
        self.name = settings.name or default_name(self.model.path, settings.engine)
        self.files = model_files(self.model.path, settings.engine)
        self.signature = file_signature(self.files)
        self.metrics = ServerMetrics(settings.max_batch, self.model.threshold)
        self.metrics.set_model(self.name, self.model.identity())
        self.ready = False
        self.reload_lock: asyncio.Lock | None = None
        self.last_reload_error: str | None = None
        self.tmpdir: Path | None = None
        self.batcher: Batcher | None = None
        self._pre_pool = self._engine_pool = self._load_pool = None
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="mhpc-serve-"))
        self._pre_pool = ThreadPoolExecutor(2, thread_name_prefix="mhpc-pre")
        self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="mhpc-engine")  # one batch at a time
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="mhpc-load")  # a reload never blocks scoring
        s = self.settings
        self.batcher = Batcher(self._engine_pool, s.max_batch, s.batch_wait_ms / 1000.0, s.max_queue,
                               on_batch=lambda n: self.metrics.batch_size.observe(n))
        self.metrics.queue_depth.set_function(lambda: self.batcher.queue.qsize())
        self.batcher.start()
        self.reload_lock = asyncio.Lock()
        if s.watch_s > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch()))
        if self.peers is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._follow_peers()))
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        for pool in (self._pre_pool, self._engine_pool, self._load_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)  # our own mkdtemp folder

    # ------------------------------------------------------------ hot reload
    async def reload(self, reason: str) -> dict[str, Any]:
        """Loads and checks the model file again; swaps it in if it is new and sound, else keeps the old one.
        The swap is one reference assignment: queued jobs keep the model they were preprocessed for."""
        async with self.reload_lock:
            signature = file_signature(self.files)
            loop = asyncio.get_running_loop()
            s = self.settings
            try:
                new = await loop.run_in_executor(self._load_pool, load_model, s.model, s.engine, s.device, s.key)
            except Exception as exc:  # noqa: BLE001 - any failure to load keeps the old model serving
                self.signature = signature  # do not retry the same bad file; a new write changes the signature
                self.last_reload_error = f"{exc}"
                self.metrics.reloads.labels(result="refused").inc()
                log.warning("mhpc serve: reload (%s) refused, the old model keeps serving: %s", reason, exc)
                raise ApiError(422, f"reload refused, the old model keeps serving: {exc}") from None
            self.signature = signature
            self.last_reload_error = None
            if new.sha256 == self.model.sha256:
                self.metrics.reloads.labels(result="unchanged").inc()
                return {"reloaded": False, "reason": "the model file is unchanged", "model": self.model.identity()}
            old, self.model = self.model, new
            self.metrics.set_model(self.name, new.identity())
            self.metrics.reloads.labels(result="loaded").inc()
            log.warning("mhpc serve: reloaded %s (%s): sha256 %s -> %s", s.model, reason, old.sha256[:12],
                        new.sha256[:12])
            return {"reloaded": True, "previous_sha256": old.sha256, "model": new.identity()}

    def metrics_text(self) -> str:
        return generate_latest(self.metrics.registry).decode()

    async def _follow_peers(self) -> None:
        """Every ``peers.sync_s``: tells the peers this replica's metrics and live model, and reloads when a
        reload was asked for anywhere (another replica's ``/admin/reload``, or SIGHUP to ``mhpc serve --ray``)."""
        if self.generation is None:
            self.generation = self.peers.generation_at_start  # read before this replica loaded its model
        reloading: asyncio.Task | None = None
        while True:
            try:
                generation = await self.peers.sync(self.metrics_text(), self.model.sha256)
                if generation != self.generation and (reloading is None or reloading.done()):
                    self.generation = generation
                    # A task of its own: the replica keeps posting (and so stays on the board) while it loads.
                    reloading = asyncio.get_running_loop().create_task(
                        self._reload_quietly("reload asked for on another replica or by SIGHUP"))
            except Exception as exc:  # noqa: BLE001 - the peers being unreachable must never stop scoring
                log.warning("mhpc serve: cannot reach the other replicas: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.peers.sync_s)

    async def _reload_quietly(self, reason: str) -> None:
        with contextlib.suppress(ApiError):  # refused: logged and counted; the old model keeps serving
            await self.reload(reason)

    async def reload_everywhere(self, reason: str) -> dict[str, Any]:
        """``reload`` here, then on every peer; waits (up to ``peers.settle_s``) until every replica reports
        this replica's model and says which model each one serves."""
        result = await self.reload(reason)  # refused: ApiError, and the peers are not asked
        if self.peers is None:
            return result
        try:
            self.generation = await self.peers.reload_all()
            await self.peers.sync(self.metrics_text(), self.model.sha256)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.peers.settle_s

            def settled(live: dict[str, str]) -> bool:
                return len(live) >= self.peers.replicas and all(sha == self.model.sha256 for sha in live.values())

            while not settled(live := await self.peers.live_models()) and loop.time() < deadline:
                await asyncio.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - this replica reloaded; say that the others could not be asked
            log.warning("mhpc serve: reloaded here, but cannot reach the other replicas: %s: %s",
                        type(exc).__name__, exc)
            result.update(replicas=None, all_replicas_live=False,
                          peers_error=f"cannot reach the other replicas: {type(exc).__name__}")
            return result
        result["replicas"] = live
        result["all_replicas_live"] = settled(live)
        return result

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_s)
            if file_signature(self.files) != self.signature:
                with contextlib.suppress(ApiError):
                    await self.reload("model file changed")

    # ------------------------------------------------------------ scoring
    async def preprocess(self, model: ServedModel, data: bytes, name: str, keep: bool = False):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pre_pool, model.preprocess_bytes, data, name, self.tmpdir, keep)

    async def score(self, model: ServedModel, images: list, arrival=None) -> list[tuple[float, np.ndarray, Any]]:
        """Queues the images (all or none) and waits for all their (score, map, verdict), within the request
        timeout."""
        results = await self.score_each(model, images, arrival=arrival)
        failed = next((r for r in results if isinstance(r, ApiError)), None)
        if failed is not None:
            raise failed
        return results

    async def score_each(self, model: ServedModel, images: list, map_sizes: list | None = None,
                         arrival=None) -> list:
        """As ``score``, but an image the engine failed on is an ApiError in its place, not a failed request.
        ``map_sizes``: per image, the (width, height) its map is wanted at, or None."""
        s = self.settings
        if len(images) > s.max_queue:
            tiles = " (a tiled model counts each tile)" if model.preprocessing.get("tile") else ""
            raise ApiError(413, f"{len(images)} images{tiles} in one request; this server takes at most "
                                f"{s.max_queue} (--max-queue)")
        try:
            futures = self.batcher.submit(model, images, map_sizes, arrival)
        except QueueFull as exc:
            raise ApiError(503, f"server busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), s.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"no result within {s.timeout_s:g} s (--timeout-s)") from None
        # An exception here is the engine failing on this image alone (a failed batch is rerun image by image).
        return [ApiError(500, f"scoring failed: {type(r).__name__}: {r}") if isinstance(r, BaseException) else r
                for r in results]


def _png_b64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _map_payload(fmt: str, model: ServedModel, prepared, amap: np.ndarray) -> dict[str, Any]:
    """The map and the overlay exactly as `mhpc predict` writes them (maps/*.npy, overlays/*.png): in the
    image's own coordinates for a whole-image model, over the centre crop for a centre-cropped one. ``amap``
    is already in those coordinates (``ServedModel.map_in_image``, on the engine thread); no torch here."""
    from mhpc.prediction import render_overlay

    pre = prepared.preprocessing  # the image under the map, as mhpc predict picks it: the original image for a
    rgb = prepared.original if pre.get("crop") == "none" else prepared.image  # whole-image or tiled model
    if prepared.boxes is not None:  # a tiled model: the tiles' maps stitched, overlaps averaged (predict_tiled)
        height, width = rgb.shape[:2]
        total, count = np.zeros((height, width), np.float64), np.zeros((height, width), np.float64)
        for (top, left, th, tw), tile_map in zip(prepared.boxes, amap):
            total[top:top + th, left:left + tw] += tile_map
            count[top:top + th, left:left + tw] += 1
        amap = total / count
    amap = np.asarray(amap, dtype=np.float32)
    out: dict[str, Any] = {"map_shape": list(amap.shape),
                           "overlay_png": _png_b64(render_overlay(rgb, amap, model.threshold))}
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, amap)
        out["map_npy"] = base64.b64encode(buf.getvalue()).decode("ascii")
    else:  # 8-bit grey levels over the overlay's colour scale, 0 .. 2x threshold (or the map's maximum)
        vmax = 2 * model.threshold if model.threshold else float(amap.max()) or 1.0
        grey = (np.clip(amap / vmax, 0, 1) * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(grey, mode="L").save(buf, format="PNG")
        out["map_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        out["map_png_range"] = [0.0, vmax]
    return out


def _combine(model: ServedModel, prepared, parts: list) -> Any:
    """One image's (score, map, verdict) from its engine results; a tiled model's as `mhpc predict` combines its
    tiles: the highest tile score, any tile's verdict for an exported graph (else score >= threshold), the
    tiles' maps (stitched when drawn). An engine error on any part is the image's error."""
    failed = next((r for r in parts if isinstance(r, ApiError)), None)
    if failed is not None:
        return failed
    if prepared.boxes is None:
        return parts[0]
    score = max(s for s, _, _ in parts)
    verdict = any(v for _, _, v in parts) if model.engine != "torch" else model.is_anomaly(score)
    return score, [m for _, m, _ in parts], verdict


BINARY_HEADER = "inference-header-content-length"  # the binary tensor data extension (Triton's clients' default)


def _split_body(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """A v2 request body -> (its JSON, the binary tensor data after it). With the binary tensor data
    extension the body is ``header_length`` bytes of JSON followed by the tensors' raw bytes."""
    if header_length is None:
        json_part, binary = raw, b""
    else:
        if not re.fullmatch(r"[0-9]{1,19}", header_length.strip()) or int(header_length) > len(raw):
            raise ApiError(400, f"Inference-Header-Content-Length {header_length!r} is not a byte count within "
                                f"the body's {len(raw)} bytes")
        json_part, binary = raw[:int(header_length)], raw[int(header_length):]
    try:
        return json.loads(json_part), binary
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ApiError(400, "the request body is not JSON (the protocol's JSON tensor form)") from None


def _binary_response(answer: dict[str, Any], blobs: list[bytes]) -> Response:
    """The binary tensor data extension's answer: the JSON, then the outputs' raw bytes in order."""
    head = json.dumps(answer).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _parse_tensor(body: Any, model: ServedModel, binary: bytes = b"") -> np.ndarray:
    """The v2 request's one input as uint8 [B, H, W, 3] at the model's input size, or a one-line ApiError.
    The data is the input's ``data`` (JSON), or, with ``parameters.binary_data_size``, that many raw bytes
    from ``binary`` (the binary tensor data extension)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise ApiError(400, f"the request must be a JSON object with 'inputs': a list of one tensor named "
                            f"'{INPUT_NAME}'")
    t = body["inputs"][0]
    if not isinstance(t, dict):
        raise ApiError(400, "each input must be an object with name, shape, datatype and data")
    h, w = model.input_shape
    if t.get("name") != INPUT_NAME:
        raise ApiError(400, f"unknown input {t.get('name')!r}; the model's input is {INPUT_NAME!r}")
    if t.get("datatype") != "UINT8":
        raise ApiError(400, f"input {INPUT_NAME!r} must have datatype UINT8 (RGB pixels 0..255), "
                            f"got {t.get('datatype')!r}")
    shape = t.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) for s in shape)
            or shape[0] < 1 or shape[1:] != [h, w, 3]):
        raise ApiError(400, f"input {INPUT_NAME!r} must have shape [B, {h}, {w}, 3] with B >= 1, got {shape!r}")
    params = t.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise ApiError(400, f"input {INPUT_NAME!r}: binary_data_size {size!r} does not match the "
                                f"{len(binary)} bytes after the JSON header")
        if size != int(np.prod(shape)):
            raise ApiError(400, f"input {INPUT_NAME!r}: shape {shape} needs {int(np.prod(shape))} bytes, got {size}")
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    if binary:
        raise ApiError(400, f"{len(binary)} bytes of binary data after the JSON header, but input {INPUT_NAME!r} "
                            "has no parameters.binary_data_size")
    try:
        arr = np.asarray(t.get("data"), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ApiError(400, f"input {INPUT_NAME!r}: data must be a (flat or nested) list of numbers") from None
    if arr.size != int(np.prod(shape)):
        raise ApiError(400, f"input {INPUT_NAME!r}: shape {shape} needs {int(np.prod(shape))} values, got {arr.size}")
    if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255 or (arr != np.round(arr)).any()):
        raise ApiError(400, f"input {INPUT_NAME!r}: UINT8 data must be integers in 0..255")
    return arr.astype(np.uint8).reshape(shape)


def create_app(settings: ServeSettings, model: ServedModel | None = None, peers: Any = None) -> FastAPI:
    """The app for one model; ``model``: an already loaded ServedModel (else it is loaded from settings);
    ``peers``: the other replicas (``ServerState``), under Ray Serve."""
    state = ServerState(settings, model, peers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="mhpc serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.mhpc = state
    max_bytes = int(settings.max_upload_mb * 2**20)

    # ---------------------------------------------------------------- errors: one line of JSON, never a traceback
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(413, f"request body over {settings.max_upload_mb:g} MB (--max-upload-mb)")

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("mhpc serve: %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _error(500, f"internal error: {type(exc).__name__}")

    app.add_middleware(MeasureAndLimit, metrics=state.metrics, max_bytes=max_bytes, max_mb=settings.max_upload_mb)

    # ---------------------------------------------------------------- the page
    @app.get("/", response_class=HTMLResponse)
    async def page():
        from mhpc.serve.page import render_page

        return HTMLResponse(render_page(state.name))

    # ---------------------------------------------------------------- REST
    @app.post("/predict")
    async def predict(request: Request, map: str | None = None):  # noqa: A002 - the query parameter's name
        if map is not None and map not in MAP_FORMATS:
            raise ApiError(400, f"map must be one of {list(MAP_FORMATS)}, got {map!r}")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send the images as multipart/form-data (curl -F file=@image.png)")
        with state.batcher.coming() as arrival:  # a batch being gathered may wait for this request's images
            try:
                form = await request.form(max_files=settings.max_queue, max_fields=settings.max_queue)
            except BodyTooLarge:
                raise
            except Exception as exc:  # noqa: BLE001 - malformed multipart bodies, too many parts
                raise ApiError(400, f"unreadable multipart body: {getattr(exc, 'detail', exc)}") from None
            uploads = [(key, v) for key, v in form.multi_items() if hasattr(v, "read")]
            if not uploads:
                raise ApiError(400, "no image in the request: send one or more files as multipart form fields")
            model = state.model  # one model for the whole request, even across a reload
            names = [u.filename or key for key, u in uploads]
            datas = [await u.read() for _, u in uploads]
            await form.close()
            started = time.perf_counter()
            prepared = await asyncio.gather(*(state.preprocess(model, d, n, keep=map is not None)
                                              for d, n in zip(datas, names)), return_exceptions=True)
            return await _answer(model, names, prepared, started, map, arrival)

    async def _answer(model: ServedModel, names: list[str], prepared: list, started: float, map: str | None,
                      arrival):
        good = [i for i, p in enumerate(prepared) if not isinstance(p, BaseException)]
        results: dict[int, Any] = {}
        if good:
            images, sizes, owner = [], [], []  # a tiled model: one engine image per tile
            for i in good:
                p = prepared[i]
                if p.boxes is None:
                    images.append(p.image)
                    sizes.append(p.size)
                    owner.append(i)
                else:
                    images += list(p.image)
                    sizes += [(tw, th) for _, _, th, tw in p.boxes]
                    owner += [i] * len(p.boxes)
            scored = await state.score_each(model, images, sizes if map is not None else None, arrival)
            parts: dict[int, list] = {}
            for i, result in zip(owner, scored):
                parts.setdefault(i, []).append(result)
            results = {i: _combine(model, prepared[i], parts[i]) for i in good}
        elapsed = time.perf_counter() - started
        loop = asyncio.get_running_loop()
        out, first_error, n_ok = [], None, 0
        for i, name in enumerate(names):
            p = prepared[i]
            if isinstance(p, BaseException) or isinstance(results.get(i), ApiError):
                if isinstance(p, BaseException):
                    if not isinstance(p, MHPCError):
                        log.error("mhpc serve: preprocessing %s failed: %s: %s", name, type(p).__name__, p)
                    status = 413 if "over the limit" in str(p) or "too large" in str(p) else 400
                    message = " ".join(str(p).split()) if isinstance(p, MHPCError) else f"cannot read image {name}"
                else:
                    status, message = results[i].status, results[i].message
                first_error = first_error or (status, message)
                out.append({"filename": name, "error": message, "status": status})
                continue
            score, amap, verdict = results[i]
            width, height = p.size
            item = {"filename": name, "score": score, "is_anomaly": verdict,
                    "threshold": model.threshold, "width": width, "height": height, "time_s": round(elapsed, 6)}
            if p.warning is not None:  # as `mhpc predict` warns about the file (16-bit values clipped)
                item["warning"] = p.warning
                log.warning("mhpc serve: %s", p.warning)
            if map is not None:  # image encoding off the event loop
                item.update(await loop.run_in_executor(state._pre_pool, _map_payload, map, model, p, amap))
            out.append(item)
            n_ok += 1
            state.metrics.scores.observe(score)
        if not n_ok:
            raise ApiError(*first_error)
        return {"model": state.name, "model_sha256": model.sha256, "results": out}

    # ---------------------------------------------------------------- Open Inference Protocol v2
    def _check_name(name: str) -> None:
        if name != state.name:
            raise ApiError(404, f"unknown model {name!r}; this server serves {state.name!r}")

    @app.get("/v2")
    async def server_metadata():
        return {"name": "mhpc", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if not state.ready:
            raise ApiError(503, "not ready")
        return {"ready": True}

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        _check_name(name)
        m = state.model
        h, w = m.input_shape
        outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1]},
                   {"name": "maps", "datatype": "FP32", "shape": [-1, h, w]}]
        if m.threshold is not None:
            outputs.append({"name": "is_anomaly", "datatype": "BOOL", "shape": [-1]})
        return {"name": state.name, "versions": [m.sha256[:12]], "platform": f"mhpc_{m.engine}",
                "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, h, w, 3]}],
                "outputs": outputs,
                "parameters": {"threshold": m.threshold, "preprocessing": m.preprocessing,
                               "normalisation": "inside: (x / 255 - ImageNet mean) / ImageNet std",
                               "live_model": m.identity(), "last_reload_error": state.last_reload_error}}

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        _check_name(name)
        if not state.ready:
            raise ApiError(503, "not ready")
        return {"name": state.name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        _check_name(name)
        with state.batcher.coming() as arrival:  # a batch being gathered may wait for this request's images
            body, binary = _split_body(await request.body(), request.headers.get(BINARY_HEADER))
            model = state.model
            images = _parse_tensor(body, model, binary)  # the graph's own input: uint8 pixels, scored as they are
            scored = await state.score(model, list(images), arrival)
        tensors = {"scores": ("FP32", np.array([s for s, _, _ in scored], dtype="<f4")),
                   "maps": ("FP32", np.stack([m for _, m, _ in scored]).astype("<f4"))}
        if model.threshold is not None:
            tensors["is_anomaly"] = ("BOOL", np.array([bool(v) for _, _, v in scored], dtype=bool))
        wanted = body.get("outputs") if isinstance(body.get("outputs"), list) else []
        wanted = [o for o in wanted if isinstance(o, dict)]
        if any(not isinstance(o.get("name"), str) for o in wanted):
            raise ApiError(400, "each requested output must be an object with a 'name' string")
        if wanted:
            unknown = {o.get("name") for o in wanted} - set(tensors)
            if unknown:
                raise ApiError(400, f"unknown output(s) {sorted(map(str, unknown))}; the model has {list(tensors)}")
        for s, _, _ in scored:
            state.metrics.scores.observe(s)
        # Binary outputs (the binary tensor data extension): those asked for with parameters.binary_data, or
        # every output with the request's parameters.binary_data_output; the rest as JSON lists.
        params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        every = params.get("binary_data_output") is True
        binary_of = {o.get("name"): (o.get("parameters") if isinstance(o.get("parameters"), dict) else {})
                     .get("binary_data", every) is True for o in wanted}
        outputs, blobs = [], []
        for out_name, (datatype, value) in tensors.items():
            if wanted and out_name not in binary_of:
                continue
            o = {"name": out_name, "datatype": datatype, "shape": list(value.shape)}
            if binary_of.get(out_name, every):
                blobs.append(value.tobytes())
                o["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                o["data"] = value.reshape(-1).tolist()
            outputs.append(o)
        answer = {"model_name": state.name, "model_version": model.sha256[:12], "outputs": outputs}
        if isinstance(body.get("id"), str):
            answer["id"] = body["id"]
        return _binary_response(answer, blobs) if blobs else answer

    # ---------------------------------------------------------------- metrics and admin
    @app.get("/metrics")
    async def metrics():
        if state.peers is None:
            return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
        from mhpc.serve.metrics import merge_replicas

        # Every replica's series, labelled by replica: this one's now, the others' as of their last sync.
        own = state.metrics_text()
        try:
            await state.peers.sync(own, state.model.sha256)
            texts = await state.peers.metrics_texts()
        except Exception as exc:  # noqa: BLE001 - the board gone (its driver killed): this replica's own series
            log.warning("mhpc serve: /metrics: cannot reach the other replicas: %s: %s", type(exc).__name__, exc)
            texts = {state.peers.replica: own}
        return Response(merge_replicas(texts), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        _check_admin(request)
        return await state.reload_everywhere("POST /admin/reload")

    def _check_admin(request: Request) -> None:
        token = settings.admin_token
        if token is None:
            if not is_loopback(settings.host):
                raise ApiError(403, f"admin endpoints are off: the server binds to {settings.host} (not loopback) "
                                    "without --admin-token-file")
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer TOKEN' (the --admin-token-file token)",
                           {"WWW-Authenticate": "Bearer"})

    return app


class MeasureAndLimit:
    """ASGI middleware: request count and latency by endpoint (the route's template, so ``/v2/models/{name}``
    is one series) and status; bodies over ``max_bytes`` get 413, by Content-Length or by counting."""

    def __init__(self, app, metrics: ServerMetrics, max_bytes: int, max_mb: float) -> None:
        self.app, self.metrics, self.max_bytes, self.max_mb = app, metrics, max_bytes, max_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        self.metrics.in_flight.inc()
        try:
            if length.isdigit() and int(length) > self.max_bytes:
                response = _error(413, f"request body of {int(length):,} bytes is over {self.max_mb:g} MB "
                                       "(--max-upload-mb)")
                await response(scope, receive, send_status)
            else:
                await self.app(scope, limited, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
