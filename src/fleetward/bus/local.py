"""The in-process bus: the embedded default, for one process that needs no server.

Subscriptions are held in dictionaries by subject (and by prefix, for a trailing ``*``); a publish is one or
two lookups and a bounded append per subscriber, on the caller's turn of the event loop. Use it from one
event loop at a time.
"""

from __future__ import annotations

import asyncio
import itertools

from fleetward.bus.base import InboxSubscription, Message, NoResponders, RequestTimedOut, check_subject
from fleetward.errors import TransportError


class LocalSubscription(InboxSubscription):
    def __init__(self, bus: LocalBus, max_pending: int) -> None:
        super().__init__(max_pending)
        self._bus = bus

    def deliver(self, message: Message) -> None:
        self._inbox.put(message)

    def _attached(self, subject: str) -> None:
        self._bus._attach(self, subject)

    def _detached(self, subject: str) -> None:
        self._bus._detach(self, subject)

    async def settled(self) -> None:
        return  # in effect as soon as added


class LocalBus:
    """Publish, subscribe and request within this process."""

    shared = False

    def __init__(self) -> None:
        # Tuples, not sets: a subject usually has one subscriber (a device's hub), and a hub holds many.
        self._exact: dict[str, tuple[LocalSubscription, ...]] = {}
        #: subscriptions ending in ``.*``, by what comes before it
        self._prefixed: dict[str, tuple[LocalSubscription, ...]] = {}
        self._requests: dict[str, asyncio.Future[bytes]] = {}
        self._request_ids = itertools.count(1)

    async def start(self) -> None:
        return

    async def close(self) -> None:
        groups = (*self._exact.values(), *self._prefixed.values())
        for subscription in {item for group in groups for item in group}:
            subscription.close()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(TransportError("the bus closed", code="bus_closed"))
        self._requests.clear()

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, *subjects: str, max_pending: int) -> LocalSubscription:
        subscription = LocalSubscription(self, max_pending)
        for subject in subjects:
            subscription.add(subject)
        return subscription

    def _attach(self, subscription: LocalSubscription, subject: str) -> None:
        table, key = (self._prefixed, subject[:-2]) if subject.endswith(".*") else (self._exact, subject)
        table[key] = (*table.get(key, ()), subscription)

    def _detach(self, subscription: LocalSubscription, subject: str) -> None:
        table, key = (self._prefixed, subject[:-2]) if subject.endswith(".*") else (self._exact, subject)
        remaining = tuple(item for item in table.get(key, ()) if item is not subscription)
        if remaining:
            table[key] = remaining
        else:
            table.pop(key, None)

    def _targets(self, subject: str) -> tuple[LocalSubscription, ...]:
        exact = self._exact.get(subject, ())
        if not self._prefixed:
            return exact
        prefixed = self._prefixed.get(subject.rpartition(".")[0], ())
        return tuple(dict.fromkeys((*exact, *prefixed))) if prefixed else exact

    # ------------------------------------------------------------------ messages

    def may_deliver(self, subject: str) -> bool:
        return subject in self._exact or (
            bool(self._prefixed) and subject.rpartition(".")[0] in self._prefixed
        )

    def publish(self, subject: str, payload: bytes) -> None:
        targets = self._targets(subject)
        if targets:
            message = Message(subject, payload)
            for subscription in targets:
                subscription.deliver(message)

    async def request(self, subject: str, payload: bytes, timeout_seconds: float) -> bytes:
        check_subject(subject)
        targets = self._targets(subject)
        if not targets:
            raise NoResponders(f"nobody listens on {subject}")
        reply = f"_reply.{next(self._request_ids)}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._requests[reply] = future
        message = Message(subject, payload, reply)
        try:
            for subscription in targets:
                subscription.deliver(message)
            return await asyncio.wait_for(future, timeout_seconds)
        except TimeoutError:
            raise RequestTimedOut(f"no answer on {subject} within {timeout_seconds:g} s") from None
        finally:
            self._requests.pop(reply, None)

    def respond(self, message: Message, payload: bytes) -> None:
        future = self._requests.get(message.reply) if message.reply else None
        if future is not None and not future.done():
            future.set_result(payload)
