"""The bus between processes and nodes: core NATS, through nats-py.

Every subject goes out under a prefix (``fleetward.`` by default), so that one NATS can carry several
deployments. The connection reconnects by itself, for as long as it takes, and re-subscribes; while it is
down, publishes wait in nats-py's buffer (bounded) and requests fail at once with a :class:`TransportError`
(``bus_unavailable``). Starting fails with ``bus_unreachable`` when NATS does not answer in time.

Publishing, subscribing and unsubscribing never wait: they are queued, in order, for one writer task, so a
hub can subscribe to a device's subject in the middle of a synchronous callback and the order of what it
asked for is the order NATS sees. ``settled()`` waits until NATS has everything queued so far (a round
trip). Requests go straight out, each answered on the connection's shared reply subject.

nats-py's exceptions stay inside this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as WireSubscription

from fleetward.bus.base import (
    InboxSubscription,
    Message,
    NoResponders,
    RequestTimedOut,
    check_subject,
    check_token,
)
from fleetward.errors import ConfigurationError, TransportError

logger = logging.getLogger(__name__)

_NATS_ERRORS = (nats.errors.Error, OSError, TimeoutError)
#: messages NATS may deliver to one subscription in one read, beyond what its inbox keeps
_BURST = 4096
#: operations applied, at most, between a flush being asked for and its PING going out
_FLUSH_EVERY = 256
#: seconds between two warnings that NATS dropped messages for a slow subscriber
_SLOW_WARNING_SECONDS = 60.0


def parse_servers(url: str) -> list[str]:
    """The server URLs in ``url`` (comma-separated for a cluster): ``nats://`` or ``tls://``, with a host."""
    servers = [item.strip() for item in url.split(",") if item.strip()]
    if not servers:
        raise ConfigurationError("the bus URL is empty")
    for server in servers:
        parts = urlsplit(server)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigurationError(
                f"the bus URL must look like nats://host:4222 (or tls://…), got {redact(server)!r}"
            )
    return servers


