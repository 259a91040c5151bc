"""The agent's connection to the hub: kept up, drained of telemetry, and routing what comes down it.

:class:`HubLink` holds one MQTT connection over mutual TLS (client id = device id, user name in the IoT
Hub form), and keeps it:

- **connecting**: the TLS context comes from :class:`Credentials` at every attempt, so a renewed
  certificate is used on the next connection; :meth:`HubLink.reconnect` makes that connection now.
  Failed attempts wait with exponential backoff and full jitter (:func:`~fleetward.agent.backoff.full_jitter`:
  a delay drawn between 0 and ``min(cap, initial * 2**attempt)``); the attempt count starts again only
  after a connection that lasted ``stable_after_seconds``, so a connection that keeps being dropped at
  once keeps backing off.
- **sending**: telemetry is drained from the :class:`~fleetward.agent.outbox.Outbox` in order, at QoS 1,
  at most ``inflight_window`` unacknowledged at once; a message leaves the outbox only when its PUBACK
  came. When the connection ends, what is in flight is sent again on the next one (at least once).
- **receiving**: direct methods go to the handler registered for their name (:meth:`HubLink.on_method`;
  a method nobody handles is answered 404, as IoT Hub does), desired-property patches to
  :meth:`HubLink.on_desired` (after each connect, the whole desired document first, if it changed),
  cloud-to-device messages to :meth:`HubLink.on_message` (subscribed only once a handler exists, so
  messages wait on the hub until then; each is acknowledged, which completes it, after its handler ran).
- **twin**: :meth:`HubLink.get_twin` and :meth:`HubLink.patch_reported`, with timeouts.
- **quarantine**: a hub that refuses the methods subscription has quarantined the device; telemetry then
  stays in the outbox (the hub would end the connection for it) and the subscription is tried again every
  ``quarantine_retry_seconds``.

Nothing here grows without bound: the window, the method slots, the twin requests and the handler queues
have sizes; desired patches that overflow their queue are replaced by a fresh read of the twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fleetward.agent import dialect
from fleetward.agent.backoff import Uniform, full_jitter
from fleetward.agent.dialect import CloudMessage, DesiredPatch, Json, JsonObject, MethodCall, TwinResponse
from fleetward.agent.mqtt import MqttClient
from fleetward.agent.outbox import Outbox
from fleetward.errors import (
    FleetwardError,
    InvalidInput,
    PayloadTooLarge,
    ProtocolViolation,
    ServerError,
    TransportError,
)
from fleetward.hub import codec
from fleetward.wire.identity import check_module_id

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class Credentials(Protocol):
    """Where the TLS client identity comes from; asked again at every connection attempt."""

    def tls_context(self) -> ssl.SSLContext: ...


@dataclass(frozen=True)
class CertificateFiles:
    """The default: the operational certificate and key files, and the CA that signed the hub's."""

    ca_file: Path
    certificate_file: Path
    key_file: Path

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.certificate_file), str(self.key_file))
        return context


@dataclass(frozen=True)
class LinkSettings:
    device_id: str
    host: str
    port: int = 8883
    #: the host part of the user name (the hub's name); the host by default
    hub_name: str | None = None
    #: connect as this module of the device (``{device}/{module}``), so that an application may hold the
    #: device identity itself; None: as the device
    module_id: str | None = None
    keep_alive_seconds: int = 60
    connect_timeout_seconds: float = 10.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 120.0
    #: a connection that lasted this long resets the backoff
    stable_after_seconds: float = 30.0
    #: telemetry sent and not yet acknowledged (the hub reads 64 before it stops)
    inflight_window: int = 32
    #: a full window that sees no PUBACK for this long ends the connection
    puback_timeout_seconds: float = 30.0
    request_timeout_seconds: float = 10.0
    max_pending_requests: int = 16
    max_concurrent_methods: int = 4
    method_handler_timeout_seconds: float = 300.0
    #: a method answer, at most (the hub ends the connection for a larger one)
    method_max_payload_bytes: int = 128 * 1024
    #: desired patches and cloud-to-device messages waiting for their handler
    handler_queue_size: int = 64
    max_packet_bytes: int = 512 * 1024
    quarantine_retry_seconds: float = 60.0
    #: how long closing waits for the connection to end gracefully
    close_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, str) or not self.device_id:
            raise ValueError("a device id is required")
        if self.module_id is not None:
            check_module_id(self.module_id)
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{item.name} must be positive, got {value}")
        if not 1 <= self.keep_alive_seconds <= 65535:
            raise ValueError("keep_alive_seconds is 1 to 65,535")
        if self.inflight_window > 65535:
            raise ValueError("inflight_window is at most 65,535")

    @property
    def username(self) -> str:
        return dialect.username(self.hub_name or self.host, self.device_id, self.module_id)

    @property
    def client_id(self) -> str:
        return dialect.client_id(self.device_id, self.module_id)


