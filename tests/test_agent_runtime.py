"""The agent as a running program, against the real server and hub: enrollment, measured launch, telemetry,
restarts, crash reports, baselines, re-attestation after an expiry, refused launches, refusals.

The hub runs on SQLite only here (the store is not what these tests are about). The agents' state
directories are under a directory every user may traverse, so that applications running as their own
users (the tests run as root) reach their images.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.config import AgentSettings, HubSettings, Intervals, SandboxSettings, SoftwareRoot
from fleetward.agent.launch import InstallRecord
from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.agent.runtime import Agent
from fleetward.agent.status import AgentStatus, log_paths, read_status
from fleetward.agent.supervisor import AppState
from fleetward.api import schemas
from fleetward.authority.service import RevocationReason
from fleetward.clock import FakeClock
from fleetward.errors import NotFound
from fleetward.server import free_port
from fleetward.sim.agents import PANEL_MONITOR, panel_monitor_package
from fleetward.sim.fleet import SimulatedDevice, measurement
from tests.agent_apps import COMPONENT, app_interpreter, reachable_directory
from tests.conftest import AGENT, HubSetup, healthy_software
from tests.waiting import eventually

T = TypeVar("T")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


@dataclass
class Device:
    """One agent's world: its state directory, its identity, its publisher, and the hub it reaches."""

    hub: HubSetup
    state: Path
    clock: FakeClock
    publisher: ec.EllipticCurvePrivateKey
    apps: tuple[InstallRecord, ...] = ()

    @property
    def root(self) -> SoftwareRootOfTrust:
        return SoftwareRootOfTrust.load_or_create(self.state / "identity.key")

    @property
    def simulated(self) -> SimulatedDevice:
        return SimulatedDevice("panel", healthy_software(), root_of_trust=self.root)

    @property
    def device_id(self) -> str:
        return self.simulated.device_id

    def claim(self) -> None:
        self.hub.tenant.claim(self.simulated)

    def settings(self, **changes: object) -> AgentSettings:
        settings = AgentSettings(
            state_dir=self.state,
            authority_url=self.hub.server.url,
            hub=HubSettings(host="127.0.0.1", port=self.hub.hub_port),
            root_of_trust=SoftwareRoot(self.state / "identity.key"),
            measurement=measurement(*AGENT),
            ca_file=self.hub.tls.ca_file,
            apps=self.apps,
            publisher_keys=(self.publisher.public_key(),),
            intervals=Intervals(
                telemetry_seconds=0, baseline_seconds=0, baseline_sample_seconds=0.1, status_seconds=0.1
            ),
            sandbox=SandboxSettings(restart_initial_backoff_seconds=0.05, restart_max_backoff_seconds=0.1),
        )
        return replace(settings, **changes)  # type: ignore[arg-type]

    def agent(self, **changes: object) -> Agent:
        return Agent(self.settings(**changes), clock=self.clock)

    def install(
        self,
        body: str | None = None,
        *,
        version: str = "2.1.0",
        tampered: bool = False,
        register: bool = True,
    ) -> InstallRecord:
        """A signed package, its reference value registered with the authority: the simulator's
        panel-monitor (``body`` None: it sends 20 readings and answers read_power through the app API),
        or a Python application of component ``COMPONENT``."""
        if body is None:
            package, component = panel_monitor_package(self.hub.tenant.id), PANEL_MONITOR
        else:
            manifest = Manifest(name="test-app", component_id=COMPONENT, entry_point="bin/app")
            script = f"#!{app_interpreter(own_user=True)}\n{body.strip()}\n".encode()
            package, component = build_package(manifest, {"bin/app": script}), COMPONENT
        directory = self.state.parent / "packages"
        directory.mkdir(exist_ok=True)
        path = directory / f"{self.state.name}.tar"
        path.write_bytes(package)
        path.with_name(path.name + ".sig").write_bytes(sign_package(self.publisher, package))
        digest = hashlib.sha256(package).hexdigest()
        if tampered:
            path.write_bytes(package.replace(b"import", b"imp0rt"))
        if register:
            self.hub.tenant.client.post(
                f"/v1/tenants/{self.hub.tenant.id}/reference-values",
                schemas.ReferenceValuesAdd(
                    values=[schemas.ReferenceValueItem(component=component, version=version, sha256=digest)]
                ),
                schemas.ReferenceValuesAdded,
            )
        record = InstallRecord(
            component_id=component, version=version, package_sha256=digest, package_path=path
        )
        self.apps = (*self.apps, record)
        return record

    # --- what the cloud saw, through the operator API (on a thread: the API's client is synchronous)

    async def telemetry(self) -> list[schemas.TelemetryPublic]:
        params: dict[str, str | int] = {"device_id": self.device_id, "limit": 1000}
        path = f"/v1/tenants/{self.hub.tenant.id}/telemetry"
        return await asyncio.to_thread(self.hub.tenant.client.get_list, path, schemas.TelemetryPublic, params)

    async def failures(self) -> list[schemas.FailureSignaturePublic]:
        path = f"/v1/tenants/{self.hub.tenant.id}/failures"
        return await asyncio.to_thread(self.hub.tenant.client.get_list, path, schemas.FailureSignaturePublic)

    async def reports(self, kind: str) -> list[schemas.ReportPublic]:
        path = f"/v1/tenants/{self.hub.tenant.id}/reports"
        params: dict[str, str | int] = {"device_id": self.device_id, "kind": kind}
        return await asyncio.to_thread(self.hub.tenant.client.get_list, path, schemas.ReportPublic, params)


