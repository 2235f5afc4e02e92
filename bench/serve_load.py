"""`mhpc serve` under load on loopback, side by side with in-process batch predict of the same images.

For each engine (torch, onnxruntime) and with / without dynamic batching (``--max-batch 8 --batch-wait-ms 5``
against ``--max-batch 1 --batch-wait-ms 0``), a server runs as its own process; 1, 4 and 16 concurrent
clients each send single-image ``POST /predict`` requests until ``--requests`` are answered (or
``--phase-s`` runs out: every phase stops by itself). Reported: throughput (images/s), p50 / p99 latency,
errors; next to it the in-process figures: `mhpc predict`'s batch throughput (load_scorer +
ImageFilesDataset + score_dataset, batch 8) and the engine's batch-1 time. Targets (issue 18): at 16
clients serving throughput >= 0.8x in-process batch predict; at 1 client p50 <= batch-1 time + 10 ms.
``--soak-s`` adds a soak at 4 clients: the server's RSS at the start and the end, and the errors.

    .venv/bin/python bench/serve_load.py --model MODEL_DIR --images DIR [--requests 200] [--soak-s 60]
    .venv/bin/python bench/serve_load.py --tiny --requests 8 --clients 1 4 --soak-s 2   # smoke run, ~1 min

``--tiny`` fits a random-init ResNet-18 model at 64x64 on generated stripes (no weights needed).
Needs the extras serve and deploy, plus psutil (bench extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_setup(work: Path) -> tuple[Path, list[Path]]:
    import numpy as np
    from PIL import Image

    from mhpc.cli import main

    rng = np.random.default_rng(0)
    good, test = work / "good", work / "test"
    for folder, n in ((good, 8), (test, 16)):
        folder.mkdir(parents=True)
        for i in range(n):
            yy, xx = np.mgrid[0:96, 0:128]
            base = np.sin((xx + yy) * 0.6 + rng.uniform(0, 6)) * 100 + 128
            img = np.stack([base, base * 0.5 + 60, 255 - base], -1) + rng.normal(0, 5, (96, 128, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    model = work / "model"
    assert main(["fit", "--folder", str(good), "--out", str(model), "--backbone", "resnet18", "--random-init",
                 "--quiet", "--input-size", "64", "64", "--holdout", "0.25"]) == 0
    return model, sorted(test.glob("*.png"))


def in_process(model: str, engine: str, images: list[Path], batch_size: int = 8) -> dict:
    """`mhpc predict`'s scoring loop in this process: batch throughput and the engine's batch-1 time."""
    import torch

    from mhpc.prediction import load_scorer
    from mhpc.data.datasets import ImageFilesDataset
    from mhpc.data.tiling import score_dataset

    scorer, pre, _ = load_scorer(model, engine)
    ds = ImageFilesDataset([str(p) for p in images], preprocessing=pre).validate()
    list(score_dataset(scorer, ds, batch_size))  # warm-up
    start = time.perf_counter()
    n = sum(1 for _ in score_dataset(scorer, ds, batch_size))
    throughput = n / (time.perf_counter() - start)
    one = ds[0]["image"][None]
    scorer.predict_images(one)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        scorer.predict_images(one)
        times.append(time.perf_counter() - t)
    return {"predict_images_per_s": throughput, "batch1_ms": 1000 * statistics.median(times),
            "torch_threads": torch.get_num_threads()}


class Server:
    def __init__(self, model: str, engine: str, batching: bool) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   HF_HUB_OFFLINE="1")
        flags = ["--max-batch", "8", "--batch-wait-ms", "5"] if batching else ["--max-batch", "1", "--batch-wait-ms", "0"]
        self.proc = subprocess.Popen([sys.executable, "-m", "mhpc", "serve", "--model", model, "--engine", engine,
                                      "--port", "0", "--watch-s", "0", "--max-queue", "256", *flags],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"at (http://[^ ]+?)/ ", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        self.url = match.group(1)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def load(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int | None, seconds: float) -> dict:
    """``clients`` threads, each with its own connection, send single-image requests until ``requests``
    are answered or ``seconds`` pass."""
    import httpx

    latencies, errors, lock = [], [0], threading.Lock()
    counter = [0]
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = k
            while time.perf_counter() < deadline:
                with lock:
                    if requests is not None and counter[0] >= requests:
                        return
                    counter[0] += 1
                name, data = payloads[i % len(payloads)]
                i += clients
                t = time.perf_counter()
                try:
                    ok = http.post(url + "/predict", files={"file": (name, data, "image/png")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - t)
                    errors[0] += not ok

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    pick = (lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "images_per_s": len(lat) / wall,
            "p50_ms": pick(0.5), "p99_ms": pick(0.99), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (torch); it is exported to ONNX for the onnxruntime engine")
    ap.add_argument("--images", help="folder of test images")
    ap.add_argument("--tiny", action="store_true", help="a tiny random-init model and generated images (smoke run)")
    ap.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200, help="requests per phase (200)")
    ap.add_argument("--phase-s", type=float, default=120.0, help="a phase stops after this many seconds (120)")
    ap.add_argument("--soak-s", type=float, default=60.0, help="soak at 4 clients, per engine (60; 0: none)")
    ap.add_argument("--out", help="write the results as JSON here too")
    args = ap.parse_args()
    from mhpc.cli import main as mhpc_main
    from mhpc.data.io import list_images

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        if args.tiny:
            model, images = tiny_setup(work)
        elif args.model and args.images:
            model, images = Path(args.model), list_images(Path(args.images))
        else:
            ap.error("give --model and --images, or --tiny")
        if not images:
            ap.error(f"no images in {args.images}")
        payloads = [(p.name, p.read_bytes()) for p in images]
        results = []
        for engine in args.engines:
            target = str(model)
            if engine == "onnxruntime":
                target = str(work / "model.onnx")
                assert mhpc_main(["export", "--model", str(model), "--out", target, "--quiet"]) == 0
            ref = in_process(target, engine, images)
            print(f"{engine}: in-process predict {ref['predict_images_per_s']:.1f} images/s, batch-1 "
                  f"{ref['batch1_ms']:.1f} ms", flush=True)
            for batching in (True, False):
                server = Server(target, engine, batching)
                try:
                    load(server.url, payloads, 2, 2 * len(payloads[:4]), args.phase_s)  # warm-up
                    for clients in args.clients:
                        r = load(server.url, payloads, clients, args.requests, args.phase_s)
                        r.update(engine=engine, batching=batching, **ref,
                                 vs_predict=r["images_per_s"] / ref["predict_images_per_s"])
                        results.append(r)
                        print(json.dumps(r), flush=True)
                    if batching and args.soak_s > 0:
                        before = server.rss_mb()
                        r = load(server.url, payloads, 4, None, args.soak_s)
                        r.update(engine=engine, batching=batching, soak=True, rss_start_mb=before,
                                 rss_end_mb=server.rss_mb())
                        results.append(r)
                        print(json.dumps(r), flush=True)
                finally:
                    server.stop()
    print("\n| engine | batching | clients | images/s | x in-process predict | p50 ms | p99 ms | batch-1 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("soak"):
            continue
        print(f"| {r['engine']} | {'on' if r['batching'] else 'off'} | {r['clients']} | {r['images_per_s']:.1f} | "
              f"{r['vs_predict']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['batch1_ms']:.1f} | {r['errors']} |")
    for r in results:
        if r.get("soak"):
            print(f"soak {r['engine']}: {r['requests']} requests in {r['wall_s']:.0f} s, {r['errors']} errors, RSS "
                  f"{r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