@dataclass(frozen=True)
class MethodResult:
    """What a method handler answers: a status (0 to 999) and a payload (JSON by convention)."""

    status: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.status, int) or isinstance(self.status, bool):
            raise TypeError("a method status is an int")
        if not 0 <= self.status <= 999:
            raise ValueError("a method status is 0 to 999")
        if not isinstance(self.payload, bytes):
            raise TypeError("a method payload is bytes")

    @classmethod
    def of_json(cls, status: int, value: Json) -> MethodResult:
        return cls(status, json.dumps(value).encode())


@dataclass(frozen=True)
class DesiredProperties:
    """Desired properties for the handler: the whole document (``complete``) or a patch (null removes)."""

    version: int
    properties: JsonObject
    complete: bool


@dataclass(frozen=True)
class Twin:
    desired: JsonObject
    desired_version: int
    reported: JsonObject
    reported_version: int


@dataclass(frozen=True)
class LinkStatus:
    connected: bool
    quarantined: bool
    connects: int
    failures: int
    sent: int
    acknowledged: int
    last_error: str | None


class MethodHandler(Protocol):
    def __call__(self, call: MethodCall, /) -> Awaitable[MethodResult]: ...


class DesiredHandler(Protocol):
    def __call__(self, desired: DesiredProperties, /) -> Awaitable[None]: ...


class MessageHandler(Protocol):
    def __call__(self, message: CloudMessage, /) -> Awaitable[None]: ...


class _Session:
    """What lives as long as one connection."""

    def __init__(self, client: MqttClient, settings: LinkSettings) -> None:
        self.client = client
        self.tasks: set[asyncio.Task[None]] = set()
        self.ended = asyncio.Event()
        self.error: BaseException | None = None
        self.quarantined = False
        self.messages_subscribed = False
        self.in_flight: set[int] = set()
        self.acked: list[int] = []
        self.acks_ready = asyncio.Event()
        self.window_freed = asyncio.Event()
        self.methods_running = 0
        self.desired: deque[DesiredPatch] = deque()
        self.desired_ready = asyncio.Event()
        self.resync = True
        self.messages: asyncio.Queue[tuple[CloudMessage, codec.Publish]] = asyncio.Queue(
            settings.handler_queue_size
        )
        self._queue_size = settings.handler_queue_size

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and self.error is None:
            self.error = error
            self.ended.set()

    def offer_desired(self, patch: DesiredPatch) -> None:
        """Queue a patch for the handler; on overflow, forget the queue and read the whole twin instead."""
        if len(self.desired) >= self._queue_size:
            self.desired.clear()
            self.resync = True
        else:
            self.desired.append(patch)
        self.desired_ready.set()


