"""Helpers for the `mhpc serve` tests: tiny images, a tiny fitted model, servers on an ephemeral port."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIT = ["--backbone", "resnet18", "--random-init", "--quiet", "--input-size", "64", "64"]


def write_images(folder: Path, n: int, seed: int, size=(64, 80)) -> list[Path]:
    """Striped textures (the same family as conftest's), as PNG files of ``size`` (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.sin((xx + yy) * 0.6 + rng.uniform(0, 6)) * 100 + 128
        img = np.stack([base, base * 0.5 + 60, 255 - base], -1) + rng.normal(0, 5, (h, w, 3))
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def fit_tiny(folder: Path, out: Path) -> Path:
    from mhpc.cli import main

    assert main(["fit", "--folder", str(folder), "--out", str(out), "--holdout", "0.34", *FIT]) == 0
    return out


@contextlib.contextmanager
def running(app):
    """An app under uvicorn in a thread, on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["HF_HUB_OFFLINE"] = "1"
    return e


@contextlib.contextmanager
def serve_process(*args: str, ready_s: float = 30):
    """`mhpc serve --port 0 ...` as a child process; yields (process, base URL) once it is ready."""
    import httpx

    port = [] if "--port" in args else ["--port", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "mhpc", "serve", *port, *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert match, f"no start-up line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        url = match.group(1)
        deadline = time.time() + ready_s
        while True:
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server not ready"
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
