""" "Check now": when a wave opens, its devices are asked to check for updates at once (ADR 0015).

The director only answers; a device learns of a new assignment when it asks. Asking costs one direct
method per device, ``fleetward.checkForUpdates``, sent through the hub router so that it reaches the device
on whichever hub process holds its session. Offline devices are skipped: they check when they connect.

:class:`Nudger` is the boundary; :class:`RouterNudger` is the real one, :class:`FakeNudger` the one tests
use. :func:`check_now` asks many devices with bounded concurrency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetward.errors import FleetwardError
from fleetward.hub.routing import DeviceRouter

logger = logging.getLogger(__name__)

#: the direct method the agent answers by checking for updates now
CHECK_METHOD = "fleetward.checkForUpdates"


@dataclass(frozen=True)
class OpenedWave:
    """Devices a deployment has just assigned, which should check for updates now."""

    tenant_id: str
    deployment_id: str
    wave: int
    device_ids: tuple[str, ...]


class Nudger(Protocol):
    """Asks one device to check for updates now; False if it could not be reached (offline, no answer)."""

    async def check_for_updates(self, tenant_id: str, device_id: str) -> bool: ...


class RouterNudger:
    """Calls :data:`CHECK_METHOD` through the hub router, with a short timeout."""

    def __init__(self, router: DeviceRouter, timeout_seconds: float = 5.0) -> None:
        self._router = router
        self._timeout = timeout_seconds

    async def check_for_updates(self, tenant_id: str, device_id: str) -> bool:
        try:
            result = await self._router.invoke_method(
                tenant_id, device_id, CHECK_METHOD, b"{}", self._timeout
            )
        except FleetwardError as error:  # offline (NotFound), no answer (DeviceTimeout), the bus failed
            logger.debug("check now: device %s not reached (%s)", device_id, error.code)
            return False
        return 200 <= result.status < 300


class FakeNudger:
    """Remembers whom it was asked to nudge; ``offline`` devices are not reached."""

    def __init__(self, offline: frozenset[str] = frozenset()) -> None:
        self.offline = offline
        self.nudged: list[tuple[str, str]] = []

    async def check_for_updates(self, tenant_id: str, device_id: str) -> bool:
        if device_id in self.offline:
            return False
        self.nudged.append((tenant_id, device_id))
        return True


async def check_now(nudger: Nudger, waves: Sequence[OpenedWave], *, concurrency: int = 32) -> int:
    """Ask every device of ``waves`` to check now, ``concurrency`` at a time; how many were reached."""
    if concurrency < 1:
        raise ValueError("concurrency is at least 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(tenant_id: str, device_id: str) -> bool:
        async with gate:
            return await nudger.check_for_updates(tenant_id, device_id)

    jobs = [one(wave.tenant_id, device_id) for wave in waves for device_id in wave.device_ids]
    if not jobs:
        return 0
    return sum(await asyncio.gather(*jobs))
