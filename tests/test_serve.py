"""`mhpc serve`: REST, the Open Inference Protocol v2, metrics, batching, back-pressure, errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
from PIL import Image

from mhpc.cli import main
from serve_util import fit_tiny, running, write_images

from mhpc.serve.app import ServeSettings, create_app
from mhpc.serve.model import ServedModel, file_sha256


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    good = root / "good"
    write_images(good, 6, seed=0)
    model = fit_tiny(good, root / "model")
    test = write_images(root / "test", 3, seed=1, size=(50, 70)) + write_images(root / "test2", 1, seed=2)
    return {"root": root, "model": model, "test": test, "good": good}


def _files(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _predict_cli(served, out, *extra):
    assert main(["predict", "--model", str(served["model"]), "--images", *map(str, served["test"]), "--out", str(out),
                 "--quiet", *extra]) == 0
    return list(csv.DictReader(open(out / "scores.csv")))


def _check_against_cli(results, rows, out):
    assert len(results) == len(rows)
    for res, row in zip(results, rows):
        assert res["score"] == pytest.approx(float(row["score"]), rel=1e-5, abs=1e-6)
        assert res["is_anomaly"] == (row["is_anomalous"] == "1")
        expected_map = np.load(out / row["map_path"])
        amap = np.load(io.BytesIO(base64.b64decode(res["map_npy"])))
        assert amap.shape == expected_map.shape and np.allclose(amap, expected_map, rtol=1e-5, atol=1e-5)
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["overlay_png"]))))
        expected_overlay = np.asarray(Image.open(out / row["overlay_path"]))
        assert overlay.shape == expected_overlay.shape and np.abs(overlay.astype(int) - expected_overlay).max() <= 1


def test_predict_equals_mhpc_predict_and_errors_are_one_line(served, tmp_path):
    rows = _predict_cli(served, tmp_path / "cli")
    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, batch_wait_ms=50))
    with running(app) as url:
        # One request with every image, then the same images as concurrent single-image requests (batched).
        r = httpx.post(url + "/predict?map=npy", files=_files(served["test"]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_sha256"] == file_sha256(served["model"] / "model.safetensors")
        _check_against_cli(body["results"], rows, tmp_path / "cli")
        first = body["results"][0]
        assert (first["width"], first["height"]) == (70, 50) and first["threshold"] > 0 and first["time_s"] > 0
        assert first["map_shape"] == [50, 70]  # the map in the image's own coordinates, as predict writes it
        singles = [None] * len(served["test"])

        def one(i):
            singles[i] = httpx.post(url + "/predict?map=npy", files=_files([served["test"][i]]), timeout=30)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(singles))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        _check_against_cli([s.json()["results"][0] for s in singles], rows, tmp_path / "cli")
        # ?map=png: an 8-bit map at the map's resolution plus its range
        r = httpx.post(url + "/predict?map=png", files=_files(served["test"][:1]))
        res = r.json()["results"][0]
        grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["map_png"]))))
        assert grey.dtype == np.uint8 and list(grey.shape) == res["map_shape"] and res["map_png_range"][1] > 0

        # One corrupt image among good ones: it alone fails, in one line; the others are scored.
        files = _files(served["test"][:2]) + [("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"))]
        r = httpx.post(url + "/predict", files=files)
        assert r.status_code == 200
        out = r.json()["results"]
        assert [o.get("error") is None for o in out] == [True, True, False]
        assert out[2]["filename"] == "broken.png" and out[2]["status"] == 400
        assert "broken.png" in out[2]["error"] and "\n" not in out[2]["error"] and "/tmp" not in out[2]["error"]
        assert out[0]["score"] == pytest.approx(float(rows[0]["score"]), rel=1e-5)
        bad = {
            "only a corrupt image": (lambda: httpx.post(url + "/predict", files=files[2:]), 400, "broken.png"),
            "an empty file": (lambda: httpx.post(url + "/predict", files=[("f", ("e.png", b"", "image/png"))]), 400,
                              "empty"),
            "an unsupported format": (lambda: httpx.post(url + "/predict", files=[("f", ("a.txt", b"hello", "text/plain"))]),
                                      400, "cannot read image a.txt"),
            "a form without files": (lambda: httpx.post(url + "/predict", files={"x": (None, "1")}), 400, "no image"),
            "no body at all": (lambda: httpx.post(url + "/predict"), 415, "multipart"),
            "a bad map format": (lambda: httpx.post(url + "/predict?map=jpg", files=_files(served["test"][:1])), 400,
                                 "map must be"),
            "an unknown endpoint": (lambda: httpx.get(url + "/nowhere"), 404, "no such endpoint"),
            "a wrong method": (lambda: httpx.get(url + "/predict"), 405, "not allowed"),
        }
        for what, (call, status, text) in bad.items():
            r = call()
            assert r.status_code == status, (what, r.text)
            err = r.json()["error"]
            assert text in err and "\n" not in err and "Traceback" not in r.text, (what, err)


def test_size_limits_reuse_predicts_checks(served, monkeypatch):
    import mhpc.data.io as io_module

    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, max_upload_mb=0.05))
    with running(app) as url:
        big = [("files", ("big.png", b"\0" * 80_000, "image/png"))]
        r = httpx.post(url + "/predict", files=big)
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]

        def chunks():  # no Content-Length: the body is counted as it arrives
            yield (b'--x\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n")
            for _ in range(10):
                yield b"\0" * 10_000

        r = httpx.post(url + "/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]
        monkeypatch.setattr(io_module, "MAX_PIXELS", 1000)  # predict's own pixel guard, lowered for a small file
        r = httpx.post(url + "/predict", files=_files(served["test"][:1]))
        assert r.status_code == 413 and "over the limit of 1,000" in r.json()["error"]
        assert served["test"][0].name in r.json()["error"]


def _slow(model: ServedModel, seconds: float, poison: int | None = None) -> ServedModel:
    """The model with an engine that takes ``seconds`` per batch and fails on a batch holding an image whose
    top-left red pixel is ``poison``."""
    score = model.score

    def slow(images):
        time.sleep(seconds)
        if poison is not None and bool((images[:, 0, 0, 0] == poison).any()):
            raise RuntimeError("poisoned batch")
        return score(images)

    model.score = slow
    return model


def _infer_body(images: np.ndarray) -> dict:
    return {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}


def test_dynamic_batching_queue_timeout_and_isolation(served):
    model = _slow(ServedModel(str(served["model"])), 0.5, poison=7)
    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, max_batch=4, batch_wait_ms=2000,
                                   max_queue=4, timeout_s=10), model=model)
    rng = np.random.default_rng(0)

    def bodies(n: int, per_request: int, poison_at: int | None = None) -> list[str]:
        out = []
        for i in range(n):
            img = rng.integers(0, 255, (per_request, 64, 64, 3), dtype=np.uint8)
            img[:, 0, 0, 0] = 7 if i == poison_at else 100
            out.append(json.dumps(_infer_body(img)))
        return out

    def post_together(url: str, payloads: list[str]) -> list[httpx.Response]:
        """All requests sent at once (a barrier), each from its own thread."""
        results, barrier = [None] * len(payloads), threading.Barrier(len(payloads))

        def post(i):
            with httpx.Client(timeout=60) as http:
                barrier.wait()
                results[i] = http.post(url, content=payloads[i], headers={"content-type": "application/json"})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return results

    with running(app) as url:
        infer_url = f"{url}/v2/models/{app.state.mhpc.name}/infer"
        # A lone request is dispatched at once: it never waits out --batch-wait-ms (2 s here) for company.
        start = time.perf_counter()
        assert httpx.post(infer_url, content=bodies(1, 1)[0], timeout=30).status_code == 200
        assert time.perf_counter() - start < 2.0  # 0.5 s on the engine; waiting out the window: >= 2.5 s
        # Four concurrent requests, one of them poisoned, queued while the engine is busy with a fifth (held
        # until the four are queued): one batch of 4 on the engine; it fails, the jobs are retried one by
        # one, and only the poisoned one fails.
        slow_score, held = model.score, threading.Event()

        def hold(images):
            if not held.is_set():
                held.set()
                deadline = time.time() + 30
                while app.state.mhpc.batcher.queue.qsize() < 4 and time.time() < deadline:
                    time.sleep(0.01)
            return slow_score(images)

        model.score = hold
        plug = threading.Thread(target=lambda: httpx.post(infer_url, content=bodies(1, 1)[0], timeout=30))
        plug.start()
        assert held.wait(10)
        results = post_together(infer_url, bodies(4, 1, poison_at=2))
        plug.join()
        assert [r.status_code for r in results] == [200, 200, 500, 200]
        assert "poisoned batch" in results[2].json()["error"]
        metrics = httpx.get(url + "/metrics").text
        assert "mhpc_batch_size_count 3.0" in metrics and "mhpc_batch_size_sum 6.0" in metrics  # 1, 1, then 4

        # In one multipart request too: the image the engine fails on carries its error, the other is scored.
        poisoned = np.full((64, 64, 3), 100, np.uint8)
        poisoned[0, 0, 0] = 7
        buf = io.BytesIO()
        Image.fromarray(poisoned).save(buf, format="PNG")
        files = [("files", ("poisoned.png", buf.getvalue(), "image/png"))] + _files(served["test"][:1])
        r = httpx.post(url + "/predict", files=files, timeout=30)
        assert r.status_code == 200
        first, second = r.json()["results"]
        assert first["status"] == 500 and "poisoned batch" in first["error"] and second["score"] > 0

        # A full queue answers 503 with Retry-After and never grows: 4 images queued at most.
        results = post_together(infer_url, bodies(8, 2))
        statuses = [r.status_code for r in results]
        assert statuses.count(503) >= 2 and statuses.count(200) >= 2 and set(statuses) == {200, 503}
        assert all(r.headers.get("retry-after") == "1" for r in results if r.status_code == 503)
        assert all("server busy" in r.json()["error"] for r in results if r.status_code == 503)
        too_many = rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
        r = httpx.post(infer_url, json=_infer_body(too_many))
        assert r.status_code == 413 and "--max-queue" in r.json()["error"]

    # Per-request timeout: 504 in one line.
    model = _slow(ServedModel(str(served["model"])), 1.5)
    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, timeout_s=0.3), model=model)
    with running(app) as url:
        r = httpx.post(url + "/predict", files=_files(served["test"][:1]), timeout=30)
        assert r.status_code == 504 and "--timeout-s" in r.json()["error"]


# ---------------------------------------------------------------- a client written to the protocol's text
def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    """Plain JSON over HTTP, as the KServe / Open Inference Protocol v2 REST specification describes it."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _letterbox_u8(path, size=64):
    """The model's letterbox, written here from its description (scale to fit, centre, pad with the mean)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(size / h, size / w)
    nw, nh = round(w * s), round(h * s)
    canvas = Image.new("RGB", (size, size), (124, 116, 104))
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def test_open_inference_protocol_v2(served):
    import torch

    from mhpc.core.mh_patch_core import MHPatchCore

    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, name="tiny"))
    with running(app) as base:
        assert _http("GET", base + "/v2/health/live") == (200, {"live": True})
        assert _http("GET", base + "/v2/health/ready") == (200, {"ready": True})
        status, meta = _http("GET", base + "/v2/models/tiny")
        assert status == 200 and meta["name"] == "tiny"
        assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 64, 64, 3]}]
        assert {o["name"] for o in meta["outputs"]} == {"scores", "maps", "is_anomaly"}
        sha = file_sha256(served["model"] / "model.safetensors")
        assert meta["parameters"]["live_model"]["sha256"] == sha and meta["parameters"]["threshold"] > 0
        assert meta["parameters"]["preprocessing"]["crop"] == "none"
        assert _http("GET", base + "/v2/models/tiny/ready")[0] == 200
        assert _http("GET", base + "/v2/models/other")[0] == 404

        batch = np.stack([_letterbox_u8(p) for p in served["test"][:3]])
        status, answer = _http("POST", base + "/v2/models/tiny/infer",
                               {"id": "r1", "inputs": [{"name": "images", "shape": [3, 64, 64, 3], "datatype": "UINT8",
                                                        "data": batch.reshape(-1).tolist()}]})
        assert status == 200 and answer["id"] == "r1" and answer["model_name"] == "tiny"
        out = {o["name"]: o for o in answer["outputs"]}
        assert out["scores"]["shape"] == [3] and out["scores"]["datatype"] == "FP32"
        assert out["maps"]["shape"] == [3, 64, 64] and len(out["maps"]["data"]) == 3 * 64 * 64
        # The same pixels through the Python API give the same scores.
        model = MHPatchCore.load(served["model"])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        scores, maps = model.predict_images(x)
        assert np.allclose(out["scores"]["data"], scores, rtol=1e-5)
        assert np.allclose(np.array(out["maps"]["data"]).reshape(3, 64, 64), maps, rtol=1e-4, atol=1e-4)
        assert out["is_anomaly"]["data"] == [bool(s >= model.threshold_) for s in scores]
        # The letterbox written above from its description gives exactly the pixels predict feeds the model:
        # the protocol's tensor and the uploaded files score the same.
        uploaded = httpx.post(base + "/predict", files=_files(served["test"][:3])).json()["results"]
        assert np.allclose(out["scores"]["data"], [u["score"] for u in uploaded], rtol=1e-5)
        # Nested data and a requested subset of outputs
        status, answer = _http("POST", base + "/v2/models/tiny/infer",
                               {"inputs": [{"name": "images", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                            "data": batch[:1].tolist()}], "outputs": [{"name": "scores"}]})
        assert status == 200 and [o["name"] for o in answer["outputs"]] == ["scores"]
        assert answer["outputs"][0]["data"][0] == pytest.approx(out["scores"]["data"][0], rel=1e-6)

        def infer(tensor):
            return _http("POST", base + "/v2/models/tiny/infer", {"inputs": [tensor]})

        wrong = {
            "dtype": ({"name": "images", "shape": [1, 64, 64, 3], "datatype": "FP32", "data": [0.0] * 12288}, "UINT8"),
            "shape": ({"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}, "[B, 64, 64, 3]"),
            "count": ({"name": "images", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": [0] * 10}, "needs 12288"),
            "range": ({"name": "images", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": [300] * 12288}, "0..255"),
            "name": ({"name": "x", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": [0] * 12288}, "unknown input"),
        }
        for what, (tensor, text) in wrong.items():
            status, err = infer(tensor)
            assert status == 400 and text in err["error"], (what, err)
        req = urllib.request.Request(base + "/v2/models/tiny/infer", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req)
        assert exc.value.code == 400 and "not JSON" in json.loads(exc.value.read())["error"]


def test_tritons_own_http_client_json_and_binary(served):
    """Triton's client library (tritonclient.http, written to the same protocol; binary tensor data is its
    default) against the server: health, metadata, and infer with JSON and with binary tensors."""
    import tritonclient.http as triton

    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, name="tiny"))
    batch = np.stack([_letterbox_u8(p) for p in served["test"][:3]])
    with running(app) as base:
        expected = _http("POST", base + "/v2/models/tiny/infer", _infer_body(batch))[1]
        expected = {o["name"]: np.array(o["data"]) for o in expected["outputs"]}
        client = triton.InferenceServerClient(url=base.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta["inputs"][0]["name"] == "images" and meta["inputs"][0]["datatype"] == "UINT8"
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        for binary in (False, True):
            tensor = triton.InferInput("images", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            result = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                                             for n in ("scores", "maps", "is_anomaly")])
            assert np.array_equal(result.as_numpy("scores"), expected["scores"].astype(np.float32)), binary
            assert np.array_equal(result.as_numpy("maps").reshape(-1), expected["maps"].astype(np.float32)), binary
            assert result.as_numpy("is_anomaly").tolist() == expected["is_anomaly"].tolist(), binary
        # No outputs named: the client asks for every output in binary (binary_data_output); and one output
        # named as JSON while the others are not asked for.
        every = client.infer("tiny", [tensor])
        assert np.array_equal(every.as_numpy("scores"), expected["scores"].astype(np.float32))
        assert every.as_numpy("maps").shape == (3, 64, 64)
        only = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput("is_anomaly", binary_data=False)])
        assert [o["name"] for o in only.get_response()["outputs"]] == ["is_anomaly"]
        assert only.as_numpy("is_anomaly").tolist() == expected["is_anomaly"].tolist()
        client.close()
        # Binary bodies the client would never send: fewer bytes than the shape needs, a declared size that is
        # not the bytes sent, a header length past the body: 400 naming the problem.
        for size, sent, header, text in ((100, 100, None, "needs 12288 bytes"), (12288, 100, None, "does not match"),
                                         (100, 100, 10**6, "not a byte count within")):
            head = json.dumps({"inputs": [{"name": "images", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                           "parameters": {"binary_data_size": size}}]}).encode()
            r = httpx.post(base + "/v2/models/tiny/infer", content=head + bytes(sent),
                           headers={"Inference-Header-Content-Length": str(header or len(head))})
            assert r.status_code == 400 and text in r.json()["error"], r.text
        # JSON nested past Python's recursion limit, an output named with a list: 400, not 500.
        for content, text in (("[" * 100000, "not JSON"),
                              (json.dumps({**_infer_body(batch[:1]), "outputs": [{"name": []}]}), "'name' string")):
            r = httpx.post(base + "/v2/models/tiny/infer", content=content)
            assert r.status_code == 400 and text in r.json()["error"], r.text


def test_clipped_sixteen_bit_upload_carries_predicts_warning(served, tmp_path):
    """A 16-bit upload with values above its sBIT depth: scored, and the answer carries the warning
    `mhpc predict` gives for the same file (naming the upload, not the server's temporary file)."""
    import warnings

    from conftest import png_with_sbit

    from mhpc.data.datasets import ImageFilesDataset

    deep = np.tile((np.arange(64) * 64).astype(np.uint16), (64, 1))  # 0..4032, but sBIT says 10 bits
    png_with_sbit(tmp_path / "deep.png", deep, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageFilesDataset([str(tmp_path / "deep.png")]).validate()
    expected = str(caught[0].message).replace(str(tmp_path / "deep.png"), "deep.png")
    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0))
    with running(app) as url:
        res = httpx.post(url + "/predict", files=_files([tmp_path / "deep.png", served["test"][0]])).json()["results"]
    assert res[0]["warning"] == expected and "clipped at 1023" in expected and np.isfinite(res[0]["score"])
    assert "warning" not in res[1]  # an 8-bit image: nothing to warn about


