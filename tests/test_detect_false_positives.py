"""The detection core on a realistic clean fleet: an hour of 200 devices doing nothing wrong gives no finding
of medium severity or more and only a handful of low ones; rogue devices slipped into the same fleet are
found. The fleet is ``fleetward.sim.clean_fleet.CleanFleet`` (``bench.monitor`` runs 1,000 devices)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from fleetward.monitor.detect import CloudSample, Detector, Finding, FindingSeverity
from fleetward.sim.clean_fleet import START, CleanFleet, Report, SimulatedDevice, judge
from fleetward.wire.baseline import BlockedConnection, SecurityBaseline

DEVICES = 200
LOW = FindingSeverity.LOW

#: the rogues, and when they start (seconds into the hour)
FLOODER, FLOOD_AT = "dev-00042", 2400  # publishes as fast as the hub lets it, for 20 s
SMUGGLER, SMUGGLE_AT = "dev-00117", 2000  # 10 KiB messages, twice a second, for 5 minutes
CALLER, CALL_AFTER = "dev-00150", 2700  # an application reaching for a host it did not declare


@pytest.mark.slow
def test_an_hour_of_a_clean_fleet_gives_nothing_above_low_and_a_handful_of_low() -> None:
    found = judge(Detector(), CleanFleet(DEVICES, 3600, seed=7))
    assert [finding for finding in found if finding.severity != LOW] == []
    assert len(found) <= DEVICES // 20  # all of them, as it happens, cellular devices on a new address
    assert {finding.code for finding in found} <= {"new_source_address"}


class WithRogues(CleanFleet):
    """The clean fleet, three of whose devices misbehave from some moment on."""

    def run(self) -> Iterator[tuple[float, list[CloudSample], list[Report]]]:
        for at, samples, reports in super().run():
            second = int(at - START) - 1
            yield (
                at,
                [self._rogue(item, second) for item in samples] + self._extra(samples, at, second),
                [self._caller(device, report, second) for device, report in reports],
            )

    @staticmethod
    def _rogue(item: CloudSample, second: int) -> CloudSample:
        if item.device_id == FLOODER and FLOOD_AT <= second < FLOOD_AT + 20:
            sent = 200 if second == FLOOD_AT else 100
            return replace(item, messages_in=sent, bytes_in=sent * 300)
        if item.device_id == SMUGGLER and SMUGGLE_AT <= second < SMUGGLE_AT + 300:
            return replace(item, messages_in=item.messages_in + 2, bytes_in=item.bytes_in + 20_480)
        return item

    def _extra(self, samples: list[CloudSample], at: float, second: int) -> list[CloudSample]:
        """Samples of rogues in seconds the clean fleet had none of them."""
        present = {item.device_id for item in samples}
        extra = []
        for device, start, length in ((FLOODER, FLOOD_AT, 20), (SMUGGLER, SMUGGLE_AT, 300)):
            if device not in present and start <= second < start + length:
                group = next(item.group_id for item in self.devices if item.device_id == device)
                extra.append(self._rogue(CloudSample(self.tenant_id, device, group, at, 1.0), second))
        return extra

    @staticmethod
    def _caller(device: SimulatedDevice, report: SecurityBaseline, second: int) -> Report:
        if device.device_id == CALLER and second >= CALL_AFTER:
            blocked = BlockedConnection(
                component_id="panel-monitor", host="c2.example.net", port=4444, count=6
            )
            report = report.model_copy(update={"blocked": (blocked,)})
        return device, report


@pytest.mark.slow
def test_rogue_devices_slipped_into_the_fleet_are_found_and_nothing_else_is() -> None:
    found = judge(Detector(), WithRogues(DEVICES, 3600, seed=7))

    def of(device: str, code: str) -> list[Finding]:
        return [finding for finding in found if finding.device_id == device and finding.code == code]

    flood = of(FLOODER, "message_flood")
    assert flood
    assert flood[0].at - START <= FLOOD_AT + 2  # within 2 s of samples
    assert flood[0].severity in (FindingSeverity.HIGH, FindingSeverity.CRITICAL)
    smuggling = of(SMUGGLER, "traffic_spike")
    assert smuggling
    assert SMUGGLE_AT < smuggling[0].at - START <= SMUGGLE_AT + 10
    assert smuggling[-1].at - START >= SMUGGLE_AT + 240  # all along: not learned as its new normal
    assert {item.metric for item in smuggling[0].evidence} >= {"bytes_in"}
    calls = of(CALLER, "undeclared_destination")
    assert calls
    assert calls[0].severity == FindingSeverity.HIGH
    assert calls[0].evidence[0].detail == "c2.example.net:4444 (panel-monitor)"
    others = [finding for finding in found if finding.device_id not in (FLOODER, SMUGGLER, CALLER)]
    assert [finding for finding in others if finding.severity != LOW] == []
    assert len(others) <= DEVICES // 20
