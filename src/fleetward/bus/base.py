"""The bus interface: subjects, bytes payloads, publish, subscribe, request and reply.

A subject is dot-separated tokens (``device.<tenant>.<device>``); a subscription may end in one ``*``
token, which matches any one token there (``device.<tenant>.*``). Publishing is fire-and-forget and
never waits; a request waits for the first answer and ends in one of three ways: the answer, nobody
listening on the subject (:class:`NoResponders`, at once), or no answer in time (:class:`RequestTimedOut`).

A subscription holds at most ``max_pending`` messages its reader has not taken yet; past that it loses the
oldest and counts them in ``missed`` (back-pressure for a live stream means losing what is stale, never
growing). Several subjects can share one subscription, and one reader (a hub reads the subjects of all
the devices it holds through one).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from fleetward.errors import TransportError

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
T = TypeVar("T")


class NoResponders(TransportError):
    """Nobody listens on the subject of a request (for a device: no hub holds its session)."""

    default_code = "no_responders"


class RequestTimedOut(TransportError):
    """A request's responder did not answer in time."""

    default_code = "request_timeout"


def check_token(value: str, what: str = "token") -> str:
    """``value`` as one subject token: 1 to 128 of ``A-Z a-z 0-9 _ -`` (no dot, no wildcard, no space)."""
    if not isinstance(value, str):
        raise TypeError(f"a {what} must be a str, not {type(value).__name__}")
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value[:80]!r} is not a safe subject token")
    return value


def check_subject(subject: str, *, wildcard: bool = False) -> str:
    """``subject`` as safe tokens joined by dots; with ``wildcard``, the last token may be ``*``."""
    if not isinstance(subject, str):
        raise TypeError(f"a subject must be a str, not {type(subject).__name__}")
    tokens = subject.split(".")
    if wildcard and len(tokens) > 1 and tokens[-1] == "*":
        tokens.pop()
    for token in tokens:
        check_token(token, "subject token")
    return subject


@dataclass(frozen=True, slots=True)
class Message:
    """What a subscription delivers; ``reply`` is set on a request, and :meth:`Bus.respond` answers it."""

    subject: str
    payload: bytes
    reply: str | None = None


class Subscription(Protocol):
    """Messages on a set of subjects, read with ``async for``; closed with ``aclose`` (or ``async with``)."""

    @property
    def missed(self) -> int:
        """Messages lost so far because the reader fell ``max_pending`` behind."""
        ...

    def add(self, subject: str) -> None:
        """Receive what is published on ``subject`` too; ``await settled()`` to know the bus routes it."""
        ...

    def discard(self, subject: str) -> None:
        """Stop receiving ``subject`` (nothing if it was not added)."""
        ...

    async def settled(self) -> None:
        """Return once every ``add`` and ``discard`` so far is in effect on the bus."""
        ...

    def __aiter__(self) -> AsyncIterator[Message]: ...

    async def __anext__(self) -> Message: ...

    async def aclose(self) -> None:
        """Stop receiving; a reader waiting in ``async for`` ends."""
        ...

    async def __aenter__(self) -> Subscription: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Bus(Protocol):
    """Where fleetward's processes meet: :class:`~fleetward.bus.local.LocalBus` within one process,
    :class:`~fleetward.bus.natsbus.NatsBus` between processes and nodes."""

    #: True when the bus reaches other processes (a hub then shares its port with them)
    shared: bool

    async def start(self) -> None:
        """Connect; raises :class:`TransportError` when the bus cannot be reached."""
        ...

    async def close(self) -> None:
        """Disconnect; the bus may be started again later."""
        ...

    def publish(self, subject: str, payload: bytes) -> None:
        """Send ``payload`` to every subscriber of ``subject``; never waits (queued when it must)."""
        ...

    def may_deliver(self, subject: str) -> bool:
        """False only when a publish on ``subject`` would certainly reach nobody (saves encoding it)."""
        ...

    async def request(self, subject: str, payload: bytes, timeout_seconds: float) -> bytes:
        """The first answer to ``payload`` on ``subject``; :class:`NoResponders`; :class:`RequestTimedOut`."""
        ...

    def respond(self, message: Message, payload: bytes) -> None:
        """Answer a request (nothing if ``message`` is not one)."""
        ...

    def subscribe(self, *subjects: str, max_pending: int) -> Subscription:
        """Messages on ``subjects`` (more can be added), at most ``max_pending`` waiting for the reader."""
        ...


class Inbox(Generic[T]):
    """The bounded queue behind a subscription: the oldest item goes when a new one finds it full.

    Event-loop thread only. ``put`` never waits; ``get`` waits for a message, or raises
    ``StopAsyncIteration`` once the inbox is closed and empty.
    """

    def __init__(self, max_pending: int) -> None:
        if max_pending <= 0:
            raise ValueError(f"max_pending must be positive, got {max_pending}")
        self._max = max_pending
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.missed = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        if self.closed:
            return
        if len(self._items) >= self._max:
            self._items.popleft()
            self.missed += 1
        self._items.append(item)
        self._wake()

    async def get(self) -> T:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class InboxSubscription:
    """What every bus's subscription shares: its subjects, a bounded inbox, ``async for`` and closing.
    A bus says what adding and removing a subject means to it (:meth:`_attached`, :meth:`_detached`)."""

    def __init__(self, max_pending: int) -> None:
        self._inbox: Inbox[Message] = Inbox(max_pending)
        self._subjects: set[str] = set()

    @property
    def missed(self) -> int:
        return self._inbox.missed

    def add(self, subject: str) -> None:
        if self._inbox.closed or subject in self._subjects:
            return
        check_subject(subject, wildcard=True)
        self._subjects.add(subject)
        self._attached(subject)

    def discard(self, subject: str) -> None:
        if subject in self._subjects:
            self._subjects.discard(subject)
            self._detached(subject)

    def _attached(self, subject: str) -> None:
        raise NotImplementedError

    def _detached(self, subject: str) -> None:
        raise NotImplementedError

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self._inbox.get()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        for subject in list(self._subjects):
            self.discard(subject)
        self._inbox.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
