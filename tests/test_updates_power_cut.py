"""A power cut during an update's trial, with the real ``fleetward agent run`` killed by ``SIGKILL``.

The device runs 1.0.0 of an application; 2.0.0 is deployed; the agent downloads it into the inactive
slot, switches (the install record names 2.0.0) and starts its trial. Then the agent is killed, as a power
cut would (its application dies with it). At the next start the agent finds the trial it did not live
through, launches 1.0.0 again before anything else, and tells the director why (``interrupted``), which
aborts the rollout. ``tests/test_slots.py`` kills a process at every step of the slots' own writes; this
test is the same story through the whole agent, the server and the hub.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.config import read_install_record
from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.agent.status import AgentStatus, read_status
from fleetward.api import schemas
from fleetward.api.routes_deployments import DeviceUpdatePublic
from fleetward.sim.fleet import SimulatedDevice
from fleetward.sim.updates import UpdateOperator
from tests.agent_apps import COMPONENT, app_interpreter, reachable_directory
from tests.conftest import HubSetup, agent_cli
from tests.waiting import wait_for

T = TypeVar("T")

AGENT_SHA256 = hashlib.sha256(b"fleetward-agent under the power-cut test").hexdigest()
APP = """
import time
print("power-cut app {version} started", flush=True)
while True:
    time.sleep(0.2)
"""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


def package(version: str) -> bytes:
    manifest = Manifest(name="power-cut-app", component_id=COMPONENT, entry_point="bin/app")
    body = f"#!{app_interpreter(own_user=True)}\n{APP.format(version=version).strip()}\n"
    return build_package(manifest, {"bin/app": body.encode()})


def running(state: Path, version: str, process: subprocess.Popen[bytes]) -> AgentStatus | None:
    """The status of the agent run ``process`` (not an earlier run's), once it runs ``version``."""
    status = read_status(state / "status.json")
    if status is None or not status.running or status.pid != process.pid:
        return None
    app = next((app for app in status.apps if app.component_id == COMPONENT), None)
    return status if app is not None and app.version == version and app.state == "running" else None


def test_an_agent_killed_during_a_trial_starts_the_previous_version_and_reports_why(
    hub: HubSetup, base: Path
) -> None:
    state = base / "agent"
    publisher = ec.generate_private_key(ec.SECP256R1())
    publisher_file = base / "publisher.pem"
    publisher_file.write_bytes(
        publisher.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    operator = UpdateOperator(hub.tenant.client, hub.tenant.id, hub.tenant.product.id, publisher)
    operator.init_repository(base / "root.json")
    first = package("1.0.0")
    operator.publish(first, "1.0.0")
    hub.tenant.client.post(
        f"/v1/tenants/{hub.tenant.id}/reference-values",
        schemas.ReferenceValuesAdd(
            values=[
                schemas.ReferenceValueItem(component="fleetward-agent", version="0.0.0", sha256=AGENT_SHA256)
            ]
        ),
        schemas.ReferenceValuesAdded,
    )

    agent_cli(state, *hub.agent_init_args(publisher_file))
    (base / "app-1.0.0.tar").write_bytes(first)
    (base / "app-1.0.0.tar.sig").write_bytes(sign_package(publisher, first))
    sha256 = hashlib.sha256(first).hexdigest()
    agent_cli(state, "app", "install", str(base / "app-1.0.0.tar"), "--sha256", sha256, "--version", "1.0.0")
    root = SoftwareRootOfTrust.load_or_create(state / "identity.key")
    device = SimulatedDevice("power-cut", (), root_of_trust=root)
    hub.tenant.claim(device)

    environment = {name: value for name, value in os.environ.items() if not name.startswith("FLEETWARD_")}
    environment |= {
        "FLEETWARD_AGENT_STATE_DIR": str(state),
        "FLEETWARD_AGENT_AGENT_SHA256": AGENT_SHA256,
        "FLEETWARD_AGENT_AGENT_VERSION": "0.0.0",
        "FLEETWARD_AGENT_INTERVALS_TELEMETRY_SECONDS": "0",
        "FLEETWARD_AGENT_INTERVALS_BASELINE_SECONDS": "0",
        "FLEETWARD_AGENT_INTERVALS_STATUS_SECONDS": "0.1",
        "FLEETWARD_AGENT_SANDBOX_FIRST_APP_UID": str(400_000 + (os.getpid() % 5000) * 10),
        "FLEETWARD_AGENT_SANDBOX_APP_UID_COUNT": "10",
        "FLEETWARD_AGENT_UPDATES_ROOT_FILE": str(base / "root.json"),
        "FLEETWARD_AGENT_UPDATES_PRODUCT_ID": hub.tenant.product.id,
        "FLEETWARD_AGENT_UPDATES_TRIAL_SECONDS": "120",  # the kill comes long before the trial ends
    }
    runs: list[subprocess.Popen[bytes]] = []

    def start(number: int) -> subprocess.Popen[bytes]:
        with (base / f"agent-run-{number}.log").open("wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-c", "from fleetward.cli.entry import main; main()", "agent", "run"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        runs.append(process)
        return process

    def aborted_on_device() -> DeviceUpdatePublic | None:
        found = operator.device(device.device_id)
        return found if found.code == "rollout_aborted" else None

    try:
        agent = start(1)
        wait_for(lambda: running(state, "1.0.0", agent), "1.0.0 to run")
        second = operator.publish(package("2.0.0"), "2.0.0")
        deployment = operator.deploy(hub.tenant.groups["Field Test"].id, [second])
        wait_for(lambda: operator.device(device.device_id).state == "trial", "the trial to begin")
        assert read_install_record(state / "apps" / f"{COMPONENT}.toml").version == "2.0.0"

        agent.send_signal(signal.SIGKILL)  # the power cut
        agent.wait()

        restarted = start(2)
        wait_for(lambda: running(state, "1.0.0", restarted), "1.0.0 to run again after the cut", timeout=60)
        assert read_install_record(state / "apps" / f"{COMPONENT}.toml").version == "1.0.0"
        status = wait_for(aborted_on_device, "the director to hear of it")
        assert "rolled_back (interrupted)" in status.message
        aborted = operator.deployment(deployment.id)
        assert aborted.state == "aborted"
        assert aborted.waves[0].rolled_back == 1
    finally:
        for process in runs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for number in range(1, len(runs) + 1):
            print(f"--- agent run {number}\n" + (base / f"agent-run-{number}.log").read_text()[-3000:])
