"""Waiting in tests for something that happens in another task, thread or process: poll until truthy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy, and return that; ``AssertionError`` naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


async def eventually(check: Callable[[], Awaitable[T | None]], *, what: str = "", timeout: float = 15.0) -> T:
    """The same for an awaitable check, without blocking the event loop."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)