def test_metrics_in_prometheus_format(served):
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0))
    with running(app) as url:
        for _ in range(2):
            assert httpx.post(url + "/predict", files=_files(served["test"][:2])).status_code == 200
        httpx.post(url + "/predict")
        text = httpx.get(url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("mhpc_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 2
    assert samples[("mhpc_requests_total", (("endpoint", "/predict"), ("status", "415")))] == 1
    assert samples[("mhpc_request_duration_seconds_count", (("endpoint", "/predict"),))] == 3
    assert samples[("mhpc_image_score_count", ())] == 4
    assert samples[("mhpc_batch_size_sum", ())] == 4
    assert ("mhpc_queue_depth", ()) in samples and samples[("mhpc_requests_in_flight", ())] == 1  # the scrape
    info = [s for s in families["mhpc_model_info"].samples]
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["sha256"] == file_sha256(served["model"] / "model.safetensors")
    assert info[0].labels["n_train_images"] == "4" and info[0].labels["saved"].startswith("20")


def test_admin_token_and_loopback(served, tmp_path):
    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, admin_token="s3cret"))
    with running(app) as url:
        assert httpx.post(url + "/admin/reload").status_code == 401
        assert httpx.post(url + "/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.post(url + "/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["reloaded"] is False
    # Bound to a non-loopback address without a token, the admin endpoints are off.
    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0, host="0.0.0.0"))
    with running(app) as url:
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 403 and "--admin-token-file" in r.json()["error"]


