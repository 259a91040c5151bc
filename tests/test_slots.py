"""A/B slots: an update lands in the inactive slot, a failed or interrupted trial goes back to the previous
package, and a power cut at any step leaves a package that measured launch accepts.

Every check of "what starts" is a real measured launch (:class:`~fleetward.agent.launch.Launcher`: hash,
publisher signature, safe unpack, manifest) of the record that ``apps/<component id>.toml`` holds, read as
the agent reads it. The power-cut test runs the update in a child process that ``SIGKILL``s itself at one
step; the parent then recovers, as the agent does at start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetward.agent.config import read_install_record, render_install_record
from fleetward.agent.launch import InstallRecord
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.slots import (
    INTERRUPTED,
    PARTIAL_NAME,
    ComponentSlots,
    SlotState,
)
from fleetward.errors import Conflict
from tests.agent_apps import COMPONENT, AppWorld, manifest_for, script

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
CHUNKS = 3


@dataclass(frozen=True)
class Release:
    version: str
    data: bytes
    signature: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Device:
    """A state directory with slots for :data:`COMPONENT`, and a publisher whose packages launch."""

    world: AppWorld

    @property
    def state_dir(self) -> Path:
        return self.world.base / "state"

    @property
    def apps_dir(self) -> Path:
        return self.state_dir / "apps"

    def slots(self) -> ComponentSlots:
        return ComponentSlots.open(self.state_dir, self.apps_dir, COMPONENT)

    def release(self, version: str) -> Release:
        body = f"print('version {version}')"
        data = build_package(manifest_for(COMPONENT), {"bin/app": script(body, own_user=False)})
        return Release(version, data, sign_package(self.world.publisher, data))

    def record(self) -> InstallRecord:
        """The install record as the agent reads it at start."""
        return read_install_record(self.apps_dir / f"{COMPONENT}.toml")

    async def launched_version(self) -> str:
        """Measured launch of the install record; what it launched."""
        launched = await self.world.launcher().launch(self.record())
        return launched.record.version


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(AppWorld(tmp_path))


def update(slots: ComponentSlots, release: Release, *, deployment: str = "deployment-1") -> None:
    """Download, stage, switch and commit ``release``."""
    target = slots.download_path(release.sha256, len(release.data))
    with target.path.open("r+b") as handle:
        handle.seek(target.offset)
        handle.write(release.data[target.offset :])
    slots.stage(release.sha256, release.version, release.signature)
    slots.switch(deployment, NOW)
    slots.commit()


def slot_files(device: Device) -> dict[str, list[str]]:
    base = device.state_dir / "slots" / COMPONENT
    return {slot: sorted(path.name for path in (base / slot).iterdir()) for slot in ("a", "b")}


# ------------------------------------------------------------------------------------------- behaviour


async def test_an_update_downloads_stages_switches_and_commits_into_the_inactive_slot(device: Device) -> None:
    slots = device.slots()
    first, second = device.release("1.0.0"), device.release("2.0.0")
    update(slots, first)
    assert slots.slot_of(device.record()) == "a"

    target = slots.download_path(second.sha256, len(second.data))
    assert (target.slot, target.offset) == ("b", 0)
    target.path.write_bytes(second.data)
    slots.stage(second.sha256, second.version, second.signature)
    assert device.record().version == "1.0.0", "staging does not change what starts"
    switched = slots.switch("deployment-2", NOW)
    assert switched.previous == device.slots().slot_record("a", "1.0.0", first.sha256)
    assert device.record() == switched.record
    assert slots.state().trial == switched.trial
    slots.commit()

    assert slots.state() == SlotState(previous=switched.previous)
    assert await device.launched_version() == "2.0.0"
    assert slot_files(device) == {
        "a": ["package.tar", "package.tar.sig"],
        "b": ["package.tar", "package.tar.sig"],
    }
    assert slots.recover(NOW).failed is None


async def test_roll_back_restores_the_previous_record_which_measured_launch_launches(device: Device) -> None:
    slots = device.slots()
    update(slots, device.release("1.0.0"))
    second = device.release("2.0.0")
    target = slots.download_path(second.sha256, len(second.data))
    target.path.write_bytes(second.data)
    slots.stage(second.sha256, second.version, second.signature)
    slots.switch("deployment-2", NOW)
    assert await device.launched_version() == "2.0.0"

    restored = slots.roll_back("crash_loop")

    assert restored == device.record()
    assert restored is not None
    assert restored.version == "1.0.0"
    assert await device.launched_version() == "1.0.0"
    assert slots.state() == SlotState()
    assert slot_files(device)["b"] == [], "the failed package is discarded"
    with pytest.raises(Conflict):
        slots.commit()


async def test_roll_back_of_a_first_install_removes_the_record(device: Device) -> None:
    slots = device.slots()
    first = device.release("1.0.0")
    target = slots.download_path(first.sha256, len(first.data))
    target.path.write_bytes(first.data)
    slots.stage(first.sha256, first.version, first.signature)
    slots.switch("deployment-1", NOW)
    assert slots.roll_back("health_check_failed") is None
    assert slots.active() is None


async def test_an_update_of_a_package_installed_outside_the_slots_rolls_back_to_it(device: Device) -> None:
    legacy = device.release("1.0.0")
    package = device.state_dir / "packages" / COMPONENT / f"{legacy.sha256}.tar"
    package.parent.mkdir(parents=True)
    package.write_bytes(legacy.data)
    package.with_name(package.name + ".sig").write_bytes(legacy.signature)
    record = InstallRecord(
        COMPONENT, "1.0.0", legacy.sha256, package, package.with_name(package.name + ".sig")
    )
    device.apps_dir.mkdir()
    (device.apps_dir / f"{COMPONENT}.toml").write_text(render_install_record(record, device.state_dir))

    slots = device.slots()
    second = device.release("2.0.0")
    target = slots.download_path(second.sha256, len(second.data))
    assert target.slot == "a"
    target.path.write_bytes(second.data)
    slots.stage(second.sha256, second.version, second.signature)
    slots.switch("deployment-2", NOW)
    assert await device.launched_version() == "2.0.0"
    assert slots.roll_back("health_check_failed") == record
    assert await device.launched_version() == "1.0.0"


async def test_a_download_of_the_same_package_resumes_and_of_another_starts_afresh(device: Device) -> None:
    slots = device.slots()
    update(slots, device.release("1.0.0"))
    second, third = device.release("2.0.0"), device.release("3.0.0")
    half = len(second.data) // 2
    target = slots.download_path(second.sha256, len(second.data))
    target.path.write_bytes(second.data[:half])

    resumed = device.slots().download_path(second.sha256, len(second.data))
    assert (resumed.path, resumed.offset) == (target.path, half)
    assert resumed.path.read_bytes() == second.data[:half]

    other = device.slots().download_path(third.sha256, len(third.data))
    assert (other.path, other.offset) == (target.path, 0)
    assert other.path.read_bytes() == b""
    download = slots.state().download
    assert download is not None
    assert download.sha256 == third.sha256

    update(slots, third)
    assert await device.launched_version() == "3.0.0"


async def test_a_download_never_touches_the_active_slot(device: Device) -> None:
    slots = device.slots()
    first = device.release("1.0.0")
    update(slots, first)
    update(slots, device.release("2.0.0"))  # active b, previous a
    third = device.release("3.0.0")
    target = slots.download_path(third.sha256, len(third.data))
    assert target.slot == "a"
    assert slots.state().previous is None, "the previous package in the slot being overwritten is forgotten"
    assert slot_files(device)["b"] == ["package.tar", "package.tar.sig"]
    assert await device.launched_version() == "2.0.0"


async def test_a_trial_blocks_a_new_download_and_a_stage_needs_the_whole_download(device: Device) -> None:
    slots = device.slots()
    first = device.release("1.0.0")
    target = slots.download_path(first.sha256, len(first.data))
    target.path.write_bytes(first.data[:10])
    with pytest.raises(Conflict):
        slots.stage(first.sha256, first.version, first.signature)
    with pytest.raises(Conflict):
        slots.switch("deployment-1", NOW)
    target.path.write_bytes(first.data)
    slots.stage(first.sha256, first.version, first.signature)
    slots.switch("deployment-1", NOW)
    with pytest.raises(Conflict):
        slots.download_path(first.sha256, len(first.data))


async def test_the_previous_package_is_switched_to_again_without_a_download(device: Device) -> None:
    slots = device.slots()
    first = device.release("1.0.0")
    update(slots, first)
    update(slots, device.release("2.0.0"))
    assert slots.restage(device.release("9.0.0").sha256, "9.0.0") is None
    staged = slots.restage(first.sha256, "1.0.0")
    assert staged is not None
    assert staged.slot == "a"
    switched = slots.switch("deployment-1", NOW)
    assert switched.previous is not None
    assert switched.previous.version == "2.0.0"
    slots.commit()
    assert await device.launched_version() == "1.0.0"


async def test_recover_rolls_back_a_trial_the_agent_did_not_live_through(device: Device) -> None:
    slots = device.slots()
    update(slots, device.release("1.0.0"))
    second = device.release("2.0.0")
    target = slots.download_path(second.sha256, len(second.data))
    target.path.write_bytes(second.data)
    slots.stage(second.sha256, second.version, second.signature)
    trial = slots.switch("deployment-2", NOW).trial

    recovery = device.slots().recover(NOW)

    assert recovery.failed is not None
    assert (recovery.failed.deployment_id, recovery.failed.version) == ("deployment-2", "2.0.0")
    assert recovery.failed.failure == INTERRUPTED
    assert recovery.failed.started_at == trial.started_at
    assert recovery.active == device.record()
    assert await device.launched_version() == "1.0.0"
    assert device.slots().recover(NOW).failed is None, "a failure is reported once"


async def test_recover_removes_leftovers_and_keeps_a_resumable_download(device: Device) -> None:
    slots = device.slots()
    update(slots, device.release("1.0.0"))
    second = device.release("2.0.0")
    target = slots.download_path(second.sha256, len(second.data))
    target.path.write_bytes(second.data[:100])
    stray = [
        device.apps_dir / f".{COMPONENT}.toml.0123456789ab.tmp",
        slots.directory / ".state.json.0123456789ab.tmp",
        slots.slot_dir("b") / ".package.tar.sig.0123456789ab.tmp",
        slots.slot_dir("a") / PARTIAL_NAME,
    ]
    for path in stray:
        path.write_bytes(b"half")

    recovery = device.slots().recover(NOW)

    assert recovery.failed is None
    assert not any(path.exists() for path in stray)
    assert len(recovery.cleaned) == len(stray)
    assert device.slots().download_path(second.sha256, len(second.data)).offset == 100
    assert await device.launched_version() == "1.0.0"


async def test_recover_removes_a_staged_package_never_switched_to(device: Device) -> None:
    slots = device.slots()
    update(slots, device.release("1.0.0"))
    second = device.release("2.0.0")
    target = slots.download_path(second.sha256, len(second.data))
    target.path.write_bytes(second.data)
    slots.stage(second.sha256, second.version, second.signature)

    recovery = device.slots().recover(NOW)

    assert recovery.failed is None
    assert slots.state() == SlotState()
    assert slot_files(device)["b"] == []
    assert await device.launched_version() == "1.0.0"


# ------------------------------------------------------------------------------------------- power cuts

CHILD = r"""
import datetime as dt, json, os, signal, sys
from pathlib import Path
from fleetward.agent.slots import ComponentSlots

