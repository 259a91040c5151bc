"""The hub under load: telemetry ingest, connections held, a reconnect storm, revocation to session end.

    .venv/bin/python -m bench.hub [--devices 10000] [--publishers 100] [--seconds 10]

Each figure comes with a baseline measured in the same run, by the same load generator:

* telemetry: QoS 1 messages per second acknowledged by fleetward's hub (each one committed to SQLite before
  its PUBACK) against Mosquitto's QoS 1 pass-through (no persistence, same TLS, same client certificates);
* connections: authenticated idle connections one hub process holds, and the memory each one costs it;
* reconnect storm: how fast all devices connect again (TLS with client certificate, CONNECT, standing
  looked up in the store, CONNACK) against the bare TLS handshake rate of a plain Python TLS server with
  the same certificates;
* revocation: time from the revoke request to the device's session being closed, while all are connected.

The load generator is ``fleetward.agent.mqtt.MqttClient`` (asyncio, one process). Nothing fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fleetward.agent.mqtt import MqttClient
from fleetward.api import schemas
from fleetward.client import FleetwardClient
from fleetward.server import free_port
from fleetward.sim.fleet import SimulatedDevice, image_digest, measurement
from fleetward.transport import trust

SOFTWARE = (measurement("fleetward-agent", "1.4.0"),)
BODY = json.dumps({"power_watts": 312.5, "panel_temperature": 31.5, "status": "ok"}).encode()


def raise_file_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Fleetward:
    """``fleetward init`` and ``fleetward serve`` in their own process, with the hub on."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, self.hub_port = free_port(), free_port()
        environment = dict(os.environ, FLEETWARD_CLI_CONFIG=str(directory / "cli.json"))
        command = str(Path(sys.executable).parent / "fleetward")
        subprocess.run(
            [command, "init", "--data-dir", str(directory), "--port", str(self.port)],
            check=True,
            env=environment,
            capture_output=True,
        )
        self.token = json.loads((directory / "cli.json").read_text())["token"]
        self.ca_file = directory / "tls" / "service-ca.pem"
        environment["FLEETWARD_HUB_PORT"] = str(self.hub_port)
        # The ingest figure is the hub's capacity, not its per-device policy (100/s, as IoT Hub's):
        # Mosquitto limits nothing either.
        environment["FLEETWARD_LIMIT_HUB_MESSAGES_PER_SECOND"] = "1000000"
        environment["FLEETWARD_LIMIT_HUB_MESSAGE_BURST"] = "1000000"
        environment["FLEETWARD_LIMIT_HUB_BYTES_PER_SECOND"] = "1000000000"
        self.process = subprocess.Popen(
            [
                command,
                "serve",
                "--data-dir",
                str(directory),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=environment,
        )
        self.url = f"https://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", verify=trust(self.ca_file)).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("fleetward serve did not start")

    def client(self) -> FleetwardClient:
        return FleetwardClient(self.url, self.token, ca_file=self.ca_file, timeout_seconds=120)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def enroll_fleet(fleetward: Fleetward, count: int) -> tuple[str, list[SimulatedDevice]]:
    devices = [SimulatedDevice(f"d{number:05d}", SOFTWARE) for number in range(count)]
    with fleetward.client() as client:
        tenant = client.post("/v1/tenants", schemas.TenantCreate(name="bench"), schemas.TenantPublic)
        client.post(
            f"/v1/tenants/{tenant.id}/reference-values",
            schemas.ReferenceValuesAdd(
                values=[
                    schemas.ReferenceValueItem(
                        component=item.name,
                        version=item.version,
                        sha256=image_digest(item.name, item.version),
                    )
                    for item in SOFTWARE
                ]
            ),
            schemas.ReferenceValuesAdded,
        )
        for start in range(0, count, 1000):
            client.post(
                f"/v1/tenants/{tenant.id}/devices/claim",
                schemas.DeviceClaim(
                    devices=[device.claim_item() for device in devices[start : start + 1000]]
                ),
                schemas.ClaimResponse,
            )

    async def enroll_all() -> None:
        limits = httpx.Limits(max_connections=16)  # httpcore's pool slows down with many more
        async with httpx.AsyncClient(verify=trust(fleetward.ca_file), timeout=120, limits=limits) as http:
            gate = asyncio.Semaphore(16)

            async def one(device: SimulatedDevice) -> None:
                async with gate:
                    await device.enroll(fleetward.url, http)

            await asyncio.gather(*(one(device) for device in devices))

    asyncio.run(enroll_all())
    return tenant.id, devices


