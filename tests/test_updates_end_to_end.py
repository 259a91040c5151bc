"""Updates end to end: real agents, the real server and hub, the real TUF repository and director.

Three agents run an application installed the way ``fleetward agent app install`` does. The operator
initialises the image repository (2 of 3 offline root keys), publishes releases, and deploys them to the
agents' group in waves; each wave is asked to check at once through the hub ("check now"). The stories:

- a release whose application crashes at start fails its trial on the first device: that device rolls
  back by itself, the rollout aborts in its first wave, the other devices are never touched; a good
  release then goes through every wave and becomes the group's deployment;
- a release that passes its trial but crashes a little later: the crash reports raise the wave's crash
  rate above the group's, the rollout aborts while the wave soaks, and the device it updated is assigned
  the previous deployment again, which it installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.config import (
    AgentSettings,
    HubSettings,
    Intervals,
    SandboxSettings,
    SoftwareRoot,
    UpdateSettings,
    load_install_records,
)
from fleetward.agent.install import install_package
from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.agent.runtime import Agent
from fleetward.api.schemas_images import ImagePublic
from fleetward.clock import FakeClock
from fleetward.config import Limits
from fleetward.sim.fleet import SimulatedDevice, measurement
from fleetward.sim.updates import UpdateOperator
from tests.agent_apps import COMPONENT, app_interpreter, reachable_directory
from tests.conftest import AGENT, HubSetup
from tests.waiting import eventually

T = TypeVar("T")

GOOD = """
import time
print("test-app {version} started", flush=True)
while True:
    time.sleep(0.2)
