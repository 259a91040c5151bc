"""The agent's launcher: what it starts, how it counts the starts of an agent on trial, and when it goes back.

The slots, the agent image (built from the running fleetward) and measured launch are real; only the final
``exec`` is a seam (:class:`~fleetward.agent.self_update.Execute`), which records what would run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import fleetward
from fleetward.agent.config import AgentSettings, HubSettings, SoftwareRoot
from fleetward.agent.launch import InstallRecord
from fleetward.agent.package import sign_package
from fleetward.agent.self_update import (
    AGENT_COMPONENT_ID,
    AGENT_DID_NOT_START,
    BOOT_COUNT_NAME,
    LaunchTarget,
    agent_command,
    agent_slots,
    build_agent_image,
    choose_target,
    launch,
)
from fleetward.agent.slots import ComponentSlots
from fleetward.errors import LaunchRefused
from fleetward.wire.evidence import Measurement
from tests.agent_apps import reachable_directory

NOON = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
PUBLISHER = ec.generate_private_key(ec.SECP256R1())
IMAGE = build_agent_image()


@pytest.fixture
def state() -> Iterator[Path]:
    with reachable_directory() as base:
        yield base / "state"


def settings_for(state: Path) -> AgentSettings:
    return AgentSettings(
        state_dir=state,
        authority_url="https://authority.invalid",
        hub=HubSettings(host="hub.invalid"),
        root_of_trust=SoftwareRoot(state / "identity.key"),
        measurement=Measurement(name="fleetward-agent", version="1.0.0", sha256="1" * 64),
        publisher_keys=(PUBLISHER.public_key(),),
    )


def install(slots: ComponentSlots, version: str, data: bytes = IMAGE, *, commit: bool = True) -> None:
    """What the updater does with an agent image: download, stage, switch (and commit, once healthy)."""
    sha256 = hashlib.sha256(data).hexdigest()
    target = slots.download_path(sha256, len(data))
    target.path.write_bytes(data)
    slots.stage(sha256, version, sign_package(PUBLISHER, data))
    slots.switch("d-1", NOON)
    if commit:
        slots.commit()


@dataclass
class Verifier:
    """Counts verifications; refuses when told to."""

    image_dir: Path
    refusal: LaunchRefused | None = None
    calls: int = 0

    def __call__(self, record: InstallRecord) -> Path:
        self.calls += 1
        if self.refusal is not None:
            raise self.refusal
        return self.image_dir / record.package_sha256


class Executed(Exception):
    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        super().__init__(argv[0])
        self.argv = argv
        self.env = dict(env)


def execute(path: str, argv: list[str], env: Mapping[str, str], /) -> NoReturn:
    raise Executed(argv, env)


def test_with_no_agent_image_the_launcher_runs_the_installed_agent(state: Path) -> None:
    target = choose_target(agent_slots(state), Verifier(state / "images"))
    assert (target.record, target.image_dir) == (None, None)
    environ = {"FLEETWARD_AGENT_AGENT_SHA256": "2" * 64}
    argv, env = agent_command(target, state, "info", environ, python="/usr/bin/python3")
    assert argv[:3] == ["/usr/bin/python3", "-P", "-c"]
    assert argv[4:] == ["agent", "run", "--state-dir", str(state), "--log-level", "info"]
    assert env["FLEETWARD_AGENT_AGENT_SHA256"] == "2" * 64  # the installed agent measures itself as before


def test_an_installed_agent_image_runs_from_its_unpacked_directory_measured_as_the_image(state: Path) -> None:
    slots = agent_slots(state)
    install(slots, "2.0.0")
    verifier = Verifier(state / "images")
    target = choose_target(slots, verifier)
    assert target.record is not None
    sha256 = hashlib.sha256(IMAGE).hexdigest()
    assert target.image_dir == state / "images" / sha256
    argv, env = agent_command(target, state, "debug", {"FLEETWARD_AGENT_AGENT_IMAGE": "/usr/lib/x"})
    assert argv[4:7] == [str(target.image_dir), "agent", "run"]
    assert env["FLEETWARD_AGENT_AGENT_NAME"] == AGENT_COMPONENT_ID
    assert env["FLEETWARD_AGENT_AGENT_VERSION"] == "2.0.0"
    assert env["FLEETWARD_AGENT_AGENT_SHA256"] == sha256
    assert "FLEETWARD_AGENT_AGENT_IMAGE" not in env
    assert not (slots.directory / BOOT_COUNT_NAME).exists()  # a committed image is not counted


def test_the_first_start_of_a_trial_is_counted_and_the_second_rolls_it_back(state: Path) -> None:
    slots = agent_slots(state)
    install(slots, "2.0.0", commit=False)
    verifier = Verifier(state / "images")
    first = choose_target(slots, verifier)
    assert first.record is not None
    assert first.record.version == "2.0.0"
    assert (slots.directory / BOOT_COUNT_NAME).exists()

    second = choose_target(slots, verifier)  # the agent on trial exited without committing
    assert second == LaunchTarget(None, None, second.note)  # nothing came before it: the installed agent
    trial = slots.state().trial
    assert trial is not None
    assert trial.failure == AGENT_DID_NOT_START  # the agent now started finishes the rollback and reports it
    assert choose_target(slots, verifier).record is None  # and a start before it does decides the same


def test_a_second_trial_goes_back_to_the_previous_agent_image(state: Path) -> None:
    slots = agent_slots(state)
    install(slots, "2.0.0")
    other = build_agent_image_with(state.parent, "extra.txt", b"3.0.0")
    install(slots, "3.0.0", other, commit=False)
    verifier = Verifier(state / "images")
    assert choose_target(slots, verifier).record is not None
    back = choose_target(slots, verifier)
    assert back.record is not None
    assert back.record.version == "2.0.0"


def test_an_agent_image_measured_launch_refuses_is_not_started(state: Path) -> None:
    slots = agent_slots(state)
    install(slots, "2.0.0", commit=False)
    verifier = Verifier(state / "images", LaunchRefused("bad signature", code="package_signature_invalid"))
    target = choose_target(slots, verifier)
    assert target.record is None
    trial = slots.state().trial
    assert trial is not None
    assert trial.failure == "package_signature_invalid"


def test_launch_verifies_the_image_with_measured_launch_and_execs_it(state: Path) -> None:
    settings = settings_for(state)
    install(agent_slots(state), "2.0.0")
    with pytest.raises(Executed) as executed:
        launch(settings, execute=execute, environ={})
    image_dir = Path(executed.value.argv[4])
    assert (image_dir / "fleetward" / "__init__.py").read_bytes() == (Path(fleetward.__file__).read_bytes())
    assert not (image_dir / "fleetward" / "__init__.py").stat().st_mode & 0o222  # read-only


def build_agent_image_with(base: Path, name: str, content: bytes) -> bytes:
    """An agent image of a copy of fleetward with one file added (or replaced)."""
    copy = base / "fleetward-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(Path(fleetward.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / name).write_bytes(content)
    return build_agent_image(copy)


def test_the_exec_command_imports_fleetward_from_the_image(state: Path) -> None:
    data = build_agent_image_with(
        state.parent, "__init__.py", b'print("from the image")\n__version__ = "9"\n'
    )
    settings = settings_for(state)
    install(agent_slots(state), "2.0.0", data)
    with pytest.raises(Executed) as executed:
        launch(settings, execute=execute, environ={})
    argv = executed.value.argv
    done = subprocess.run([*argv[:5], "agent", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("from the image")
