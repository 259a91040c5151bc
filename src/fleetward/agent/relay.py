"""Moving bytes between two sockets in the agent's event loop: the proxy's tunnels and forwarded ports.

:func:`relay` copies both ways with bounded buffers, back-pressure, half-close and an idle timeout;
:class:`Acceptor` accepts on a listening socket, runs one tracked task per connection up to a bound, and
ends them all when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

#: accept() errors that pass: out of descriptors or memory, or a connection that ended before it was taken
_TRANSIENT_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)


async def relay(
    first: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    second: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    idle_timeout_seconds: float,
    chunk_bytes: int,
) -> None:
    """Copy bytes both ways until both sides are done, one fails, or nothing moved for the idle timeout.

    Each direction reads at most ``chunk_bytes`` and waits for the other side to take it (``drain``)
    before reading more, so a slow reader slows its writer. An end of stream is passed on as a half-close.
    The caller closes the streams.
    """
    loop = asyncio.get_running_loop()
    last_moved = loop.time()

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        nonlocal last_moved
        while data := await source.read(chunk_bytes):
            last_moved = loop.time()
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()

    pumps = {
        asyncio.ensure_future(pump(first[0], second[1])),
        asyncio.ensure_future(pump(second[0], first[1])),
    }
    pending = set(pumps)
    try:
        while pending:
            remaining = last_moved + idle_timeout_seconds - loop.time()
            if remaining <= 0:
                return  # idle
            done, pending = await asyncio.wait(pending, timeout=remaining)
            for task in done:
                error = task.exception()
                if isinstance(error, OSError):
                    return  # a side failed or was reset: the tunnel is over
                if error is not None:
                    raise error
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close ``writer`` and wait a moment (at most a second) for it to be closed."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


class Acceptor:
    """Accepts on a listening socket in the agent's loop and runs one tracked task per connection."""

    def __init__(self, listener: socket.socket, *, max_connections: int, what: str) -> None:
        self._listener = listener
        self._max = max_connections
        self._what = what
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        listener.setblocking(False)
        self.port: int = listener.getsockname()[1]

    @property
    def active(self) -> int:
        """Connections open now (tunnels, and connections still asking for one)."""
        return len(self._connections)

    def start(self, serve: Callable[[socket.socket], Awaitable[None]], busy: bytes) -> None:
        self._accepting = asyncio.ensure_future(self._accept(serve, busy))
        self._accepting.add_done_callback(self._done)

    async def _accept(self, serve: Callable[[socket.socket], Awaitable[None]], busy: bytes) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(self._listener)
            except OSError as error:
                if error.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    raise
                logger.warning("%s: accept failed: %s", self._what, error)
                await asyncio.sleep(0.1)  # out of descriptors or memory: let connections end first
                continue
            if len(self._connections) >= self._max:
                with contextlib.suppress(OSError):
                    connection.setblocking(False)
                    if busy:
                        connection.send(busy)
                connection.close()
                continue
            task = asyncio.ensure_future(serve(connection))
            self._connections.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", self._what, exc_info=task.exception())

    async def close(self) -> None:
        """Stop accepting, close the listening socket, end every connection and wait for each."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        self._listener.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
