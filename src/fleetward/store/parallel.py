"""Spread GIL-releasing work (signature checks) over a few threads, in order, in chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class ParallelMap:
    """``map_all(function, items)``: like ``map``, with one chunk per thread; answers in input order.

    Worth it only for work that releases the GIL (pyca/cryptography's ECDSA verification does); each
    chunk runs in one thread so the overhead is per chunk, not per item.
    """

    def __init__(self, threads: int, *, name: str) -> None:
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix=name)

    def map_all(self, function: Callable[[In], Out], items: Sequence[In]) -> list[Out]:
        if len(items) < 2 or self._threads == 1:
            return [function(item) for item in items]
        size = -(-len(items) // self._threads)
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        futures = [self._pool.submit(_apply, function, chunk) for chunk in chunks]
        return [result for future in futures for result in future.result()]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _apply(function: Callable[[In], Out], chunk: Sequence[In]) -> list[Out]:
    return [function(item) for item in chunk]
