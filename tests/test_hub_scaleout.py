"""The hub scaled out: two servers on one PostgreSQL database and one NATS, each with its own hub, and
``fleetward serve --workers 2 --bus-url …`` as real processes.

A device connected to hub A is reached through server B's API, for everything the API does with a
device's session: direct methods, desired patches, cloud-to-device messages, the connection state, the
live stream, revocation, and a takeover by a newer connection on B. The trust poll is set to 30 s here,
so that a session ending within a second shows the bus carried the revocation, not the poll.

These tests need PostgreSQL and NATS: they skip with a reason where either is missing, and fail instead
under ``FLEETWARD_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qsl

import aiomqtt
import httpx
import pytest

from fleetward.api import schemas
from fleetward.authority.keystore import MasterKeyStore
from fleetward.bus.natsbus import NatsBus
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services, build_services
from fleetward.config import Limits, Settings
from fleetward.hub import codec
from fleetward.server import BackgroundServer, free_port
from fleetward.service_tls import ServiceTls
from fleetward.sim.fleet import SimulatedDevice
from fleetward.transport import trust
from tests.conftest import HubSetup, TenantSetup, _empty_postgres, healthy_software, make_tenant
from tests.test_bus import nats_url, unique_prefix
from tests.test_hub_behaviour import (
    METHODS,
    TWIN_DESIRED,
    connected,
    device_path,
    devicebound,
    devicebound_properties,
    events_topic,
    eventually,
    hub_event,
    invoke,
    messages,
    next_message,
    patch_desired,
    payload_of,
    raw_device,
    refusal,
    send_message,
    session_ended,
    sse_events,
    telemetry,
)

pytestmark = pytest.mark.postgres


@dataclass
class Cluster:
    """Two servers, A and B, on one database and one bus: the same tenant seen through either."""

    a: HubSetup
    b: HubSetup


def node(
    database_url: str,
    data_dir: Path,
    limits: Limits,
    tls: ServiceTls,
    clock: FakeClock,
    key: bytes,
    bus: NatsBus,
) -> Services:
    port = free_port()
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        port=port,
        public_url=f"https://127.0.0.1:{port}",
        limits=limits,
        hub_port=free_port(),
        tls_certificate=tls.certificate_file,
        tls_private_key=tls.private_key_file,
        bus_url=nats_url(),
    )
    return build_services(settings, clock=clock, keystore=MasterKeyStore(key), bus=bus)


@pytest.fixture
def cluster(
    postgres_url: str, tmp_path: Path, clock: FakeClock, service_tls: ServiceTls
) -> Iterator[Cluster]:
    url = nats_url()
    _empty_postgres(postgres_url)
    limits = Limits(hub_trust_poll_milliseconds=30_000)
    key = secrets.token_bytes(32)  # the nodes share the master key, as operations.md says they must
    prefix = unique_prefix()
    services = [
        node(postgres_url, tmp_path / name, limits, service_tls, clock, key, NatsBus(url, prefix=prefix))
        for name in ("a", "b")
    ]
    _operator, token = services[0].registry.bootstrap("admin@example.com", "Admin")
    try:
        with (
            BackgroundServer(services[0], port=services[0].settings.port) as server_a,
            BackgroundServer(services[1], port=services[1].settings.port) as server_b,
            FleetwardClient(server_a.url, token, ca_file=service_tls.ca_file) as client_a,
            FleetwardClient(server_b.url, token, ca_file=service_tls.ca_file) as client_b,
        ):
            tenant = make_tenant(client_a)
            seen_from_b = replace(tenant, client=client_b)
            yield Cluster(
                HubSetup(services[0], server_a, service_tls, token, tenant, tmp_path),
                HubSetup(services[1], server_b, service_tls, token, seen_from_b, tmp_path),
            )
    finally:
        for built in services:
            built.close()


@pytest.fixture
def device(cluster: Cluster) -> SimulatedDevice:
    return cluster.a.enroll(SimulatedDevice("room-1", healthy_software()))


async def answer_methods(client: aiomqtt.Client, answer: str) -> None:
    """Answer every direct method but ``sleep`` with 200 and ``{"by": answer, "echo": payload}``."""
    async for message in client.messages:
        topic = message.topic.value
        name = topic.split("/")[3]
        rid = dict(parse_qsl(topic.partition("?")[2]))["$rid"]
        if name != "sleep":
            body = json.dumps({"by": answer, "echo": json.loads(payload_of(message))})
            await client.publish(f"$iothub/methods/res/200/?$rid={rid}", body)


@contextlib.asynccontextmanager
async def answering(client: aiomqtt.Client, answer: str) -> AsyncIterator[None]:
    await client.subscribe(METHODS)
    task = asyncio.create_task(answer_methods(client, answer))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------- two servers


def test_a_direct_method_called_through_server_b_is_answered_by_the_device_connected_to_hub_a(
    cluster: Cluster, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with cluster.a.mqtt(device) as client, answering(client, "room-1"):
            result = await asyncio.to_thread(invoke, cluster.b, device, "reboot", {"delay": 5})
            assert (result.status, result.payload) == (200, {"by": "room-1", "echo": {"delay": 5}})
            started = time.monotonic()
            refused = await asyncio.to_thread(
                refusal,
                cluster.b,
                "POST",
                device_path(cluster.b, device, "/methods/sleep"),
                {"timeout_seconds": 1},
            )
            assert refused == (504, "method_timeout")
            assert 0.9 < time.monotonic() - started < 5

    asyncio.run(run())
    eventually(lambda: not connected(cluster.b, device), what="the session gone, seen from B")
    refused = refusal(cluster.b, "POST", device_path(cluster.b, device, "/methods/reboot"), {})
    assert refused == (404, "device_offline")


def test_a_method_for_a_module_called_through_server_b_reaches_the_module_on_hub_a_not_the_device_on_b(
    cluster: Cluster, device: SimulatedDevice
) -> None:
    """Each session has its own subject: the module's session on hub A answers, although the device's own
    session is held by hub B."""
    module = "fleetward-agent"

    def call(name: str) -> schemas.MethodResultPublic:
        return cluster.b.tenant.client.post(
            device_path(cluster.b, device, f"/modules/{module}/methods/{name}"),
            schemas.MethodInvoke(payload={"delay": 1}, timeout_seconds=5),
            schemas.MethodResultPublic,
        )

    async def run() -> None:
        as_module = cluster.a.mqtt(
            device,
            identifier=f"{device.device_id}/{module}",
            username=f"127.0.0.1/{device.device_id}/{module}/?api-version=2021-04-12",
        )
        async with (
            as_module as on_a,
            answering(on_a, "module on A"),
            cluster.b.mqtt(device) as on_b,
            answering(on_b, "device on B"),
        ):
            result = await asyncio.to_thread(call, "reboot")
            assert (result.status, result.payload) == (200, {"by": "module on A", "echo": {"delay": 1}})
            result = await asyncio.to_thread(invoke, cluster.a, device, "reboot", {"delay": 2})
            assert (result.status, result.payload) == (200, {"by": "device on B", "echo": {"delay": 2}})

    asyncio.run(run())


def test_a_desired_patch_and_a_message_written_through_server_b_reach_the_device_on_hub_a(
    cluster: Cluster, device: SimulatedDevice
) -> None:
    assert not connected(cluster.b, device)

    async def run() -> schemas.CloudToDevicePublic:
        async with cluster.a.mqtt(device) as client:
            await client.subscribe(TWIN_DESIRED)
            await client.subscribe(devicebound(device), qos=1)
            assert await asyncio.to_thread(connected, cluster.b, device)
            patched = await asyncio.to_thread(patch_desired, cluster.b, device, {"threshold": 30})
            assert (patched.version, patched.pushed) == (2, True)
            pushed = await next_message(client)
            assert pushed.topic.value == "$iothub/twin/PATCH/properties/desired/?$version=2"
            assert json.loads(payload_of(pushed)) == {"threshold": 30, "$version": 2}
            queued = await asyncio.to_thread(send_message, cluster.b, device, "from B", k="v")
            delivered = await next_message(client)
            assert payload_of(delivered) == b"from B"
            assert devicebound_properties(device, delivered.topic.value)["k"] == "v"
            return queued

    queued = asyncio.run(run())
    eventually(
        lambda: messages(cluster.b, device)[queued.id].state == "completed", what="the message completed"
    )
    eventually(lambda: not connected(cluster.b, device), what="the session gone, seen from B")
    assert not patch_desired(cluster.b, device, {"threshold": 31}).pushed


def test_revoking_a_device_through_server_b_ends_its_session_on_hub_a_within_a_second(
    cluster: Cluster, device: SimulatedDevice
) -> None:
    async def run() -> float:
        async with cluster.a.mqtt(device) as client:
            await client.subscribe(METHODS)
            started = time.monotonic()
            await asyncio.to_thread(
                cluster.b.tenant.client.post,
                f"/v1/tenants/{cluster.b.tenant.id}/devices/{device.device_id}/revoke",
                schemas.Revoke(),
                schemas.RevokedDevice,
            )
            await session_ended(client)
            return time.monotonic() - started

    assert asyncio.run(run()) < 1.0
    # Recorded by hub A (revoking a device revokes its certificates: the first change ends the session).
    assert hub_event(cluster.a, device, "certificate_revoked")[0].detail.startswith("trust ended")


def test_a_newer_connection_on_hub_b_takes_over_the_session_on_hub_a_and_inherits_its_subscriptions(
    cluster: Cluster, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with cluster.a.mqtt(device, clean_session=False) as first:
            await first.subscribe(METHODS)
            async with raw_device(cluster.b, device, clean_session=False) as (second, connack):
                assert connack.return_code is codec.ConnectReturnCode.ACCEPTED
                assert connack.session_present  # handed over by hub A
                assert await session_ended(first) < 2
                # The API of A reaches the device on B now.
                call = asyncio.create_task(asyncio.to_thread(invoke, cluster.a, device, "ping"))
                request = await second.expect(codec.Publish)
                rid = request.topic.partition("$rid=")[2]
                await second.send(codec.Publish(f"$iothub/methods/res/204/?$rid={rid}", b""))
                assert (await call).status == 204
                await second.send(codec.Publish(events_topic(device), b"from B", qos=1, packet_id=3))
                assert await second.expect(codec.PubAck) == codec.PubAck(3)
                assert await asyncio.to_thread(connected, cluster.a, device)

    asyncio.run(run())
    assert hub_event(cluster.a, device, "session_taken_over")
    assert [item.body for item in telemetry(cluster.a)] == ["from B"]


def test_the_live_stream_of_server_b_shows_the_telemetry_a_device_sends_to_hub_a(cluster: Cluster) -> None:
    watched = cluster.a.enroll(SimulatedDevice("room-1", healthy_software()))
    on_b = cluster.a.enroll(SimulatedDevice("room-2", healthy_software()))
    stream = f"{cluster.b.server.url}/v1/tenants/{cluster.b.tenant.id}/telemetry/stream"

    async def run() -> list[schemas.TelemetryPublic]:
        headers = {"Authorization": f"Bearer {cluster.b.token}"}
        async with (
            httpx.AsyncClient(verify=trust(cluster.b.tls.ca_file), headers=headers, timeout=10) as http,
            http.stream("GET", stream) as response,
            cluster.a.mqtt(watched) as client_a,
            cluster.b.mqtt(on_b) as client_b,
        ):
            assert response.status_code == 200
            enough = asyncio.Event()

            async def publish() -> None:  # until the stream has enough (it may start a moment late)
                number = 0
                while not enough.is_set():
                    await client_a.publish(events_topic(watched), f"a-{number}", qos=1)
                    await client_b.publish(events_topic(on_b), f"b-{number}", qos=1)
                    await asyncio.sleep(0.02)
                    number += 1

            publisher = asyncio.create_task(publish())
            received: list[schemas.TelemetryPublic] = []
            try:
                async with asyncio.timeout(10):
                    async for event, data in sse_events(response):
                        assert event == "telemetry"
                        received.append(schemas.TelemetryPublic.model_validate_json(data))
                        if {item.device_id for item in received} == {watched.device_id, on_b.device_id}:
                            break
            finally:
                enough.set()
                await publisher
            return received

    received = asyncio.run(run())
    from_a = [item for item in received if item.device_id == watched.device_id]
    assert from_a
    assert all((item.body or "").startswith("a-") for item in from_a)
    stored = {item.body: item for item in telemetry(cluster.b, device_id=watched.device_id, limit=1000)}
    assert all(
        stored[item.body].model_dump(exclude={"id"}) == item.model_dump(exclude={"id"}) for item in from_a
    )


# ---------------------------------------------------------------------- serve --workers 2 --bus-url


class Served:
    """``fleetward init`` and ``fleetward serve --workers 2 --bus-url …`` as processes."""

    def __init__(self, directory: Path, bus_url: str) -> None:
        self.port, self.hub_port = free_port(), free_port()
        command = str(Path(sys.executable).parent / "fleetward")
        environment = dict(os.environ, FLEETWARD_CLI_CONFIG=str(directory / "cli.json"))
        subprocess.run(
            [command, "init", "--data-dir", str(directory), "--port", str(self.port)],
            check=True,
            env=environment,
            capture_output=True,
        )
        self.token = json.loads((directory / "cli.json").read_text())["token"]
        self.ca_file = directory / "tls" / "service-ca.pem"
        self.url = f"https://127.0.0.1:{self.port}"
        environment["FLEETWARD_HUB_PORT"] = str(self.hub_port)
        self.process = subprocess.Popen(
            [
                *(command, "serve", "--data-dir", str(directory), "--port", str(self.port)),
                *("--workers", "2", "--bus-url", bus_url, "--log-level", "warning"),
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"serve exited: {self.process.stderr.read().decode() if self.process.stderr else ''}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", verify=trust(self.ca_file), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("serve did not start")

    def worker_pids(self) -> set[int]:
        """The worker processes (the children of ``serve``)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return {int(pid) for pid in children.read_text().split()} if children.exists() else set()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()


