"""The agent's application API: one Unix socket per application, and nothing it did not declare.

``async with AppApiServer(endpoint, services) as server:`` listens on ``endpoint.socket_path`` for one
application, speaking the frames of :mod:`fleetward.agent.app_protocol` (docs/wire.md, "The agent's
application API"). The runtime starts one server per application and hands it the shared services
(:class:`AppServices`: the outbox, the :class:`~fleetward.agent.app_cloud.CloudRouter`, the peripherals,
…).

- **Who may connect**: the socket file is the application's (its uid and gid when the agent is root, the
  agent's otherwise), mode 0600, in a directory that only the agent may write. Each connection's
  ``SO_PEERCRED`` uid must be the application's; any other peer, root included, gets ``peer_refused`` and is
  closed. At most ``max_connections`` connections at once.
- **What it may ask**: each operation is checked against the manifest's capabilities first
  (:meth:`~fleetward.agent.manifest.Capabilities.require`). A refusal answers ``capability_not_declared``
  naming the capability and the detail, and is recorded through ``on_violation`` (at most
  ``max_violations_per_minute`` a minute; the rest are counted). Operations that reach the cloud (telemetry,
  twin, methods, messages, the device certificate) need ``DeviceAuthentication`` naming the device's tenant.
- **Bounds**: a frame is at most ``max_frame_bytes``; at most ``max_concurrent_requests`` requests run at
  once per connection (the next one is answered ``too_many_requests``); a connection whose frames are
  refused ``max_consecutive_invalid_frames`` times in a row is closed; each request ends within
  ``request_timeout_seconds``. Pushes wait in a queue of at most ``max_pending_pushes`` per connection: an
  application that does not read them is **disconnected** when the queue is full (its registrations end
  with the connection; on reconnecting it registers again and gets its whole desired namespace anew).
  Responses are never dropped: an application that does not read them stops being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel

from fleetward.agent import app_protocol as protocol
from fleetward.agent.app_cloud import CloudRouter
from fleetward.agent.app_protocol import ErrorCode, FrameRefused, PushKind
from fleetward.agent.app_services import (
    CertificateSource,
    DeferralLedger,
    PowerControls,
    StorageMeter,
    SystemEvent,
    SystemEvents,
    TelemetrySink,
    UpdateDeferrals,
    ViolationRecorder,
)
from fleetward.agent.dialect import CloudMessage, JsonObject, MethodCall
from fleetward.agent.link import MethodResult
from fleetward.agent.manifest import Capabilities, Capability, PowerControl
from fleetward.agent.peripherals import Peripherals, UartPort
from fleetward.agent.sandbox import AppIdentity
from fleetward.bounds import check_positive
from fleetward.errors import (
    CapabilityNotDeclared,
    ConfigurationError,
    Conflict,
    FleetwardError,
    InvalidInput,
    NotFound,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_READ_CHUNK_BYTES = 64 * 1024
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class AppApiLimits:
    """Bounds of one application's API. Every one carries its unit in its name."""

    max_frame_bytes: int = 256 * 1024
    max_connections: int = 4
    max_concurrent_requests: int = 8
    max_pending_pushes: int = 64
    max_consecutive_invalid_frames: int = 8
    request_timeout_seconds: float = 30.0
    method_timeout_seconds: float = 30.0
    max_pending_method_calls: int = 4
    max_twin_patch_bytes: int = 8 * 1024
    max_deferral_request_seconds: int = protocol.MAX_DEFERRAL_REQUEST_SECONDS
    max_violations_per_minute: int = 10
    peripheral_threads: int = 2
    close_timeout_seconds: float = 2.0

    def __post_init__(self) -> None:
        check_positive(self, "application API limit", fractional=lambda _name: True)
        if not 1024 <= self.max_frame_bytes <= protocol.MAX_FRAME_BYTES_CEILING:
            raise ValueError(f"max_frame_bytes is 1,024 to {protocol.MAX_FRAME_BYTES_CEILING:,}")
        if self.max_deferral_request_seconds > protocol.MAX_DEFERRAL_REQUEST_SECONDS:
            raise ValueError(
                f"max_deferral_request_seconds is at most {protocol.MAX_DEFERRAL_REQUEST_SECONDS}"
            )


