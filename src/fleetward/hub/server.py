"""The hub's shell: MQTT over mutual TLS on asyncio, obeying the pure cores (codec, topics, session, twin).

One :class:`DeviceConnection` per TCP connection. It reads packets as they complete, checks each against
the topic policy, and hands the work to the store: telemetry through a group-committing batcher (a QoS 1
PUBLISH is acknowledged once its batch is committed), twins and cloud-to-device messages through worker
threads. The :class:`Hub` holds the connections by device, ends them when trust ends (it follows the
store's trust-change feed, and is woken by the bell of its own process and by ``trust`` on the bus), and
does for a connected device what the API asks through the bus (``routing.py``): direct methods,
desired-property patches, cloud-to-device messages. Several hubs (processes, nodes) can share one port
and one store when the bus is shared (NATS): each listens with ``SO_REUSEPORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import ssl
from collections import deque
from types import TracebackType
from typing import Any, cast

from cryptography import x509

from fleetward.bus import subjects
from fleetward.bus.base import Bus
from fleetward.bus.local import LocalBus
from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import (
    AccessRefused,
    DeviceTimeout,
    FleetwardError,
    InvalidInput,
    NotFound,
    ProtocolViolation,
    SecurityRefusal,
    TransportError,
)
from fleetward.hub import codec, routing, topics
from fleetward.hub import twin as twin_core
from fleetward.hub.feed import TelemetryFeed
from fleetward.hub.meter import DeviceCounters, Meter, Observer
from fleetward.hub.routing import DeviceRoutes, MethodResult, SessionTaken
from fleetward.hub.session import (
    Backlog,
    ConnectRefused,
    OutboundWindow,
    PeerIdentity,
    SessionKey,
    TokenBucket,
    check_session,
    identify,
)
from fleetward.hub.store import CloudToDeviceMessage, HubStore, TelemetryMessage
from fleetward.hub.twin import JsonObject
from fleetward.monitor import reports as monitor_reports
from fleetward.monitor.reports import ReportStore
from fleetward.store import events as event_log
from fleetward.store.batching import Batcher
from fleetward.store.database import Database
from fleetward.store.events import Event, EventBudget, Severity
from fleetward.store.trust import TrustBell, TrustKind

logger = logging.getLogger(__name__)


class SecurityEvents:
    """Refusals and other security events, written in batches, and bounded per device per minute."""

    def __init__(self, database: Database, clock: Clock, per_minute: int) -> None:
        self._db = database
        self._clock = clock
        self._pending: list[Event] = []
        self._budget = EventBudget(per_minute)
        self._overflow = 0

    @property
    def suppressed(self) -> int:
        return self._budget.suppressed + self._overflow

    def record(self, event: Event) -> None:
        if not self._budget.allow(event.device_id or event.detail[:64], self._clock.now()):
            return
        if len(self._pending) >= 10_000:
            self._overflow += 1
            return
        self._pending.append(event)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._write, batch)
        except FleetwardError as error:
            logger.warning("could not record %d hub events: %s", len(batch), error)

    def _write(self, batch: list[Event]) -> None:
        with self._db.write() as connection:
            event_log.record(connection, batch)


class TrustAnchors:
    """The tenants' CAs: loaded into the TLS context as they appear, and kept for binding a certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self.issuing: dict[str, x509.Certificate] = {}
        #: set when a certificate chained to no CA loaded yet: look again at once
        self.stale = False

    def update(self, anchors: dict[str, tuple[bytes, bytes]]) -> None:
        self.stale = False
        for tenant_id, (root, issuing) in anchors.items():
            if tenant_id in self.issuing:
                continue
            self._context.load_verify_locations(cadata=root + issuing)
            self.issuing[tenant_id] = x509.load_der_x509_certificate(issuing)