def redact(url: str) -> str:
    """``url`` without the user and password it may carry."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"***@{host}{port}").geturl()


@dataclass(frozen=True, slots=True)
class _Publish:
    subject: str  # on the wire: prefixed, or a reply subject
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Subscribe:
    subscription: NatsSubscription
    subject: str


@dataclass(frozen=True, slots=True)
class _Unsubscribe:
    subscription: NatsSubscription
    subject: str


@dataclass(frozen=True, slots=True)
class _Flush:
    done: asyncio.Future[None]


_Op = _Publish | _Subscribe | _Unsubscribe | _Flush


class NatsSubscription(InboxSubscription):
    def __init__(self, bus: NatsBus, max_pending: int) -> None:
        super().__init__(max_pending)
        self._bus = bus
        self.max_pending = max_pending
        #: what NATS has (or is about to have), by subject: the writer task's to change
        self.wire: dict[str, WireSubscription] = {}

    def _attached(self, subject: str) -> None:
        self._bus._queue(_Subscribe(self, subject))

    def _detached(self, subject: str) -> None:
        self._bus._queue(_Unsubscribe(self, subject))

    async def settled(self) -> None:
        await self._bus.settled()

    async def receive(self, msg: Msg) -> None:
        self._inbox.put(Message(self._bus.unprefixed(msg.subject), msg.data, msg.reply or None))

    def close(self) -> None:
        super().close()
        self._bus.subscriptions.discard(self)


class NatsBus:
    """Core NATS at ``url``; subjects under ``prefix``; at most ``max_outbound`` publishes queued."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "fleetward",
        max_outbound: int = 65_536,
        connect_timeout_seconds: float = 5.0,
        flush_timeout_seconds: float = 2.0,
        name: str = "fleetward",
    ) -> None:
        self._servers = parse_servers(url)
        self.url = ",".join(redact(server) for server in self._servers)
        self._prefix = check_token(prefix, "bus subject prefix") + "."
        self._max_outbound = max_outbound
        self._connect_timeout = connect_timeout_seconds
        self._flush_timeout = flush_timeout_seconds
        self._name = name
        self._client: Client | None = None
        self._writer: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._ops: deque[_Op] = deque()
        self._publishes = 0
        #: open subscriptions, closed with the bus
        self.subscriptions: set[NatsSubscription] = set()
        self._ready: asyncio.Event | None = None  # made by start(), in the event loop that runs the bus
        self._last_error: BaseException | None = None
        self._slow_warned = -_SLOW_WARNING_SECONDS
        self._down = False
        #: publishes lost: the outbound queue was full, or NATS refused them
        self.dropped = 0

    # ------------------------------------------------------------------ connection

    async def start(self) -> None:
        if self._client is not None:
            return
        client = Client()
        try:
            await asyncio.wait_for(
                client.connect(
                    servers=self._servers,
                    name=self._name,
                    connect_timeout=max(1, int(self._connect_timeout)),
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,  # reconnect for as long as it takes
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                self._connect_timeout,
            )
        except _NATS_ERRORS as error:
            reason = self._last_error or error
            with contextlib.suppress(*_NATS_ERRORS):
                await client.close()
            raise TransportError(
                f"NATS is not reachable at {self.url} ({type(reason).__name__}: {reason or 'no answer'})",
                code="bus_unreachable",
            ) from None
        self._client = client
        self._down = False
        self._ready = ready = asyncio.Event()
        if self._ops:
            ready.set()
        self._writer = asyncio.create_task(self._write(client, ready), name="bus-writer")
        logger.info("bus: NATS at %s (subjects under %s*)", self.url, self._prefix)

    async def close(self) -> None:
        client, self._client = self._client, None
        for subscription in list(self.subscriptions):
            subscription.close()
        if client is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(_Flush(done))
        with contextlib.suppress(TransportError, TimeoutError):
            await asyncio.wait_for(done, self._flush_timeout)
        for task in [*self._flushes, *([self._writer] if self._writer is not None else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer = None
        for op in self._ops:
            if isinstance(op, _Flush) and not op.done.done():
                op.done.set_exception(TransportError("the bus closed", code="bus_closed"))
        self._ops.clear()
        self._publishes = 0
        self._ready = None
        with contextlib.suppress(*_NATS_ERRORS):
            await client.close()

    async def _on_error(self, error: Exception) -> None:
        self._last_error = error
        if isinstance(error, nats.errors.SlowConsumerError):
            now = time.monotonic()
            if now - self._slow_warned >= _SLOW_WARNING_SECONDS:
                self._slow_warned = now
                logger.warning("bus: a subscriber of %s falls behind; messages are dropped", error.subject)
        else:
            logger.debug("bus: %s: %s", type(error).__name__, error)

    async def _on_disconnected(self) -> None:
        if self._client is not None and not self._down:
            self._down = True
            logger.warning("bus: lost NATS at %s; reconnecting (commands between processes wait)", self.url)

    async def _on_reconnected(self) -> None:
        self._down = False
        logger.warning("bus: NATS at %s again", self.url)

    @property
    def connected(self) -> bool:
        """Connected to NATS now (False while it reconnects)."""
        return self._client is not None and self._client.is_connected

    def _connected(self) -> Client:
        client = self._client
        if client is None or not client.is_connected:
            raise TransportError(f"the bus (NATS at {self.url}) is not connected", code="bus_unavailable")
        return client

    # ------------------------------------------------------------------ the writer

    def _queue(self, op: _Op) -> None:
        if isinstance(op, _Publish):
            if self._publishes >= self._max_outbound:
                self.dropped += 1
                return
            self._publishes += 1
        self._ops.append(op)
        if self._ready is not None:
            self._ready.set()

    async def _write(self, client: Client, ready: asyncio.Event) -> None:
        """Apply the queued operations in order. A flush does not hold the queue up for its round trip:
        the flushes met on the way share one PING, sent after everything before them."""
        waiting: list[asyncio.Future[None]] = []
        applied = 0
        while True:
            if waiting and (not self._ops or applied >= _FLUSH_EVERY):
                self._confirm(client, waiting)
                waiting, applied = [], 0
            if not self._ops:
                ready.clear()
                await ready.wait()
                continue
            op = self._ops.popleft()
            if isinstance(op, _Flush):
                waiting.append(op.done)
                continue
            applied += 1
            try:
                await self._apply(client, op)
            except _NATS_ERRORS as error:
                if isinstance(op, _Publish):
                    self.dropped += 1
                    logger.debug("bus: a publish on %s was lost: %s", op.subject, error)
                else:
                    logger.warning("bus: could not change a subscription to %s: %s", op.subject, error)

    async def _apply(self, client: Client, op: _Publish | _Subscribe | _Unsubscribe) -> None:
        if isinstance(op, _Publish):
            self._publishes -= 1
            await client.publish(op.subject, op.payload)
        elif isinstance(op, _Subscribe):
            # nats-py's own queue only hands messages to the subscription's inbox, which loses the oldest
            # when its reader lags; it is bounded too, with room for a burst that arrives in one read.
            op.subscription.wire[op.subject] = await client.subscribe(
                self._prefix + op.subject,
                cb=op.subscription.receive,
                pending_msgs_limit=op.subscription.max_pending + _BURST,
                pending_bytes_limit=0,  # bounded by messages, as the inbox is
            )
        else:
            wire = op.subscription.wire.pop(op.subject, None)
            if wire is not None and not client.is_closed:
                await wire.unsubscribe()

    def _confirm(self, client: Client, waiting: list[asyncio.Future[None]]) -> None:
        task = asyncio.create_task(self._round_trip(client, waiting), name="bus-flush")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _round_trip(self, client: Client, waiting: list[asyncio.Future[None]]) -> None:
        failure: TransportError | None = None
        try:
            if not client.is_connected:
                raise nats.errors.ConnectionReconnectingError
            await client.flush(max(1, int(self._flush_timeout)))
        except _NATS_ERRORS as error:
            failure = TransportError(f"NATS did not answer: {type(error).__name__}", code="bus_unavailable")
        for done in waiting:
            if done.done():
                continue
            if failure is None:
                done.set_result(None)
            else:
                done.set_exception(failure)

    async def settled(self) -> None:
        """Return once NATS has every publish and subscription change queued so far."""
        if self._client is None:
            raise TransportError("the bus is not started", code="bus_unavailable")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(_Flush(done))
        try:
            await asyncio.wait_for(done, self._flush_timeout + 1)
        except TimeoutError:
            raise TransportError(f"NATS at {self.url} did not answer", code="bus_unavailable") from None

    # ------------------------------------------------------------------ messages

    def unprefixed(self, subject: str) -> str:
        return subject[len(self._prefix) :] if subject.startswith(self._prefix) else subject

    def subscribe(self, *subjects: str, max_pending: int) -> NatsSubscription:
        subscription = NatsSubscription(self, max_pending)
        self.subscriptions.add(subscription)
        for subject in subjects:
            subscription.add(subject)
        return subscription

    def may_deliver(self, subject: str) -> bool:
        return True  # other processes' interest is NATS's to know

    def publish(self, subject: str, payload: bytes) -> None:
        self._queue(_Publish(self._prefix + subject, payload))

    async def request(self, subject: str, payload: bytes, timeout_seconds: float) -> bytes:
        check_subject(subject)
        client = self._connected()
        try:
            answer = await client.request(self._prefix + subject, payload, timeout=timeout_seconds)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"nobody listens on {subject}") from None
        except nats.errors.TimeoutError:
            raise RequestTimedOut(f"no answer on {subject} within {timeout_seconds:g} s") from None
        except _NATS_ERRORS as error:
            raise TransportError(f"the bus failed: {type(error).__name__}", code="bus_unavailable") from None
        return answer.data

    def respond(self, message: Message, payload: bytes) -> None:
        if message.reply:
            self._queue(_Publish(message.reply, payload))