def clients_for(
    devices: list[SimulatedDevice], port: int, ca_file: Path, directory: Path
) -> list[MqttClient]:
    return [device.hub_client("127.0.0.1", port, ca_file, directory) for device in devices]


async def connect_all(clients: list[MqttClient], parallel: int = 256) -> float:
    """Connect every client (at most ``parallel`` handshakes at once); the seconds it took."""
    gate = asyncio.Semaphore(parallel)

    async def one(client: MqttClient) -> None:
        async with gate:
            await client.__aenter__()

    started = time.perf_counter()
    await asyncio.gather(*(one(client) for client in clients))
    return time.perf_counter() - started


async def close_all(clients: list[MqttClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


async def publish_rate(
    clients: list[MqttClient], devices: list[SimulatedDevice], seconds: float, window: int
) -> float:
    """QoS 1 telemetry messages acknowledged per second, ``window`` in flight per client."""
    acknowledged = 0
    stop = time.perf_counter() + seconds

    async def lane(client: MqttClient, device: SimulatedDevice) -> None:
        nonlocal acknowledged
        topic = f"devices/{device.device_id}/messages/events/%24.ct=application%2Fjson"
        while time.perf_counter() < stop:
            await client.publish(topic, BODY, qos=1)
            acknowledged += 1

    started = time.perf_counter()
    pairs = zip(clients, devices, strict=True)
    await asyncio.gather(*(lane(client, device) for client, device in pairs for _ in range(window)))
    return acknowledged / (time.perf_counter() - started)


def mosquitto_config(directory: Path, port: int, fleetward: Fleetward, chain: bytes) -> Path:
    """Mosquitto with the hub's certificate, requiring the tenant's client certificates, persisting nothing.

    Mosquitto drops root for its own user, so it gets copies of the files it may read.
    """
    folder = directory / "mosquitto"
    folder.mkdir(mode=0o755, exist_ok=True)
    folder.chmod(0o755)
    directory.chmod(0o755)
    (folder / "chain.pem").write_bytes(chain)
    for name in ("service-certificate.pem", "service-key.pem"):
        shutil.copyfile(fleetward.directory / "tls" / name, folder / name)
        (folder / name).chmod(0o644)
    (folder / "chain.pem").chmod(0o644)
    config = folder / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                "persistence false",
                "log_dest none",
                f"listener {port} 127.0.0.1",
                f"cafile {folder / 'chain.pem'}",
                f"certfile {folder / 'service-certificate.pem'}",
                f"keyfile {folder / 'service-key.pem'}",
                "require_certificate true",
                "allow_anonymous true",
                "max_inflight_messages 0",
                "",
            ]
        )
    )
    return config


