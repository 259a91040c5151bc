"""The agent updates itself: its image, its own A/B slots, and the launcher that counts its starts.

An **agent image** is a package in the usual format (:mod:`fleetward.agent.package`) whose manifest names
the agent's component, :data:`AGENT_COMPONENT_ID`, and whose tree holds the ``fleetward`` Python package
(``fleetward/…``, the source files; the entry point is ``fleetward/__main__.py``).
:func:`build_agent_image` makes one of the running fleetward; it is published like any image
(``fleetward image add FILE --kind agent``).

The agent's slots are :class:`~fleetward.agent.slots.ComponentSlots` of that component, with their install
record in ``<state>/agent-image/`` rather than ``apps/`` (measured boot launches everything in ``apps/``
as an application). The updater downloads, stages and switches an agent image there, reports ``trial``,
and asks the agent to restart (``agent run`` exits with :data:`RESTART_EXIT_CODE`).

**The launcher** (``fleetward agent launch``, what systemd runs, ``Restart=always``) decides what to
``exec`` at each start (:func:`choose_target`), under the state lock:

- no agent install record: the installed agent (``agent run`` as it is);
- a record: measured launch verifies its package (hash, a trusted publisher's signature, a safe unpack,
  read-only) and the same Python runs ``agent run`` with the unpacked image first on ``sys.path``, its
  measurement being the image's (component id, version, package SHA-256);
- a record on trial: the start is counted (``slots/<agent>/boot-count.json``); the second start of the same
  trial, or a package measured launch refuses, marks the trial failed
  (:meth:`~fleetward.agent.slots.ComponentSlots.mark_failed`) and runs what ran before. The agent it starts
  finishes the rollback at start (``Updater.recover``) and reports it ``rolled_back``, once.

The new agent, on trial, commits its slot and reports ``installed`` once the authority issued it a
certificate for its new measurement and it is connected to the hub (``Agent``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import fleetward
from fleetward.agent.config import AgentSettings, write_private_file
from fleetward.agent.launch import InstallRecord, Launcher, MemoryMeasurementLog
from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package
from fleetward.agent.slots import ComponentSlots, StepHook, Trial, no_hook
from fleetward.agent.status import StateLock
from fleetward.errors import ConfigurationError, LaunchRefused
from fleetward.wire.reports import AgentReport

logger = logging.getLogger(__name__)

#: The agent's own component id: what its images' manifests name.
AGENT_COMPONENT_ID = "f1eeda7a-a9e7-4000-8000-00000000a9e7"
#: ``agent run`` exits with this to be started again (by the launcher's service manager) on a new image.
RESTART_EXIT_CODE = 75
#: The reason of a rollback when the agent on trial started twice without committing.
AGENT_DID_NOT_START = "agent_did_not_start"
#: The entry point of an agent image.
AGENT_ENTRY_POINT = "fleetward/__main__.py"
#: How many starts an agent on trial has to commit itself.
TRIAL_STARTS = 1
BOOT_COUNT_NAME = "boot-count.json"
_ENV_AGENT = "FLEETWARD_AGENT_AGENT_"
#: the first argument after ``-c`` is the image directory, put first on ``sys.path``
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'fleetward'; "
    "from fleetward.cli.entry import main; main()"
)
_INSTALLED = "import sys; sys.argv[0] = 'fleetward'; from fleetward.cli.entry import main; main()"


def agent_record_dir(state_dir: Path) -> Path:
    """Where the agent's install record is (``<state>/agent-image/<agent component id>.toml``)."""
    return state_dir / "agent-image"


def agent_slots(state_dir: Path, *, hook: StepHook = no_hook) -> ComponentSlots:
    """The agent's own slots (created if new)."""
    return ComponentSlots.open(state_dir, agent_record_dir(state_dir), AGENT_COMPONENT_ID, hook=hook)


def build_agent_image(source: Path | None = None) -> bytes:
    """An agent image of the fleetward package in ``source`` (the running one by default): every file but
    compiled bytecode, under ``fleetward/``. The version is the image's, given when it is published."""
    root = source or Path(fleetward.__file__).parent
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_dir() or "__pycache__" in relative.parts or path.suffix in (".pyc", ".pyo"):
            continue
        files[f"fleetward/{relative.as_posix()}"] = path.read_bytes()
    if AGENT_ENTRY_POINT not in files:
        raise ValueError(f"{root} has no __main__.py: it is not a fleetward package")
    manifest = Manifest(
        name="fleetward-agent", component_id=AGENT_COMPONENT_ID, entry_point=AGENT_ENTRY_POINT
    )
    return build_package(manifest, files)


# ------------------------------------------------------------------------------------------- the launcher


@dataclass(frozen=True)
class LaunchTarget:
    """What the launcher starts: the agent image ``record`` unpacked in ``image_dir``, or (both None) the
    installed agent. ``note`` says why, for the log."""

    record: InstallRecord | None
    image_dir: Path | None
    note: str


