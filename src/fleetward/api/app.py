"""The ASGI application: routes, limits, error format, and the lifetime of what runs beside it (the bus,
the enrollment batcher, the hub)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

import fleetward
from fleetward.api import (
    errors,
    routes_attestation,
    routes_audits,
    routes_authority,
    routes_deployments,
    routes_hub,
    routes_monitor,
    routes_registry,
    routes_reports,
    routes_updates,
)
from fleetward.api.device_auth import DeviceAuthenticator
from fleetward.api.device_lane import DeviceLane
from fleetward.api.limits import BodyLimit
from fleetward.authority.service import EnrollmentWork
from fleetward.bus import subjects
from fleetward.bus.base import Bus
from fleetward.compose import Services
from fleetward.config import Limits
from fleetward.errors import FleetwardError
from fleetward.hub.feed import TelemetryFeed
from fleetward.hub.routing import DeviceRouter
from fleetward.hub.server import Hub, server_tls_context
from fleetward.monitor.audit_service import run_schedules
from fleetward.monitor.service import Monitor
from fleetward.store.batching import Batcher
from fleetward.updates.check_now import RouterNudger
from fleetward.updates.deployments import run_ticks
from fleetward.wire.evidence import EnrollmentResponse

logger = logging.getLogger(__name__)

NONCE_PURGE_SECONDS = 600.0


async def _purge_nonces(services: Services) -> None:
    while True:
        await asyncio.sleep(NONCE_PURGE_SECONDS)
        try:
            purged = await asyncio.to_thread(services.authority.purge_expired_nonces)
        except FleetwardError as error:
            logger.warning("could not purge expired nonces: %s", error)
        else:
            logger.debug("purged %d expired nonces", purged)


def _announce_trust(services: Services, bus: Bus) -> Callable[[], None]:
    """Publish ``trust`` on the bus whenever this process records a trust change, so that every hub (in
    any process, on any node) reads the trust feed at once; returns the function that stops it."""
    loop = asyncio.get_running_loop()

    def rung() -> None:  # any thread
        with contextlib.suppress(RuntimeError):  # the loop is closing: the hubs' polls still see it
            loop.call_soon_threadsafe(bus.publish, subjects.TRUST, b"")

    return services.trust_bell.listen(rung)


async def _start_hub(services: Services, feed: TelemetryFeed, monitor: Monitor) -> Hub | None:
    """The hub, if it has a port and TLS to serve with (it only speaks mutual TLS)."""
    settings = services.settings
    if not settings.hub_port:
        return None
    if settings.tls_certificate is None or settings.tls_private_key is None:
        logger.warning("the hub is off: it needs a TLS certificate and key (fleetward init makes them)")
        return None
    context = server_tls_context(str(settings.tls_certificate), str(settings.tls_private_key))
    hub = Hub(
        services.hub_store,
        services.database,
        services.clock,
        settings.limits,
        context,
        services.trust_bell,
        services.reports,
        bus=services.bus,
        feed=feed,
        observer=monitor,
    )
    await hub.start(settings.host, settings.hub_port)
    logger.info("hub listening for devices on %s:%d (MQTT over mutual TLS)", settings.host, hub.port)
    return hub


def create_app(services: Services | None, *, limits: Limits | None = None) -> FastAPI:
    """The API for ``services``; the enrollment batcher runs while the app does.

    Without services the app only describes itself (``fleetward openapi``).
    """
    limits = services.settings.limits if services is not None else (limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is None:
            yield
            return
        batcher: Batcher[EnrollmentWork, EnrollmentResponse] = Batcher(
            services.authority.process_enrollments,
            name="enrollments",
            max_batch=limits.enrollment_batch_max,
            max_pending=limits.enrollment_queue_max,
        )
        bus = services.bus
        try:
            await bus.start()
        except FleetwardError as error:
            logger.error("fleetward cannot start: %s", error)
            raise
        # in one process the trust bell wakes its hub directly; other processes hear it on a shared bus
        stop_announcing = _announce_trust(services, bus) if bus.shared else lambda: None
        try:
            monitor = Monitor(
                services.database,
                services.clock,
                limits,
                services.health,
                services.playbooks,
                services.keystore,
                services.trust_bell,
            )
            async with batcher, monitor:
                app.state.enrollments = batcher
                app.state.monitor = monitor
                app.state.feed = TelemetryFeed(limits.telemetry_stream_buffer, bus)
                app.state.router = DeviceRouter(bus, limits)
                app.state.hub = await _start_hub(services, app.state.feed, monitor)
                purger = asyncio.create_task(_purge_nonces(services))
                audits = asyncio.create_task(run_schedules(services.audits, services.clock))
                app.state.nudger = RouterNudger(app.state.router, limits.check_now_timeout_seconds)
                rollouts = asyncio.create_task(
                    run_ticks(
                        services.deployments,
                        app.state.nudger,
                        limits.rollout_tick_milliseconds / 1000,
                        limits.rollout_judge_interval_milliseconds / 1000,
                    )
                )
                try:
                    yield
                finally:
                    for task in (purger, rollouts, audits):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    if app.state.hub is not None:
                        await app.state.hub.stop()
        finally:
            stop_announcing()
            await bus.close()

    app = FastAPI(
        title="fleetward",
        version=fleetward.__version__,
        summary="Secures fleets of connected devices: identity, attestation, 24-hour certificates.",
        lifespan=lifespan,
        # fleetward exports no OpenTelemetry; checking for it on every request costs CPU on the hot path.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.services = services
    if services is not None:
        app.state.device_authenticator = DeviceAuthenticator(services.database, services.clock, limits)

    def limit_for(path: str) -> int:
        if path.endswith(("/devices/claim", "/reference-values")):
            return limits.max_bulk_request_bytes
        if path.endswith("/images"):  # a package, base64 in JSON
            return limits.max_image_bytes * 4 // 3 + limits.max_request_bytes
        return limits.max_request_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    errors.install(app)
    app.include_router(routes_attestation.router)
    app.include_router(routes_registry.router)
    app.include_router(routes_authority.router)
    app.include_router(routes_hub.router)
    app.include_router(routes_reports.router)
    app.include_router(routes_updates.router)
    app.include_router(routes_deployments.device_router)
    app.include_router(routes_deployments.router)
    app.include_router(routes_monitor.router)
    app.include_router(routes_audits.router)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": fleetward.__version__}

    return app


def create_asgi(services: Services) -> DeviceLane:
    """What a server runs: the API behind the device lane (``device_lane.py``)."""
    return DeviceLane(create_app(services), services.settings.limits.max_request_bytes)