async def bare_handshake_rate(devices: list[SimulatedDevice], fleetward: Fleetward, directory: Path) -> float:
    """Handshakes per second of a plain asyncio TLS server with the hub's certificate, requiring client ones.

    The server runs in its own process, as the hub does, so both compete with the load generator alike.
    """
    port = free_port()
    tls = fleetward.directory / "tls"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.tls_server",
            str(port),
            str(tls / "service-certificate.pem"),
            str(tls / "service-key.pem"),
            str(directory / "mosquitto" / "chain.pem"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()
        contexts = [
            client.tls_context for client in clients_for(devices, port, fleetward.ca_file, directory / "bare")
        ]
        gate = asyncio.Semaphore(256)

        async def handshake(context: ssl.SSLContext) -> None:
            async with gate:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                await reader.read(2)
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()

        started = time.perf_counter()
        await asyncio.gather(*(handshake(context) for context in contexts))
        return len(contexts) / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait()


async def revocation_times(
    fleetward: Fleetward, tenant_id: str, victims: list[tuple[SimulatedDevice, MqttClient]]
) -> list[float]:
    times: list[float] = []
    with fleetward.client() as client:
        for device, connection in victims:
            started = time.perf_counter()
            await asyncio.to_thread(
                client.post,
                f"/v1/tenants/{tenant_id}/devices/{device.device_id}/revoke",
                schemas.Revoke(),
                schemas.RevokedDevice,
            )
            await asyncio.wait_for(connection.closed.wait(), 10)
            times.append(time.perf_counter() - started)
    return times


async def measure(
    fleetward: Fleetward,
    tenant_id: str,
    devices: list[SimulatedDevice],
    arguments: argparse.Namespace,
    scratch: Path,
) -> None:
    chain_pem = "".join(
        fleetward.client()
        .get_list(f"/v1/tenants/{tenant_id}/ca/certificates", schemas.CaCertificatePublic)[index]
        .pem
        for index in (0, 1)
    ).encode()
    publishers = devices[: arguments.publishers]

    # 1. telemetry: fleetward's hub (durable) against Mosquitto (pass-through), same generator
    clients = clients_for(publishers, fleetward.hub_port, fleetward.ca_file, scratch / "pub")
    await connect_all(clients)
    await publish_rate(clients, publishers, 1.0, arguments.window)
    hub_rate = await publish_rate(clients, publishers, arguments.seconds, arguments.window)
    await close_all(clients)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    mosquitto_rate = 0.0
    if Path(mosquitto).exists():
        port = free_port()
        config = mosquitto_config(scratch, port, fleetward, chain_pem)
        broker = subprocess.Popen([mosquitto, "-c", str(config)], stderr=subprocess.DEVNULL)
        try:
            await asyncio.sleep(0.5)
            clients = clients_for(publishers, port, fleetward.ca_file, scratch / "mosquitto")
            await connect_all(clients)
            await publish_rate(clients, publishers, 1.0, arguments.window)
            mosquitto_rate = await publish_rate(clients, publishers, arguments.seconds, arguments.window)
            await close_all(clients)
        finally:
            broker.terminate()
            broker.wait()
    ratio = hub_rate / mosquitto_rate if mosquitto_rate else float("nan")
    print(
        f"telemetry  QoS 1, {len(publishers)} devices × {arguments.window} in flight, TLS: "
        f"hub (each committed to SQLite) {hub_rate:8.0f}/s, "
        f"Mosquitto 2 (no persistence) {mosquitto_rate:8.0f}/s: ratio {ratio:.2f}"
    )

    # 2. connections held, and the memory each costs the hub
    idle_before = rss_bytes(fleetward.process.pid)
    clients = clients_for(devices, fleetward.hub_port, fleetward.ca_file, scratch / "all")
    connect_seconds = await connect_all(clients)
    await asyncio.sleep(2)
    idle_after = rss_bytes(fleetward.process.pid)
    with fleetward.client() as client:
        probe = client.get(
            f"/v1/tenants/{tenant_id}/devices/{devices[-1].device_id}/connection", schemas.ConnectionPublic
        )
    held = sum(not client.closed.is_set() for client in clients)
    print(
        f"connections {held} held by one hub process (last one connected: {probe.connected}); "
        f"{(idle_after - idle_before) / max(held, 1) / 1024:.1f} KiB of hub memory each "
        f"(RSS {idle_before / 2**20:.0f} → {idle_after / 2**20:.0f} MiB); "
        f"connecting them all took {connect_seconds:.1f} s"
    )

    # 4. revocation to session end, with everyone connected
    victims = list(zip(devices[-20:], clients[-20:], strict=True))
    times = await revocation_times(fleetward, tenant_id, victims)
    print(
        f"revocation request → session closed, {len(times)} devices, {held} connected: "
        f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
    )

    # 3. reconnect storm: everyone drops and comes back at once, against bare TLS handshakes
    survivors = clients[: len(clients) - len(victims)]
    await close_all(survivors)
    await asyncio.sleep(1)
    storm = clients_for(devices[: len(survivors)], fleetward.hub_port, fleetward.ca_file, scratch / "storm")
    storm_seconds = await connect_all(storm)
    storm_rate = len(storm) / storm_seconds
    await close_all(storm)
    bare_rate = await bare_handshake_rate(devices[: len(survivors)], fleetward, scratch)
    print(
        f"reconnect storm {len(storm)} devices in {storm_seconds:.1f} s: {storm_rate:.0f}/s; "
        f"bare TLS handshakes (same certificates) {bare_rate:.0f}/s: ratio {storm_rate / bare_rate:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--window", type=int, default=8, help="QoS 1 messages in flight per publisher")
    parser.add_argument("--seconds", type=float, default=10.0)
    arguments = parser.parse_args()
    raise_file_limit()
    print(f"fleetward hub benchmark ({os.cpu_count()} cores, {arguments.devices} devices)")
    with tempfile.TemporaryDirectory(prefix="fleetward-hub-bench-") as scratch:
        directory = Path(scratch)
        fleetward = Fleetward(directory / "fleetward")
        try:
            started = time.perf_counter()
            tenant_id, devices = enroll_fleet(fleetward, arguments.devices)
            print(f"enrolled {len(devices)} devices in {time.perf_counter() - started:.1f} s")
            asyncio.run(measure(fleetward, tenant_id, devices, arguments, directory))
        finally:
            fleetward.stop()


if __name__ == "__main__":
    main()
