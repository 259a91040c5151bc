"""Running the API: in the foreground (``fleetward serve``) or on a thread (the demo, tests, benchmarks)."""

from __future__ import annotations

import logging
import os
import threading
import time
from types import TracebackType

import uvicorn

from fleetward.api.app import create_asgi
from fleetward.api.device_lane import DeviceLane
from fleetward.compose import Services
from fleetward.config import Settings
from fleetward.errors import ConfigurationError

logger = logging.getLogger(__name__)


def uvicorn_config(
    services: Services, *, port: int | None = None, log_level: str = "warning"
) -> uvicorn.Config:
    settings = services.settings
    tls: dict[str, str] = {}
    if settings.tls_certificate is not None or settings.tls_private_key is not None:
        if settings.tls_certificate is None or settings.tls_private_key is None:
            raise ConfigurationError("TLS needs both a certificate and a private key")
        tls = {"ssl_certfile": str(settings.tls_certificate), "ssl_keyfile": str(settings.tls_private_key)}
    return uvicorn.Config(
        create_asgi(services),
        host=settings.host,
        port=settings.port if port is None else port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=5,
        **tls,  # type: ignore[arg-type]
    )


def serve(services: Services, *, log_level: str = "info", workers: int = 1) -> None:
    """Serve until interrupted, in this process or in ``workers`` processes sharing the port and store.

    Workers share the store (and the master key): nonces are redeemed in the store, and each worker
    group-commits its own enrollments. With a shared bus (``bus_url``, NATS) each worker also runs a hub on
    the same port (``SO_REUSEPORT``: the kernel spreads the devices' connections), and the bus carries
    commands to whichever worker holds a device. Without one the workers run no hub (a warning says so):
    the in-process bus cannot reach a device held by another process.
    """
    if workers <= 1:
        uvicorn.Server(uvicorn_config(services, log_level=log_level)).run()
        return
    settings = services.settings
    os.environ.update(settings.to_environment())
    if not settings.bus_url:
        os.environ.pop("FLEETWARD_BUS_URL", None)  # what this process runs with, not what it inherited
        if settings.hub_port:
            logger.warning(
                "with --workers %d and no bus the hub is off: give --bus-url nats://… (FLEETWARD_BUS_URL) to "
                "run it in every worker, or run it in a single-process server",
                workers,
            )
            os.environ["FLEETWARD_HUB_PORT"] = "0"
    single = uvicorn_config(services, log_level=log_level)
    uvicorn.run(
        "fleetward.server:worker_app",
        factory=True,
        workers=workers,
        host=single.host,
        port=single.port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        ssl_certfile=single.ssl_certfile,
        ssl_keyfile=single.ssl_keyfile,
        timeout_graceful_shutdown=5,
    )


def worker_app() -> DeviceLane:
    """The app of one worker process, from the ``FLEETWARD_*`` environment its parent set."""
    from fleetward.compose import build_services

    return create_asgi(build_services(Settings.from_environment(), migrate=False))


class BackgroundServer:
    """The API on a thread, on an ephemeral port unless told otherwise; ``url`` is where it listens."""

    def __init__(self, services: Services, *, port: int = 0) -> None:
        self._server = uvicorn.Server(uvicorn_config(services, port=port))
        self._thread = threading.Thread(target=self._server.run, name="fleetward-api", daemon=True)
        self._scheme = "https" if services.settings.tls_certificate else "http"
        self._host = services.settings.host
        self.port = port

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self._host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError("the API server did not start")
            time.sleep(0.01)
        sockets = [socket for server in self._server.servers for socket in server.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for servers whose URL must be known before they start)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