@pytest.fixture
def device(hub: HubSetup, base: Path, clock: FakeClock) -> Device:
    return Device(hub, base / "device", clock, ec.generate_private_key(ec.SECP256R1()))


SLEEPER = """
import sys, time
print("panel monitor started", flush=True)
while True:
    time.sleep(0.2)
"""

CRASHER = """
import os, signal, sys
sys.stderr.write("reading the inverter\\nsegfault at 0x%x in worker %d\\n" % (id(sys) * 16, os.getpid()))
sys.stderr.flush()
os.kill(os.getpid(), signal.SIGSEGV)
"""


async def connected(agent: Agent) -> AgentStatus:
    async def check() -> AgentStatus | None:
        status = await agent.status()
        return status if status.link.connected else None

    return await eventually(check, what="the hub connection")


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    async with agent:
        yield agent


async def test_an_agent_without_a_credential_enrolls_launches_its_app_and_the_app_reaches_the_cloud(
    device: Device,
) -> None:
    """The app sends its readings and answers a direct method through the agent's application API."""
    device.claim()
    device.install()
    async with running(device.agent()) as agent:
        status = await connected(agent)
        assert status.certificate is not None
        assert status.device_id == device.device_id
        assert status.root_of_trust == "software"
        assert status.measurements == 2  # the agent itself, then the application
        assert [entry.name for entry in agent.boot.log.entries()] == ["fleetward-agent", PANEL_MONITOR]
        await agent.app(PANEL_MONITOR).wait_for(AppState.RUNNING)
        stored = await eventually(lambda: _at_least(device.telemetry(), 20), what="20 readings stored")
        answer = await asyncio.to_thread(
            device.hub.tenant.client.post,
            f"/v1/tenants/{device.hub.tenant.id}/devices/{device.device_id}/methods/read_power",
            schemas.MethodInvoke(payload={"unit": "kW"}, timeout_seconds=10),
            schemas.MethodResultPublic,
        )
        own = await asyncio.to_thread(
            device.hub.tenant.client.post,
            f"/v1/tenants/{device.hub.tenant.id}/devices/{device.device_id}/methods/fleetward.status",
            schemas.MethodInvoke(payload=None, timeout_seconds=10),
            schemas.MethodResultPublic,
        )
    assert [json.loads(item.body or "")["power_watts"] for item in stored] == list(range(300, 320))
    assert answer.status == 200
    assert answer.payload == {"power_watts": 312.5, "unit": "kW", "answered_by": "panel-monitor"}
    assert own.status == 200
    assert isinstance(own.payload, dict)
    assert own.payload["device_id"] == device.device_id
    written = read_status(device.state / "status.json")
    assert written is not None
    assert not written.running
    assert written.apps[0].state == "stopped"
    stdout, _stderr = log_paths(device.state / "logs", PANEL_MONITOR)
    assert "panel-monitor 2.1.0 started" in stdout.read_text()