args = json.loads(sys.argv[1])
log = open(args["log"], "a")

def hook(step, phase):
    log.write(f"{step}:{phase}\n")
    log.flush()
    if f"{step}:{phase}" == args["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)

slots = ComponentSlots.open(Path(args["state_dir"]), Path(args["apps_dir"]), args["component_id"], hook=hook)
data = Path(args["package"]).read_bytes()
target = slots.download_path(args["sha256"], len(data))
chunk = -(-len(data) // args["chunks"])
descriptor = os.open(target.path, os.O_WRONLY)
for index in range(args["chunks"]):
    hook(f"download.chunk{index}", "before")
    os.pwrite(descriptor, data[index * chunk : (index + 1) * chunk], index * chunk)
    os.fsync(descriptor)
    hook(f"download.chunk{index}", "after")
os.close(descriptor)
slots.stage(args["sha256"], args["version"], bytes.fromhex(args["signature"]))
slots.switch("deployment-3", dt.datetime.fromisoformat(args["now"]))
hook("trial", "before")
hook("trial", "after")
if args["outcome"] == "commit":
    slots.commit()
else:
    slots.roll_back("health_check_failed")
"""


def _steps(*names: str) -> tuple[str, ...]:
    return tuple(f"{name}:{phase}" for name in names for phase in ("before", "after"))


def _write(name: str) -> tuple[str, ...]:
    return (f"{name}.temp", name)


#: Every durable step of an update whose previous package sits in the slot it downloads into, in order.
BEFORE_TRIAL = _steps(
    *_write("download.state"),
    "download.clear",
    "download.create",
    *(f"download.chunk{index}" for index in range(CHUNKS)),
    "stage.sync",
    *_write("stage.signature"),
    "stage.rename",
    *_write("stage.state"),
    *_write("switch.state"),
    *_write("switch.record"),
    "trial",
)
STEPS = {
    "commit": BEFORE_TRIAL + _steps(*_write("commit.state")),
    "roll_back": BEFORE_TRIAL
    + _steps(
        *_write("rollback.state"), *_write("rollback.record"), *_write("rollback.clear"), "rollback.discard"
    ),
}


def run_child(device: Device, release: Release, outcome: str, kill_at: str | None) -> list[str]:
    """Run the update in a child process, killed at ``kill_at``; the steps it reached."""
    package = device.world.base / "incoming.tar"
    package.write_bytes(release.data)
    log = device.world.base / "steps.log"
    log.unlink(missing_ok=True)
    args = {
        "state_dir": str(device.state_dir),
        "apps_dir": str(device.apps_dir),
        "component_id": COMPONENT,
        "package": str(package),
        "sha256": release.sha256,
        "version": release.version,
        "signature": release.signature.hex(),
        "now": NOW.isoformat(),
        "chunks": CHUNKS,
        "outcome": outcome,
        "kill_at": kill_at,
        "log": str(log),
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, timeout=60, check=False
    )
    expected = -9 if kill_at is not None else 0
    assert result.returncode == expected, result.stderr.decode()
    return log.read_text().splitlines()


def at_or_after(outcome: str, kill_at: str, step: str) -> bool:
    steps = STEPS[outcome]
    return steps.index(kill_at) >= steps.index(step)


@pytest.fixture
def updated_twice(device: Device) -> Device:
    """1.0.0 in slot a (the previous package), 2.0.0 in slot b (active, committed)."""
    slots = device.slots()
    update(slots, device.release("1.0.0"), deployment="deployment-1")
    update(slots, device.release("2.0.0"), deployment="deployment-2")
    return device


@pytest.mark.parametrize("outcome", sorted(STEPS))
def test_an_uninterrupted_update_passes_every_step_in_order(updated_twice: Device, outcome: str) -> None:
    assert tuple(run_child(updated_twice, updated_twice.release("3.0.0"), outcome, None)) == STEPS[outcome]


@pytest.mark.parametrize(
    ("outcome", "kill_at"), [(outcome, step) for outcome, steps in sorted(STEPS.items()) for step in steps]
)
async def test_a_power_cut_at_any_step_leaves_a_package_measured_launch_accepts(
    updated_twice: Device, outcome: str, kill_at: str
) -> None:
    """After the kill and recovery, the install record names 2.0.0, or 3.0.0 once the commit is durable;
    measured launch accepts it; a trial cut short is reported once; and the update can be done again."""
    device = updated_twice
    third = device.release("3.0.0")
    reached = run_child(device, third, outcome, kill_at)
    assert reached[-1] == kill_at

    recovery = device.slots().recover(NOW)

    committed = outcome == "commit" and at_or_after(outcome, kill_at, "commit.state:after")
    assert await device.launched_version() == ("3.0.0" if committed else "2.0.0")
    assert recovery.active == device.record()

    switched = at_or_after(outcome, kill_at, "switch.record:after")
    if outcome == "commit":
        reported = switched and not committed
        reason = INTERRUPTED
    else:
        reported = switched and not at_or_after(outcome, kill_at, "rollback.clear:after")
        reason = (
            "health_check_failed" if at_or_after(outcome, kill_at, "rollback.state:after") else INTERRUPTED
        )
    if reported:
        assert recovery.failed is not None
        assert (recovery.failed.version, recovery.failed.failure) == ("3.0.0", reason)
    else:
        assert recovery.failed is None
    again = device.slots().recover(NOW)
    assert (again.failed, again.cleaned) == (None, ()), "recovery leaves nothing to recover"

    slots = device.slots()
    state = slots.state()
    assert state.trial is None
    assert state.staged is None
    files = slot_files(device)
    active_slot = slots.slot_of(device.record())
    assert active_slot is not None
    assert files[active_slot] == ["package.tar", "package.tar.sig"]
    inactive = files["a" if active_slot == "b" else "b"]
    assert inactive in ([], ["package.tar", "package.tar.sig"], [PARTIAL_NAME])
    if committed:
        assert state.previous is not None
        assert state.previous.version == "2.0.0"
        return

    # what was downloaded before the cut is kept, and the update then succeeds
    target = slots.download_path(third.sha256, len(third.data))
    chunk = -(-len(third.data) // CHUNKS)
    if kill_at.startswith("download.chunk"):
        index = int(kill_at.removeprefix("download.chunk").partition(":")[0])
        written = index + (1 if kill_at.endswith(":after") else 0)
        assert target.offset == min(written * chunk, len(third.data))
    update(slots, third, deployment="deployment-3")
    assert await device.launched_version() == "3.0.0"
    previous = slots.state().previous
    assert previous is not None
    assert previous.version == "2.0.0"
