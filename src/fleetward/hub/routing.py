"""Device routing over the bus: the API reaches a device through whichever hub process holds its session.

A hub that holds a device's session (or its saved persistent session) subscribes to the device's subject,
``device.<tenant>.<device>`` (:mod:`fleetward.bus.subjects`; a module session of the device has its own,
``device.<tenant>.<device>.<module in hex>``, so that each session is found wherever it is), from the
moment its CONNECT is accepted until the session is gone. Everything for the session travels there as a
:class:`Command`:

============  =================  ======================================================================
op            how                what the holder does
============  =================  ======================================================================
``method``    request            calls the direct method, answers the device's status and payload (or
                                 ``device_offline``, ``method_timeout``)
``desired``   request            pushes the desired patch if the device listens; answers ``pushed``
``messages``  publish            sends the device its pending cloud-to-device messages
``state``     request            answers whether the device is connected, and with which certificate
                                 (its serial)
``takeover``  request, publish   a newer connection of the device was accepted by another hub: the
                                 older session here ends, and its saved subscriptions are handed over
============  =================  ======================================================================

Nobody on the subject (NATS's "no responders") means no hub holds the device: it is not connected. The
bus is a signal path; the store stays the authority (twins, pending messages and standing are read there).

Takeover across processes: before it subscribes, a hub that accepts a device's CONNECT asks the device's
subject to take over (``takeover`` request; nobody answers when no other hub holds the device, which is
the usual case). After it subscribes it announces the takeover once more (``takeover`` publish), for the
rare race of two connections accepted at once by two hubs: the older connection, by acceptance time and
then by hub id, ends; a hub whose connection is the newer repeats its announcement so the other sees it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from fleetward.bus import subjects
from fleetward.bus.base import Bus, Message, NoResponders, RequestTimedOut
from fleetward.config import Limits
from fleetward.errors import DeviceTimeout, FleetwardError, InvalidInput, NotFound, TransportError
from fleetward.hub import topics
from fleetward.hub.session import SessionKey
from fleetward.hub.twin import JsonObject
from fleetward.wire.identity import check_module_id

if TYPE_CHECKING:
    from fleetward.hub.server import Hub

logger = logging.getLogger(__name__)


class Op(StrEnum):
    METHOD = "method"
    DESIRED = "desired"
    MESSAGES = "messages"
    STATE = "state"
    TAKEOVER = "takeover"


@dataclass(frozen=True)
class MethodResult:
    status: int
    payload: bytes


@dataclass(frozen=True)
class Command:
    """What travels on a device's subject (the device is named by the subject)."""

    op: Op
    #: method: its name; takeover: the id of the hub that accepted the newer connection
    name: str = ""
    #: method: its payload; desired: the patch, JSON
    payload: bytes = b""
    #: desired: the version the patch made
    version: int = 0
    #: method: how long to wait for the device
    timeout_seconds: float = 0.0
    #: takeover: when the newer connection was accepted (ns since the epoch)
    since_ns: int = 0

    def encode(self) -> bytes:
        return _json(
            op=self.op.value,
            name=self.name,
            payload=base64.b64encode(self.payload).decode("ascii"),
            version=self.version,
            timeout_seconds=self.timeout_seconds,
            since_ns=self.since_ns,
        )

    @classmethod
    def decode(cls, data: bytes) -> Command:
        """Raises ``ValueError`` for anything but a command this version encodes."""
        fields = _object(data)
        try:
            return cls(
                op=Op(fields["op"]),
                name=_typed(fields, "name", str),
                payload=base64.b64decode(_typed(fields, "payload", str), validate=True),
                version=_typed(fields, "version", int),
                timeout_seconds=float(_typed(fields, "timeout_seconds", (int, float))),
                since_ns=_typed(fields, "since_ns", int),
            )
        except (KeyError, ValueError) as error:  # binascii.Error is a ValueError
            raise ValueError(f"not a device command: {error}") from None