async def _at_least(found: Awaitable[list[T]], count: int) -> list[T] | None:
    items = await found
    return items if len(items) >= count else None


async def test_telemetry_queued_while_the_hub_is_unreachable_survives_a_restart_of_the_agent(
    device: Device,
) -> None:
    device.claim()
    async with running(device.agent(hub=HubSettings(host="127.0.0.1", port=free_port()))) as agent:
        await eventually(lambda: _certified(agent), what="a certificate")
        for number in range(30):
            await agent.send_telemetry(json.dumps({"n": number}).encode())
        status = await agent.status()
        assert status.outbox.messages == 30
        assert not status.link.connected
    assert await device.telemetry() == []
    async with running(device.agent()) as agent:
        stored = await eventually(lambda: _at_least(device.telemetry(), 30), what="30 messages stored")
        assert (await agent.status()).outbox.messages == 0
    assert [json.loads(item.body or "")["n"] for item in stored] == list(range(30))


async def _certified(agent: Agent) -> AgentStatus | None:
    status = await agent.status()
    return status if status.certificate is not None else None


async def test_an_application_crash_arrives_as_a_failure_grouped_by_signature(device: Device) -> None:
    device.claim()
    device.install(CRASHER)
    async with running(device.agent()) as agent:
        handle = agent.app(COMPONENT)
        await handle.wait_for(AppState.CRASH_LOOP, timeout_seconds=30)
        failures = await eventually(
            lambda: _matching(device.failures(), lambda rows: any(row.kind == "crash_loop" for row in rows)),
            what="the crash loop in the cloud",
        )
        status = await agent.status()
    crashes = [row for row in failures if row.kind == "crash"]
    assert len(crashes) == 1  # five crashes, other addresses and pids, one signature
    assert crashes[0].count == 5
    assert crashes[0].devices == 1
    assert crashes[0].headline == "SIGSEGV: segfault at 0x? in worker <n>"
    assert crashes[0].component_id == COMPONENT
    assert status.reports_sent == 6
    assert status.apps[0].state == "crash_loop"
    _stdout, stderr = log_paths(device.state / "logs", COMPONENT)
    assert "segfault at" in stderr.read_text()


async def _matching(found: Awaitable[list[T]], predicate: Callable[[list[T]], bool]) -> list[T] | None:
    items = await found
    return items if predicate(items) else None


async def test_a_security_baseline_and_the_agents_health_arrive_at_their_intervals(device: Device) -> None:
    device.claim()
    intervals = Intervals(telemetry_seconds=0.3, baseline_seconds=0.3, baseline_sample_seconds=0.1)
    async with running(device.agent(intervals=intervals)) as agent:
        await connected(agent)
        path = f"/v1/tenants/{device.hub.tenant.id}/devices/{device.device_id}/baseline"

        async def baseline() -> schemas.BaselinePublic | None:
            with contextlib.suppress(NotFound):
                return await asyncio.to_thread(device.hub.tenant.client.get, path, schemas.BaselinePublic)
            return None

        received = await eventually(baseline, what="a baseline")
        health = await eventually(lambda: _at_least(device.telemetry(), 1), what="the agent's health")
    assert health[0].properties["fleetward-agent"] == "health"
    assert json.loads(health[0].body or "")["outbox_dropped"] == 0
    assert received.device_id == device.device_id
    assert received.baseline.format == "fleetward-baseline-v1"
    # the agent's own connection to the hub is one of what it saw
    assert any(item.remote_port == device.hub.hub_port for item in received.baseline.established)


