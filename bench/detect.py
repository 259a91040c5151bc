"""The detection core: how many samples it judges per second, and how quiet it stays on a clean fleet.

    .venv/bin/python -m bench.detect [--devices 1000] [--seconds 60] [--hours 1]

* judged: :meth:`Detector.observe_many` on a fleet whose every device sends a normal sample each second
  (what the hub hands the monitor: one batch per second), after a warm-up that let the baselines learn;
  and the same on the clean fleet below (fewer samples per device, most of them opening a new bucket);
* clean fleet: :class:`fleetward.sim.clean_fleet.CleanFleet`, an hour of a realistic fleet that does
  nothing wrong, judged sample by sample and report by report; every finding is a false positive,
  counted by severity and code.

The figures are samples per second of one core (``bench.monitor`` relates them to the hub's ingest
rate). Nothing fails on a time or a count.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import Counter

from fleetward.monitor.detect import CloudSample, DetectionSettings, Detector, FindingSeverity
from fleetward.sim.clean_fleet import START, TENANT, CleanFleet, judge


def clean_fleet_alerts(devices: int, hours: float) -> dict[str, int]:
    """Findings on a clean fleet of ``devices`` over ``hours``: counted by severity, and by code (as
    ``code:<code>``). Every one is a false positive."""
    fleet = CleanFleet(devices, int(hours * 3600))
    found = judge(Detector(DetectionSettings(max_devices=max(devices, 1))), fleet)
    counts = {severity.value: 0 for severity in FindingSeverity}
    for finding in found:
        counts[finding.severity.value] += 1
    for code, count in sorted(Counter(finding.code for finding in found).items()):
        counts[f"code:{code}"] = count
    return counts


def steady_fleet(devices: int, seconds: int, seed: int = 11) -> list[list[CloudSample]]:
    """``seconds`` batches in which every device sends one or two small messages (and now and then gets
    one): the common case of a normal sample."""
    rng = random.Random(seed)
    batches = []
    for second in range(seconds):
        at = START + second + 1
        batches.append(
            [
                CloudSample(
                    TENANT,
                    f"dev-{number:05d}",
                    f"group-{number % 10:03d}",
                    at,
                    1.0,
                    messages_in=rng.randint(1, 2),
                    bytes_in=rng.randint(150, 400),
                    messages_out=1 if rng.random() < 0.05 else 0,
                    bytes_out=200 if rng.random() < 0.05 else 0,
                )
                for number in range(devices)
            ]
        )
    return batches


def judged_per_second(devices: int, seconds: int) -> float:
    """Samples per second :meth:`Detector.observe_many` judges on a steady fleet of ``devices`` (each sending
    every second), timed over ``seconds`` seconds of it after as many of warm-up."""
    batches = steady_fleet(devices, 2 * seconds)
    detector = Detector(DetectionSettings(max_devices=max(devices, 1)))
    for batch in batches[:seconds]:
        detector.observe_many(batch)
    timed = batches[seconds:]
    started = time.perf_counter()
    for batch in timed:
        detector.observe_many(batch)
    elapsed = time.perf_counter() - started
    return sum(len(batch) for batch in timed) / elapsed


def clean_fleet_judged_per_second(devices: int, seconds: int) -> tuple[float, int]:
    """Samples per second judged on :class:`CleanFleet` (samples built beforehand), and how many."""
    fleet = CleanFleet(devices, seconds)
    batches = [fleet.samples(second) for second in range(seconds)]
    detector = Detector(DetectionSettings(max_devices=max(devices, 1)))
    started = time.perf_counter()
    for batch in batches:
        detector.observe_many(batch)
    elapsed = time.perf_counter() - started
    total = sum(len(batch) for batch in batches)
    return total / elapsed, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=60, help="seconds of the steady fleet timed")
    parser.add_argument("--hours", type=float, default=1.0, help="length of the clean fleet's run")
    arguments = parser.parse_args()
    print(f"fleetward detection benchmark ({os.cpu_count()} cores, {arguments.devices} devices)")
    rate = judged_per_second(arguments.devices, arguments.seconds)
    print(f"steady fleet: {rate:,.0f} samples judged per second (one core)")
    rate, total = clean_fleet_judged_per_second(arguments.devices, int(arguments.hours * 3600))
    print(f"clean fleet:  {rate:,.0f} samples judged per second ({total:,} samples)")
    started = time.perf_counter()
    counts = clean_fleet_alerts(arguments.devices, arguments.hours)
    elapsed = time.perf_counter() - started
    severities = ", ".join(f"{counts[name]} {name}" for name in ("low", "medium", "high", "critical"))
    print(
        f"clean fleet of {arguments.devices} devices for {arguments.hours:g} h: {severities} "
        f"(false positives; simulated and judged in {elapsed:.1f} s)"
    )
    for name, count in counts.items():
        if name.startswith("code:"):
            print(f"  {name[5:]}: {count}")


if __name__ == "__main__":
    main()
