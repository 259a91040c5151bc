"""The live telemetry stream for operators: committed telemetry, fanned out to bounded subscriber queues.

A subscriber that reads too slowly loses the oldest messages, never the hub's memory: its queue is bounded
and it is told how many it missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from fleetward.hub.store import TelemetryMessage


@dataclass(eq=False)
class _Subscriber:
    tenant_id: str
    device_id: str | None
    queue: asyncio.Queue[TelemetryMessage]
    missed: int = 0


class TelemetryFeed:
    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._subscribers: set[_Subscriber] = set()

    def publish(self, messages: Sequence[TelemetryMessage]) -> None:
        """Hand committed messages to every subscriber of their tenant (and device). Event-loop thread."""
        for subscriber in list(self._subscribers):
            for message in messages:
                if message.tenant_id != subscriber.tenant_id:
                    continue
                if subscriber.device_id is not None and message.device_id != subscriber.device_id:
                    continue
                if subscriber.queue.full():
                    subscriber.queue.get_nowait()
                    subscriber.missed += 1
                subscriber.queue.put_nowait(message)

    async def follow(
        self, tenant_id: str, device_id: str | None = None
    ) -> AsyncGenerator[tuple[TelemetryMessage, int]]:
        """Telemetry of a tenant (or one device) as it is committed, with the count missed so far."""
        subscriber = _Subscriber(tenant_id, device_id, asyncio.Queue(self._buffer))
        self._subscribers.add(subscriber)
        try:
            while True:
                message = await subscriber.queue.get()
                yield message, subscriber.missed
        finally:
            self._subscribers.discard(subscriber)
