"""The agent updates itself, end to end: the real ``fleetward agent launch``, server, hub and director.

The test plays systemd (``Restart=always``): it starts ``fleetward agent launch`` again whenever it exits.
The operator publishes agent images of the running fleetward (``--kind agent``) and deploys them:

- one whose ``fleetward`` fails at import: the agent installs it and restarts on it; it dies at once, twice,
  and at its second start the launcher goes back to the installed agent, which tells the director
  ``rolled_back`` (``agent_did_not_start``);
- a good one: the agent installs it, restarts on it, comes up from its slot measured as the image, gets a
  certificate for that measurement, reaches the hub and commits itself: ``installed``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import fleetward
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.agent.self_update import AGENT_COMPONENT_ID, RESTART_EXIT_CODE, build_agent_image
from fleetward.agent.status import AgentStatus, read_status
from fleetward.api import schemas
from fleetward.api.routes_deployments import DeviceUpdatePublic
from fleetward.sim.fleet import SimulatedDevice
from fleetward.sim.updates import UpdateOperator
from fleetward.wire.updates import ImageKind
from tests.agent_apps import reachable_directory
from tests.conftest import HubSetup, agent_cli
from tests.waiting import wait_for

T = TypeVar("T")

AGENT_SHA256 = hashlib.sha256(b"fleetward-agent under the self-update test").hexdigest()
GROUP = "Field Test OS Evaluation"  # a Retail group gets an agent image only after an evaluation group


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


def broken_image(base: Path) -> bytes:
    """An agent image whose fleetward fails at import."""
    copy = base / "broken-fleetward"
    shutil.copytree(Path(fleetward.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "__init__.py").write_text('raise ImportError("this agent image is broken")\n')
    return build_agent_image(copy)


class Systemd:
    """Runs ``fleetward agent launch`` and starts it again whenever it exits (``Restart=always``)."""

    def __init__(self, environment: dict[str, str], logs: Path) -> None:
        self._environment = environment
        self._logs = logs
        self.exits: list[int] = []
        self.current: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Systemd:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        process = self.current
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        self._thread.join(timeout=60)
        for number in range(1, len(self.exits) + 2):
            log = self._logs / f"launch-{number}.log"
            if log.exists():
                print(f"--- start {number}\n" + log.read_text()[-2500:])

    def _loop(self) -> None:
        number = 0
        while not self._stopping.is_set():
            number += 1
            with (self._logs / f"launch-{number}.log").open("wb") as log:
                self.current = subprocess.Popen(
                    [sys.executable, "-c", "from fleetward.cli.entry import main; main()", "agent", "launch"],
                    env=self._environment,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            while True:
                try:
                    code = self.current.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if self._stopping.is_set():
                        self.current.send_signal(signal.SIGTERM)
            self.exits.append(code)
            time.sleep(0.2)  # RestartSec


def running(state: Path, version: str) -> AgentStatus | None:
    status = read_status(state / "status.json")
    return status if status is not None and status.running and status.agent_version == version else None


def test_the_agent_installs_its_own_image_and_a_broken_one_is_rolled_back_by_boot_counting(
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
    root = SoftwareRootOfTrust.load_or_create(state / "identity.key")
    device = SimulatedDevice("self-update", (), root_of_trust=root)
    hub.tenant.claim(device, group=GROUP)
    group_id = hub.tenant.groups[GROUP].id

    env = {name: value for name, value in os.environ.items() if not name.startswith("FLEETWARD_")}
    env |= {
        "FLEETWARD_AGENT_STATE_DIR": str(state),
        "FLEETWARD_AGENT_AGENT_SHA256": AGENT_SHA256,
        "FLEETWARD_AGENT_AGENT_VERSION": "0.0.0",
        "FLEETWARD_AGENT_INTERVALS_TELEMETRY_SECONDS": "0",
        "FLEETWARD_AGENT_INTERVALS_BASELINE_SECONDS": "0",
        "FLEETWARD_AGENT_INTERVALS_STATUS_SECONDS": "0.1",
        "FLEETWARD_AGENT_UPDATES_ROOT_FILE": str(base / "root.json"),
        "FLEETWARD_AGENT_UPDATES_PRODUCT_ID": hub.tenant.product.id,
    }

    def aborted() -> DeviceUpdatePublic | None:
        found = operator.device(device.device_id)
        return found if found.code == "rollout_aborted" else None

    def installed() -> DeviceUpdatePublic | None:
        found = operator.device(device.device_id)
        return found if found.state == "installed" else None

    with Systemd(env, base) as systemd:
        wait_for(lambda: running(state, "0.0.0"), "the installed agent to run", timeout=60)

        broken = operator.publish(broken_image(base), "1.0.0", ImageKind.AGENT)
        assert broken.component_id == AGENT_COMPONENT_ID
        deployment = operator.deploy(group_id, [broken])
        rolled_back = wait_for(aborted, "the director to hear of the rollback", timeout=60)
        assert "rolled_back (agent_did_not_start)" in rolled_back.message
        assert operator.deployment(deployment.id).waves[0].rolled_back == 1
        assert RESTART_EXIT_CODE in systemd.exits  # the agent restarted on the broken image
        status = wait_for(lambda: running(state, "0.0.0"), "the installed agent to run again", timeout=60)
        assert status.agent_sha256 == AGENT_SHA256
        assert not (state / "agent-image" / f"{AGENT_COMPONENT_ID}.toml").exists()

        image = build_agent_image()
        good = operator.publish(image, "1.1.0", ImageKind.AGENT)
        operator.deploy(group_id, [good])
        status = wait_for(lambda: running(state, "1.1.0"), "the new agent to run from its slot", timeout=60)
        assert status.agent_sha256 == hashlib.sha256(image).hexdigest()
        assert (
            wait_for(installed, "the director to see the agent installed", timeout=60).deployment_id
            is not None
        )
        last = read_status(state / "status.json")
        assert last is not None
        assert last.certificate is not None
        assert (state / "agent-image" / f"{AGENT_COMPONENT_ID}.toml").exists()
        restarts = len(systemd.exits)
    assert restarts >= 3  # broken: restart, death, rollback; good: restart
