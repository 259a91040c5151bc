"""The monitor under load: how fast it judges against how fast the hub ingests, how soon a rogue device is
narrowed with a thousand connected, and how quiet it stays on a clean fleet.

    .venv/bin/python -m bench.monitor [--devices 1000] [--victims 5] [--seconds 5]

Each figure comes with a baseline measured in the same run:

* judged: samples per second the detection core judges (one core, ``bench.detect``) against the QoS 1
  messages per second the hub acknowledges in this run (``fleetward serve`` in its own process, 100
  publishers): how many times over the detector keeps up with the hub's own ingest;
* anomaly to narrowed: with ``--devices`` connected (each sending a reading every 5 s), a device starts
  flooding; the time from its first message to the hub ending its session (a playbook quarantined it),
  against the time from a revocation request to the session's end in the same run (the trust feed alone);
* clean fleet: alerts raised over an hour of a simulated fleet that does nothing wrong (false positives).

Nothing fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.detect import clean_fleet_alerts, judged_per_second
from bench.hub import (
    Fleetward,
    clients_for,
    close_all,
    connect_all,
    enroll_fleet,
    publish_rate,
    raise_file_limit,
    revocation_times,
)
from fleetward.agent.mqtt import MqttClient
from fleetward.api import schemas_monitor
from fleetward.monitor.playbooks import Condition, PlaybookSpec, Quarantine
from fleetward.sim.fleet import SimulatedDevice

READING = b'{"power_watts": 312.5, "panel_temperature": 31.5}'


async def readings(clients: list[MqttClient], devices: list[SimulatedDevice], stop: asyncio.Event) -> None:
    """Every device sends a reading every 5 s (with jitter), as a quiet fleet does."""

    async def one(client: MqttClient, device: SimulatedDevice) -> None:
        topic = f"devices/{device.device_id}/messages/events/"
        await asyncio.sleep(random.uniform(0, 5))
        while not stop.is_set() and not client.closed.is_set():
            with contextlib.suppress(Exception):
                await client.publish(topic, READING, qos=1)
            await asyncio.sleep(random.uniform(4, 6))

    await asyncio.gather(*(one(c, d) for c, d in zip(clients, devices, strict=True)), return_exceptions=True)


async def flood_to_narrowed(client: MqttClient, device: SimulatedDevice) -> float:
    """Flood from ``client`` until the hub ends its session; seconds from the first message."""
    topic = f"devices/{device.device_id}/messages/events/"
    started = time.perf_counter()

    async def flood() -> None:
        with contextlib.suppress(Exception):
            while not client.closed.is_set():
                await client.publish(topic, READING, qos=0)
                await asyncio.sleep(0.002)

    task = asyncio.create_task(flood())
    try:
        await asyncio.wait_for(client.closed.wait(), 60)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return time.perf_counter() - started


async def measure(
    fleetward: Fleetward,
    tenant_id: str,
    devices: list[SimulatedDevice],
    arguments: argparse.Namespace,
    scratch: Path,
) -> None:
    # 1. the hub's ingest in this run, against the detection core's judging
    publishers = devices[:100]
    clients = clients_for(publishers, fleetward.hub_port, fleetward.ca_file, scratch / "pub")
    await connect_all(clients)
    await publish_rate(clients, publishers, 1.0, 16)
    ingest = await publish_rate(clients, publishers, arguments.seconds, 16)
    await close_all(clients)
    judged = await asyncio.to_thread(judged_per_second, len(devices), 60)
    print(
        f"judged     detection core {judged:10.0f} samples/s (one core), hub ingest {ingest:8.0f} msg/s "
        f"in this run: the detector keeps up {judged / ingest:.1f}× over"
    )

    # 2. anomaly → narrowed with everyone connected, against revocation → closed
    with fleetward.client() as client:
        client.post(
            f"/v1/tenants/{tenant_id}/playbooks",
            PlaybookSpec(name="flood", condition=Condition(min_severity="high"), actions=(Quarantine(),)),
            schemas_monitor.PlaybookPublic,
        )
    clients = clients_for(devices, fleetward.hub_port, fleetward.ca_file, scratch / "all")
    await connect_all(clients)
    stop = asyncio.Event()
    quiet = asyncio.create_task(readings(clients, devices, stop))
    await asyncio.sleep(15)  # the baselines see a few buckets of the quiet fleet first
    held = sum(not client.closed.is_set() for client in clients)
    narrowed = [await flood_to_narrowed(clients[index], devices[index]) for index in range(arguments.victims)]
    revoked = await revocation_times(
        fleetward,
        tenant_id,
        list(zip(devices[-arguments.victims :], clients[-arguments.victims :], strict=True)),
    )
    stop.set()
    quiet.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await quiet
    await close_all(clients)
    print(
        f"narrowed   first flood message → session ended by a playbook's quarantine, {held} connected: "
        f"median {statistics.median(narrowed):.2f} s, max {max(narrowed):.2f} s; revocation request → "
        f"session ended: median {statistics.median(revoked):.2f} s: ratio "
        f"{statistics.median(narrowed) / statistics.median(revoked):.1f}"
    )

    # 3. a clean fleet for an hour
    alerts = await asyncio.to_thread(clean_fleet_alerts, len(devices), 1.0)
    raised = {key: value for key, value in alerts.items() if value}
    print(f"clean      {len(devices)} devices × 1 h of normal behaviour: alerts raised {raised or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--victims", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    arguments = parser.parse_args()
    raise_file_limit()
    with tempfile.TemporaryDirectory(prefix="fleetward-bench-monitor-") as scratch_dir:
        scratch = Path(scratch_dir)
        fleetward = Fleetward(scratch / "data")
        try:
            tenant_id, devices = enroll_fleet(fleetward, arguments.devices)
            asyncio.run(measure(fleetward, tenant_id, devices, arguments, scratch))
        finally:
            fleetward.stop()


if __name__ == "__main__":
    main()
