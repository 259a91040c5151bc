"""What the hub counts of each device for the monitor: the cloud side of the security metrics.

A connection adds to its device's :class:`DeviceCounters` as packets pass (messages and bytes each way,
authorization failures, connection attempts, disconnects, source addresses); once per sampling interval the
hub hands :meth:`Meter.collect`'s samples to its observer (the monitor) and the counters start again. A
device that did nothing in an interval gives no sample. The meter holds at most ``max_devices`` devices;
an idle device without a live session is forgotten after a few intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fleetward.monitor.detect import CloudSample
from fleetward.monitor.reports import ParsedReport

#: source addresses remembered per device per interval
MAX_ADDRESSES = 8
_FORGET_AFTER_IDLE_ROUNDS = 5


class Observer(Protocol):
    """Who the hub tells what it sees (the monitor). Called on the hub's event loop: must not block."""

    def observe_samples(self, samples: Sequence[CloudSample]) -> None: ...

    def observe_report(self, tenant_id: str, device_id: str, report: ParsedReport) -> None:
        """A report the device's agent sent, once stored: a security baseline, a failure, a violation."""
        ...


class DeviceCounters:
    """One device's counts in the current interval (its own session and its modules' together)."""

    __slots__ = (
        "addresses",
        "authorization_failures",
        "bytes_in",
        "bytes_out",
        "connection_attempts",
        "device_id",
        "dirty",
        "disconnects",
        "idle_rounds",
        "live",
        "messages_in",
        "messages_out",
        "tenant_id",
    )

    def __init__(self, tenant_id: str, device_id: str) -> None:
        self.tenant_id = tenant_id
        self.device_id = device_id
        self.live = 0
        self.idle_rounds = 0
        self._reset()

    def _reset(self) -> None:
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.authorization_failures = 0
        self.connection_attempts = 0
        self.disconnects = 0
        self.addresses: set[str] = set()
        self.dirty = False

    def received(self, size: int) -> None:
        self.messages_in += 1
        self.bytes_in += size
        self.dirty = True

    def sent(self, size: int) -> None:
        self.messages_out += 1
        self.bytes_out += size
        self.dirty = True

    def refused(self) -> None:
        self.authorization_failures += 1
        self.dirty = True

    def attempted(self, address: str) -> None:
        self.connection_attempts += 1
        if len(self.addresses) < MAX_ADDRESSES:
            self.addresses.add(address)
        self.dirty = True

    def ended(self) -> None:
        self.disconnects += 1
        self.dirty = True


class Meter:
    def __init__(self, max_devices: int) -> None:
        self._max_devices = max_devices
        self._devices: dict[tuple[str, str], DeviceCounters] = {}
        #: devices not counted because the meter was full (the monitor sees less of them, never more)
        self.overflow = 0
        self._spare = DeviceCounters("", "")

    def counters(self, tenant_id: str, device_id: str) -> DeviceCounters:
        key = (tenant_id, device_id)
        found = self._devices.get(key)
        if found is not None:
            return found
        if len(self._devices) >= self._max_devices:
            self.overflow += 1
            return self._spare  # counted nowhere: a full meter must not grow
        found = self._devices[key] = DeviceCounters(tenant_id, device_id)
        return found

    def __len__(self) -> int:
        return len(self._devices)

    def collect(self, at: float, seconds: float) -> list[CloudSample]:
        """The samples of the interval ending ``at`` (epoch seconds), and a fresh interval."""
        samples: list[CloudSample] = []
        forgotten: list[tuple[str, str]] = []
        for key, counters in self._devices.items():
            if not counters.dirty:
                counters.idle_rounds += 1
                if counters.live <= 0 and counters.idle_rounds >= _FORGET_AFTER_IDLE_ROUNDS:
                    forgotten.append(key)
                continue
            counters.idle_rounds = 0
            samples.append(
                CloudSample(
                    tenant_id=counters.tenant_id,
                    device_id=counters.device_id,
                    group_id=None,
                    at=at,
                    seconds=seconds,
                    messages_in=counters.messages_in,
                    bytes_in=counters.bytes_in,
                    messages_out=counters.messages_out,
                    bytes_out=counters.bytes_out,
                    authorization_failures=counters.authorization_failures,
                    connection_attempts=counters.connection_attempts,
                    disconnects=counters.disconnects,
                    source_addresses=frozenset(counters.addresses),
                )
            )
            counters._reset()
        for key in forgotten:
            del self._devices[key]
        self._spare._reset()
        return samples
