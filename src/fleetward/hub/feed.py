"""The live telemetry stream for operators: committed telemetry on the bus, followed through bounded queues.

The hub hands over each message once its batch is committed; what was committed in one turn of the event
loop goes on the bus as one message per tenant, on ``telemetry.<tenant>`` (cut at
:data:`BATCH_MAX_BYTES`). A stream follows its tenant's subject (and keeps only the device it asked for, if
any), so that with a shared bus (NATS) a stream served by any process sees the devices of every process.
With the in-process bus nothing is encoded while nobody follows.

A follower that reads too slowly loses the oldest messages, never the process's memory: its queue is
bounded (``telemetry_stream_buffer`` messages) and it is told how many it missed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncGenerator, Sequence

from fleetward.bus import subjects
from fleetward.bus.base import Bus, Inbox, Subscription
from fleetward.bus.local import LocalBus
from fleetward.hub.store import TelemetryMessage

logger = logging.getLogger(__name__)

#: the most one bus message of telemetry holds (NATS refuses more than 1 MiB by default); a single
#: telemetry message (at most ``mqtt_max_packet_bytes``) always fits, alone
BATCH_MAX_BYTES = 512 * 1024
#: bus messages a follower's subscription holds before its pump takes them (it takes them at once)
_BATCHES_PENDING = 256


def encode(message: TelemetryMessage) -> bytes:
    """One message, as an item of a batch."""
    return json.dumps(
        [
            message.id,
            message.tenant_id,
            message.device_id,
            message.received_at.isoformat(),
            message.properties,
            base64.b64encode(message.body).decode("ascii"),
            message.module_id,
        ],
        separators=(",", ":"),
    ).encode()


def encode_batch(items: Sequence[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


def decode_batch(data: bytes) -> list[TelemetryMessage]:
    """Raises ``ValueError`` for anything :func:`encode_batch` did not make."""
    try:
        items = json.loads(data)
        if not isinstance(items, list):
            raise TypeError("not a list")
        messages = [
            TelemetryMessage(
                tenant_id=_text(tenant_id),
                device_id=_text(device_id),
                received_at=dt.datetime.fromisoformat(received_at),
                properties=tuple((_text(key), _text(value)) for key, value in properties),
                body=base64.b64decode(body, validate=True),
                id=identifier if isinstance(identifier, int) and not isinstance(identifier, bool) else 0,
                module_id=None if module_id is None else _text(module_id),
            )
            for identifier, tenant_id, device_id, received_at, properties, body, module_id in items
        ]
    except (TypeError, ValueError, UnicodeDecodeError, binascii.Error) as error:
        raise ValueError(f"not a telemetry batch: {type(error).__name__}") from None
    return messages


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


class TelemetryFeed:
    def __init__(self, buffer: int, bus: Bus | None = None) -> None:
        self._buffer = buffer
        self._bus: Bus = bus or LocalBus()
        self._subjects: dict[str, str] = {}
        #: committed in this turn of the event loop, by subject, encoded
        self._pending: dict[str, list[bytes]] = {}

    def publish(self, messages: Sequence[TelemetryMessage]) -> None:
        """Hand over committed messages; they go on the bus at the end of this turn. Event-loop thread."""
        bus = self._bus
        for message in messages:
            subject = self._subjects.get(message.tenant_id)
            if subject is None:
                try:
                    subject = subjects.telemetry(message.tenant_id)
                except ValueError as error:
                    logger.warning("telemetry not streamed: %s", error)
                    continue
                if len(self._subjects) >= 4096:
                    self._subjects.clear()
                self._subjects[message.tenant_id] = subject
            if not bus.may_deliver(subject):
                continue
            if not self._pending:
                asyncio.get_running_loop().call_soon(self._send)
            self._pending.setdefault(subject, []).append(encode(message))

    def _send(self) -> None:
        pending, self._pending = self._pending, {}
        for subject, items in pending.items():
            batch: list[bytes] = []
            size = 0
            for item in items:
                if batch and size + len(item) > BATCH_MAX_BYTES:
                    self._bus.publish(subject, encode_batch(batch))
                    batch, size = [], 0
                batch.append(item)
                size += len(item) + 1
            self._bus.publish(subject, encode_batch(batch))

    async def follow(
        self, tenant_id: str, device_id: str | None = None
    ) -> AsyncGenerator[tuple[TelemetryMessage, int]]:
        """Telemetry of a tenant (or one device) as it is committed, with the count missed so far."""
        subscription = self._bus.subscribe(subjects.telemetry(tenant_id), max_pending=_BATCHES_PENDING)
        followed: Inbox[TelemetryMessage] = Inbox(self._buffer)
        pump = asyncio.create_task(_pump(subscription, followed, device_id), name="telemetry-follower")
        try:
            while True:
                try:
                    message = await followed.get()
                except StopAsyncIteration:
                    return
                yield message, followed.missed
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await subscription.aclose()


async def _pump(subscription: Subscription, followed: Inbox[TelemetryMessage], device_id: str | None) -> None:
    """Move what arrives on the bus to the follower's bounded queue, keeping its device only."""
    lost = 0
    try:
        async for item in subscription:
            if subscription.missed > lost:  # never seen so far: whole batches, at least one message each
                followed.missed += subscription.missed - lost
                lost = subscription.missed
            try:
                messages = decode_batch(item.payload)
            except ValueError as error:
                logger.warning("a malformed telemetry batch on the bus: %s", error)
                continue
            for message in messages:
                if device_id is None or message.device_id == device_id:
                    followed.put(message)
    finally:
        followed.close()