async def test_an_agent_offline_past_its_certificate_expiry_re_attests_by_itself(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    device.claim()
    async with running(device.agent()) as agent:
        first = (await connected(agent)).certificate
    assert first is not None
    device.clock.advance(25 * 3600)  # offline for a day and an hour: the certificate has expired
    caplog.set_level(logging.INFO, logger="fleetward.agent.renewal")
    async with running(device.agent()) as agent:
        status = await eventually(lambda: _renewed_from(agent, first.serial), what="a new certificate")
    assert status.certificate is not None
    assert status.certificate.not_after > device.clock.now() > first.not_after
    assert "re-attested" in caplog.text


async def _renewed_from(agent: Agent, serial: str) -> AgentStatus | None:
    status = await agent.status()
    return status if status.certificate is not None and status.certificate.serial != serial else None


async def test_a_tampered_package_is_refused_reported_and_never_started(device: Device) -> None:
    device.claim()
    device.install(SLEEPER, tampered=True)
    async with running(device.agent()) as agent:
        await connected(agent)
        status = await agent.status()
        with pytest.raises(NotFound):
            agent.app(COMPONENT)
        reports = await eventually(lambda: device.reports("launch_refused"), what="the refused launch")
    (app,) = status.apps
    assert (app.state, app.reason) == ("refused", "package_hash_mismatch")
    assert status.measurements == 1  # the agent alone: nothing refused is measured
    assert reports[0].report["reason"] == "package_hash_mismatch"
    assert reports[0].component_id == COMPONENT
    assert not (device.state / "storage" / COMPONENT).exists()


async def test_the_authoritys_refusal_after_a_revocation_is_logged_and_shown_in_the_status(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    device.claim()
    caplog.set_level(logging.WARNING)
    async with running(device.agent()) as agent:
        await connected(agent)
        await asyncio.to_thread(
            device.hub.tenant.client.post,
            f"/v1/tenants/{device.hub.tenant.id}/devices/{device.device_id}/revoke",
            schemas.Revoke(reason=RevocationReason.KEY_COMPROMISE),
            schemas.RevokedDevice,
        )

        async def refused() -> AgentStatus | None:
            status = await agent.status()
            return status if status.last_refusal is not None else None

        status = await eventually(refused, what="the authority's refusal")
    assert status.last_refusal is not None
    assert status.last_refusal.code == "device_revoked"
    assert not status.link.connected
    assert (status.link.last_error or "").startswith("connect_refused")
    assert "device_revoked" in caplog.text
    written = read_status(device.state / "status.json")
    assert written is not None
    assert written.last_refusal is not None
    assert written.last_refusal.code == "device_revoked"


OVERREACHER = """
import json, os, socket, time
connection = socket.socket(socket.AF_UNIX)
connection.connect(os.environ["FLEETWARD_AGENT_SOCKET"])
frames = connection.makefile("rwb")
frames.readline()  # the hello
frames.write(b'{"id": 1, "op": "gpio.write", "args": {"pin": 5, "value": 1}}\\n')
frames.flush()
print(frames.readline().decode(), flush=True)
while True:
    time.sleep(0.2)
"""


async def test_an_application_using_an_undeclared_capability_is_refused_and_the_cloud_sees_it(
    device: Device,
) -> None:
    device.claim()
    device.install(OVERREACHER)
    async with running(device.agent()) as agent:
        reports = await eventually(
            lambda: _matching(device.reports("capability_denied"), bool), what="the violation in the cloud"
        )
        status = await agent.status()
    assert reports[0].component_id == COMPONENT
    assert reports[0].headline == "Gpio not declared: 5"
    assert status.violations == 1
    stdout, _stderr = log_paths(device.state / "logs", COMPONENT)
    assert '"capability_not_declared"' in stdout.read_text()