def test_core_imports_without_the_extra_and_the_cli_names_it(served, monkeypatch, capsys):
    import importlib
    import sys

    # The extra's packages made unimportable (None in sys.modules), then mhpc's modules imported afresh.
    for name in ("fastapi", "uvicorn", "starlette", "prometheus_client", "multipart"):
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m == "mhpc.cli" or m.startswith("mhpc.serve")]:
        monkeypatch.delitem(sys.modules, name)
    cli = importlib.import_module("mhpc.cli")
    importlib.import_module("mhpc.serve.model")  # loading, identity and scoring need no HTTP package
    assert cli.main(["serve", "--model", str(served["model"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mhpc serve: error: mhpc serve needs the optional extra 'serve': pip install 'mhpc[serve]' "
                   "(missing: fastapi, uvicorn, python-multipart, prometheus-client)")


def test_exported_model_under_onnxruntime_equals_mhpc_predict(served, tmp_path):
    from mhpc.deploy import DeployedModel

    onnx = tmp_path / "tiny.onnx"
    assert main(["export", "--model", str(served["model"]), "--out", str(onnx), "--quiet"]) == 0
    rows = _predict_cli({**served, "model": onnx}, tmp_path / "cli", "--engine", "onnxruntime")
    app = create_app(ServeSettings(model=str(onnx), engine="onnxruntime", watch_s=0))
    with running(app) as url:
        r = httpx.post(url + "/predict?map=npy", files=_files(served["test"]))
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        _check_against_cli(r.json()["results"], rows, tmp_path / "cli")
        meta = httpx.get(url + "/v2/models/tiny").json()
        assert meta["platform"] == "mhpc_onnxruntime" and meta["parameters"]["live_model"]["sha256"] == file_sha256(onnx)
        batch = np.stack([_letterbox_u8(p) for p in served["test"][:2]])
        status, answer = _http("POST", url + "/v2/models/tiny/infer", _infer_body(batch))
        assert status == 200
        expected = DeployedModel(onnx).predict(batch)
        assert np.allclose(answer["outputs"][0]["data"], expected.scores, rtol=1e-5)
    # A folder holding exactly one export serves it, as `mhpc predict --engine` takes it.
    assert ServedModel(str(tmp_path), "onnxruntime").path == str(onnx)


def test_tiled_model_scores_as_mhpc_predict(served, tmp_path):
    """A model fitted on tiles: each upload is cut into tiles as `mhpc predict` cuts it; the image's score is
    the highest tile's, the map is stitched at the image's full resolution, the verdict is predict's."""
    tiled = tmp_path / "tiled"
    assert main(["fit", "--folder", str(served["good"]), "--out", str(tiled), "--tile", "40", "--holdout", "0.34",
                 "--backbone", "resnet18", "--random-init", "--quiet", "--input-size", "32", "32"]) == 0
    rows = _predict_cli({**served, "model": tiled}, tmp_path / "cli")
    app = create_app(ServeSettings(model=str(tiled), watch_s=0, max_queue=16))
    with running(app) as url:
        r = httpx.post(url + "/predict?map=npy", files=_files(served["test"]))
        assert r.status_code == 200
        _check_against_cli(r.json()["results"], rows, tmp_path / "cli")
        plain = httpx.post(url + "/predict", files=_files(served["test"])).json()["results"]
        assert [p["score"] for p in plain] == [res["score"] for res in r.json()["results"]]
        r = httpx.post(url + "/predict", files=_files(served["test"] * 2))  # 8 images of 4 tiles each: 32 > 16
        assert r.status_code == 413 and "counts each tile" in r.json()["error"]
    # Its export under onnxruntime: the verdict is any tile's own, as `mhpc predict --engine onnxruntime` says.
    onnx = tmp_path / "tiled.onnx"
    assert main(["export", "--model", str(tiled), "--out", str(onnx), "--quiet"]) == 0
    rows = _predict_cli({**served, "model": onnx}, tmp_path / "cli-onnx", "--engine", "onnxruntime")
    app = create_app(ServeSettings(model=str(onnx), engine="onnxruntime", watch_s=0, max_queue=16))
    with running(app) as url:
        r = httpx.post(url + "/predict?map=npy", files=_files(served["test"]))
        assert r.status_code == 200
        _check_against_cli(r.json()["results"], rows, tmp_path / "cli-onnx")


def test_verdict_right_at_the_threshold_is_the_exported_graph_s_own(served, tmp_path):
    """The graph compares in float32; a threshold whose float32 rounding equals an image's score while its
    float64 value lies just above it flags the image in the graph and in `mhpc predict --engine onnxruntime`:
    the server must say the same (score >= threshold in float64 would not)."""
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.deploy import DeployedModel

    image = served["test"][0]
    first = tmp_path / "first.onnx"
    assert main(["export", "--model", str(served["model"]), "--out", str(first), "--quiet"]) == 0
    pixels = ServedModel(str(first), "onnxruntime").preprocess_file(image).image[None]
    s32 = DeployedModel(first).predict(pixels).scores[0]
    edge = float(s32) + float(np.spacing(s32)) / 4
    assert np.float32(edge) == s32 and not float(s32) >= edge  # the two rules disagree here
    model = MHPatchCore.load(served["model"])
    model.threshold_ = edge
    model.save(tmp_path / "edge")
    onnx = tmp_path / "edge.onnx"
    assert main(["export", "--model", str(tmp_path / "edge"), "--out", str(onnx), "--quiet"]) == 0
    assert DeployedModel(onnx).predict(pixels).scores[0] == s32  # the same graph but for its threshold
    out = tmp_path / "cli"
    assert main(["predict", "--model", str(onnx), "--engine", "onnxruntime", "--images", str(image), "--out", str(out),
                 "--quiet"]) == 0
    assert [row["is_anomalous"] for row in csv.DictReader(open(out / "scores.csv"))] == ["1"]
    app = create_app(ServeSettings(model=str(onnx), engine="onnxruntime", watch_s=0))
    with running(app) as url:
        res = httpx.post(url + "/predict", files=_files([image])).json()["results"][0]
        assert res["score"] == float(s32) and res["is_anomaly"] is True and res["threshold"] == edge
        status, answer = _http("POST", url + "/v2/models/edge/infer", _infer_body(pixels))
        assert status == 200 and {o["name"]: o for o in answer["outputs"]}["is_anomaly"]["data"] == [True]


def test_hot_reload_while_serving_sighup_and_graceful_sigterm(served, tmp_path):
    import os
    import shutil
    import signal

    from serve_util import serve_process

    model = tmp_path / "line"
    shutil.copytree(served["model"], model)
    file = model / "model.safetensors"
    old_sha = file_sha256(file)
    new_images = tmp_path / "new"
    write_images(new_images, 3, seed=7)
    image = served["test"][0]
    with serve_process("--model", str(model), "--watch-s", "0.2", "--batch-wait-ms", "500") as (proc, url):
        answers, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                r = httpx.post(url + "/predict", files=_files([image]), timeout=30)
                answers.append((r.status_code, r.json()))

        threads = [threading.Thread(target=client) for _ in range(2)]
        [t.start() for t in threads]
        time.sleep(0.5)
        assert main(["update", "--model", str(model), "--folder", str(new_images), "--quiet"]) == 0
        new_sha = file_sha256(file)
        assert new_sha != old_sha
        deadline = time.time() + 60
        while httpx.get(url + "/v2/models/line").json()["parameters"]["live_model"]["sha256"] != new_sha:
            assert time.time() < deadline, "the updated model was not picked up"
            time.sleep(0.1)
        time.sleep(0.6)
        stop.set()
        [t.join() for t in threads]
        # No request failed; every answer came from the old or the new model, with that model's score.
        assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
        by_model = {}
        for _, body in answers:
            by_model.setdefault(body["model_sha256"], set()).add(body["results"][0]["score"])
        assert set(by_model) == {old_sha, new_sha}
        live = ServedModel(str(model))
        expected_new = live.score(live.preprocess_file(image).image[None])[0][0]
        for scores in by_model.values():  # one score per model, up to float rounding (batches of 1 or 2 images)
            assert max(scores) == pytest.approx(min(scores), rel=1e-6)
        assert all(s == pytest.approx(expected_new, rel=1e-5) for s in by_model[new_sha])
        assert min(by_model[old_sha]) != pytest.approx(min(by_model[new_sha]), rel=1e-5)  # the two are told apart

        # A damaged file is refused (its SHA-256 fails), and the new model keeps serving.
        data = bytearray(file.read_bytes())
        data[-100] ^= 0xFF
        tmp = model / "damaged.tmp"
        tmp.write_bytes(bytes(data))
        os.replace(tmp, file)

        def refused():
            return httpx.get(url + "/metrics").text.count('mhpc_model_reloads_total{result="refused"}')

        deadline = time.time() + 60
        while "integrity" not in str(httpx.get(url + "/v2/models/line").json()["parameters"]["last_reload_error"]):
            assert time.time() < deadline, "the damaged file was not looked at"
            time.sleep(0.1)
        meta = httpx.get(url + "/v2/models/line").json()["parameters"]
        assert meta["live_model"]["sha256"] == new_sha
        r = httpx.post(url + "/predict", files=_files([image]), timeout=30)
        assert r.status_code == 200 and r.json()["model_sha256"] == new_sha
        # POST /admin/reload (loopback, no token needed) and SIGHUP both try again and refuse it in one line.
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 422 and "old model keeps serving" in r.json()["error"]
        assert 'mhpc_model_reloads_total{result="refused"} 2.0' in httpx.get(url + "/metrics").text
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 60
        while 'mhpc_model_reloads_total{result="refused"} 3.0' not in httpx.get(url + "/metrics").text:
            assert time.time() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)

        # SIGTERM with a request in flight (eight images and their maps): it is answered, then the server exits 0.
        result = {}
        inflight = threading.Thread(target=lambda: result.update(
            r=httpx.post(url + "/predict?map=npy", files=_files([image] * 8), timeout=60)))
        inflight.start()
        deadline = time.time() + 60
        while "mhpc_requests_in_flight 2.0" not in httpx.get(url + "/metrics").text:  # it and this request
            assert time.time() < deadline and inflight.is_alive(), "the request did not arrive"
        proc.send_signal(signal.SIGTERM)
        inflight.join()
        assert result["r"].status_code == 200 and result["r"].json()["model_sha256"] == new_sha
        assert len(result["r"].json()["results"]) == 8
        assert proc.wait(30) == 0
        assert "mhpc serve: stopped" in proc.stdout.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/v2/health/live")


def test_page_in_headless_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    images = served["test"][:2]
    with running(app) as url, sync_playwright() as pw:
        expected = [httpx.post(url + "/predict", files=_files([p])).json()["results"][0] for p in images]
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path="/usr/bin/chromium",
                                                        headless=True, args=flags)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('meta').textContent.includes('threshold')")
            page.set_input_files("#pick", [str(p) for p in images])
            page.wait_for_function("document.querySelectorAll('.result .verdict.ok, .result .verdict.anomaly').length == 2",
                                   timeout=30000)
            cards = page.query_selector_all(".result")
            shown = {c.query_selector(".name").inner_text(): c for c in cards}
            for res in expected:
                c = shown[res["filename"]]
                assert c.query_selector(".verdict").inner_text() == ("ANOMALY" if res["is_anomaly"] else "OK")
                assert f"{res['score']:.4g}"[:4] in c.query_selector(".score").inner_text()
                # the heat map over the image in its own size (70 x 50), as predict's overlay
                assert c.query_selector("img.overlay").evaluate("img => img.complete && img.naturalWidth") == 70
            assert sorted(page.evaluate("window.mhpcScores")) == pytest.approx(sorted(r["score"] for r in expected))
            assert all(u.startswith(url) or u.startswith("data:") for u in requests)  # no external assets
        finally:
            browser.close()


def test_cli_refuses_bad_options_in_one_line(served, tmp_path, capsys):
    import socket

    model = str(served["model"])
    empty = tmp_path / "token"
    empty.write_text("\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = {
            "model file not found": ["--model", str(tmp_path / "none")],
            "--max-batch must be an integer >= 1": ["--model", model, "--max-batch", "0"],
            "--max-queue (4) must be at least --max-batch (8)": ["--model", model, "--max-queue", "4"],
            "--timeout-s must be > 0": ["--model", model, "--timeout-s", "0"],
            "--port must be in 0..65535": ["--model", model, "--port", "70000"],
            f"--admin-token-file {empty} is empty": ["--model", model, "--admin-token-file", str(empty)],
            f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}": ["--model", model, "--port",
                                                                     str(busy.getsockname()[1])],
            "--replicas needs --ray": ["--model", model, "--replicas", "2"],
            "--ray needs a fixed --port": ["--model", model, "--ray", "--port", "0"],
        }
        capsys.readouterr()
        for text, argv in cases.items():
            assert main(["serve", *argv]) == 2, text
            err = capsys.readouterr().err.strip()
            assert err.startswith("mhpc serve: error: ") and text in err and len(err.splitlines()) == 1, err