@dataclass(frozen=True)
class AppEndpoint:
    """One application's side of the API: who it is, what it declared, where its socket is."""

    component_id: str
    capabilities: Capabilities
    socket_path: Path
    #: the application's own user when the agent is root; None when it runs as the agent's user
    identity: AppIdentity | None = None

    @property
    def peer_uid(self) -> int:
        return self.identity.uid if self.identity is not None else os.geteuid()


@dataclass(frozen=True)
class AppServices:
    """What the API hands requests to, shared by every application's server. A service left out (None)
    answers ``service_unavailable`` once the capability check passed."""

    on_violation: ViolationRecorder
    #: the device's tenant: cloud operations need DeviceAuthentication naming it (None: not enrolled yet)
    tenant_id: str | None = None
    #: where the tenant is read at each request instead, when it is learnt later (at enrollment)
    tenant_source: Callable[[], str | None] | None = None
    telemetry: TelemetrySink | None = None
    cloud: CloudRouter | None = None
    peripherals: Peripherals | None = None
    storage: StorageMeter | None = None
    deferrals: UpdateDeferrals | None = None
    certificates: CertificateSource | None = None
    power: PowerControls | None = None
    events: SystemEvents | None = None

    def current_tenant(self) -> str | None:
        return self.tenant_source() if self.tenant_source is not None else self.tenant_id


@dataclass
class AppApiStats:
    connections: int = 0
    peers_refused: int = 0
    requests: int = 0
    invalid_frames: int = 0
    closed_for_invalid_frames: int = 0
    closed_for_push_overflow: int = 0
    violations: int = 0
    violations_not_recorded: int = 0


class AppApiServer:
    """Serves one application's API socket; an async context manager that removes the socket after."""

    def __init__(
        self, endpoint: AppEndpoint, services: AppServices, limits: AppApiLimits | None = None
    ) -> None:
        self.endpoint = endpoint
        self.services = services
        self.limits = limits or AppApiLimits()
        self.stats = AppApiStats()
        self._deferrals = services.deferrals or DeferralLedger()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._violation_times: deque[float] = deque()
        self._executor: ThreadPoolExecutor | None = None

    async def __aenter__(self) -> AppApiServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the server is started already")
        listening = await asyncio.to_thread(_listen, self.endpoint, self.limits.max_connections)
        self._executor = ThreadPoolExecutor(
            self.limits.peripheral_threads, thread_name_prefix=f"app-{self.endpoint.component_id[:8]}"
        )
        self._server = await asyncio.start_unix_server(self._accept, sock=listening)

    async def close(self) -> None:
        """Stop listening, end every connection, and remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for connection in list(self._connections):
            connection.close("the agent is stopping the application's API")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.limits.close_timeout_seconds * 2)
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.endpoint.socket_path)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            refusal = self._refusal(writer)
            if refusal is not None:
                writer.write(protocol.encode_error(None, *refusal))
                writer.close()
                try:
                    async with asyncio.timeout(self.limits.close_timeout_seconds):
                        await writer.wait_closed()
                except (TimeoutError, ConnectionError):
                    writer.transport.abort()
                return
            self.stats.connections += 1
            connection = _Connection(self, reader, writer)
            self._connections.add(connection)
            try:
                await connection.run()
            finally:
                self._connections.discard(connection)
        finally:
            self._tasks.discard(task)

    def _refusal(self, writer: asyncio.StreamWriter) -> tuple[str, str] | None:
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != self.endpoint.peer_uid:
            self.stats.peers_refused += 1
            logger.warning(
                "the API socket of %s refused process %d of uid %d (only uid %d may connect)",
                self.endpoint.component_id,
                pid,
                uid,
                self.endpoint.peer_uid,
            )
            return ErrorCode.PEER_REFUSED, "this socket belongs to another user"
        if len(self._connections) >= self.limits.max_connections:
            return (
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"an application has at most {self.limits.max_connections} connections",
            )
        return None

    # --- shared by the connections

    async def blocking(self, function: Callable[..., T], *args: object) -> T:
        """Run a blocking peripheral call on this application's own threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def require(self, op: str, capability: Capability, detail: str | int | None = None) -> None:
        """Raise :class:`CapabilityNotDeclared` (recorded as a violation) unless the manifest declares it."""
        try:
            self.endpoint.capabilities.require(capability, detail)
        except CapabilityNotDeclared as denied:
            await self._violation(denied)
            raise CapabilityNotDeclared(
                f"{op}: {denied.message}", capability=denied.capability, detail=denied.detail
            ) from None

    async def require_cloud(self, op: str) -> None:
        """Cloud operations: ``DeviceAuthentication`` naming the device's tenant."""
        tenant = self.services.current_tenant()
        await self.require(op, Capability.DEVICE_AUTHENTICATION, tenant)
        if tenant is None:
            raise Conflict(
                f"{op}: the device is not enrolled in a tenant yet", code=ErrorCode.DEVICE_NOT_ENROLLED
            )

    async def _violation(self, denied: CapabilityNotDeclared) -> None:
        self.stats.violations += 1
        logger.warning("application %s: %s", self.endpoint.component_id, denied.message)
        now = time.monotonic()
        while self._violation_times and now - self._violation_times[0] >= 60.0:
            self._violation_times.popleft()
        if len(self._violation_times) >= self.limits.max_violations_per_minute:
            self.stats.violations_not_recorded += 1
            return
        self._violation_times.append(now)
        try:
            await self.services.on_violation(self.endpoint.component_id, denied.capability, denied.detail)
        except FleetwardError as error:
            logger.error("the violation of %s could not be recorded: %s", self.endpoint.component_id, error)

    def peripherals(self) -> Peripherals:
        return _available(self.services.peripherals, "peripherals")

    def deferrals(self) -> UpdateDeferrals:
        return self._deferrals


