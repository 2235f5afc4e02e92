"""Running the app with uvicorn: bind (one-line error when the port is taken), SIGHUP reloads, SIGTERM
stops accepting, finishes the requests in flight, then returns."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

from mhpc.errors import MHPCError
from mhpc.serve import require_serve


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise MHPCError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_server(settings, port: int, announce=print) -> None:
    """Loads the model, binds, serves until SIGTERM / SIGINT. ``announce`` gets the one start-up line."""
    require_serve()
    import uvicorn

    from mhpc.serve.app import ApiError, create_app

    app = create_app(settings)  # loads and checks the model before anything listens
    state = app.state.mhpc
    sock = bind(settings.host, port)
    host, real_port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    server = uvicorn.Server(config)

    loop_holder: dict = {}

    async def reload_from_signal() -> None:
        with contextlib.suppress(ApiError):  # a refused file is logged; the old model keeps serving
            await state.reload("SIGHUP")

    def on_hup(signum, frame) -> None:
        loop = loop_holder.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(reload_from_signal()))

    original_startup = server.startup

    async def startup(sockets=None):
        loop_holder["loop"] = asyncio.get_running_loop()
        await original_startup(sockets=sockets)

    server.startup = startup
    saved_hup = signal.signal(signal.SIGHUP, on_hup)
    # After its graceful shutdown uvicorn re-raises the signal it caught: a SIGTERM that stopped the server
    # is then a normal end (exit 0), not the CLI's "interrupted".
    saved_term = signal.signal(signal.SIGTERM, lambda s, f: None)
    url_host = f"[{host}]" if ":" in host else host
    announce(f"mhpc serve: {state.name} ({settings.engine}, sha256 {state.model.sha256[:12]}) at "
             f"http://{url_host}:{real_port}/  (POST /predict, /v2/models/{state.name}/infer, /metrics)")
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGHUP, saved_hup)
        signal.signal(signal.SIGTERM, saved_term)
        sock.close()