def holders(port: int) -> dict[int, int]:
    """Process id → established connections it holds on ``port`` (from ``ss``)."""
    listing = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts: dict[int, int] = {}
    for part in listing.split("pid=")[1:]:
        pid = int(part.split(",")[0])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def device_context(served: Served, device: SimulatedDevice, directory: Path) -> ssl.SSLContext:
    assert device.credential is not None
    certificate, key = directory / f"{device.device_id[:16]}.pem", directory / f"{device.device_id[:16]}.key"
    certificate.write_text(device.credential.issued.certificate)
    key.write_bytes(device.credential.key_pem())
    key.chmod(0o600)
    context = ssl.create_default_context(cafile=str(served.ca_file))
    context.load_cert_chain(str(certificate), str(key))
    return context


@pytest.mark.slow
def test_serve_with_two_workers_and_a_bus_runs_the_hub_in_every_worker_and_routes_methods_between_them(
    tmp_path: Path,
) -> None:
    served = Served(tmp_path / "data", nats_url())
    try:
        served.wait_until_serving()
        devices = [SimulatedDevice(f"panel-{number:02d}", healthy_software()) for number in range(16)]
        with FleetwardClient(served.url, served.token, ca_file=served.ca_file) as client:
            tenant: TenantSetup = make_tenant(client)
            tenant.claim(*devices)

            async def enroll() -> None:
                async with httpx.AsyncClient(verify=trust(served.ca_file), timeout=30) as http:
                    for simulated in devices:
                        await simulated.enroll(served.url, http)

            asyncio.run(enroll())

            async def run() -> dict[int, int]:
                async with contextlib.AsyncExitStack() as stack:
                    for simulated in devices:
                        mqtt = aiomqtt.Client(
                            "127.0.0.1",
                            served.hub_port,
                            identifier=simulated.device_id,
                            tls_context=device_context(served, simulated, tmp_path),
                            protocol=aiomqtt.ProtocolVersion.V311,
                            timeout=10,
                        )
                        await stack.enter_async_context(mqtt)
                        await stack.enter_async_context(answering(mqtt, simulated.name))
                    held = await asyncio.to_thread(holders, served.hub_port)
                    for simulated in devices:  # each call lands on either worker, the device on either
                        result = await asyncio.to_thread(
                            client.post,
                            f"/v1/tenants/{tenant.id}/devices/{simulated.device_id}/methods/whoami",
                            schemas.MethodInvoke(payload=simulated.name, timeout_seconds=10),
                            schemas.MethodResultPublic,
                        )
                        assert (result.status, result.payload) == (
                            200,
                            {"by": simulated.name, "echo": simulated.name},
                        )
                    return held

            held = asyncio.run(run())
        if shutil.which("ss") and held:
            # 16 connections spread by the kernel's hash: both workers hold some (all on one: p = 2^-15).
            assert set(held) <= served.worker_pids()
            assert len(held) == 2, held
            assert sum(held.values()) == len(devices)
    finally:
        served.stop()