@dataclass(frozen=True)
class Answer:
    """A holder's answer to a request on a device's subject."""

    #: method: the device's status (0: no answer, see ``error``)
    status: int = 0
    payload: bytes = b""
    #: method: the error code when the device could not answer (``device_offline``, ``method_timeout``)
    error: str = ""
    message: str = ""
    #: state: the device is connected here; desired: the patch was sent to it
    connected: bool = False
    pushed: bool = False
    #: takeover: the older session's subscriptions, when it was persistent
    session: tuple[str, ...] | None = None
    #: takeover: the connection here is the newer one, and stays
    newer: bool = False
    #: state: the serial (hex) of the certificate the connected session presented ("" when not connected)
    serial: str = ""

    def encode(self) -> bytes:
        return _json(
            status=self.status,
            payload=base64.b64encode(self.payload).decode("ascii"),
            error=self.error,
            message=self.message,
            connected=self.connected,
            pushed=self.pushed,
            session=list(self.session) if self.session is not None else None,
            newer=self.newer,
            serial=self.serial,
        )

    @classmethod
    def decode(cls, data: bytes) -> Answer:
        fields = _object(data)
        try:
            session = fields.get("session")
            if session is not None and not (
                isinstance(session, list) and all(isinstance(item, str) for item in session)
            ):
                raise ValueError("session is not a list of names")
            return cls(
                status=_typed(fields, "status", int),
                payload=base64.b64decode(_typed(fields, "payload", str), validate=True),
                error=_typed(fields, "error", str),
                message=_typed(fields, "message", str),
                connected=_typed(fields, "connected", bool),
                pushed=_typed(fields, "pushed", bool),
                session=tuple(session) if session is not None else None,
                newer=_typed(fields, "newer", bool),
                serial=_serial(fields.get("serial", "")),  # absent in answers of older hubs
            )
        except (KeyError, ValueError) as error:  # binascii.Error is a ValueError
            raise ValueError(f"not a device answer: {error}") from None


