"""fleetward appkit: an application's side of the agent's API, in one file of standard-library Python
(3.9 or newer).

Applications run as their own user with the system's ``python3``; they cannot import fleetward. The agent
puts this file next to them (or on their ``PYTHONPATH``); copy it as it is. An application is a few lines::

    from appkit import AgentClient

    with AgentClient() as agent:                      # $FLEETWARD_AGENT_SOCKET
        agent.send_telemetry({"temperature": agent.adc_read("ADC0", 1)})
        agent.on_method("blink", lambda payload: (200, {"blinked": payload["times"]}))
        agent.on_desired(lambda desired: print(desired.properties))
        agent.run()                                   # answers methods, hands pushes to the handlers

Every request waits for its answer (``timeout`` seconds at most) and raises :class:`AgentError` with the
agent's code (``capability_not_declared``, ``invalid_request``, …) when it is refused. Pushes that arrive
while a request waits are kept (at most ``max_buffered_pushes``; beyond, the oldest are dropped and counted
in ``dropped_pushes``) and handed out by :meth:`AgentClient.next_push` and :meth:`AgentClient.run`.
The wire format is in fleetward's docs/wire.md, "The agent's application API".
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

API_VERSION = 1
SOCKET_VARIABLE = "FLEETWARD_AGENT_SOCKET"
#: The longest frame the agent may be configured to send.
MAX_FRAME_BYTES = 1024 * 1024

Json = Any
Peripheral = Union[int, str]  # noqa: UP007 - evaluated at run time, and appkit runs on Python 3.9 too


class AgentError(Exception):
    """The agent refused a request, or the connection failed (``connection_closed``, ``timeout``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Push:
    kind: str
    data: dict[str, Json]


@dataclass(frozen=True)
class MethodCall:
    call_id: str
    name: str
    payload: Json


@dataclass(frozen=True)
class Desired:
    """The application's desired properties: all of them (``complete``) or a patch (``None`` removes)."""

    version: int
    complete: bool
    properties: dict[str, Json]


@dataclass(frozen=True)
class Message:
    message_id: str
    properties: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Event:
    kind: str
    details: dict[str, Json] = field(default_factory=dict)


#: a handler answers ``(status, payload)``, or a payload alone (status 200)
MethodHandler = Callable[[Json], Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


class AgentClient:
    """A connection to the agent. Not thread-safe: use it from one thread."""

    def __init__(
        self, path: str | None = None, *, timeout: float = 60.0, max_buffered_pushes: int = 256
    ) -> None:
        chosen = path or os.environ.get(SOCKET_VARIABLE)
        if not chosen:
            raise AgentError("no_socket", f"no socket path given and ${SOCKET_VARIABLE} is not set")
        self.path = chosen
        self.timeout = timeout
        self.component_id = ""
        self.max_frame_bytes = MAX_FRAME_BYTES
        self.dropped_pushes = 0
        self._socket: socket.socket | None = None
        self._buffer = bytearray()
        self._pushes: deque[Push] = deque()
        self._max_pushes = max_buffered_pushes
        self._ids = itertools.count(1)
        self._methods: dict[str, MethodHandler] = {}
        self._on_desired: Callable[[Desired], None] | None = None
        self._on_message: Callable[[Message], None] | None = None
        self._on_event: Callable[[Event], None] | None = None
        self._stopped = False

    # --- connection

    def connect(self) -> AgentClient:
        """Connect and read the agent's hello (which names the component)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as error:
            sock.close()
            raise AgentError("connection_failed", f"{self.path}: {error.strerror or error}") from None
        self._socket = sock
        frame = self._read_frame(time.monotonic() + self.timeout)
        if "error" in frame:
            self.close()
            raise AgentError(frame["error"]["code"], frame["error"]["message"])
        if frame.get("push") != "hello":
            self.close()
            raise AgentError("protocol_error", "the agent did not say hello")
        self.component_id = frame["data"]["component_id"]
        self.max_frame_bytes = min(int(frame["data"]["max_frame_bytes"]), MAX_FRAME_BYTES)
        return self

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> AgentClient:
        return self.connect() if self._socket is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests

    def call(self, op: str, **args: Json) -> dict[str, Json]:
        """Send one request and wait for its answer; :class:`AgentError` if refused."""
        request_id = next(self._ids)
        line = json.dumps({"id": request_id, "op": op, "args": args}, separators=(",", ":"))
        self._send(line.encode("utf-8") + b"\n")
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self._read_frame(deadline)
            if "push" in frame:
                self._keep(frame)
                continue
            if frame.get("id") == request_id:
                if "error" in frame:
                    raise AgentError(frame["error"]["code"], frame["error"]["message"])
                result: dict[str, Json] = frame["result"]
                return result
            if frame.get("id") is None and "error" in frame:  # about the connection itself
                raise AgentError(frame["error"]["code"], frame["error"]["message"])

    def send_telemetry(self, body: str | bytes | Json, properties: dict[str, str] | None = None) -> str:
        """Send telemetry: text as UTF-8, bytes as they are, anything else as JSON. Its message id."""
        chosen = dict(properties or {})
        if isinstance(body, bytes):
            result = self.call("telemetry.send", body=_b64(body), body_encoding="base64", properties=chosen)
        else:
            if not isinstance(body, str):
                body = json.dumps(body, separators=(",", ":"))
                chosen.setdefault("$.ct", "application/json")
                chosen.setdefault("$.ce", "utf-8")
            result = self.call("telemetry.send", body=body, properties=chosen)
        return str(result["message_id"])

    def get_twin(self) -> dict[str, Json]:
        """This application's desired and reported properties, and the versions of the twin's halves."""
        return self.call("twin.get")

    def report(self, patch: dict[str, Json]) -> int:
        """Merge ``patch`` into this application's reported properties (``None`` removes a key)."""
        return int(self.call("twin.report", patch=patch)["version"])

    def register_method(self, name: str) -> None:
        self.call("methods.register", name=name)

    def respond(self, call_id: str, status: int, payload: Json = None) -> None:
        self.call("methods.respond", call_id=call_id, status=status, payload=payload)

    def subscribe_desired(self) -> None:
        self.call("twin.subscribe")

    def subscribe_messages(self) -> None:
        self.call("messages.subscribe")

    def subscribe_events(self) -> None:
        self.call("events.subscribe")

    def gpio_read(self, pin: Peripheral) -> int:
        return int(self.call("gpio.read", pin=pin)["value"])

    def gpio_write(self, pin: Peripheral, value: int) -> None:
        self.call("gpio.write", pin=pin, value=1 if value else 0)

    def uart_open(self, name: Peripheral, baud_rate: int = 115200) -> None:
        self.call("uart.open", name=name, baud_rate=baud_rate)

    def uart_write(self, name: Peripheral, data: bytes) -> int:
        return int(self.call("uart.write", name=name, data=_b64(data))["written"])

    def uart_read(self, name: Peripheral, max_bytes: int = 256, timeout: float = 0.0) -> bytes:
        result = self.call("uart.read", name=name, max_bytes=max_bytes, timeout_ms=int(timeout * 1000))
        return base64.b64decode(result["data"])

    def uart_close(self, name: Peripheral) -> None:
        self.call("uart.close", name=name)

    def i2c_transfer(self, bus: Peripheral, address: int, write: bytes = b"", read_length: int = 0) -> bytes:
        result = self.call(
            "i2c.transfer", bus=bus, address=address, write=_b64(write), read_length=read_length
        )
        return base64.b64decode(result["data"])

    def spi_transfer(
        self, bus: Peripheral, chip_select: int = 0, write: bytes = b"", read_length: int = 0
    ) -> bytes:
        result = self.call(
            "spi.transfer", bus=bus, chip_select=chip_select, write=_b64(write), read_length=read_length
        )
        return base64.b64decode(result["data"])

    def adc_read(self, controller: Peripheral, channel: int) -> int:
        return int(self.call("adc.read", controller=controller, channel=channel)["value"])

    def pwm_set(
        self, controller: Peripheral, channel: int, period_ns: int, duty_ns: int, enabled: bool = True
    ) -> None:
        self.call(
            "pwm.set",
            controller=controller,
            channel=channel,
            period_ns=period_ns,
            duty_ns=duty_ns,
            enabled=enabled,
        )

    def storage_quota(self) -> tuple[int, int]:
        """(bytes used, bytes allowed) of this application's MutableStorage."""
        result = self.call("storage.quota")
        return int(result["used_bytes"]), int(result["allowed_bytes"])

    def defer_update(self, seconds: int) -> dict[str, Json]:
        """Ask that updates wait ``seconds`` (at most a day a request); what was granted."""
        return self.call("update.defer", seconds=seconds)

    def certificate_paths(self) -> tuple[str, str]:
        """(certificate, key) file paths of the device's current operational certificate."""
        result = self.call("device.certificate_paths")
        return str(result["certificate"]), str(result["key"])

    def device_id(self) -> str:
        """The device id the certificate names: what an IoT Hub SDK connects as (DeviceAuthentication)."""
        return str(self.call("device.certificate_paths")["device_id"])

    def reboot(self) -> None:
        self.call("power.reboot")

    # --- pushes

    def on_method(self, name: str, handler: MethodHandler) -> None:
        """Register direct method ``name``; ``handler(payload)`` answers ``(status, payload)`` or a payload
        (status 200). An exception answers 500."""
        self.register_method(name)
        self._methods[name] = handler

    def on_desired(self, handler: Callable[[Desired], None]) -> None:
        """Subscribe to this application's desired properties: all of them at once, then each change."""
        self._on_desired = handler
        self.subscribe_desired()

    def on_message(self, handler: Callable[[Message], None]) -> None:
        self._on_message = handler
        self.subscribe_messages()

    def on_event(self, handler: Callable[[Event], None]) -> None:
        self._on_event = handler
        self.subscribe_events()

    def next_push(self, timeout: float | None = None) -> Push | None:
        """The next push (kept or arriving), or None after ``timeout`` seconds (None: wait as long as it
        takes)."""
        if self._pushes:
            return self._pushes.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                frame = self._read_frame(deadline)
            except AgentError as error:
                if error.code == "timeout":
                    return None
                raise
            if "push" in frame:
                return Push(str(frame["push"]), dict(frame.get("data") or {}))
            if frame.get("id") is None and "error" in frame:
                raise AgentError(frame["error"]["code"], frame["error"]["message"])

    def dispatch(self, push: Push) -> None:
        """Hand ``push`` to its handler; a method call is answered with what the handler returns."""
        data = push.data
        if push.kind == "method":
            self._answer(MethodCall(data["call_id"], data["name"], data.get("payload")))
        elif push.kind == "desired" and self._on_desired is not None:
            self._on_desired(Desired(int(data["version"]), bool(data["complete"]), dict(data["properties"])))
        elif push.kind == "message" and self._on_message is not None:
            body = data["body"]
            raw = base64.b64decode(body) if data.get("body_encoding") == "base64" else body.encode("utf-8")
            self._on_message(Message(data["message_id"], dict(data["properties"]), raw))
        elif push.kind == "event" and self._on_event is not None:
            self._on_event(Event(data["kind"], dict(data.get("details") or {})))

    def run(self, duration: float | None = None) -> None:
        """Dispatch pushes until :meth:`stop`, or for ``duration`` seconds. Raises :class:`AgentError`
        (``connection_closed``) if the agent ends the connection."""
        self._stopped = False
        end = None if duration is None else time.monotonic() + duration
        while not self._stopped:
            wait = None if end is None else end - time.monotonic()
            if wait is not None and wait <= 0:
                return
            push = self.next_push(wait)
            if push is not None:
                self.dispatch(push)

    def stop(self) -> None:
        """End :meth:`run` after the push being handled (call it from a handler)."""
        self._stopped = True

    def _answer(self, call: MethodCall) -> None:
        handler = self._methods.get(call.name)
        if handler is None:
            self.respond(call.call_id, 404, {"message": f"no handler for {call.name!r}"})
            return
        try:
            answer = handler(call.payload)
        except Exception as error:  # noqa: BLE001 - the hub must get an answer whatever the handler did
            answer = (500, {"message": f"{type(error).__name__}: {error}"[:1024]})
        status, payload = (
            answer
            if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], int)
            else (200, answer)
        )
        try:
            self.respond(call.call_id, status, payload)
        except AgentError as error:
            if error.code != "unknown_call":  # unknown_call: too late, the agent answered the hub 504
                raise

    # --- frames

    def _keep(self, frame: dict[str, Json]) -> None:
        if len(self._pushes) >= self._max_pushes:
            self._pushes.popleft()
            self.dropped_pushes += 1
        self._pushes.append(Push(str(frame["push"]), dict(frame.get("data") or {})))

    def _connected(self) -> socket.socket:
        if self._socket is None:
            raise AgentError("connection_closed", "not connected to the agent")
        return self._socket

    def _send(self, data: bytes) -> None:
        if len(data) > self.max_frame_bytes:
            raise AgentError("frame_too_large", f"a frame is at most {self.max_frame_bytes} bytes")
        try:
            self._connected().sendall(data)
        except OSError as error:
            self.close()
            raise AgentError("connection_closed", f"the agent's socket: {error}") from None

    def _read_frame(self, deadline: float | None) -> dict[str, Json]:
        sock = self._connected()
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                frame = json.loads(line)
                if not isinstance(frame, dict):
                    raise AgentError("protocol_error", "the agent sent a frame that is not an object")
                return frame
            if len(self._buffer) > MAX_FRAME_BYTES:
                self.close()
                raise AgentError("protocol_error", "the agent sent a frame longer than any allowed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise AgentError("timeout", "the agent did not answer in time")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(64 * 1024)
            except TimeoutError:
                raise AgentError("timeout", "the agent did not answer in time") from None
            except OSError as error:
                self.close()
                raise AgentError("connection_closed", f"the agent's socket: {error}") from None
            if not chunk:
                self.close()
                raise AgentError("connection_closed", "the agent closed the connection")
            self._buffer += chunk