def test_reload_with_a_model_key_refuses_an_unsigned_file(served, tmp_path, monkeypatch):
    import shutil

    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.core.model_file import KEY_ENV

    fitted = MHPatchCore.load(served["model"])
    other = MHPatchCore.load(served["model"])
    other.threshold_ = other.threshold_ * 2  # a different model, saved without the key
    other.save(tmp_path / "unsigned")
    signed = tmp_path / "signed"
    monkeypatch.setenv(KEY_ENV, "line-7-key")
    fitted.save(signed)
    app = create_app(ServeSettings(model=str(signed), watch_s=0))
    with running(app) as url:
        sha = httpx.get(url + "/v2/models/signed").json()["parameters"]["live_model"]["sha256"]
        shutil.copyfile(tmp_path / "unsigned" / "model.safetensors", signed / "model.safetensors")
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 422 and "not signed with the configured model key" in r.json()["error"]
        assert httpx.get(url + "/v2/models/signed").json()["parameters"]["live_model"]["sha256"] == sha
        fitted.threshold_ = other.threshold_
        fitted.save(signed)  # signed with the key: accepted
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 200 and r.json()["reloaded"] is True
        assert r.json()["model"]["threshold"] == pytest.approx(fitted.threshold_)
        assert httpx.post(url + "/predict", files=_files(served["test"][:1])).json()["results"][0]["threshold"] == \
            pytest.approx(fitted.threshold_)


