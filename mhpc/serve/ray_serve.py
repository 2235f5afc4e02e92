"""`mhpc serve --ray [ADDRESS] --replicas N`: the same FastAPI app as a Ray Serve deployment.

Each replica builds the app itself (``serve.ingress`` with a builder, so no loaded model is pickled), loads
the model, and batches its own requests with the app's dynamic batcher. Ray Serve's HTTP proxy spreads
requests over the replicas; there is no load balancer of our own.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

from mhpc.errors import MHPCError


def deployment(settings: Any, replicas: int):
    """The bound Ray Serve application: ``replicas`` copies of ``create_app(settings)``."""
    from ray import serve

    def build():
        from mhpc.serve.app import create_app

        return create_app(settings)

    @serve.deployment(name="mhpc", num_replicas=replicas)
    @serve.ingress(build)
    class MhpcServe:
        pass

    return MhpcServe.bind()


def run_on_ray(settings: Any, port: int, address: str | None, replicas: int,
               announce: Callable[[str], None] = print) -> None:
    """Starts Ray Serve (a local Ray, or joins ``address``), deploys, serves until SIGTERM / SIGINT."""
    from mhpc.distributed import ray_session
    from mhpc.serve.app import default_name
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
    stop = threading.Event()
    with ray_session(address):
        # After ray.init, which installs handlers of its own: SIGTERM / SIGINT end the wait below.
        saved = {sig: signal.signal(sig, lambda s, f: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            serve.start(http_options={"host": settings.host, "port": port})
            serve.run(deployment(settings, replicas), name="mhpc", route_prefix="/", blocking=False)
            name = settings.name or default_name(settings.model, settings.engine)
            announce(f"mhpc serve: {name} ({settings.engine}, sha256 {model.sha256[:12]}) on Ray Serve, "
                     f"{replicas} replica(s), at http://{settings.host}:{port}/  (POST /predict, "
                     f"/v2/models/{name}/infer, /metrics)")
            while not stop.wait(0.5):
                pass
        finally:
            try:
                serve.shutdown()  # the replicas finish their requests in flight
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)