def server_tls_context(certificate_file: str, private_key_file: str) -> ssl.SSLContext:
    """TLS 1.2 or newer, a client certificate required; trust anchors are added per tenant."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate_file, private_key_file)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class Hub:
    """The MQTT server for devices, and the API's way to reach them."""

    def __init__(
        self,
        store: HubStore,
        database: Database,
        clock: Clock,
        limits: Limits,
        tls: ssl.SSLContext,
        trust_bell: TrustBell,
        reports: ReportStore | None = None,
        *,
        bus: Bus | None = None,
        feed: TelemetryFeed | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self.reports = reports or ReportStore(database, clock)
        self.clock = clock
        self.limits = limits
        self.tls = tls
        self.handshakes = 0
        self.anchors = TrustAnchors(tls)
        self.events = SecurityEvents(database, clock, limits.hub_security_events_per_minute)
        self.bus: Bus = bus or LocalBus()
        self.feed = feed or TelemetryFeed(limits.telemetry_stream_buffer, self.bus)
        self.routes = DeviceRoutes(self, self.bus, limits)
        #: what the monitor is told of each device, once per sampling interval (nothing without a monitor)
        self.observer = observer
        self.meter = Meter(limits.hub_max_connections * 2) if observer is not None else None
        #: the live sessions: a device's own, and each of its modules' (each one independent)
        self.connections: dict[SessionKey, DeviceConnection] = {}
        #: device id → the keys of its modules' live sessions (trust ends all of a device's sessions)
        self.module_sessions: dict[str, set[SessionKey]] = {}
        self.saved_sessions: dict[SessionKey, frozenset[topics.Subscription]] = {}
        self.telemetry: Batcher[TelemetryMessage, TelemetryMessage] = Batcher(
            store.append_telemetry,
            name="telemetry",
            max_batch=limits.telemetry_batch_max,
            max_pending=limits.telemetry_queue_max,
        )
        #: direct methods awaiting their answer: the session asked, and the caller's future
        self._methods: dict[str, tuple[SessionKey, asyncio.Future[MethodResult]]] = {}
        self._request_ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._trust_seq = 0
        loop = asyncio.get_running_loop()

        def rung() -> None:  # any thread
            loop.call_soon_threadsafe(self.wake)

        self._stop_listening = trust_bell.listen(rung)
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self.anchors.update(await asyncio.to_thread(self.store.trust_anchors))
        self._trust_seq = await asyncio.to_thread(self.store.latest_trust_change)
        await self.telemetry.__aenter__()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: DeviceConnection(self),
            host,
            port,
            backlog=4096,
            # Hubs that share a bus share the port too (the processes of ``serve --workers N``); alone, a
            # second server on the same port fails to start instead of silently taking half the devices.
            reuse_port=self.bus.shared,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks = [
            asyncio.create_task(self._follow_trust(), name="hub-trust"),
            asyncio.create_task(self.routes.serve(), name="hub-routes"),
            asyncio.create_task(self._flush_events(), name="hub-events"),
        ]
        if self.observer is not None:
            self._tasks.append(asyncio.create_task(self._sample(), name="hub-meter"))
        if self.bus.shared:  # in one process the trust bell wakes this hub already
            self._tasks.append(asyncio.create_task(self._hear_trust(), name="hub-trust-bus"))

    async def stop(self) -> None:
        self._stop_listening()  # the bell outlives this hub and its event loop
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections.values()):
            connection.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.routes.close()
        await self.telemetry.__aexit__(None, None, None)
        await self.events.flush()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Hub:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ trust

    async def _follow_trust(self) -> None:
        """End the sessions trust no longer covers, within the poll interval (sooner when rung)."""
        interval = self.limits.hub_trust_poll_milliseconds / 1000
        rounds = 0
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                woken = await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                changes = await asyncio.to_thread(self.store.trust_changes_since, self._trust_seq)
                rounds += 1
                if woken or self.anchors.stale or rounds % 20 == 0:  # a tenant's CA may have appeared
                    self.anchors.update(await asyncio.to_thread(self.store.trust_anchors))
            except FleetwardError as error:
                logger.warning("could not read trust changes: %s", error)
                continue
            for change in changes:
                self._trust_seq = max(self._trust_seq, change.seq)
                for connection in self.sessions_of(change.device_id):
                    if connection.identity is None:
                        continue
                    if change.kind is TrustKind.RELEASED:
                        connection.mode = topics.AccessMode.FULL
                    elif (
                        change.kind is TrustKind.CERTIFICATE_REVOKED
                        and change.serial != connection.identity.serial
                    ):
                        continue
                    else:
                        connection.end(f"trust ended: {change.kind.value}", code=change.kind.value)

    def sessions_of(self, device_id: str) -> list[DeviceConnection]:
        """Every live session of the device: its own and its modules'."""
        found = [self.connections[key] for key in self.module_sessions.get(device_id, ())]
        own = self.connections.get(SessionKey(device_id))
        return found if own is None else [own, *found]

    def register(self, key: SessionKey, connection: DeviceConnection) -> None:
        self.connections[key] = connection
        if key.module_id is not None:
            self.module_sessions.setdefault(key.device_id, set()).add(key)

    def unregister(self, key: SessionKey) -> None:
        del self.connections[key]
        if key.module_id is not None:
            modules = self.module_sessions.get(key.device_id)
            if modules is not None:
                modules.discard(key)
                if not modules:
                    del self.module_sessions[key.device_id]

    def wake(self) -> None:
        """Look at the trust feed (and the tenants' CAs) now rather than at the next poll."""
        self._wake.set()

    async def _hear_trust(self) -> None:
        """``trust`` on the bus: another process recorded a trust change (or its tenant's CA may be new)."""
        async with self.bus.subscribe(subjects.TRUST, max_pending=16) as heard:
            async for _message in heard:
                self.wake()

    async def _sample(self) -> None:
        """Hand the monitor what each device did in the last interval."""
        assert self.meter is not None
        assert self.observer is not None
        interval = self.limits.monitor_sample_milliseconds / 1000
        while True:
            await asyncio.sleep(interval)
            samples = self.meter.collect(self.clock.now().timestamp(), interval)
            if samples:
                self.observer.observe_samples(samples)

    def counters(self, identity: PeerIdentity) -> DeviceCounters | None:
        """The meter's counters of the device, if the hub has a monitor to tell."""
        return None if self.meter is None else self.meter.counters(identity.tenant_id, identity.device_id)

    async def _flush_events(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.events.flush()

    def security_event(self, code: str, detail: str, identity: PeerIdentity | None, peer: str) -> None:
        self.events.record(
            Event(
                at=self.clock.now(),
                kind="hub",
                code=code,
                detail=f"{detail} (from {peer})",
                severity=Severity.WARNING,
                tenant_id=identity.tenant_id if identity else None,
                device_id=identity.device_id if identity else None,
            )
        )

    # ------------------------------------------------------------------ what the API asks of devices

    def _live(self, tenant_id: str, key: SessionKey) -> DeviceConnection | None:
        """The session ``key`` of the tenant, if it is connected and past its CONNACK."""
        connection = self.connections.get(key)
        if (
            connection is None
            or not connection.ready
            or connection.identity is None
            or connection.identity.tenant_id != tenant_id
        ):
            return None
        return connection

    def _connected(self, tenant_id: str, key: SessionKey) -> DeviceConnection:
        connection = self._live(tenant_id, key)
        if connection is None:
            raise NotFound("the device is not connected", code="device_offline")
        return connection

    def is_connected(self, tenant_id: str, key: SessionKey) -> bool:
        try:
            self._connected(tenant_id, key)
        except NotFound:
            return False
        return True

    async def invoke_method(
        self, tenant_id: str, key: SessionKey, name: str, payload: bytes, timeout_seconds: float
    ) -> MethodResult:
        """Call a direct method and wait for the session's answer, at most ``timeout_seconds``."""
        connection = self._connected(tenant_id, key)
        if topics.Subscription.METHODS not in connection.subscriptions:
            raise NotFound("the device does not listen for direct methods", code="device_offline")
        request_id = f"{next(self._request_ids):x}"
        future: asyncio.Future[MethodResult] = asyncio.get_running_loop().create_future()
        self._methods[request_id] = (key, future)
        try:
            connection.send(codec.Publish(topics.method_request_topic(name, request_id), payload))
            return await asyncio.wait_for(future, timeout_seconds)
        except TimeoutError:
            raise DeviceTimeout(
                f"the device did not answer {name} within {timeout_seconds:g} s", code="method_timeout"
            ) from None
        finally:
            self._methods.pop(request_id, None)

    def method_answered(self, answering: SessionKey, request_id: str, result: MethodResult) -> bool:
        """Hand ``result`` to the caller if ``answering`` is the session the method was sent to; an answer
        from any other session (a guessed request id) is ignored, and False says so."""
        pending = self._methods.get(request_id)
        if pending is None or pending[0] != answering:
            return False
        if not pending[1].done():
            pending[1].set_result(result)
        return True

    def desired_changed(self, tenant_id: str, key: SessionKey, version: int, patch: JsonObject) -> bool:
        """Push a desired-property patch to the session if it is connected and listening; True if sent."""
        connection = self._live(tenant_id, key)
        if connection is None or topics.Subscription.TWIN_DESIRED not in connection.subscriptions:
            return False
        body = json.dumps({**patch, "$version": version}).encode()
        connection.send(codec.Publish(topics.desired_patch_topic(version), body))
        return True

    def cloud_to_device_queued(self, tenant_id: str, device_id: str) -> None:
        connection = self.connections.get(SessionKey(device_id))
        if (
            connection is not None
            and connection.identity is not None
            and connection.identity.tenant_id == tenant_id
        ):
            connection.deliver_pending()


_PING_RESPONSE = codec.encode(codec.PingResp())
_UNKNOWN_ISSUER = 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY


class DeviceConnection(asyncio.Protocol):
    """One device's MQTT connection."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        limits = hub.limits
        self.reader = codec.PacketReader(limits.mqtt_max_packet_bytes)
        self.identity: PeerIdentity | None = None
        #: the session this connection is (known once its CONNECT is checked)
        self.key: SessionKey | None = None
        #: when the hub accepted its CONNECT (ns since the epoch): the newer of two connections stays
        self.accepted_ns = 0
        self.mode = topics.AccessMode.FULL
        self.subscriptions: set[topics.Subscription] = set()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._connected = False
        self._plaintext: list[bytes] = []
        self._telemetry_topics: dict[tuple[str, topics.AccessMode], topics.DevicePublish] = {}
        self._handshaking = False
        self._clean_session = True
        self._closing = False
        self._backlog: list[codec.Packet] = []
        self._keep_alive = float(limits.hub_max_keep_alive_seconds)
        self._last_seen = 0.0
        self._partial_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._messages = TokenBucket(limits.hub_messages_per_second, limits.hub_message_burst)
        self._bytes = TokenBucket(limits.hub_bytes_per_second, limits.hub_bytes_per_second * 2)
        self._throttled = False
        #: packets read but not yet handled: while throttled they wait here, and reading is paused
        self._held: deque[codec.Packet] = deque()
        self._inbound = 0
        self._reading_paused = False
        self._window: OutboundWindow[str] = OutboundWindow(limits.hub_inflight_outbound)
        self._outbox: Backlog[CloudToDeviceMessage] = Backlog(limits.cloud_to_device_max_pending)
        self._queued_ids: set[str] = set()
        self._writable = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bookkeeping: set[asyncio.Task[Any]] = set()
        #: the device's counters for the monitor (None: no monitor, or not identified yet)
        self.counted: DeviceCounters | None = None

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        if len(self.hub.connections) + self.hub.handshakes >= self.hub.limits.hub_max_connections:
            self.hub.security_event("hub_full", "the hub holds its maximum of connections", None, self.peer)
            self._closing = True
            transport.abort()
            return
        # TLS runs here, over memory buffers, rather than in the listener: a refused certificate is then
        # seen, answered with its alert and recorded, and a slow handshake is timed out like a slow CONNECT.
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = self.hub.tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaking = True
        self.hub.handshakes += 1
        self._timer = loop.call_later(self.hub.limits.hub_connect_timeout_seconds, self._check_timeouts)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._incoming.write(data)
        if self._handshaking and not self._continue_handshake():
            return
        chunks: list[bytes] = []
        peer_closed = False
        try:
            while True:
                chunk = self._tls.read(65536)
                if not chunk:  # an SSLObject reads the peer's close_notify as b"", not as an exception
                    peer_closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.close()
            return
        except ssl.SSLError as error:
            self._refuse(ProtocolViolation(f"TLS failed ({error.reason})", code="tls_failed"))
            return
        self._flush()
        if chunks:
            self._plaintext_received(b"".join(chunks))
        if peer_closed:
            self.close()

    def _continue_handshake(self) -> bool:
        """Advance the TLS handshake; True once it is complete and the peer identified."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLCertVerificationError as error:
            self._flush()  # the alert tells the device why
            if error.verify_code == _UNKNOWN_ISSUER:  # perhaps a tenant created since the last look
                self.hub.anchors.stale = True
                self.hub.wake()
            self._refuse(
                AccessRefused(
                    f"TLS refused the certificate: {error.verify_message}", code="certificate_refused"
                )
            )
            return False
        except ssl.SSLError as error:
            self._flush()
            refused: SecurityRefusal = ProtocolViolation(
                f"the TLS handshake failed ({error.reason})", code="tls_failed"
            )
            if error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":  # CERT_REQUIRED fails here, not below
                refused = AccessRefused("a client certificate is required", code="certificate_missing")
            self._refuse(refused)
            return False
        self._handshaking = False
        self.hub.handshakes -= 1
        self._flush()
        certificate = self._tls.getpeercert(binary_form=True)
        if not certificate:
            self._refuse(AccessRefused("a client certificate is required", code="certificate_missing"))
            return False
        try:
            self.identity = identify(certificate, self.hub.anchors.issuing, self.hub.clock.now())
        except AccessRefused as refused:
            self._refuse(refused)
            return False
        self.counted = self.hub.counters(self.identity)
        if self.counted is not None:
            self.counted.live += 1
            self.counted.attempted(self.peer.rpartition(":")[0])
        return True

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending and self.transport is not None:
            self.transport.write(pending)

    def _plaintext_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._last_seen = now
        try:
            packets = self.reader.feed(data)
        except ProtocolViolation as violation:
            self._refuse(violation)
            return
        self._partial_since = (self._partial_since or now) if self.reader.buffered else None
        self._held.extend(packets)
        self._handle_held(now)

    def _handle_held(self, now: float) -> None:
        """Handle the packets read so far, in order; over the rate limit, the rest waits for the throttle
        to end (a flood in one read is slowed like one spread over many)."""
        while self._held and not self._closing and not self._throttled:
            try:
                self._handle(self._held.popleft(), now)
            except SecurityRefusal as refused:
                self._refuse(refused)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshaking:
            self._handshaking = False
            self.hub.handshakes -= 1
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        self._leave()
        if self.counted is not None:
            self.counted.live -= 1
            self.counted.ended()
            self.counted = None

    def _leave(self) -> None:
        """Unregister this connection; a persistent session keeps its subscriptions for the next one.

        Whichever way the connection ends (DISCONNECT, a refusal, a takeover, the network): ``close``
        unregisters before ``connection_lost`` runs, so both come here. The Azure IoT device SDK connects
        with ``clean_session=0`` and subscribes to nothing again after a reconnect: it relies on this.
        """
        key = self.key
        if key is not None and self.hub.connections.get(key) is self:
            self.hub.unregister(key)
            if self._clean_session:
                self.hub.saved_sessions.pop(key, None)
            else:
                self.hub.saved_sessions[key] = frozenset(self.subscriptions)
            self.hub.routes.release_if_idle(key)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self.deliver_pending()

    # ------------------------------------------------------------------ lifecycle

    def _check_timeouts(self) -> None:
        """Close a device that never sent CONNECT, stopped mid-packet, or missed its keep-alive."""
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        limits = self.hub.limits
        if self._handshaking:
            self._refuse(
                ProtocolViolation("the TLS handshake did not finish in time", code="handshake_timeout")
            )
            return
        if not self._connected:
            self._refuse(ProtocolViolation("no CONNECT in time", code="connect_timeout"))
            return
        if self._partial_since is not None and now - self._partial_since > limits.hub_packet_timeout_seconds:
            self._refuse(ProtocolViolation("a packet was left unfinished", code="packet_timeout"))
            return
        if now - self._last_seen > self._keep_alive * 1.5:
            self.end("keep-alive expired", code="keep_alive_timeout", security=False)
            return
        self._timer = loop.call_later(
            min(self._keep_alive, limits.hub_packet_timeout_seconds), self._check_timeouts
        )

    def _refuse(self, refused: SecurityRefusal) -> None:
        """Record a security refusal and close the connection."""
        self.hub.security_event(refused.code, refused.message, self.identity, self.peer)
        if self.counted is not None and isinstance(refused, AccessRefused) and refused.code != "quarantined":
            self.counted.refused()
        self.close()

    def end(self, reason: str, *, code: str, security: bool = True) -> None:
        if security:
            self.hub.security_event(code, reason, self.identity, self.peer)
        self.close()

    def close(self) -> None:
        if not self._closing and self.transport is not None:
            self._write_queued()  # what was sent before closing (a refusing CONNACK) goes out first
            self._closing = True
            self.transport.abort()
            self._leave()

    def send(self, packet: codec.Packet) -> None:
        data = codec.encode(packet)
        if self.counted is not None and isinstance(packet, codec.Publish):
            self.counted.sent(len(packet.payload))
        self._write(data)

    def _write(self, data: bytes) -> None:
        """Queue plaintext; everything queued in one turn of the loop goes out as one TLS write."""
        if self._closing or self.transport is None or self._handshaking:
            return
        self._plaintext.append(data)
        if len(self._plaintext) == 1:
            asyncio.get_running_loop().call_soon(self._write_queued)

    def _write_queued(self) -> None:
        if self._closing or not self._plaintext:
            self._plaintext.clear()
            return
        data = b"".join(self._plaintext)
        self._plaintext.clear()
        self._tls.write(data)
        self._flush()

    def _spawn(self, work: Any, *, cancel_on_close: bool = True) -> None:
        """Run ``work`` as a task, cancelled when the connection is lost unless ``cancel_on_close`` is False.

        The bookkeeping of cloud-to-device messages must outlive the connection: cancelled while still queued
        for a worker thread, a message acknowledged just before a disconnect would stay pending, and one sent
        just before a drop would be sent again without DUP.
        """
        task = asyncio.ensure_future(work)
        tasks = self._tasks if cancel_on_close else self._bookkeeping
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # ------------------------------------------------------------------ packets

    def _handle(self, packet: codec.Packet, now: float) -> None:
        if not self._connected:
            if isinstance(packet, codec.Connect):
                if self._backlog:
                    raise ProtocolViolation("a second CONNECT", code="protocol_violation")
                self._backlog.append(packet)
                self._pause_reading()
                self._spawn(self._accept(packet))
            elif self._backlog and len(self._backlog) < 16:
                self._backlog.append(packet)  # pipelined behind the CONNECT being checked
            else:
                raise ProtocolViolation("the first packet must be CONNECT", code="protocol_violation")
            return
        if isinstance(packet, codec.Publish):
            self._on_publish(packet, now)
        elif isinstance(packet, codec.PubAck):
            self._on_puback(packet.packet_id)
        elif isinstance(packet, codec.Subscribe):
            self._on_subscribe(packet)
        elif isinstance(packet, codec.Unsubscribe):
            for topic_filter in packet.topics:
                with contextlib.suppress(AccessRefused):
                    self.subscriptions.discard(
                        topics.classify_subscribe(self.identity_id, topic_filter, module_id=self.module_id)
                    )
            self.send(codec.UnsubAck(packet.packet_id))
        elif isinstance(packet, codec.PingReq):
            self._write(_PING_RESPONSE)
        elif isinstance(packet, codec.Disconnect):
            self.close()
        else:
            raise ProtocolViolation(
                f"a device may not send {type(packet).__name__}", code="protocol_violation"
            )

    @property
    def ready(self) -> bool:
        """Its CONNECT is accepted (CONNACK sent) and it is not closing."""
        return self._connected and not self._closing

    @property
    def identity_id(self) -> str:
        assert self.identity is not None
        return self.identity.device_id

    @property
    def module_id(self) -> str | None:
        return self.key.module_id if self.key is not None else None

    async def _accept(self, connect: codec.Connect) -> None:
        identity = self.identity
        assert identity is not None
        try:
            self._keep_alive, key = check_session(
                connect, identity, self.hub.limits.hub_max_keep_alive_seconds
            )
            self.mode = await asyncio.to_thread(
                self.hub.store.access_of, identity.tenant_id, identity.device_id, identity.serial
            )
        except ConnectRefused as refused:
            self.send(codec.ConnAck(refused.return_code))
            self._refuse(refused)
            return
        except AccessRefused as refused:
            self.send(codec.ConnAck(codec.ConnectReturnCode.NOT_AUTHORIZED))
            self._refuse(refused)
            return
        except TransportError:
            self.send(codec.ConnAck(codec.ConnectReturnCode.SERVER_UNAVAILABLE))
            self.close()
            return
        if self._closing:
            return
        hub = self.hub
        try:  # the ids are known tenants' and hex (``identify``): this never refuses, but it may not widen
            subjects.device(identity.tenant_id, *key)
        except ValueError as error:
            self.send(codec.ConnAck(codec.ConnectReturnCode.NOT_AUTHORIZED))
            self._refuse(AccessRefused(f"the identity is not routable: {error}", code="certificate_unknown"))
            return
        accepted_ns = routing.now_ns()
        handed: frozenset[topics.Subscription] | None = None
        if not hub.routes.holds(key):
            # Another hub may hold the session (live, or saved): it ends it and hands it over.
            try:
                names = await hub.routes.take_over(identity.tenant_id, key, accepted_ns)
            except SessionTaken as taken:
                self.end(taken.message, code=taken.code)
                return
            handed = routing.session_of(names) if names is not None else None
            if self._closing:
                return
        previous = hub.connections.get(key)
        if previous is not None and previous is not self:
            previous.end(
                f"a newer connection of the same session took over: {self.peer}", code="session_taken_over"
            )
        self.key = key
        hub.register(key, self)
        self.accepted_ns = accepted_ns
        self._clean_session = connect.clean_session
        saved = hub.saved_sessions.get(key, handed)
        session_present = not connect.clean_session and saved is not None
        if session_present and saved is not None:
            self.subscriptions = {item for item in saved if self._allowed(item)}
        hub.routes.hold(identity.tenant_id, key)
        hub.routes.announce(identity.tenant_id, key, accepted_ns)
        await hub.routes.settled()  # the API reaches the device through the bus from the CONNACK on
        if self._closing:
            return
        self._connected = True
        self.send(codec.ConnAck(codec.ConnectReturnCode.ACCEPTED, session_present))
        loop = asyncio.get_running_loop()
        if self._timer is not None:  # the CONNECT timer: from now on, the device's own keep-alive
            self._timer.cancel()
        self._timer = loop.call_later(
            min(self._keep_alive, self.hub.limits.hub_packet_timeout_seconds), self._check_timeouts
        )
        backlog, self._backlog = self._backlog[1:], []
        now = loop.time()
        try:
            for packet in backlog:
                self._handle(packet, now)
        except SecurityRefusal as refused:
            self._refuse(refused)
            return
        self._resume_reading()
        if topics.Subscription.CLOUD_TO_DEVICE in self.subscriptions:
            self.deliver_pending()

    def _allowed(self, subscription: topics.Subscription) -> bool:
        return self.mode is topics.AccessMode.FULL or subscription in (
            topics.Subscription.TWIN_RESPONSES,
            topics.Subscription.TWIN_DESIRED,
        )

    def _on_subscribe(self, packet: codec.Subscribe) -> None:
        codes: list[int] = []
        added: set[topics.Subscription] = set()
        for topic_filter, requested in packet.topics:
            try:
                subscription = topics.classify_subscribe(
                    self.identity_id, topic_filter, self.mode, self.module_id
                )
            except AccessRefused as refused:
                self.hub.security_event(refused.code, refused.message, self.identity, self.peer)
                # a quarantined device asking for its topics back is the narrowing at work, not an attack
                if self.counted is not None and refused.code != "quarantined":
                    self.counted.refused()
                codes.append(codec.SUBACK_FAILURE)
                continue
            added.add(subscription)
            codes.append(min(requested, 1))
        self.subscriptions |= added
        self.send(codec.SubAck(packet.packet_id, tuple(codes)))
        if topics.Subscription.CLOUD_TO_DEVICE in added:
            self.deliver_pending()

    def _on_publish(self, packet: codec.Publish, now: float) -> None:
        if packet.qos == 2:
            raise ProtocolViolation("QoS 2 is not supported (as in IoT Hub)", code="qos_unsupported")
        self._limit_rate(len(packet.payload), now)
        if self.counted is not None:
            self.counted.received(len(packet.payload))
        identity = self.identity
        assert identity is not None
        decided = self._telemetry_topics.get((packet.topic, self.mode))
        if decided is None:
            # As IoT Hub does, a publish outside the device's topics ends its connection (AccessRefused).
            decided = topics.classify_publish(identity.device_id, packet.topic, self.mode, self.module_id)
            if isinstance(decided, topics.Telemetry):  # a device repeats its telemetry topics: remember a few
                if len(self._telemetry_topics) >= 16:
                    self._telemetry_topics.clear()
                self._telemetry_topics[(packet.topic, self.mode)] = decided
        if isinstance(decided, topics.Telemetry) and decided.report_kind is not None:
            self._spawn(self._store_report(decided.report_kind, packet.payload, packet.packet_id))
            return
        if isinstance(decided, topics.Telemetry):
            message = TelemetryMessage(
                identity.tenant_id,
                identity.device_id,
                self.hub.clock.now(),
                decided.properties,
                packet.payload,
                module_id=self.module_id,
            )
            self._inbound += 1
            if self._inbound >= self.hub.limits.hub_inflight_inbound:
                self._pause_reading()
            packet_id = packet.packet_id if packet.qos else None
            queued = self.hub.telemetry.offer(message)
            if queued is None:  # the batcher is full: wait for room (and read no more meanwhile)
                self._pause_reading()
                self._spawn(self._store_telemetry(message, packet_id))
            else:  # the hot path: no task per message, a callback once the batch is committed
                queued.add_done_callback(functools.partial(self._telemetry_committed, packet_id))
        elif isinstance(decided, topics.TwinGet):
            self._spawn(self._twin_get(decided.request_id))
        elif isinstance(decided, topics.TwinReported):
            self._spawn(self._twin_reported(decided.request_id, packet.payload))
        else:
            if len(packet.payload) > self.hub.limits.method_max_payload_bytes:
                raise ProtocolViolation(
                    "a method response is over its size bound", code="method_payload_too_large"
                )
            assert self.key is not None
            answer = MethodResult(decided.status, packet.payload)
            if not self.hub.method_answered(self.key, decided.request_id, answer):
                logger.info("%s answered a method it was not asked (or answered too late)", self.peer)
        if packet.qos and not isinstance(decided, topics.Telemetry):
            self.send(codec.PubAck(packet.packet_id or 0))

    def _limit_rate(self, size: int, now: float) -> None:
        wait = max(self._messages.spend(1, now), self._bytes.spend(size, now))
        if not wait:
            return
        if not self._throttled:
            self._throttled = True
            self.hub.security_event(
                "rate_limited", "the device publishes faster than its rate limit", self.identity, self.peer
            )
        if wait > 30:  # a flood far past the limit: the device is not slowing down
            raise ProtocolViolation("the device keeps publishing far over its rate limit", code="flood")
        self._pause_reading()
        asyncio.get_running_loop().call_later(wait, self._end_throttle)

    def _end_throttle(self) -> None:
        self._throttled = False
        self._handle_held(asyncio.get_running_loop().time())
        self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if (
            self._reading_paused
            and self.transport is not None
            and not self._closing
            and not self._throttled
            and self._inbound < self.hub.limits.hub_inflight_inbound
            and self._connected
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    async def _store_telemetry(self, message: TelemetryMessage, packet_id: int | None) -> None:
        future: asyncio.Future[TelemetryMessage] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(await self.hub.telemetry.submit(message))
        except FleetwardError as error:
            future.set_exception(error)
        self._telemetry_committed(packet_id, future)

    def _telemetry_committed(self, packet_id: int | None, future: asyncio.Future[TelemetryMessage]) -> None:
        """Acknowledge a telemetry message once its batch is committed; never before."""
        self._inbound -= 1
        if future.cancelled():
            self.close()
            return
        error = future.exception()
        if error is not None:
            # Not committed, not acknowledged: the device sends it again on its next connection.
            logger.warning("telemetry of %s not stored: %s", self.peer, error)
            self.close()
            return
        if packet_id is not None:
            self.send(codec.PubAck(packet_id))
        self.hub.feed.publish((future.result(),))
        self._resume_reading()

    async def _store_report(self, kind: str, body: bytes, packet_id: int | None) -> None:
        """An agent's own report (a crash, a baseline): kept for the monitor, acknowledged once committed.

        A malformed report is recorded as a security event and acknowledged all the same: it can never
        become valid, and the device's store-and-forward queue must not send it forever.
        """
        identity = self.identity
        assert identity is not None
        try:
            parsed = monitor_reports.parse_report(kind, body)
            await asyncio.to_thread(self.hub.reports.record, identity.tenant_id, identity.device_id, parsed)
            if self.hub.observer is not None:
                self.hub.observer.observe_report(identity.tenant_id, identity.device_id, parsed)
        except InvalidInput as refused:  # PayloadTooLarge too
            self.hub.security_event(refused.code, refused.message, identity, self.peer)
        except FleetwardError as error:  # not committed, not acknowledged: the device sends it again
            logger.warning("report of %s not stored: %s", self.peer, error)
            self.close()
            return
        if packet_id:
            self.send(codec.PubAck(packet_id))

    async def _twin_get(self, request_id: str) -> None:
        identity = self.identity
        assert identity is not None
        try:
            twin = await asyncio.to_thread(
                self.hub.store.twin, identity.tenant_id, identity.device_id, module_id=self.module_id
            )
        except FleetwardError as error:
            self._twin_answer(request_id, 500, {"message": error.message})
            return
        self._twin_answer(request_id, 200, twin.document())

    async def _twin_reported(self, request_id: str, body: bytes) -> None:
        identity = self.identity
        assert identity is not None
        limits = self.hub.limits
        try:
            patch = twin_core.parse_patch(body, limits.twin_max_bytes)
            half = await asyncio.to_thread(
                functools.partial(
                    self.hub.store.patch_twin,
                    identity.tenant_id,
                    identity.device_id,
                    patch,
                    desired=False,
                    module_id=self.module_id,
                )
            )
        except InvalidInput as refused:
            status = 413 if refused.code == "twin_too_large" or "too_large" in refused.code else 400
            self.hub.security_event(refused.code, refused.message, identity, self.peer)
            self._twin_answer(request_id, status, {"message": refused.message})
            return
        except FleetwardError as error:
            self._twin_answer(request_id, 500, {"message": error.message})
            return
        self.send(codec.Publish(topics.twin_response_topic(204, request_id, half.version), b""))

    def _twin_answer(self, request_id: str, status: int, body: JsonObject) -> None:
        self.send(codec.Publish(topics.twin_response_topic(status, request_id), json.dumps(body).encode()))

    # ------------------------------------------------------------------ cloud-to-device

    def deliver_pending(self) -> None:
        """Fetch the device's pending messages and send what its window allows."""
        if (
            self._connected
            and topics.Subscription.CLOUD_TO_DEVICE in self.subscriptions
            and self.mode is topics.AccessMode.FULL
        ):
            self._spawn(self._fetch_pending())

    async def _fetch_pending(self) -> None:
        identity = self.identity
        assert identity is not None
        try:
            pending = await asyncio.to_thread(
                self.hub.store.pending_messages, identity.tenant_id, identity.device_id
            )
        except FleetwardError as error:
            logger.warning("could not read cloud-to-device messages: %s", error)
            return
        in_flight = set(self._window.unacknowledged())
        for message in pending:
            if (
                message.id not in in_flight
                and message.id not in self._queued_ids
                and self._outbox.push(message)
            ):
                self._queued_ids.add(message.id)
        self._send_queued()

    def _send_queued(self) -> None:
        sent: list[str] = []
        while self._writable and not self._window.full:
            message = self._outbox.pop()
            if message is None:
                break
            self._queued_ids.discard(message.id)
            packet_id = self._window.take(message.id)
            self.send(
                codec.Publish(
                    topics.cloud_to_device_topic(message.device_id, message.id, message.properties),
                    message.body,
                    qos=1,
                    dup=message.delivery_count > 0,
                    packet_id=packet_id,
                )
            )
            sent.append(message.id)
        if sent:
            self._spawn(asyncio.to_thread(self.hub.store.mark_delivered, sent), cancel_on_close=False)

    def _on_puback(self, packet_id: int) -> None:
        message_id = self._window.acknowledge(packet_id)
        self._spawn(asyncio.to_thread(self.hub.store.complete, message_id), cancel_on_close=False)
        self._send_queued()