def _replica_series(url: str, name: str) -> dict[str, list]:
    """replica -> the samples of metric ``name`` in one scrape of ``url``/metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name:
                out.setdefault(sample.labels["replica"], []).append(sample)
    return out


def test_ray_serve_replicas_answer_like_the_single_process_server(served, tmp_path):
    import os
    import shutil
    import signal
    import socket

    from serve_util import serve_process

    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.keys import file_sha256

    app = create_app(ServeSettings(model=str(served["model"]), watch_s=0))
    with running(app) as url:
        expected = httpx.post(url + "/predict", files=_files(served["test"])).json()["results"]
        batch = np.stack([_letterbox_u8(p) for p in served["test"][:2]])
        expected_v2 = _http("POST", url + "/v2/models/model/infer", _infer_body(batch))[1]
    with socket.socket() as s:  # Ray Serve's proxy needs a fixed port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = tmp_path / "model"  # a copy: the model is replaced below
    shutil.copytree(served["model"], model)
    with serve_process("--model", str(model), "--ray", "--replicas", "2", "--port", str(port), "--watch-s", "0",
                       ready_s=240) as (proc, url):
        for _ in range(3):  # a few requests, so both replicas are likely to answer; each must agree
            got = httpx.post(url + "/predict", files=_files(served["test"]), timeout=60).json()["results"]
            assert [g["score"] for g in got] == [e["score"] for e in expected]
        status, answer = _http("POST", url + "/v2/models/model/infer", _infer_body(batch))
        assert status == 200 and answer["outputs"][0]["data"] == expected_v2["outputs"][0]["data"]

        # /metrics on any replica shows both, each labelled: the /predict counts add up to the 3 requests sent.
        # (A replica's series are as of its last post to the board, at most about a second old.)
        deadline = time.time() + 30
        while True:
            counts = _replica_series(url, "mhpc_requests_total")
            predicted = sum(s.value for samples in counts.values() for s in samples
                            if s.labels["endpoint"] == "/predict" and s.labels["status"] == "200")
            replicas = _replica_series(url, "mhpc_model_info")  # every replica has this one series
            if len(replicas) == 2 and predicted == 3:
                break
            assert time.time() < deadline and predicted <= 3, f"replicas {sorted(replicas)}, {predicted} predicted"
            time.sleep(0.5)

        # POST /admin/reload on one replica reloads both (the file is not watched: --watch-s 0).
        fitted = MHPatchCore.load(model)
        fitted.threshold_ = fitted.threshold_ * 2
        fitted.save(model)
        new_sha = file_sha256(model / "model.safetensors")
        r = httpx.post(url + "/admin/reload", timeout=60)
        assert r.status_code == 200 and r.json()["reloaded"] is True, r.text
        assert r.json()["all_replicas_live"] is True and len(r.json()["replicas"]) == 2, r.text
        assert set(r.json()["replicas"].values()) == {new_sha}
        for _ in range(4):
            assert httpx.post(url + "/predict", files=_files(served["test"][:1]), timeout=60).json()["model_sha256"] \
                == new_sha

        # SIGHUP to `mhpc serve --ray` reloads every replica too.
        fitted.threshold_ = fitted.threshold_ * 2
        fitted.save(model)
        third_sha = file_sha256(model / "model.safetensors")
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.time() + 30
        while {s.labels["sha256"] for samples in _replica_series(url, "mhpc_model_info").values()
               for s in samples} != {third_sha}:
            assert time.time() < deadline, "SIGHUP did not reload every replica"
            time.sleep(0.5)
        proc.terminate()
        assert proc.wait(120) == 0 and "mhpc serve: stopped" in proc.stdout.read()


def test_replica_board_forgets_a_silent_replica(monkeypatch):
    from mhpc.serve import ray_serve

    now = [100.0]
    monkeypatch.setattr(ray_serve.time, "monotonic", lambda: now[0])
    board = ray_serve.ReplicaBoard()
    assert board.sync("a", "text-a", "sha-1") == 0 and board.sync("b", "text-b", "sha-1") == 0
    assert board.reload_all() == 1 and board.sync("a", "text-a2", "sha-2") == 1
    assert board.live_models() == {"a": "sha-2", "b": "sha-1"}
    now[0] += ray_serve.EXPIRE_S + 1  # b stopped posting (stopped or replaced): it leaves the board
    board.sync("a", "text-a3", "sha-2")
    assert board.live_models() == {"a": "sha-2"} and board.metrics_texts() == {"a": "text-a3"}


def test_replicas_without_their_board_still_answer_metrics_and_reload(served, tmp_path):
    """Under Ray, with the board gone (its driver killed while the replicas live on): /metrics gives this
    replica's own series, and /admin/reload reloads this replica and says the others were not reached."""
    import shutil

    from mhpc.core.mh_patch_core import MHPatchCore

    class GoneBoard:
        replica, replicas, sync_s, settle_s, generation_at_start = "r1", 2, 0.05, 1.0, 0

        async def _gone(self, *args):
            raise ConnectionError("the board's owner died")

        sync = reload_all = metrics_texts = live_models = _gone

    model = tmp_path / "model"
    shutil.copytree(served["model"], model)
    app = create_app(ServeSettings(model=str(model), watch_s=0), peers=GoneBoard())
    with running(app) as url:
        httpx.post(url + "/predict", files=_files(served["test"][:1]))
        r = httpx.get(url + "/metrics")
        assert r.status_code == 200 and 'replica="r1"' in r.text
        assert 'mhpc_requests_total{endpoint="/predict",replica="r1",status="200"} 1.0' in r.text
        fitted = MHPatchCore.load(model)
        fitted.threshold_ = fitted.threshold_ * 2
        fitted.save(model)
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 200 and r.json()["reloaded"] is True and r.json()["replicas"] is None
        assert r.json()["all_replicas_live"] is False and "cannot reach the other replicas" in r.json()["peers_error"]