"""
#: crashes at start: it never passes a trial
BROKEN = """
import sys
sys.stderr.write("test-app {version}: the calibration table is missing\\n")
raise SystemExit(3)
"""
#: passes a short trial, then crashes: a regression only the fleet's crash reports show
LATE_CRASH = """
import os, signal, sys, time
time.sleep(1.0)
sys.stderr.write("test-app {version}: segfault in the inverter driver\\n")
sys.stderr.flush()
os.kill(os.getpid(), signal.SIGSEGV)
"""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def limits() -> Limits:
    return Limits(rollout_tick_milliseconds=100)


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


def package(body: str, version: str) -> bytes:
    manifest = Manifest(name="test-app", component_id=COMPONENT, entry_point="bin/app")
    script = f"#!{app_interpreter(own_user=True)}\n{body.format(version=version).strip()}\n"
    return build_package(manifest, {"bin/app": script.encode()})


@dataclass
class Fleet:
    hub: HubSetup
    base: Path
    clock: FakeClock
    operator: UpdateOperator
    root_file: Path
    first: ImagePublic
    agents: list[Agent]

    @property
    def group_id(self) -> str:
        return self.hub.tenant.groups["Field Test"].id

    async def versions(self) -> list[str]:
        """What each agent runs now (its application's version), in agent order."""
        statuses = [await agent.status() for agent in self.agents]
        return [
            next((app.version for app in status.apps if app.component_id == COMPONENT), "-")
            for status in statuses
        ]

    async def running(self, version: str, agent: Agent) -> bool:
        status = await agent.status()
        return any(
            app.component_id == COMPONENT and app.version == version and app.state == "running"
            for app in status.apps
        )


def install_first_release(
    base: Path,
    number: int,
    hub: HubSetup,
    publisher: ec.EllipticCurvePrivateKey,
    release: bytes,
    root_file: Path,
) -> AgentSettings:
    """A device's state directory with the first release installed the way ``fleetward agent app
    install`` does it (outside the slots), and update settings pointing at the tenant's repository."""
    state = base / f"device-{number}"
    state.mkdir(mode=0o711)
    settings = AgentSettings(
        state_dir=state,
        authority_url=hub.server.url,
        hub=HubSettings(host="127.0.0.1", port=hub.hub_port),
        root_of_trust=SoftwareRoot(state / "identity.key"),
        measurement=measurement(*AGENT),
        ca_file=hub.tls.ca_file,
        publisher_keys=(publisher.public_key(),),
        intervals=Intervals(
            telemetry_seconds=0, baseline_seconds=0, baseline_sample_seconds=0.1, status_seconds=0.1
        ),
        # each device's applications get uids of their own: stopping an application ends every process of
        # its uid, and these agents share a machine (and may share it with another test run)
        sandbox=SandboxSettings(
            restart_initial_backoff_seconds=0.05,
            restart_max_backoff_seconds=0.1,
            first_app_uid=500_000 + (os.getpid() % 1000) * 100 + number * 10,
            app_uid_count=10,
        ),
        updates=UpdateSettings(
            root_file=root_file, product_id=hub.tenant.product.id, trial_seconds=0.6, notice_seconds=0.1
        ),
    )
    published = base / "test-app-2.1.0.tar"
    if not published.exists():
        published.write_bytes(release)
        published.with_name(published.name + ".sig").write_bytes(sign_package(publisher, release))
    install_package(settings, published, hashlib.sha256(release).hexdigest(), "2.1.0")
    return replace(settings, apps=load_install_records(settings.apps_dir))


@contextlib.asynccontextmanager
async def fleet_of(
    hub: HubSetup,
    base: Path,
    clock: FakeClock,
    size: int,
    *,
    first_release: bytes | None = None,
    adjust: Callable[[AgentSettings], AgentSettings] | None = None,
) -> AsyncIterator[Fleet]:
    """``size`` agents running release 2.1.0 (``first_release``, or a good one), published in the tenant's
    freshly initialised repository; ``adjust`` changes each agent's settings."""
    publisher = ec.generate_private_key(ec.SECP256R1())
    operator = UpdateOperator(hub.tenant.client, hub.tenant.id, hub.tenant.product.id, publisher)
    root_file = base / "root.json"
    assert await asyncio.to_thread(operator.init_repository, root_file) == 1
    release = first_release or package(GOOD, "2.1.0")
    first = await asyncio.to_thread(operator.publish, release, "2.1.0")
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for number in range(size):
            name = f"device-{number}"
            settings = install_first_release(base, number, hub, publisher, release, root_file)
            if adjust is not None:
                settings = adjust(settings)
            root = SoftwareRootOfTrust.load_or_create(settings.state_dir / "identity.key")
            hub.tenant.claim(SimulatedDevice(name, (), root_of_trust=root))
            agents.append(await stack.enter_async_context(Agent(settings, clock=clock)))
        fleet = Fleet(hub, base, clock, operator, root_file, first, agents)
        for agent in agents:
            await eventually(
                functools.partial(fleet.running, "2.1.0", agent), what="the agents to run 2.1.0", timeout=30
            )
        yield fleet


async def test_a_release_that_fails_its_trial_aborts_in_the_first_wave_and_a_good_one_then_completes(
    hub: HubSetup, base: Path, clock: FakeClock
) -> None:
    async with fleet_of(hub, base, clock, 3) as fleet:
        operator = fleet.operator
        broken = await asyncio.to_thread(operator.publish, package(BROKEN, "2.2.0"), "2.2.0")
        deployment = await asyncio.to_thread(
            operator.deploy, fleet.group_id, [broken], waves=["1", "all"], max_failure_fraction=0.2
        )
        assert [wave.size for wave in deployment.waves] == [1, 2]
        aborted = await operator.follow(deployment.id)
        assert aborted.state == "aborted"
        assert "1 failed or rolled back" in aborted.reason
        assert aborted.waves_opened == 1  # the second wave never opened
        assert aborted.waves[0].rolled_back == 1
        # the device of the first wave rolled back by itself; no device runs the broken release
        assert await fleet.versions() == ["2.1.0"] * 3
        statuses = [await asyncio.to_thread(operator.device, agent.device_id) for agent in fleet.agents]
        [reached] = [status for status in statuses if status.code == "rollout_aborted"]
        # nothing came before: the device is left with no assignment, and says why
        assert (reached.state, reached.deployment_id) == ("unassigned", None)
        assert f"deployment {deployment.id} was aborted" in reached.message
        assert "rolled_back (app_unhealthy)" in reached.message
        assert "calibration table is missing" in reached.message

        good = await asyncio.to_thread(operator.publish, package(GOOD, "2.3.0"), "2.3.0")
        rollout = await asyncio.to_thread(operator.deploy, fleet.group_id, [good], waves=["1", "all"])
        completed = await operator.follow(rollout.id)
        assert completed.state == "current", completed.reason
        assert [wave.installed for wave in completed.waves] == [1, 2]
        for agent in fleet.agents:
            await eventually(
                functools.partial(fleet.running, "2.3.0", agent), what="2.3.0 to run", timeout=30
            )
        statuses = [await asyncio.to_thread(operator.device, agent.device_id) for agent in fleet.agents]
        assert {status.state for status in statuses} == {"installed"}
        # each device fetched a delta from the release it ran, not the whole image
        assert all(status.bytes_saved > 0 for status in statuses)
        # and the agents' own status says the director has every result
        for agent in fleet.agents:
            updates = (await agent.status()).updates
            assert updates is not None
            assert updates.checks >= 1
            assert (updates.pending_results, updates.last_error) == (0, None)


async def test_crashes_after_an_install_abort_the_rollout_and_the_updated_device_goes_back(
    hub: HubSetup, base: Path, clock: FakeClock
) -> None:
    async with fleet_of(hub, base, clock, 2) as fleet:
        operator = fleet.operator
        baseline = await asyncio.to_thread(operator.deploy, fleet.group_id, [fleet.first])
        assert (await operator.follow(baseline.id)).state == "current"

        regression = await asyncio.to_thread(operator.publish, package(LATE_CRASH, "2.2.0"), "2.2.0")
        deployment = await asyncio.to_thread(
            operator.deploy,
            fleet.group_id,
            [regression],
            waves=["1", "all"],
            soak_seconds=3600,  # the next wave waits an hour: the crashes come first
            min_crash_reports=1,
            crash_rate_factor=1.0,
        )
        [updated] = [
            agent
            for agent in fleet.agents
            if (await asyncio.to_thread(operator.device, agent.device_id)).deployment_id == deployment.id
        ]
        soaking = await operator.follow(deployment.id, until=frozenset({"rolling_out"}))
        await eventually(
            lambda: _installed(operator, updated.device_id, deployment.id),
            what="the first wave to install",
            timeout=30,
        )
        fleet.clock.advance(60)  # the crash rate is per device-hour: let some time pass
        aborted = await operator.follow(deployment.id)
        assert aborted.state == "aborted", aborted.reason
        assert "crash reports" in aborted.reason
        assert soaking.waves_opened == aborted.waves_opened == 1
        # the device the rollout reached is assigned the previous deployment again, and installs it
        await eventually(
            functools.partial(fleet.running, "2.1.0", updated), what="the rollback to 2.1.0", timeout=30
        )
        status = await asyncio.to_thread(operator.device, updated.device_id)
        assert status.deployment_id == baseline.id
        assert await fleet.versions() == ["2.1.0", "2.1.0"]


async def _installed(operator: UpdateOperator, device_id: str, deployment_id: str) -> bool:
    status = await asyncio.to_thread(operator.device, device_id)
    return status.deployment_id == deployment_id and status.state == "installed"
