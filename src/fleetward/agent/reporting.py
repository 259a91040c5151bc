"""Where the agent's reports go: a small interface, and the in-memory collector the tests use.

The hub link carries reports to the cloud (through the store-and-forward outbox); until it is wired,
the composition root can hand the launcher and the supervisor any :class:`Reporter`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from fleetward.wire.reports import AgentReport


class Reporter(Protocol):
    """Takes one report. It should not block for long: the supervisor waits for it before restarting."""

    async def __call__(self, report: AgentReport) -> None: ...


class MemoryReporter:
    """Keeps every report in order; :meth:`wait_for` lets a test wait for the one it expects."""

    def __init__(self) -> None:
        self.reports: list[AgentReport] = []
        self._changed = asyncio.Condition()

    async def __call__(self, report: AgentReport) -> None:
        async with self._changed:
            self.reports.append(report)
            self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[list[AgentReport]], bool], *, timeout_seconds: float = 10.0
    ) -> list[AgentReport]:
        """Wait until ``predicate(reports)`` holds; raise ``TimeoutError`` after ``timeout_seconds``."""
        async with asyncio.timeout(timeout_seconds), self._changed:
            await self._changed.wait_for(lambda: predicate(self.reports))
        return list(self.reports)