class HubLink:
    """The agent's link to the hub. ``async with HubLink(…) as link:`` keeps it up until the block ends."""

    def __init__(
        self,
        settings: LinkSettings,
        outbox: Outbox,
        credentials: Credentials,
        *,
        sleep: Sleep | None = None,
        uniform: Uniform | None = None,
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._credentials = credentials
        self._sleep: Sleep = sleep or asyncio.sleep
        self._uniform: Uniform = uniform or random.SystemRandom().uniform
        self._methods: dict[str, MethodHandler] = {}
        self._desired_handler: DesiredHandler | None = None
        self._message_handler: MessageHandler | None = None
        self._requests: dict[str, asyncio.Future[TwinResponse]] = {}
        self._request_ids = itertools.count(1)
        self._request_slots = asyncio.Semaphore(settings.max_pending_requests)
        self._session: _Session | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._reconnect_requested = False
        self._runner: asyncio.Task[None] | None = None
        self._desired_version = 0
        self._connects = 0
        self._failures = 0
        self._sent = 0
        self._acknowledged = 0
        self._last_error: str | None = None
        self._change = asyncio.Event()
        self._change_count = 0

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> HubLink:
        if self._runner is not None:
            raise RuntimeError("a HubLink runs once")
        self._runner = asyncio.create_task(self._run(), name="fleetward-hub-link")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End the connection (DISCONNECT) and stop; unacknowledged telemetry stays in the outbox."""
        self._closing = True
        self._wake.set()
        runner = self._runner
        if runner is None or runner.done():
            return
        done, _pending = await asyncio.wait({runner}, timeout=self._settings.close_timeout_seconds)
        if not done:
            runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    def reconnect(self) -> None:
        """Drop the connection and connect again at once, reading the credentials again (after renewal)."""
        self._reconnect_requested = True
        self._wake.set()

    @property
    def status(self) -> LinkStatus:
        session = self._session
        return LinkStatus(
            connected=session is not None,
            quarantined=session is not None and session.quarantined,
            connects=self._connects,
            failures=self._failures,
            sent=self._sent,
            acknowledged=self._acknowledged,
            last_error=self._last_error,
        )

    async def changes(self) -> AsyncGenerator[LinkStatus, None]:
        """The status after each connect, disconnect and failed attempt (the latest, for a slow reader)."""
        seen = self._change_count
        while True:
            if self._change_count == seen:
                await self._change.wait()
            seen = self._change_count
            yield self.status

    def _changed(self) -> None:
        self._change_count += 1
        change, self._change = self._change, asyncio.Event()
        change.set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise TransportError("not connected to the hub in time", code="hub_unreachable") from None

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the hub has acknowledged everything in the outbox."""
        try:
            async with asyncio.timeout(timeout):
                await self._outbox.wait_empty()
        except TimeoutError:
            raise TransportError("the outbox was not drained in time", code="flush_timeout") from None

    # ------------------------------------------------------------------ routes

    def on_method(self, name: str, handler: MethodHandler | None) -> None:
        """Route direct method ``name`` to ``handler`` (None removes the route: the method answers 404)."""
        dialect.check_method_name(name)
        if handler is None:
            self._methods.pop(name, None)
        else:
            self._methods[name] = handler

    def on_desired(self, handler: DesiredHandler) -> None:
        self._desired_handler = handler
        session = self._session
        if session is not None:
            session.resync = True
            session.desired_ready.set()

    def on_message(self, handler: MessageHandler) -> None:
        self._message_handler = handler
        session = self._session
        if session is not None and not session.messages_subscribed and not session.quarantined:
            session.spawn(self._subscribe_messages(session), "fleetward-link-subscribe")

    # ------------------------------------------------------------------ twin

    async def get_twin(self, *, timeout: float | None = None) -> Twin:
        response = await self._request(dialect.twin_get_topic, b"", timeout)
        if response.status != 200:
            raise _twin_refusal(response)
        document = dialect.parse_json_object(response.body, "a twin")
        halves = document.get("desired"), document.get("reported")
        if not isinstance(halves[0], dict) or not isinstance(halves[1], dict):
            raise ProtocolViolation("the hub sent a twin without its two halves", code="bad_json")
        desired_version, desired = dialect.split_version(halves[0], "desired properties")
        reported_version, reported = dialect.split_version(halves[1], "reported properties")
        return Twin(desired, desired_version, reported, reported_version)

    async def patch_reported(self, patch: Mapping[str, Json], *, timeout: float | None = None) -> int:
        """Merge ``patch`` into the reported properties (null removes a key); the new version."""
        body = json.dumps(dict(patch)).encode()
        response = await self._request(dialect.twin_reported_topic, body, timeout)
        if response.status not in (200, 204):
            raise _twin_refusal(response)
        if response.version is None:
            raise ProtocolViolation("the hub accepted a reported patch without a $version", code="bad_topic")
        return response.version

    async def _request(
        self, topic_of: Callable[[str], str], body: bytes, timeout: float | None
    ) -> TwinResponse:
        seconds = self._settings.request_timeout_seconds if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds), self._request_slots:
                session = await self._live_session()
                request_id = f"{next(self._request_ids):x}"
                future: asyncio.Future[TwinResponse] = asyncio.get_running_loop().create_future()
                self._requests[request_id] = future
                try:
                    await session.client.publish(topic_of(request_id), body)
                    return await future
                finally:
                    self._requests.pop(request_id, None)
        except TimeoutError:
            raise TransportError(f"the hub did not answer within {seconds:g} s", code="hub_timeout") from None

    async def _live_session(self) -> _Session:
        while True:
            if self._closing:
                raise TransportError("the link is closed", code="link_closed")
            session = self._session
            if session is not None:
                return session
            await self._connected.wait()

    # ------------------------------------------------------------------ keeping the connection

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            self._wake.clear()
            if self._closing:
                return
            self._reconnect_requested = False
            try:
                client = await self._connect()
            except FleetwardError as error:
                self._failures += 1
                self._last_error = f"{error.code}: {error.message}"
                logger.warning("could not connect to the hub (attempt %d): %s", attempt + 1, error)
                self._changed()
                await self._pause(full_jitter(attempt, *self._backoff()))
                attempt += 1
                continue
            connected_at = loop.time()
            await self._hold(client)
            if self._closing:
                return
            if self._reconnect_requested:
                attempt = 0
                continue
            if loop.time() - connected_at >= self._settings.stable_after_seconds:
                attempt = 0
            await self._pause(full_jitter(attempt, *self._backoff()))
            attempt += 1

    def _backoff(self) -> tuple[float, float, Uniform]:
        settings = self._settings
        return settings.backoff_initial_seconds, settings.backoff_max_seconds, self._uniform

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the link is closed or asked to reconnect meanwhile."""
        if self._closing or self._reconnect_requested:
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, woken):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _connect(self) -> MqttClient:
        settings = self._settings
        try:
            context = await asyncio.to_thread(self._credentials.tls_context)
        except (OSError, ssl.SSLError, ValueError) as error:
            raise TransportError(
                f"could not load the certificate and key: {error}", code="credentials_unreadable"
            ) from None
        client = MqttClient(
            settings.host,
            settings.port,
            settings.client_id,
            context,
            username=settings.username,
            keep_alive_seconds=settings.keep_alive_seconds,
            clean_session=True,
            max_packet_bytes=settings.max_packet_bytes,
            inbox_size=settings.handler_queue_size,
            timeout_seconds=settings.connect_timeout_seconds,
            auto_ack=False,
        )
        return await client.__aenter__()

    async def _hold(self, client: MqttClient) -> None:
        """One connection, from its subscriptions to its end."""
        session = _Session(client, self._settings)
        try:
            codes = await client.subscribe(dialect.TWIN_RESPONSES, dialect.TWIN_DESIRED, dialect.METHODS)
            if codes[0] == codec.SUBACK_FAILURE:
                raise TransportError("the hub refused the twin responses", code="subscribe_refused")
            session.quarantined = codes[2] == codec.SUBACK_FAILURE
            if self._wants_messages and not session.quarantined:
                await self._subscribe_messages(session)
        except FleetwardError as error:
            self._failures += 1
            self._last_error = f"{error.code}: {error.message}"
            logger.warning("the hub connection failed while subscribing: %s", error)
            await client.close()
            return
        self._connects += 1
        self._session = session
        self._connected.set()
        if session.quarantined:
            logger.warning("the hub has quarantined this device: telemetry waits in the outbox")
            session.spawn(self._watch_quarantine(session), "fleetward-link-quarantine")
        else:
            session.spawn(self._drain(session), "fleetward-link-drain")
        session.spawn(self._route(session), "fleetward-link-route")
        session.spawn(self._collect_acks(session), "fleetward-link-acks")
        session.spawn(self._deliver_desired(session), "fleetward-link-desired")
        session.spawn(self._deliver_messages(session), "fleetward-link-messages")
        self._changed()
        try:
            waits = [
                asyncio.ensure_future(event.wait()) for event in (client.closed, self._wake, session.ended)
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
        finally:
            await self._end(session)

    async def _end(self, session: _Session) -> None:
        self._session = None
        self._connected.clear()
        if session.error is not None and not isinstance(session.error, TransportError):
            logger.error("the hub connection ended on an error", exc_info=session.error)
        elif session.error is not None:
            logger.warning("the hub connection ended: %s", session.error)
        else:
            logger.info("the hub connection ended (%d messages in flight)", len(session.in_flight))
        tasks = list(session.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # their errors were collected as they ended
        for future in self._requests.values():
            if not future.done():
                future.set_exception(TransportError("the hub connection ended", code="disconnected"))
        client = session.client
        if client.closed.is_set():
            await client.close()
        else:
            await client.__aexit__(None, None, None)  # a graceful DISCONNECT
        try:
            await self._acknowledge(session)  # PUBACKs that came before the end still count
            await self._outbox.rewind()
        except FleetwardError as error:
            logger.warning("the outbox failed while the connection ended: %s", error)
        self._changed()

    # ------------------------------------------------------------------ telemetry

    async def _drain(self, session: _Session) -> None:
        client, window = session.client, self._settings.inflight_window
        while True:
            free = window - len(session.in_flight)
            if free <= 0:
                session.window_freed.clear()
                try:
                    async with asyncio.timeout(self._settings.puback_timeout_seconds):
                        await session.window_freed.wait()
                except TimeoutError:
                    raise TransportError(
                        "the hub stopped acknowledging telemetry", code="hub_stalled"
                    ) from None
                continue
            batch = await self._outbox.take(free)
            if not batch:
                await self._outbox.wait()
                continue
            for message in batch:
                future = client.send_publish(
                    dialect.telemetry_topic(
                        self._settings.device_id, message.encoded_properties, self._settings.module_id
                    ),
                    message.body,
                    dup=message.redelivery,
                )
                session.in_flight.add(message.seq)
                future.add_done_callback(functools.partial(self._puback, session, message.seq))
            self._sent += len(batch)

    def _puback(self, session: _Session, seq: int, done: asyncio.Future[codec.Packet]) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # the connection ended: the message is sent again on the next one
        session.acked.append(seq)
        session.acks_ready.set()

    async def _collect_acks(self, session: _Session) -> None:
        """Delete acknowledged messages, one transaction for all the PUBACKs that came meanwhile."""
        while True:
            await session.acks_ready.wait()
            session.acks_ready.clear()
            await self._acknowledge(session)

    async def _acknowledge(self, session: _Session) -> None:
        batch, session.acked = session.acked, []
        if not batch:
            return
        try:
            await self._outbox.acknowledge(batch)
        except BaseException:
            session.acked[:0] = batch  # not deleted: whoever comes next tries again
            raise
        session.in_flight.difference_update(batch)
        self._acknowledged += len(batch)
        session.window_freed.set()

    async def _watch_quarantine(self, session: _Session) -> None:
        while session.quarantined:
            await self._sleep(self._settings.quarantine_retry_seconds)
            (code,) = await session.client.subscribe(dialect.METHODS)
            if code != codec.SUBACK_FAILURE:
                logger.info("the hub has released this device from quarantine")
                session.quarantined = False
                if self._wants_messages:
                    await self._subscribe_messages(session)
                session.spawn(self._drain(session), "fleetward-link-drain")
                self._changed()

    @property
    def _wants_messages(self) -> bool:
        """Cloud-to-device messages have a handler, and this is the device's session (a module has none)."""
        return self._message_handler is not None and self._settings.module_id is None

    async def _subscribe_messages(self, session: _Session) -> None:
        (code,) = await session.client.subscribe(dialect.cloud_to_device_filter(self._settings.device_id))
        session.messages_subscribed = code != codec.SUBACK_FAILURE

    # ------------------------------------------------------------------ what the hub sends

    async def _route(self, session: _Session) -> None:
        client = session.client
        while True:
            packet = await client.inbox.get()
            try:
                incoming = dialect.classify_incoming(
                    self._settings.device_id, packet.topic, packet.payload, dup=packet.dup
                )
            except ProtocolViolation as violation:
                logger.warning("ignored a message from the hub: %s", violation)
                client.acknowledge(packet)
                continue
            if isinstance(incoming, CloudMessage):
                await session.messages.put((incoming, packet))  # acknowledged once handled
                continue
            client.acknowledge(packet)
            if isinstance(incoming, TwinResponse):
                future = self._requests.get(incoming.request_id)
                if future is not None and not future.done():
                    future.set_result(incoming)
            elif isinstance(incoming, MethodCall):
                self._start_method(session, incoming)
            else:
                session.offer_desired(incoming)

    def _start_method(self, session: _Session, call: MethodCall) -> None:
        if session.methods_running >= self._settings.max_concurrent_methods:
            session.spawn(
                self._answer(session, call, MethodResult.of_json(429, {"message": "too many method calls"})),
                "fleetward-link-method",
            )
            return
        session.methods_running += 1
        session.spawn(self._call_method(session, call), "fleetward-link-method")

    async def _call_method(self, session: _Session, call: MethodCall) -> None:
        try:
            result = await self._method_result(call)
        finally:
            session.methods_running -= 1
        await self._answer(session, call, result)

    async def _method_result(self, call: MethodCall) -> MethodResult:
        handler = self._methods.get(call.name)
        if handler is None:
            return MethodResult.of_json(404, {"message": f"no handler for method {call.name!r}"})
        try:
            async with asyncio.timeout(self._settings.method_handler_timeout_seconds):
                result = await handler(call)
        except TimeoutError:
            return MethodResult.of_json(504, {"message": f"the handler of {call.name!r} took too long"})
        except InvalidInput as refused:
            return MethodResult.of_json(400, {"message": refused.message})
        except Exception:
            logger.exception("the handler of method %r failed", call.name)
            return MethodResult.of_json(500, {"message": f"the handler of {call.name!r} failed"})
        if not isinstance(result, MethodResult):
            logger.error("the handler of method %r answered %r, not a MethodResult", call.name, result)
            return MethodResult.of_json(500, {"message": f"the handler of {call.name!r} failed"})
        if len(result.payload) > self._settings.method_max_payload_bytes:
            return MethodResult.of_json(500, {"message": f"the answer of {call.name!r} is too large"})
        return result

    async def _answer(self, session: _Session, call: MethodCall, result: MethodResult) -> None:
        topic = dialect.method_response_topic(result.status, call.request_id)
        try:
            await session.client.publish(topic, result.payload)
        except TransportError:
            logger.info("the answer to method %r was lost with the connection", call.name)

    async def _deliver_desired(self, session: _Session) -> None:
        """Hand desired properties to the handler in version order: the whole document when it is not
        known to be current (after a connect, an overflow or a gap), patches otherwise."""
        while True:
            handler = self._desired_handler
            if handler is None:
                session.desired.clear()
            elif session.resync:
                session.resync = False
                try:
                    twin = await self.get_twin()
                except FleetwardError as error:
                    logger.warning("could not read the desired properties: %s", error)
                    session.resync = True
                    await self._sleep(min(5.0, self._settings.request_timeout_seconds))
                    continue
                if twin.desired_version > self._desired_version:
                    await self._hand_desired(
                        handler, DesiredProperties(twin.desired_version, twin.desired, True)
                    )
            elif session.desired:
                patch = session.desired.popleft()
                if patch.version <= self._desired_version:
                    continue
                if patch.version != self._desired_version + 1:
                    session.resync = True  # a patch went missing: read the whole document
                    continue
                await self._hand_desired(handler, DesiredProperties(patch.version, patch.patch, False))
                continue
            session.desired_ready.clear()
            if not session.desired and not (session.resync and handler is not None):
                await session.desired_ready.wait()

    async def _hand_desired(self, handler: DesiredHandler, desired: DesiredProperties) -> None:
        try:
            await handler(desired)
        except Exception:
            logger.exception("the desired-properties handler failed on version %d", desired.version)
        self._desired_version = desired.version

    async def _deliver_messages(self, session: _Session) -> None:
        """Hand cloud-to-device messages to the handler in order; acknowledge (complete) each after it."""
        while True:
            message, packet = await session.messages.get()
            handler = self._message_handler
            if handler is not None:
                try:
                    await handler(message)
                except Exception:
                    logger.exception("the message handler failed on %s; completed anyway", message.message_id)
            session.client.acknowledge(packet)


def _twin_refusal(response: TwinResponse) -> FleetwardError:
    message = f"the hub refused the twin request ({response.status})"
    with contextlib.suppress(ValueError, ProtocolViolation):
        text = dialect.parse_json_object(response.body, "a refusal").get("message")
        if isinstance(text, str):
            message = text
    if response.status == 413:
        return PayloadTooLarge(message, code="twin_too_large")
    if 400 <= response.status < 500:
        return InvalidInput(message, code="twin_refused")
    return ServerError(message, code="twin_failed")
