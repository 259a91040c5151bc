"""A clean fleet: an hour (or more) of devices doing nothing wrong, as the hub and the agents would show
them to the monitor. Every finding the detection core makes on it is a false positive.

:class:`CleanFleet` yields, second by second, the samples the hub would hand the monitor (periodic telemetry
with jitter, a tenth of the devices chattier, reconnects a few times an hour, twin updates, cloud-to-device
bursts, outbox drains after an outage) and every 5 minutes each device's security baseline (stable ports,
a handful of destinations). :func:`judge` runs it through a :class:`~fleetward.monitor.detect.Detector`.
Used by the false-positive tests and by ``bench.detect`` and ``bench.monitor``.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from fleetward.monitor.detect import CloudSample, Detector, Finding
from fleetward.wire.baseline import Destination, ListeningPort, SecurityBaseline, Traffic

#: 2026-01-01T00:00:00Z: the clean fleet's hour starts here
START = 1_767_225_600.0
TENANT = "tenant-clean"
REPORT_SECONDS = 300

_MI, _BI, _MO, _BO, _AUTH, _CONN, _DISC = range(7)


@dataclass
class SimulatedDevice:
    """One device of :class:`CleanFleet`: how it behaves, and what it did in each second."""

    device_id: str
    group_id: str
    address: str
    period_seconds: float
    message_bytes: int
    cellular: bool
    listening: tuple[ListeningPort, ...]
    destinations: tuple[tuple[str, int], ...]
    #: the second of each 5 minutes at which its agent reports
    report_phase: int
    #: second -> counters (messages in, bytes in, messages out, bytes out, auth failures, connects, ends)
    seconds: dict[int, list[int]] = field(default_factory=dict)
    #: second -> the source addresses seen connecting in it
    addresses: dict[int, set[str]] = field(default_factory=dict)

    def add(self, second: int, index: int, amount: int) -> None:
        counters = self.seconds.get(second)
        if counters is None:
            counters = self.seconds[second] = [0] * 7
        counters[index] += amount


#: a device's security baseline report, and the device that sent it
Report = tuple[SimulatedDevice, SecurityBaseline]


class CleanFleet:
    """A fleet of ``devices`` doing nothing wrong for ``seconds``, in groups of ``group_size``.

    Each group is a product: its devices send telemetry every 5 to 30 s (a tenth of them, the chatty ones,
    every 1 to 3 s with bigger messages), with jitter; patch their twin a few times an hour; receive
    cloud-to-device bursts (commands, configuration: 1 to 8 messages); lose their connection a couple of
    times an hour for a few seconds to a minute (now and then for up to 20 minutes), and send what their
    outbox kept when they are back, as fast as the hub lets them (a few of them, on cellular links, from a
    new address); and report a security baseline every 5 minutes (a telemetry message of a few KiB): the
    same listening ports, a handful of destinations, traffic with noise. Deterministic for a seed.
    """

    def __init__(
        self, devices: int, seconds: int, *, seed: int = 7, group_size: int = 100, tenant_id: str = TENANT
    ) -> None:
        self.tenant_id = tenant_id
        self.duration = seconds
        self.random = rng = random.Random(seed)  # noqa: S311 (a simulation: reproducible, not secret)
        self.devices: list[SimulatedDevice] = []
        groups = max(1, (devices + group_size - 1) // group_size)
        profiles = [self._profile(rng, number) for number in range(groups)]
        for number in range(devices):
            group = number % groups
            ports, pool, size_range = profiles[group]
            chatty = rng.random() < 0.1
            device = SimulatedDevice(
                device_id=f"dev-{number:05d}",
                group_id=f"group-{group:03d}",
                address=f"10.{number // 65536}.{number // 256 % 256}.{number % 256}",
                period_seconds=rng.uniform(1, 3) if chatty else rng.uniform(5, 30),
                message_bytes=rng.randint(*size_range) * (3 if chatty else 1),
                cellular=rng.random() < 0.03,
                listening=ports,
                destinations=tuple(rng.sample(pool, rng.randint(3, len(pool)))),
                report_phase=rng.randrange(REPORT_SECONDS),
            )
            self._live(device, rng)
            self.devices.append(device)

    @staticmethod
    def _profile(
        rng: random.Random, number: int
    ) -> tuple[tuple[ListeningPort, ...], list[tuple[str, int]], tuple[int, int]]:
        ports = (
            ListeningPort(protocol="udp", address="0.0.0.0", port=5353),  # noqa: S104 (what devices report)
            ListeningPort(protocol="tcp", address="127.0.0.1", port=7000 + number % 10),
        )
        pool = [
            ("20.50.1.10", 8883),
            ("20.50.1.11", 443),
            ("162.159.200.1", 123),
            (f"52.{number % 200}.7.20", 443),
            (f"52.{number % 200}.7.21", 443),
            (f"34.{number % 200}.3.9", 8443),
        ]
        low = rng.randint(120, 400)
        return ports, pool, (low, low + rng.randint(20, 200))

    def _live(self, device: SimulatedDevice, rng: random.Random) -> None:
        """What ``device`` does over the whole run, second by second."""
        end = self.duration
        offline: list[tuple[int, int]] = []  # (from, to): no connection
        moment = rng.expovariate(2 / 3600)
        while moment < end:
            length = rng.uniform(300, 1200) if rng.random() < 0.05 else rng.uniform(2, 60)
            offline.append((int(moment), int(moment + length)))
            moment += length + rng.expovariate(2 / 3600)

        def away(second: int) -> tuple[int, int] | None:
            for start, stop in offline:
                if start <= second < stop:
                    return start, stop
            return None

        address = device.address
        connected_at = rng.randrange(0, 5)
        device.add(connected_at, _CONN, 1)
        device.addresses.setdefault(connected_at, set()).add(address)
        queued: dict[int, list[int]] = {}  # reconnect second -> [messages, bytes] kept by the outbox

        def send(second: int, messages: int, size: int) -> None:
            gap = away(second)
            if gap is None:
                device.add(second, _MI, messages)
                device.add(second, _BI, size)
            else:
                backlog = queued.setdefault(gap[1], [0, 0])
                backlog[0] += messages
                backlog[1] += size

        moment = rng.uniform(connected_at, connected_at + device.period_seconds)
        while moment < end:
            send(int(moment), 1, int(device.message_bytes * rng.uniform(0.9, 1.1)))
            moment += device.period_seconds * rng.uniform(0.8, 1.2)
        for second in range(device.report_phase, end, REPORT_SECONDS):  # the agent's own report
            if second > 0:
                send(second, 1, rng.randint(1500, 4000))
        moment = rng.expovariate(4 / 3600)
        while moment < end:  # twin: a desired patch down, the reported patch up
            second = int(moment)
            if away(second) is None:
                device.add(second, _MO, 1)
                device.add(second, _BO, rng.randint(100, 600))
                send(second + 1, 1, rng.randint(150, 500))
            moment += rng.expovariate(4 / 3600)
        rate = 12 if rng.random() < 0.1 else 2
        moment = rng.expovariate(rate / 3600)
        while moment < end:  # cloud-to-device bursts; held by the hub while the device is away
            second = int(moment)
            gap = away(second)
            arrives = second if gap is None else gap[1]
            for message in range(rng.randint(1, 8)):
                device.add(arrives + message // 4, _MO, 1)
                device.add(arrives + message // 4, _BO, rng.randint(100, 2000))
            moment += rng.expovariate(rate / 3600)
        for start, stop in offline:
            device.add(start, _DISC, 1)
            if stop >= end:
                continue
            attempts = 1 if rng.random() < 0.8 else 2
            device.add(stop, _CONN, attempts)
            if device.cellular:
                address = f"100.{rng.randint(64, 127)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            device.addresses.setdefault(stop, set()).add(address)
            backlog = queued.get(stop)
            if backlog:  # drained as fast as the hub reads: 200 at once, then 100 a second
                messages, size = backlog
                second, allowed = stop, 200
                while messages > 0:
                    now = min(messages, allowed)
                    device.add(second, _MI, now)
                    device.add(second, _BI, size * now // backlog[0])
                    messages -= now
                    second, allowed = second + 1, 100

    def samples(self, second: int) -> list[CloudSample]:
        """What the hub hands the monitor at the end of ``second``."""
        at = START + second + 1
        found = []
        for device in self.devices:
            counters = device.seconds.get(second)
            if counters is None:
                continue
            messages_in, bytes_in, messages_out, bytes_out, failures, attempts, ends = counters
            found.append(
                CloudSample(
                    self.tenant_id,
                    device.device_id,
                    device.group_id,
                    at,
                    1.0,
                    messages_in=messages_in,
                    bytes_in=bytes_in,
                    messages_out=messages_out,
                    bytes_out=bytes_out,
                    authorization_failures=failures,
                    connection_attempts=attempts,
                    disconnects=ends,
                    source_addresses=frozenset(device.addresses.get(second, ())),
                )
            )
        return found

    def report(self, device: SimulatedDevice, second: int) -> SecurityBaseline:
        """``device``'s security baseline for the 5 minutes that end at ``second``."""
        rng = self.random
        since = max(0, second - REPORT_SECONDS)
        sent = sum(device.seconds.get(moment, (0, 0))[_BI] for moment in range(since, second))
        bytes_out = int((sent * 1.4 + 6000) * rng.lognormvariate(0, 0.2))
        bytes_in = int((sent * 0.3 + 9000) * rng.lognormvariate(0, 0.3))
        return SecurityBaseline(
            collected_at=dt.datetime.fromtimestamp(START + second, dt.UTC),
            interval_seconds=REPORT_SECONDS,
            listening=device.listening,
            destinations=tuple(
                Destination(address=address, port=port, times_seen=rng.randint(1, 40))
                for address, port in device.destinations
            ),
            traffic=Traffic(
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                packets_in=bytes_in // 300 + rng.randint(0, 20),
                packets_out=bytes_out // 400 + rng.randint(0, 20),
            ),
        )

    def run(self) -> Iterator[tuple[float, list[CloudSample], list[Report]]]:
        """Each second: its time, the samples of the fleet, and the baseline reports that came in it."""
        for second in range(self.duration):
            reports = [
                (device, self.report(device, second))
                for device in self.devices
                if second > 0 and second % REPORT_SECONDS == device.report_phase
            ]
            yield START + second + 1, self.samples(second), reports


def judge(detector: Detector, fleet: CleanFleet) -> list[Finding]:
    """Run ``fleet`` through ``detector``; every finding."""
    found: list[Finding] = []
    for at, samples, reports in fleet.run():
        found += detector.observe_many(samples)
        for device, report in reports:
            found += detector.judge_baseline(fleet.tenant_id, device.device_id, device.group_id, report, at)
    return found
