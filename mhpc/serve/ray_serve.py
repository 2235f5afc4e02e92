"""`mhpc serve --ray [ADDRESS] --replicas N`: the same FastAPI app as a Ray Serve deployment.

Each replica builds the app itself (``serve.ingress`` with a builder, so no loaded model is pickled), loads
the model, and batches its own requests with the app's dynamic batcher. Ray Serve's HTTP proxy spreads
requests over the replicas; there is no load balancer of our own.

Ray Serve sends each request to one replica, and has no way to send one to all of them. So the replicas
share one small actor, ``ReplicaBoard``: every second each replica posts its metrics text and its live
model's SHA-256 there, and reads the reload generation. ``POST /admin/reload`` on any replica (or SIGHUP
to ``mhpc serve --ray``) bumps the generation; every replica notices within about a second and reloads;
``/metrics`` on any replica shows every replica's series, labelled ``replica``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

from mhpc.errors import MHPCError

NAMESPACE = "mhpc-serve"
SYNC_S = 1.0  # how often a replica posts to the board and looks for a reload
SETTLE_S = 15.0  # how long POST /admin/reload waits for every replica to serve the new model
EXPIRE_S = 10.0  # a replica silent this long (stopped, replaced) leaves the board


def board_name(port: int) -> str:
    return f"mhpc-replica-board-{port}"  # one Serve HTTP port per cluster, so one board per `mhpc serve --ray`


class ReplicaBoard:
    """What the replicas of one deployment tell each other (a Ray actor; plain Python, so it is testable
    without Ray): each one's last metrics text and live model, and the reload generation."""

    def __init__(self) -> None:
        self.generation = 0
        self.replicas: dict[str, tuple[float, str, str]] = {}  # replica -> (posted at, metrics text, sha256)

    def sync(self, replica: str, metrics_text: str, sha256: str) -> int:
        self.replicas[replica] = (time.monotonic(), metrics_text, sha256)
        return self.generation

    def reload_all(self) -> int:
        self.generation += 1
        return self.generation

    def _live(self) -> dict[str, tuple[float, str, str]]:
        now = time.monotonic()
        self.replicas = {r: v for r, v in self.replicas.items() if now - v[0] <= EXPIRE_S}
        return self.replicas

    def current_generation(self) -> int:
        return self.generation

    def metrics_texts(self) -> dict[str, str]:
        return {r: text for r, (_, text, _) in self._live().items()}

    def live_models(self) -> dict[str, str]:
        return {r: sha for r, (_, _, sha) in self._live().items()}


class RayPeers:
    """A replica's view of the board (``ServerState(peers=...)``); every call is one awaited actor call."""

    sync_s, settle_s = SYNC_S, SETTLE_S

    def __init__(self, port: int, replicas: int) -> None:
        import ray
        from ray import serve

        self.replicas = replicas  # how many the deployment runs: a reload waits for that many on the board
        self.board = ray.get_actor(board_name(port), namespace=NAMESPACE)
        # Before this replica loads its model: a reload asked for while it loads is then not missed.
        self.generation_at_start = ray.get(self.board.current_generation.remote())
        try:
            self.replica = str(getattr(serve.get_replica_context().replica_id, "unique_id", "")) or None
        except Exception:  # noqa: BLE001 - outside a replica (not expected): fall back to the process
            self.replica = None
        self.replica = self.replica or f"{os.uname().nodename}:{os.getpid()}"

    async def sync(self, metrics_text: str, sha256: str) -> int:
        return await self.board.sync.remote(self.replica, metrics_text, sha256)

    async def reload_all(self) -> int:
        return await self.board.reload_all.remote()

    async def metrics_texts(self) -> dict[str, str]:
        return await self.board.metrics_texts.remote()

    async def live_models(self) -> dict[str, str]:
        return await self.board.live_models.remote()


def deployment(settings: Any, replicas: int, port: int):
    """The bound Ray Serve application: ``replicas`` copies of ``create_app(settings)``, sharing the board of
    ``port`` (which ``run_on_ray`` starts first)."""
    from ray import serve

    def build():
        from mhpc.serve.app import create_app

        peers = RayPeers(port, replicas)  # first: it reads the reload generation before the model loads
        return create_app(settings, peers=peers)

    @serve.deployment(name="mhpc", num_replicas=replicas)
    @serve.ingress(build)
    class MhpcServe:
        pass

    return MhpcServe.bind()


def run_on_ray(settings: Any, port: int, address: str | None, replicas: int,
               announce: Callable[[str], None] = print) -> None:
    """Starts Ray Serve (a local Ray, or joins ``address``), deploys, serves until SIGTERM / SIGINT."""
    from mhpc.distributed import ray_session
    from mhpc.serve import default_name
    from mhpc.serve.model import ServedModel

    if replicas < 1:
        raise MHPCError(f"--replicas must be >= 1, got {replicas}")
    if port == 0:
        raise MHPCError("--ray needs a fixed --port: Ray Serve's proxy does not pick a free one")
    # A bad file fails here, in one line.
    model = ServedModel(settings.model, settings.engine, settings.device, settings.key)
    try:
        from ray import serve
    except ImportError:
        raise MHPCError("Ray Serve is not installed: pip install 'mhpc[distributed]'") from None
    import ray

    stop, hup = threading.Event(), threading.Event()
    with ray_session(address):
        # After ray.init, which installs handlers of its own: SIGTERM / SIGINT end the wait below, SIGHUP
        # reloads every replica.
        saved = {sig: signal.signal(sig, lambda s, f: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        saved[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda s, f: hup.set())
        try:
            # Owned by this process: it goes when `mhpc serve --ray` ends. No CPU reserved: it only holds texts.
            board = ray.remote(num_cpus=0)(ReplicaBoard).options(name=board_name(port), namespace=NAMESPACE).remote()
            serve.start(http_options={"host": settings.host, "port": port})
            serve.run(deployment(settings, replicas, port), name="mhpc", route_prefix="/", blocking=False)
            name = settings.name or default_name(settings.model, settings.engine)
            announce(f"mhpc serve: {name} ({settings.engine}, sha256 {model.sha256[:12]}) on Ray Serve, "
                     f"{replicas} replica(s), at http://{settings.host}:{port}/  (POST /predict, "
                     f"/v2/models/{name}/infer, /metrics)")
            while not stop.wait(0.5):
                if hup.is_set():
                    hup.clear()
                    generation = ray.get(board.reload_all.remote())
                    announce(f"mhpc serve: SIGHUP: every replica reloads (generation {generation})")
        finally:
            try:
                serve.shutdown()  # the replicas finish their requests in flight
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)