def _listen(endpoint: AppEndpoint, backlog: int) -> socket.socket:
    """Bind the application's socket: 0600, its owner's, in a directory no application can write."""
    path = endpoint.socket_path
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o711, parents=True)
    info = os.stat(parent)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigurationError(
            f"{parent} must belong to the agent and be writable by nobody else (it holds API sockets)"
        )
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(path)
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigurationError(f"{path} exists and is not a socket; it is left as it is")
        os.unlink(path)  # a socket left by an earlier run
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(str(path))
        os.chmod(path, 0o600)
        if endpoint.identity is not None:
            os.chown(path, endpoint.identity.uid, endpoint.identity.gid)
        listening.listen(backlog)
        listening.setblocking(False)
    except OSError as error:
        listening.close()
        raise ConfigurationError(f"the API socket {path} cannot be bound: {error}") from None
    return listening


class _Connection:
    """One connection of the application: its frames, its pushes, its registrations."""

    def __init__(
        self, server: AppApiServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._limits = server.limits
        self._component_id = server.endpoint.component_id
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._pushes: deque[bytes] = deque()
        self._push_ready = asyncio.Event()
        self._done = asyncio.Event()
        self._closed = False
        self._abort = False
        self._running = 0
        self._invalid = 0
        self._requests: set[asyncio.Task[None]] = set()
        self._calls: dict[str, asyncio.Future[MethodResult]] = {}
        self._call_ids = itertools.count(1)
        self._uarts: dict[int | str, UartPort] = {}
        self._operations: dict[str, Callable[[Any], Awaitable[BaseModel]]] = {
            "telemetry.send": self._telemetry_send,
            "twin.get": self._twin_get,
            "twin.report": self._twin_report,
            "twin.subscribe": self._twin_subscribe,
            "methods.register": self._methods_register,
            "methods.respond": self._methods_respond,
            "messages.subscribe": self._messages_subscribe,
            "events.subscribe": self._events_subscribe,
            "gpio.read": self._gpio_read,
            "gpio.write": self._gpio_write,
            "uart.open": self._uart_open,
            "uart.write": self._uart_write,
            "uart.read": self._uart_read,
            "uart.close": self._uart_close,
            "i2c.transfer": self._i2c_transfer,
            "spi.transfer": self._spi_transfer,
            "adc.read": self._adc_read,
            "pwm.set": self._pwm_set,
            "storage.quota": self._storage_quota,
            "update.defer": self._update_defer,
            "device.certificate_paths": self._certificate_paths,
            "power.reboot": self._power_reboot,
        }

    # --- life

    async def run(self) -> None:
        hello = protocol.Hello(component_id=self._component_id, max_frame_bytes=self._limits.max_frame_bytes)
        self.push("hello", hello)
        reading = asyncio.create_task(self._read_frames(), name=f"app-api read {self._component_id}")
        writing = asyncio.create_task(self._write_pushes(), name=f"app-api push {self._component_id}")
        try:
            await self._done.wait()
        finally:
            self._closed = True
            for task in (reading, writing, *self._requests):
                task.cancel()
            await asyncio.gather(reading, writing, *self._requests, return_exceptions=True)
            await self._clean_up()

    def close(self, reason: str, *, abort: bool = False) -> None:
        if not self._done.is_set():
            logger.info("application %s: connection closed: %s", self._component_id, reason)
        self._abort = self._abort or abort
        self._done.set()

    async def _clean_up(self) -> None:
        cloud = self._server.services.cloud
        if cloud is not None:
            cloud.release(self)
        if self._server.services.events is not None:
            self._server.services.events.unsubscribe(self)
        for future in self._calls.values():
            if not future.done():
                future.set_result(MethodResult.of_json(503, {"message": "the application went away"}))
        for port in self._uarts.values():
            with contextlib.suppress(FleetwardError, OSError):
                port.close()
        self._uarts.clear()
        transport = self._writer.transport
        if self._abort:
            transport.abort()
            return
        self._writer.close()
        try:
            async with asyncio.timeout(self._limits.close_timeout_seconds):
                await self._writer.wait_closed()
        except (TimeoutError, ConnectionError):
            transport.abort()

    # --- frames in

    async def _read_frames(self) -> None:
        buffer = bytearray()
        skipping = False  # discarding the rest of a frame that was too large
        limit = self._limits.max_frame_bytes
        try:
            while not self._done.is_set():
                chunk = await self._reader.read(_READ_CHUNK_BYTES)
                if not chunk:
                    break
                buffer += chunk
                while True:
                    end = buffer.find(b"\n")
                    if end < 0:
                        if len(buffer) >= limit and not skipping:
                            skipping = True
                            await self._refused(
                                FrameRefused(
                                    f"a frame is at most {limit} bytes", code=ErrorCode.FRAME_TOO_LARGE
                                )
                            )
                        if skipping:
                            buffer.clear()
                        break
                    frame = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if skipping:
                        skipping = False
                        continue
                    if len(frame) + 1 > limit:
                        await self._refused(
                            FrameRefused(f"a frame is at most {limit} bytes", code=ErrorCode.FRAME_TOO_LARGE)
                        )
                        continue
                    if frame.strip():
                        await self._frame(frame)
                    if self._done.is_set():
                        return
        except ConnectionError:
            pass
        self.close("the application closed the connection")

    async def _frame(self, frame: bytes) -> None:
        try:
            request = protocol.decode_request(frame)
            args = protocol.parse_args(request)
        except FrameRefused as refused:
            await self._refused(refused)
            return
        self._invalid = 0
        self._server.stats.requests += 1
        if self._running >= self._limits.max_concurrent_requests:
            await self._send(
                protocol.encode_error(
                    request.id,
                    ErrorCode.TOO_MANY_REQUESTS,
                    f"at most {self._limits.max_concurrent_requests} requests run at once on a connection",
                )
            )
            return
        self._running += 1
        task = asyncio.create_task(self._execute(request, args), name=f"app-api {request.op}")
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _refused(self, refused: FrameRefused) -> None:
        self._server.stats.invalid_frames += 1
        self._invalid += 1
        await self._send(protocol.encode_error(refused.request_id, refused.code, refused.message))
        if self._invalid >= self._limits.max_consecutive_invalid_frames:
            self._server.stats.closed_for_invalid_frames += 1
            await self._send(
                protocol.encode_error(
                    None,
                    ErrorCode.TOO_MANY_INVALID_FRAMES,
                    f"{self._invalid} invalid frames in a row: the connection is closed",
                )
            )
            self.close("too many invalid frames")

    async def _execute(self, request: protocol.Request, args: BaseModel) -> None:
        try:
            frame = await self._answer(request, args)
            await self._send(frame)
        finally:
            self._running -= 1

    async def _answer(self, request: protocol.Request, args: BaseModel) -> bytes:
        seconds = self._limits.request_timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                result = await self._operations[request.op](args)
        except FleetwardError as error:
            return protocol.encode_error(request.id, error.code, error.message)
        except TimeoutError:
            return protocol.encode_error(
                request.id, ErrorCode.REQUEST_TIMEOUT, f"{request.op} did not finish within {seconds:g} s"
            )
        except Exception:
            logger.exception("application %s: %s failed", self._component_id, request.op)
            return protocol.encode_error(
                request.id, ErrorCode.INTERNAL_ERROR, f"{request.op} failed in the agent"
            )
        frame = protocol.encode_result(request.id, result)
        if len(frame) > self._limits.max_frame_bytes:
            return protocol.encode_error(
                request.id,
                ErrorCode.RESPONSE_TOO_LARGE,
                f"the answer to {request.op} would pass the frame bound",
            )
        return frame

    # --- frames out

    async def _send(self, frame: bytes) -> None:
        async with self._write_lock:
            if self._closed:
                return
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except ConnectionError:
                self.close("the application's end of the connection is gone", abort=True)

    def push(self, kind: PushKind, data: BaseModel) -> bool:
        """Queue a push without waiting; False if it could not be (closed, too large, queue full)."""
        if self._done.is_set():
            return False
        frame = protocol.encode_push(kind, data)
        if len(frame) > self._limits.max_frame_bytes:
            logger.warning(
                "application %s: a %s push passes the frame bound; not sent", self._component_id, kind
            )
            return False
        if len(self._pushes) >= self._limits.max_pending_pushes:
            self._server.stats.closed_for_push_overflow += 1
            self.close(
                f"{len(self._pushes)} pushes are waiting: the application does not read them", abort=True
            )
            return False
        self._pushes.append(frame)
        self._push_ready.set()
        return True

    async def _write_pushes(self) -> None:
        while True:
            await self._push_ready.wait()
            self._push_ready.clear()
            while self._pushes:
                await self._send(self._pushes.popleft())

    # --- what the router and the event source call

    async def call_method(self, call: MethodCall) -> MethodResult:
        if len(self._calls) >= self._limits.max_pending_method_calls:
            return MethodResult.of_json(429, {"message": "the application is busy with other method calls"})
        try:
            payload = call.json()
        except InvalidInput:
            return MethodResult.of_json(400, {"message": "the method payload is not JSON"})
        call_id = f"m{next(self._call_ids)}"
        future: asyncio.Future[MethodResult] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            if not self.push("method", protocol.MethodPush(call_id=call_id, name=call.name, payload=payload)):
                return MethodResult.of_json(503, {"message": "the application cannot take the call"})
            async with asyncio.timeout(self._limits.method_timeout_seconds):
                return await future
        except TimeoutError:
            return MethodResult.of_json(
                504, {"message": f"the application did not answer {call.name!r} in time"}
            )
        finally:
            self._calls.pop(call_id, None)

    def deliver_desired(self, version: int, properties: JsonObject, complete: bool) -> None:
        self.push(
            "desired",
            protocol.DesiredPush(
                version=version, complete=complete, properties=protocol.json_object(properties)
            ),
        )

    def deliver_message(self, message: CloudMessage) -> None:
        self.push("message", protocol.MessagePush.of(message))

    def deliver_event(self, event: SystemEvent) -> None:
        self.push("event", protocol.EventPush(kind=event.kind.value, details=dict(event.details)))

    # --- operations: the cloud

    def _cloud(self) -> CloudRouter:
        return _available(self._server.services.cloud, "the hub link")

    async def _telemetry_send(self, args: protocol.TelemetrySend) -> BaseModel:
        await self._server.require_cloud("telemetry.send")
        sink = _available(self._server.services.telemetry, "telemetry")
        properties = protocol.app_properties(args.properties, self._component_id)
        message_id = await sink.put(args.body_bytes(), properties)
        return protocol.TelemetrySent(message_id=message_id)

    async def _twin_get(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require_cloud("twin.get")
        view = await self._cloud().twin(self._component_id)
        return protocol.AppTwin(
            desired=protocol.json_object(view.desired),
            desired_version=view.desired_version,
            reported=protocol.json_object(view.reported),
            reported_version=view.reported_version,
        )

    async def _twin_report(self, args: protocol.TwinReport) -> BaseModel:
        await self._server.require_cloud("twin.report")
        patch = protocol.check_app_patch(args.patch, self._limits.max_twin_patch_bytes)
        version = await self._cloud().report(self._component_id, patch)
        return protocol.Reported(version=version)

    async def _twin_subscribe(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require_cloud("twin.subscribe")
        self._cloud().subscribe_desired(self._component_id, self)
        return protocol.Empty()

    async def _methods_register(self, args: protocol.MethodsRegister) -> BaseModel:
        await self._server.require_cloud("methods.register")
        self._cloud().register_method(args.name, self._component_id, self)
        return protocol.Registered(name=args.name)

    async def _methods_respond(self, args: protocol.MethodsRespond) -> BaseModel:
        future = self._calls.get(args.call_id)
        if future is None or future.done():
            raise NotFound(
                f"no method call {args.call_id!r} is waiting for an answer", code=ErrorCode.UNKNOWN_CALL
            )
        future.set_result(MethodResult(args.status, json.dumps(args.payload).encode()))
        return protocol.Empty()

    async def _messages_subscribe(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require_cloud("messages.subscribe")
        self._cloud().subscribe_messages(self._component_id, self)
        return protocol.Empty()

    async def _certificate_paths(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require_cloud("device.certificate_paths")
        source = _available(self._server.services.certificates, "the device certificate")
        paths = await source.paths_for(self._component_id, self._server.endpoint.identity)
        return protocol.CertificatePaths(
            certificate=str(paths.certificate), key=str(paths.key), device_id=paths.device_id
        )

    # --- operations: the device

    async def _events_subscribe(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require("events.subscribe", Capability.SYSTEM_EVENT_NOTIFICATIONS)
        _available(self._server.services.events, "system events").subscribe(self)
        return protocol.Empty()

    async def _storage_quota(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require("storage.quota", Capability.MUTABLE_STORAGE)
        meter = _available(self._server.services.storage, "the storage meter")
        used = await meter(self._component_id)
        allowed = self._server.endpoint.capabilities.mutable_storage_bytes
        return protocol.StorageQuota(used_bytes=used, allowed_bytes=allowed)

    async def _update_defer(self, args: protocol.UpdateDefer) -> BaseModel:
        await self._server.require("update.defer", Capability.SOFTWARE_UPDATE_DEFERRAL)
        longest = self._limits.max_deferral_request_seconds
        if args.seconds > longest:
            raise InvalidInput(
                f"args.seconds: one request defers at most {longest} s", code=ErrorCode.INVALID_REQUEST
            )
        grant = await self._server.deferrals().defer(self._component_id, args.seconds)
        return protocol.Deferral(
            granted_seconds=grant.granted_seconds,
            remaining_seconds=grant.remaining_seconds,
            deferred_until=grant.deferred_until.isoformat(),
        )

    async def _power_reboot(self, _: protocol.NoArgs) -> BaseModel:
        await self._server.require("power.reboot", Capability.POWER_CONTROLS, PowerControl.FORCE_REBOOT.value)
        await _available(self._server.services.power, "power controls").reboot(self._component_id)
        return protocol.Empty()

    # --- operations: peripherals

    async def _gpio_read(self, args: protocol.GpioRead) -> BaseModel:
        await self._server.require("gpio.read", Capability.GPIO, args.pin)
        value = await self._server.blocking(self._server.peripherals().gpio_read, args.pin)
        return protocol.Level(value=value)

    async def _gpio_write(self, args: protocol.GpioWrite) -> BaseModel:
        await self._server.require("gpio.write", Capability.GPIO, args.pin)
        await self._server.blocking(self._server.peripherals().gpio_write, args.pin, args.value)
        return protocol.Empty()

    async def _uart_open(self, args: protocol.UartOpen) -> BaseModel:
        await self._server.require("uart.open", Capability.UART, args.name)
        earlier = self._uarts.pop(args.name, None)
        if earlier is not None:
            await self._server.blocking(earlier.close)
        port = await self._server.blocking(self._server.peripherals().uart_open, args.name, args.baud_rate)
        if self._closed:
            port.close()
        else:
            self._uarts[args.name] = port
        return protocol.Empty()

    def _port(self, name: int | str) -> UartPort:
        port = self._uarts.get(name)
        if port is None:
            raise NotFound(
                f"UART {name!r} is not open on this connection (uart.open)", code=ErrorCode.UART_NOT_OPEN
            )
        return port

    async def _uart_write(self, args: protocol.UartWrite) -> BaseModel:
        await self._server.require("uart.write", Capability.UART, args.name)
        written = await self._server.blocking(self._port(args.name).write, args.data)
        return protocol.Written(written=written)

    async def _uart_read(self, args: protocol.UartRead) -> BaseModel:
        await self._server.require("uart.read", Capability.UART, args.name)
        port = self._port(args.name)
        data = await self._server.blocking(port.read, args.max_bytes, args.timeout_ms / 1000)
        return protocol.Data.of(data)

    async def _uart_close(self, args: protocol.UartClose) -> BaseModel:
        await self._server.require("uart.close", Capability.UART, args.name)
        port = self._port(args.name)
        del self._uarts[args.name]
        await self._server.blocking(port.close)
        return protocol.Empty()

    async def _i2c_transfer(self, args: protocol.I2cTransfer) -> BaseModel:
        await self._server.require("i2c.transfer", Capability.I2C_MASTER, args.bus)
        data = await self._server.blocking(
            self._server.peripherals().i2c_transfer, args.bus, args.address, args.write, args.read_length
        )
        return protocol.Data.of(data)

    async def _spi_transfer(self, args: protocol.SpiTransfer) -> BaseModel:
        await self._server.require("spi.transfer", Capability.SPI_MASTER, args.bus)
        data = await self._server.blocking(
            self._server.peripherals().spi_transfer, args.bus, args.chip_select, args.write, args.read_length
        )
        return protocol.Data.of(data)

    async def _adc_read(self, args: protocol.AdcRead) -> BaseModel:
        await self._server.require("adc.read", Capability.ADC, args.controller)
        value = await self._server.blocking(
            self._server.peripherals().adc_read, args.controller, args.channel
        )
        return protocol.Level(value=value)

    async def _pwm_set(self, args: protocol.PwmSet) -> BaseModel:
        await self._server.require("pwm.set", Capability.PWM, args.controller)
        await self._server.blocking(
            self._server.peripherals().pwm_set,
            args.controller,
            args.channel,
            args.period_ns,
            args.duty_ns,
            args.enabled,
        )
        return protocol.Empty()


def _available(service: T | None, what: str) -> T:
    if service is None:
        raise Conflict(f"{what} is not available on this agent", code=ErrorCode.SERVICE_UNAVAILABLE)
    return service
