"""Group commit: many concurrent requests, one transaction.

Callers ``await batcher.submit(item)``; a single worker takes everything queued (up to ``max_batch``),
hands the lot to ``process`` in a dedicated thread, where one transaction covers it, and answers each
caller with its own result. While one batch commits the next one gathers, so the cost of a commit is
shared by all the requests that arrived meanwhile. The queue is bounded: when it is full, ``submit``
waits (back-pressure) instead of letting memory grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Generic, TypeVar

from fleetward.errors import FleetwardError, ServerError

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """A bounded queue in front of a function that handles a batch in one transaction."""

    def __init__(
        self,
        process: Callable[[Sequence[Item]], Sequence[Result | FleetwardError]],
        *,
        name: str,
        max_batch: int,
        max_pending: int,
    ) -> None:
        self._process = process
        self._name = name
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] = asyncio.Queue(max_pending)
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Batcher[Item, Result]:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._worker = asyncio.create_task(self._run(), name=self._name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():
            _item, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(ServerError(f"{self._name} is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        return self._queue.qsize()

    def offer(self, item: Item) -> asyncio.Future[Result] | None:
        """Queue ``item`` without waiting: its future, or None when the queue is full (then ``submit``)."""
        if self._worker is None or self._worker.done() or self._queue.full():
            return None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return future

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its own result; raises the error that refused it."""
        if self._worker is None or self._worker.done():
            raise ServerError(f"{self._name} is not running")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    @staticmethod
    def _fail(batch: list[tuple[Item, asyncio.Future[Result]]], error: FleetwardError) -> None:
        for _item, future in batch:
            if not future.done():
                future.set_exception(error)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = [item for item, _future in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._process, items)
            except FleetwardError as error:
                self._fail(batch, error)
                continue
            except Exception:  # a bug: every caller hears of it and the worker lives on
                logger.exception("%s failed a batch of %d", self._name, len(batch))
                self._fail(batch, ServerError(f"{self._name} failed; see the server log"))
                continue
            for (_item, future), result in zip(batch, results, strict=True):
                if future.done():  # the caller went away
                    continue
                if isinstance(result, FleetwardError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