def _json(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def _object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _serial(value: object) -> str:
    if not isinstance(value, str) or len(value) > 40 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("serial is not a certificate serial in hex")
    return value


def _typed(fields: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = fields[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} has the wrong type")
    return value


class SessionTaken(FleetwardError):
    """A newer connection of the device, on another hub, keeps the device: this one must end."""

    default_code = "session_taken_over"


# ---------------------------------------------------------------------- the hub's side


class DeviceRoutes:
    """The subjects of the devices one hub holds, and the commands that arrive on them."""

    def __init__(self, hub: Hub, bus: Bus, limits: Limits) -> None:
        self.hub = hub
        self.bus = bus
        #: tells this hub's connections from others' in a takeover (and orders two accepted at once)
        self.hub_id = secrets.token_hex(8)
        self._timeout = limits.bus_request_timeout_milliseconds / 1000
        self._method_payload_max = limits.method_max_payload_bytes
        self._method_timeout_max = float(limits.method_max_timeout_seconds)
        self._subscription = bus.subscribe(max_pending=limits.bus_pending_messages)
        #: session → its subject, for every session (device or module) this hub subscribes to
        self._held: dict[SessionKey, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ holding devices

    def hold(self, tenant_id: str, key: SessionKey) -> None:
        """Receive the session's commands (the session, live or saved, is here now)."""
        if key not in self._held:
            subject = subjects.device(tenant_id, *key)
            self._held[key] = subject
            self._subscription.add(subject)

    def release_if_idle(self, key: SessionKey) -> None:
        """Stop receiving the session's commands unless it, live or saved, is still here."""
        if key in self.hub.connections or key in self.hub.saved_sessions:
            return
        subject = self._held.pop(key, None)
        if subject is not None:
            self._subscription.discard(subject)

    def holds(self, key: SessionKey) -> bool:
        return key in self._held

    async def settled(self) -> None:
        """Once this returns, the bus routes the devices held so far here (a round trip on NATS)."""
        try:
            await self._subscription.settled()
        except TransportError as error:
            logger.warning("the bus did not confirm a device's subscription: %s", error)

    async def take_over(self, tenant_id: str, key: SessionKey, since_ns: int) -> tuple[str, ...] | None:
        """Ask any other hub holding the session to end it; its saved subscriptions, if any.

        Raises :class:`SessionTaken` when the other hub's connection is the newer one.
        """
        command = Command(Op.TAKEOVER, name=self.hub_id, since_ns=since_ns)
        try:
            data = await self.bus.request(subjects.device(tenant_id, *key), command.encode(), self._timeout)
        except NoResponders:
            return None  # nobody else holds it: the usual case
        except TransportError as error:  # the bus is down or the holder slow: accept here all the same
            logger.warning("could not ask for the takeover of a device's session: %s", error)
            return None
        try:
            answer = Answer.decode(data)
        except ValueError as error:
            logger.warning("a malformed takeover answer on the bus: %s", error)
            return None
        if answer.newer:
            raise SessionTaken("a newer connection of the same device, on another hub, holds it")
        return answer.session

    def announce(self, tenant_id: str, key: SessionKey, since_ns: int) -> None:
        """Tell other hubs a connection of the session was accepted here at ``since_ns``."""
        command = Command(Op.TAKEOVER, name=self.hub_id, since_ns=since_ns)
        self.bus.publish(subjects.device(tenant_id, *key), command.encode())

    # ------------------------------------------------------------------ serving commands

    async def serve(self) -> None:
        """Answer the commands for the devices held here, until cancelled."""
        async for message in self._subscription:
            try:
                tenant_id, device_id, module_id = subjects.session_of(message.subject)
                key = SessionKey(device_id, None if module_id is None else check_module_id(module_id))
                command = Command.decode(message.payload)
            except ValueError as error:
                logger.warning("a malformed device command on the bus (%s): %s", message.subject, error)
                continue
            try:
                self._handle(tenant_id, key, command, message)
            except FleetwardError as error:  # one command failed; the device's others still arrive
                logger.warning("a %s command for %s failed: %s", command.op.value, key, error)

    def _handle(self, tenant_id: str, key: SessionKey, command: Command, message: Message) -> None:
        hub = self.hub
        if command.op is Op.METHOD:
            self._spawn(self._method(tenant_id, key, command, message))
        elif command.op is Op.DESIRED:
            try:
                patch = _object(command.payload)
            except ValueError:
                logger.warning("a malformed desired patch on the bus for %s", key)
                return
            pushed = hub.desired_changed(tenant_id, key, command.version, patch)
            self.bus.respond(message, Answer(pushed=pushed).encode())
        elif command.op is Op.MESSAGES:
            if key.module_id is None:  # modules have no cloud-to-device messages
                hub.cloud_to_device_queued(tenant_id, key.device_id)
            if message.reply:
                self.bus.respond(message, Answer().encode())
        elif command.op is Op.STATE:
            connected = hub.is_connected(tenant_id, key)
            identity = hub.connections[key].identity if connected else None
            answer = Answer(connected=connected, serial=identity.serial if identity is not None else "")
            self.bus.respond(message, answer.encode())
        else:
            self._taken_over(tenant_id, key, command, message)

    def _taken_over(self, tenant_id: str, key: SessionKey, command: Command, message: Message) -> None:
        if command.name == self.hub_id:
            return  # our own announcement
        connection = self.hub.connections.get(key)
        if connection is not None and connection.identity is not None:
            if connection.identity.tenant_id != tenant_id:
                return
            if (connection.accepted_ns, self.hub_id) > (command.since_ns, command.name):
                # The connection here is the newer one: it stays, and the other must hear so.
                if message.reply:
                    self.bus.respond(message, Answer(newer=True).encode())
                else:
                    self.announce(tenant_id, key, connection.accepted_ns)
                return
            connection.end("a newer connection of the same device took over", code="session_taken_over")
        saved = self.hub.saved_sessions.pop(key, None)
        self.release_if_idle(key)
        session = tuple(sorted(item.value for item in saved)) if saved is not None else None
        self.bus.respond(message, Answer(session=session).encode())

    async def _method(self, tenant_id: str, key: SessionKey, command: Command, message: Message) -> None:
        """Call the method on the device held here (checked again: the bus is not the API)."""
        try:
            topics.check_method_name(command.name)
        except ValueError as error:
            self.bus.respond(message, Answer(error="bad_method_name", message=str(error)).encode())
            return
        timeout = min(max(command.timeout_seconds, 0.001), self._method_timeout_max)
        if len(command.payload) > self._method_payload_max:
            answer = Answer(error="method_payload_too_large", message="the method payload is too large")
        else:
            try:
                result = await self.hub.invoke_method(tenant_id, key, command.name, command.payload, timeout)
            except NotFound as error:
                answer = Answer(error=error.code, message=error.message)
            except DeviceTimeout as error:
                answer = Answer(error=error.code, message=error.message)
            else:
                answer = Answer(status=result.status, payload=result.payload)
        self.bus.respond(message, answer.encode())

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._subscription.aclose()
        self._held.clear()


def session_of(names: tuple[str, ...]) -> frozenset[topics.Subscription]:
    """The subscriptions a takeover answer handed over (names this version does not know are left out)."""
    known = {item.value for item in topics.Subscription}
    return frozenset(topics.Subscription(name) for name in names if name in known)


# ---------------------------------------------------------------------- the API's side


class DeviceRouter:
    """How the API reaches a device, wherever its session lives."""

    def __init__(self, bus: Bus, limits: Limits) -> None:
        self.bus = bus
        self._timeout = limits.bus_request_timeout_milliseconds / 1000

    @staticmethod
    def _subject(tenant_id: str, device_id: str, module_id: str | None = None) -> str:
        if module_id is not None:
            try:
                check_module_id(module_id)
            except ValueError as error:
                raise InvalidInput(str(error), code="module_id_invalid") from None
        try:
            return subjects.device(tenant_id, device_id, module_id)
        except ValueError as error:
            raise InvalidInput(str(error), code="bad_device_id") from None

    async def _request(
        self, tenant_id: str, device_id: str, command: Command, timeout: float, module_id: str | None = None
    ) -> Answer:
        subject = self._subject(tenant_id, device_id, module_id)
        data = await self.bus.request(subject, command.encode(), timeout)
        try:
            return Answer.decode(data)
        except ValueError as error:
            raise TransportError(f"a malformed answer on the bus: {error}", code="bus_malformed") from None

    async def invoke_method(
        self,
        tenant_id: str,
        device_id: str,
        name: str,
        payload: bytes,
        timeout_seconds: float,
        *,
        module_id: str | None = None,
    ) -> MethodResult:
        """The device's (or its module's) answer to a direct method; ``NotFound`` (``device_offline``) or
        ``DeviceTimeout``."""
        command = Command(Op.METHOD, name=name, payload=payload, timeout_seconds=timeout_seconds)
        try:
            answer = await self._request(
                tenant_id, device_id, command, timeout_seconds + self._timeout, module_id
            )
        except NoResponders:
            raise NotFound("the device is not connected", code="device_offline") from None
        except RequestTimedOut:
            raise DeviceTimeout(
                f"the device did not answer {name} within {timeout_seconds:g} s", code="method_timeout"
            ) from None
        if answer.error == "method_timeout":
            raise DeviceTimeout(answer.message, code=answer.error)
        if answer.error in ("method_payload_too_large", "bad_method_name"):
            raise InvalidInput(answer.message, code=answer.error)
        if answer.error:
            raise NotFound(answer.message or "the device is not connected", code=answer.error)
        return MethodResult(answer.status, answer.payload)

    async def desired_changed(
        self,
        tenant_id: str,
        device_id: str,
        version: int,
        patch: JsonObject,
        *,
        module_id: str | None = None,
    ) -> bool:
        """Push a desired patch to the device's (or module's) session, wherever it is; True if sent to it.

        The patch is in the store already: a device that does not get it now reads it on its next twin GET.
        """
        command = Command(Op.DESIRED, payload=json.dumps(patch).encode(), version=version)
        try:
            answer = await self._request(tenant_id, device_id, command, self._timeout, module_id)
        except NoResponders:
            return False
        except TransportError as error:
            logger.warning("could not push a desired patch to %s: %s", device_id, error)
            return False
        return answer.pushed

    def cloud_to_device_queued(self, tenant_id: str, device_id: str) -> None:
        """Tell the device's session, wherever it is, that messages wait for it."""
        self.bus.publish(self._subject(tenant_id, device_id), Command(Op.MESSAGES).encode())

    async def is_connected(self, tenant_id: str, device_id: str, *, module_id: str | None = None) -> bool:
        return await self.connected_serial(tenant_id, device_id, module_id=module_id) is not None

    async def connected_serial(
        self, tenant_id: str, device_id: str, *, module_id: str | None = None
    ) -> str | None:
        """The serial (hex) of the certificate the session is connected with; ``None`` when it is not
        connected. ``TransportError`` when the bus failed or the holder did not answer in time."""
        try:
            answer = await self._request(tenant_id, device_id, Command(Op.STATE), self._timeout, module_id)
        except NoResponders:
            return None
        return answer.serial if answer.connected else None


def now_ns() -> int:
    """When a connection is accepted, comparable between nodes whose clocks agree."""
    return time.time_ns()