class Verify(Protocol):
    """Measured launch of an agent image: its unpacked, read-only directory, or ``LaunchRefused``."""

    def __call__(self, record: InstallRecord) -> Path: ...


class Execute(Protocol):
    """Replace this process (``os.execve``)."""

    def __call__(self, path: str, argv: list[str], env: Mapping[str, str], /) -> NoReturn: ...


def _starts(count_file: Path, trial: Trial) -> int:
    """How many times the launcher started this trial's agent already."""
    try:
        raw = json.loads(count_file.read_bytes()[:4096])
    except (OSError, ValueError):
        return 0
    if not isinstance(raw, dict):
        return 0
    if raw.get("sha256") != trial.sha256 or raw.get("started_at") != trial.started_at.isoformat():
        return 0
    starts = raw.get("starts")
    return starts if isinstance(starts, int) and starts >= 0 else 0


def choose_target(slots: ComponentSlots, verify: Verify) -> LaunchTarget:
    """The launcher's decision (see the module's docstring); it counts a trial's start, or marks a trial
    failed, before it returns."""
    count_file = slots.directory / BOOT_COUNT_NAME
    state = slots.state()
    trial = state.trial
    record = slots.active()
    note = "the agent image"
    if trial is not None and trial.failure is not None:
        record, note = state.previous, f"the agent before the failed trial of {trial.version}"
    elif (
        trial is not None
        and record is not None
        and slots.slot_of(record) == trial.slot
        and record.package_sha256 == trial.sha256
    ):
        starts = _starts(count_file, trial)
        if starts >= TRIAL_STARTS:
            logger.error(
                "the agent %s on trial started %d time(s) without committing: rolled back",
                trial.version,
                starts,
            )
            record = slots.mark_failed(AGENT_DID_NOT_START)
            note = f"the agent before {trial.version}, which did not start"
        else:
            write_private_file(
                count_file,
                json.dumps(
                    {"sha256": trial.sha256, "started_at": trial.started_at.isoformat(), "starts": starts + 1}
                ),
            )
            try:
                return LaunchTarget(record, verify(record), f"the agent {trial.version} on trial")
            except LaunchRefused as refused:
                logger.error("measured launch refused the agent %s: %s", trial.version, refused.message)
                record = slots.mark_failed(refused.code)
                note = f"the agent before {trial.version}, which measured launch refused"
    else:
        count_file.unlink(missing_ok=True)
    if record is None:
        return LaunchTarget(None, None, "the installed agent" if trial is None else note)
    try:
        return LaunchTarget(record, verify(record), note)
    except LaunchRefused as refused:  # it passed before; the installed agent is the last resort
        logger.error("measured launch refused the agent image %s: %s", record.version, refused.message)
        return LaunchTarget(None, None, "the installed agent (the agent image was refused)")


def agent_command(
    target: LaunchTarget,
    state_dir: Path,
    log_level: str,
    environ: Mapping[str, str],
    python: str = sys.executable,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``agent run`` for ``target``."""
    env = dict(environ)
    env["FLEETWARD_AGENT_STATE_DIR"] = str(state_dir)
    arguments = ["agent", "run", "--state-dir", str(state_dir), "--log-level", log_level]
    if target.record is None or target.image_dir is None:
        return [python, "-P", "-c", _INSTALLED, *arguments], env
    for name in [name for name in env if name.startswith(_ENV_AGENT)]:
        del env[name]  # the agent measures itself as its image, whatever agent.toml says
    env |= {
        f"{_ENV_AGENT}NAME": AGENT_COMPONENT_ID,
        f"{_ENV_AGENT}VERSION": target.record.version,
        f"{_ENV_AGENT}SHA256": target.record.package_sha256,
    }
    return [python, "-P", "-c", _BOOTSTRAP, str(target.image_dir), *arguments], env


async def _log_refusal(report: AgentReport) -> None:
    logger.error("launch refused: %s", report.model_dump_json())


def measured_verify(settings: AgentSettings) -> Verify:
    """Measured launch of an agent image with the agent's publisher keys and images directory."""

    def verify(record: InstallRecord) -> Path:
        try:
            launcher = Launcher(settings.launch_config(), report=_log_refusal, log=MemoryMeasurementLog())
        except ConfigurationError as error:
            raise LaunchRefused(error.message, code="launch_unconfigured") from None
        return asyncio.run(launcher.launch(record)).image_dir

    return verify


def launch(
    settings: AgentSettings,
    *,
    log_level: str = "info",
    execute: Execute = os.execve,
    environ: Mapping[str, str] | None = None,
    verify: Callable[[AgentSettings], Verify] = measured_verify,
) -> NoReturn:
    """Choose what to run (under the state lock) and ``exec`` it."""
    with StateLock(settings.lock_file):
        target = choose_target(agent_slots(settings.state_dir), verify(settings))
    logger.info("launching %s", target.note)
    argv, env = agent_command(
        target, settings.state_dir, log_level, os.environ if environ is None else environ
    )
    execute(argv[0], argv, env)
