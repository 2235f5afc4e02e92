"""The one-client target of issue 18, measured interleaved: in-process batch-1 and one `POST /predict`
alternate (40 pairs, 50 ms apart, medians), so both see the same machine state. `serve_load.py` measures
batch-1 once before its phases; on this machine batch-1 itself drifts by 15 ms between runs.

    .venv/bin/python bench/serve_latency.py --model MODEL_DIR --images DIR [--engine torch] [--batching on|off|both]
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
from mhpc.prediction import load_scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder; exported to ONNX for --engine onnxruntime")
    ap.add_argument("--images", required=True, help="folder of test images (the first is sent)")
    ap.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    ap.add_argument("--batching", choices=["on", "off", "both"], default="on",
                    help="both: two servers, one with and one without batching, in the same interleaving")
    ap.add_argument("--pairs", type=int, default=40)
    args = ap.parse_args()
    model = args.model
    if args.engine == "onnxruntime":
        model = str(Path(tempfile.mkdtemp()) / "model.onnx")
        subprocess.run([sys.executable, "-m", "mhpc", "export", "--model", args.model, "--out", model, "--quiet"],
                       check=True)
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    scorer, pre, _ = load_scorer(model, args.engine)
    one = ImageFilesDataset([str(images[0])], preprocessing=pre).validate()[0]["image"][None]
    modes = ["on", "off"] if args.batching == "both" else [args.batching]
    servers = {}
    payload = {"file": (images[0].name, images[0].read_bytes(), "image/png")}
    batch1, request = [], {mode: [] for mode in modes}
    try:
        for mode in modes:
            servers[mode] = serve_load.Server(model, args.engine, mode == "on")
        with httpx.Client(timeout=60) as http:
            for _ in range(5):  # warm-up
                scorer.predict_images(one)
                for server in servers.values():
                    http.post(server.url + "/predict", files=payload)
            for _ in range(args.pairs):
                time.sleep(0.05)
                start = time.perf_counter()
                scorer.predict_images(one)
                batch1.append(time.perf_counter() - start)
                for mode, server in servers.items():
                    time.sleep(0.05)
                    start = time.perf_counter()
                    answer = http.post(server.url + "/predict", files=payload)
                    request[mode].append(time.perf_counter() - start)
                    answer.raise_for_status()
    finally:
        for server in servers.values():
            server.stop()
    b = 1000 * statistics.median(batch1)
    for mode in modes:
        r = 1000 * statistics.median(request[mode])
        print(f"{args.engine}, batching {mode}: in-process batch-1 {b:.1f} ms, one-client request {r:.1f} ms, "
              f"{r - b:+.1f} ms ({args.pairs} interleaved rounds, medians; target: +10 ms at most)")


if __name__ == "__main__":
    main()
