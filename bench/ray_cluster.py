"""A real two-node Ray cluster on this machine: fit the demo category through it, score it, stop it.

`ray start --head` (1 CPU, its own object store), then a second `ray start --address ...` node with
its own CPU and object store. Measured side by side in one run, each in a fresh process (so each
peak RSS is its own):
  - single-process ONLINE fit and predict (the reference path), with 2 threads and with 1 thread (as a
    1-CPU Ray worker runs);
  - the distributed fit and Ray Data predict through the cluster with 1 worker (head node only),
    then with 2 workers (head + second node);
  - the driver's peak RSS against the total size of the patch features, at two training-set sizes.
The cluster's processes are found by PID (those that `ray start` created) and stopped at the end.

Usage: .venv/bin/python bench/ray_cluster.py [--n-train 60 240] [--out runs/bench_ray]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, peak_rss_mb, run_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PORT = 46379
CONFIG = dict(backbone="mobilenet_v2", algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA",
              distance="MAHALANOBIS", progress=False)  # the demo's proposed configuration
BATCH = 8


def _env() -> dict:
    # A cluster bound to 127.0.0.1 for this benchmark only: no token authentication between its nodes.
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}


def _ray_processes() -> set[int]:
    import psutil

    out = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "/ray/" in cmd or cmd.startswith("ray::"):
            out.add(proc.info["pid"])
    return out


def _ray_start(args: list[str], started: set[int]) -> None:
    before = _ray_processes()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", *args, "--disable-usage-stats",
                    "--node-ip-address", "127.0.0.1", "--object-store-memory", str(300 * 2**20)],
                   check=True, env=_env(), capture_output=True)
    started |= _ray_processes() - before


def _stop(started: set[int]) -> None:
    """Stops the processes `ray start` created here (and their children: raylet workers), by PID."""
    import psutil

    procs = []
    for pid in started:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.wait_procs(procs, timeout=15)[1]:
        proc.kill()


# ---------------------------------------------------------------- children (one measurement each)
def _train_paths(data: str, n: int) -> list[str]:
    return sorted(str(p) for p in (Path(data) / "grass" / "train" / "good").iterdir())[:n]


def _test_paths(data: str) -> list[str]:
    from mhpc.data.datasets import mvtec_samples

    return [str(s.image) for s in mvtec_samples(data, "grass", "test")]


def child_fit(data: str, n: int, address: str, model_out: str) -> dict:
    import torch

    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.distributed import image_batches

    paths = _train_paths(data, n)
    model = MHPatchCore(**CONFIG)
    if address == "single-1":  # one thread, as in each Ray worker (1 CPU: OMP_NUM_THREADS=1)
        torch.set_num_threads(1)
    elif address != "single":
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)  # connecting is not timed
    start = time.perf_counter()
    if address.startswith("single"):
        model.fit(image_batches(paths, model.input_shape, BATCH))
    else:
        model.fit_distributed(paths, batch_size=BATCH)  # uses the connection made above
    seconds = time.perf_counter() - start
    model.save(model_out)
    grid, dim = model.grid_shape_, int(model.target_embed_dimension)  # raw patch features: D floats each
    return {"fit_s": seconds, "images": len(paths), "peak_rss_mb": peak_rss_mb(),
            "feature_mb": len(paths) * grid[0] * grid[1] * dim * 4 / 2**20, "shards": getattr(model, "n_shards_", 1),
            "bank": list(model.memory_bank_.shape), "threads": torch.get_num_threads()}


def child_predict(data: str, model_dir: str, address: str, out: str) -> dict:
    from mhpc.cli import main

    argv = ["predict", "--model", model_dir, "--images", *_test_paths(data), "--out", out, "--quiet"]
    start = time.perf_counter()
    if address.startswith("single"):
        if address == "single-1":
            import torch

            torch.set_num_threads(1)
        assert main(argv) == 0
    else:
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        connected = time.perf_counter()
        assert main(argv + ["--ray", address]) == 0  # uses the connection made above
        start = connected
        ray.shutdown()
    return {"predict_s": time.perf_counter() - start, "images": len(_test_paths(data)), "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, nargs="+", default=[60, 240])
    p.add_argument("--out", default="runs/bench_ray")
    p.add_argument("--child", nargs="+")
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_fit(rest[0], int(rest[1]), rest[2], rest[3]) if kind == "fit" else child_predict(*rest)
        print(json.dumps(result))
        return

    from mhpc.data.synthetic import generate_benchmark

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mhpc-ray-bench-"))
    data = generate_benchmark(work / "data", ("grass",), n_train=max(args.n_train), n_test_good=15, n_test_per_defect=5)
    print(machine_line(), flush=True)
    address = f"127.0.0.1:{PORT}"
    script = str(Path(__file__).resolve())
    rows = []

    def measure(label: str, addr: str, n: int) -> None:
        model_dir = str(work / f"model-{addr}-{n}")
        env = _env() if addr != "single-1" else {**_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        fit = run_child(script, ["--child", "fit", str(data), str(n), addr, model_dir], env=env)
        pred = run_child(script, ["--child", "predict", str(data), model_dir, addr, str(work / f"pred-{addr}-{n}")],
                         env=env)
        row = {"path": label, "n_train": n, **fit, "predict_s": pred["predict_s"], "n_test": pred["images"],
               "predict_rss_mb": pred["peak_rss_mb"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    started: set[int] = set()
    try:
        for n in args.n_train:
            measure("single-process", "single", n)
            measure("single-process, 1 thread", "single-1", n)
        _ray_start(["--head", "--port", str(PORT), "--num-cpus", "1", "--include-dashboard=false"], started)
        for n in args.n_train:
            measure("ray, 1 worker", address, n)
        _ray_start(["--address", address, "--num-cpus", "1", "--dashboard-agent-listen-port", "52366",
                    "--metrics-export-port", "0"], started)
        for n in args.n_train:
            measure("ray, 2 workers", address, n)
    finally:
        _stop(started)

    base = {r["n_train"]: r for r in rows if r["path"] == "single-process"}
    lines = ["| path | train images | shards | fit img/s | fit vs single | predict img/s | predict vs single | "
             "driver peak RSS MB | patch features MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["n_train"]]
        lines.append(f"| {r['path']} | {r['n_train']} | {r['shards']} | {r['images'] / r['fit_s']:.2f} | "
                     f"{b['fit_s'] / r['fit_s']:.2f}x | {r['n_test'] / r['predict_s']:.2f} | "
                     f"{b['predict_s'] / r['predict_s']:.2f}x | {r['peak_rss_mb']:.0f} | {r['feature_mb']:.0f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
