"""The one-client target of issue 18, measured interleaved: in-process batch-1 and one `POST /predict`
alternate (40 rounds, 50 ms apart, medians), so both see the same machine state. `serve_load.py` measures
batch-1 once before its phases; on this machine batch-1 itself drifts by 15 ms between runs.

    .venv/bin/python bench/serve_latency.py --model MODEL_DIR --images DIR [--engine torch] [--batching on|off|both]
        [--v2] [--gap-ms 50] [--pairs 40]

``--v2`` adds the v2 infer endpoint with the same pixels as JSON and as binary tensor data.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import serve_load

from mhpc.data.datasets import ImageFilesDataset
from mhpc.data.io import list_images
from mhpc.prediction import load_scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder; exported to ONNX for --engine onnxruntime")
    ap.add_argument("--images", required=True, help="folder of test images (the first is sent)")
    ap.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    ap.add_argument("--batching", choices=["on", "off", "both"], default="on",
                    help="both: two servers, one with and one without batching, in the same interleaving")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--gap-ms", type=float, default=50.0, help="pause before each timed call (50)")
    ap.add_argument("--v2", action="store_true", help="also the v2 infer endpoint, JSON and binary tensor data")
    args = ap.parse_args()
    model = args.model
    if args.engine == "onnxruntime":
        model = str(Path(tempfile.mkdtemp()) / "model.onnx")
        subprocess.run([sys.executable, "-m", "mhpc", "export", "--model", args.model, "--out", model, "--quiet"],
                       check=True)
    images = list_images(Path(args.images))  # predict's own listing, as serve_load.py uses
    scorer, pre, _ = load_scorer(model, args.engine)
    one = ImageFilesDataset([str(images[0])], preprocessing=pre).validate()[0]["image"][None]
    modes = ["on", "off"] if args.batching == "both" else [args.batching]
    servers = {}
    payload = {"file": (images[0].name, images[0].read_bytes(), "image/png")}
    try:
        for mode in modes:
            servers[mode] = serve_load.Server(model, args.engine, mode == "on")
        with httpx.Client(timeout=60) as http:
            calls = {"in-process batch-1": lambda: scorer.predict_images(one)}
            for mode, server in servers.items():
                calls[f"POST /predict, batching {mode}"] = (
                    lambda url=server.url: http.post(url + "/predict", files=payload).raise_for_status())
            if args.v2:  # the same pixels as the protocol's JSON tensor and as binary tensor data
                from mhpc.serve import default_name

                calls.update(v2_calls(http, next(iter(servers.values())).url, default_name(model, args.engine),
                                      images[0], pre))
            times = {name: [] for name in calls}
            for _ in range(5):  # warm-up
                for call in calls.values():
                    call()
            for _ in range(args.pairs):
                for name, call in calls.items():
                    time.sleep(args.gap_ms / 1000)
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
    finally:
        for server in servers.values():
            server.stop()
    b = 1000 * statistics.median(times["in-process batch-1"])
    print(f"{args.engine}: {args.pairs} interleaved rounds, {args.gap_ms:g} ms apart, medians "
          "(target for one client: batch-1 + 10 ms at most)")
    for name, values in times.items():
        r = 1000 * statistics.median(values)
        print(f"  {name}: {r:.1f} ms" + ("" if name == "in-process batch-1" else f", {r - b:+.1f} ms over batch-1"))


def v2_calls(http, url: str, name: str, image: Path, pre: dict) -> dict:
    """``POST /v2/models/NAME/infer`` with the image's model-input pixels, as JSON and as binary tensor data
    (the scores only, so the answer is small in both)."""
    import json

    import numpy as np

    from mhpc.data.geometry import prepare_image
    from mhpc.data.io import load_rgb

    pixels = np.asarray(prepare_image(load_rgb(image, pre.get("bit_depth")), pre), dtype=np.uint8)[None]
    tensor = {"name": "images", "shape": list(pixels.shape), "datatype": "UINT8"}
    as_json = json.dumps({"inputs": [{**tensor, "data": pixels.reshape(-1).tolist()}],
                          "outputs": [{"name": "scores"}]})
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": pixels.size}}],
                       "outputs": [{"name": "scores"}]}).encode()
    infer = f"{url}/v2/models/{name}/infer"
    return {f"v2 infer, JSON ({len(as_json) / 1e6:.2f} MB)":
            lambda: http.post(infer, content=as_json).raise_for_status(),
            f"v2 infer, binary ({(len(head) + pixels.size) / 1e6:.2f} MB)":
            lambda: http.post(infer, content=head + pixels.tobytes(),
                              headers={"Inference-Header-Content-Length": str(len(head))}).raise_for_status()}


if __name__ == "__main__":
    main()
