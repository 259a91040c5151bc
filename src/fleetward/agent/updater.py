"""The device's updater: check, download into the inactive slot, switch, keep only what comes up healthy.

One check (:meth:`Updater.check_once`) asks the update client for a plan (TUF metadata refreshed, the
director's assignment verified, both repositories in agreement, floors respected), then installs each
planned image in turn:

1. outside the assignment's maintenance window, or while an application defers updates
   (``SoftwareUpdateDeferral``), the image waits: ``deferred`` is reported;
2. the image (or a delta from the active slot) is downloaded, resumably, into the inactive slot and
   verified (:mod:`fleetward.agent.update_client`); a refusal leaves the device on what it runs: ``failed``;
3. the slots switch (the install record now names the new slot) and the application is relaunched through
   measured launch: ``trial``;
4. if it stays up for ``trial_seconds`` the new slot is kept (``installed``); if measured launch refuses
   it, or it crashes or stops in that time, the previous slot is launched again (``rolled_back``).

A power cut or a kill at any step is recovered at the next start (:mod:`fleetward.agent.slots`: a trial
that did not finish is rolled back). A download the network cut stays ``downloading`` and is resumed
``retry_seconds`` later; an image that was rolled back is not tried again for the same deployment; going
back to the package kept in the other slot needs no download. An image of the agent itself
(:mod:`fleetward.agent.self_update`) goes into the agent's own slots the same way; after the switch
(``trial``) the agent restarts on it, and the new agent commits it (``installed``,
:meth:`Updater.commit_agent`) once it is healthy; the launcher rolls back one that does not get there,
and the agent then started reports it (``rolled_back``, from :meth:`Updater.recover`).
Every result goes to the director in a :class:`~fleetward.wire.updates.VersionReport`, with the reason a
check refused what it was given; results are kept on disk until the director has them, so none is lost
to a network cut or a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import TypeAdapter, ValidationError

from fleetward.agent.app_services import SystemEvent, SystemEventKind
from fleetward.agent.config import load_install_records, write_private_file
from fleetward.agent.launch import InstallRecord
from fleetward.agent.self_update import AGENT_COMPONENT_ID, AGENT_DID_NOT_START, agent_record_dir
from fleetward.agent.slots import INTERRUPTED, ComponentSlots, Recovery, Trial
from fleetward.agent.update_client import Downloaded, Plan, PlannedImage
from fleetward.clock import Clock, SystemClock
from fleetward.errors import FleetwardError, LaunchRefused, TransportError, UpdateRefused
from fleetward.wire.reports import MAX_REASON_CHARS
from fleetward.wire.updates import (
    CheckRefusal,
    ImageKind,
    InstalledComponent,
    UpdateResult,
    UpdateState,
    VersionReport,
)

logger = logging.getLogger(__name__)

#: The direct method that makes the agent check for updates at once ("check now").
CHECK_METHOD = "fleetward.checkForUpdates"
#: Results kept for the director at most (the oldest go first; each is small).
MAX_PENDING_RESULTS = 64

_RESULTS = TypeAdapter(list[UpdateResult])
_GIVEN_UP = TypeAdapter(list[tuple[str, str]])
_T = TypeVar("_T")


class Client(Protocol):
    """What the updater needs of :class:`~fleetward.agent.update_client.UpdateClient` (blocking calls)."""

    def check(self, installed: Mapping[str, tuple[str, str]]) -> Plan: ...

    def download(self, image: PlannedImage, partial: Path, have: Path | None) -> Downloaded: ...

    def report(self, report: VersionReport) -> None: ...


class AppControl(Protocol):
    """The agent's side: (re)launch an application from a record and watch it through its trial."""

    async def replace(self, record: InstallRecord | None, component_id: str) -> None:
        """Stop ``component_id`` if it runs, then launch ``record`` (measured) and start it; ``None``: stop
        it only. Raises ``LaunchRefused`` if measured launch refuses the record."""

    async def trial(self, component_id: str, seconds: float) -> str | None:
        """Watch the application for ``seconds``: ``None`` if it stayed up, else why not."""

    def deferred_until(self, component_id: str) -> dt.datetime | None: ...

    def deferral_done(self, component_id: str) -> None: ...

    def restart_agent(self) -> None:
        """Stop the agent cleanly so that it is started again (on the agent image now on trial)."""

    def announce(self, event: SystemEvent) -> None:
        """Tell the applications that subscribed to system events (``SystemEventNotifications``)."""


@dataclass(frozen=True)
class UpdaterSettings:
    state_dir: Path
    apps_dir: Path
    poll_seconds: float = 3600.0
    trial_seconds: float = 30.0
    #: after a download the network cut, the next try comes this soon (it resumes)
    retry_seconds: float = 60.0
    #: the running agent's own measurement SHA-256: it is the agent on trial if its image's is the same
    agent_sha256: str | None = None
    #: an application's update is announced (``update_pending``) this long before it starts, so that the
    #: application may defer it; 0: no notice
    notice_seconds: float = 0.0

    @property
    def results_file(self) -> Path:
        return self.state_dir / "updates" / "results.json"

    @property
    def given_up_file(self) -> Path:
        return self.state_dir / "updates" / "given-up.json"

    @property
    def slots_dir(self) -> Path:
        return self.state_dir / "slots"


class Updater:
    """Runs checks on a schedule and on demand; one check at a time."""

    def __init__(
        self,
        settings: UpdaterSettings,
        client: Client,
        apps: AppControl,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        on_installed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        #: told after an application's update is kept: what the device runs changed, it attests again
        self._on_installed = on_installed
        self._client = client
        self._apps = apps
        self._clock = clock or SystemClock()
        self._sleep = sleep or asyncio.sleep
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._assignment_version = 0
        #: when a deferred update may go on (the end of a deferral, the start of a window)
        self._retry_at: dt.datetime | None = None
        self._pending: list[UpdateResult] = self._load_results()
        self._given_up: list[tuple[str, str]] = self._load_given_up()
        #: why the last check refused what it was given, for the director (None after a good check)
        self._refusal: CheckRefusal | None = None
        self.last_error: str | None = None
        self.checks = 0
        #: the agent was asked to restart on its new image
        self.restarting = False
        #: (deployment, image) pairs announced to the applications (``update_pending``), once each
        self._announced: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ the schedule

    def check_now(self) -> None:
        """Look at once (the ``fleetward.checkForUpdates`` method, a reconnect)."""
        self._wake.set()

    async def run(self) -> None:
        """Check at start, then every ``poll_seconds`` or when woken; never raises on a failed check."""
        while True:
            self._wake.clear()
            try:
                await self.check_once()
            except (FleetwardError, OSError) as error:
                self.last_error = str(error)
                logger.warning("update check failed: %s", error)
            wait = self.settings.poll_seconds
            if self._retry_at is not None:  # a deferred update: look again when its wait is over
                wait = min(wait, max(1.0, (self._retry_at - self._clock.now()).total_seconds()))
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ one check

    def recover(self) -> tuple[Recovery, ...]:
        """At start, before measured boot: finish what a power cut interrupted in every component's slots
        (a trial the agent did not live through is rolled back) and keep a result for each such trial."""
        recoveries = []
        for slots_dir in (
            sorted(self.settings.slots_dir.glob("*")) if self.settings.slots_dir.is_dir() else []
        ):
            slots = self._slots(slots_dir.name)
            if self._on_trial(slots) is not None:
                logger.warning("this agent is on trial: it commits itself once it is healthy")
                continue  # this agent is the one on trial: it commits once healthy (commit_agent)
            recovery = slots.recover(self._clock.now())
            recoveries.append(recovery)
            trial = recovery.failed
            if trial is None:
                continue
            logger.error(
                "the update of %s to %s did not finish its trial (%s): rolled back",
                slots_dir.name,
                trial.version,
                trial.failure or INTERRUPTED,
            )
            self._give_up(trial.deployment_id, trial.sha256)  # an image that cost a start is not retried
            self._remember(
                UpdateResult(
                    deployment_id=trial.deployment_id,
                    component_id=slots_dir.name,
                    version=trial.version,
                    sha256=trial.sha256,
                    state=UpdateState.ROLLED_BACK,
                    code=trial.failure or INTERRUPTED,
                    message=_recovered_message(slots_dir.name, trial.failure),
                    at=self._clock.now(),
                )
            )
        return tuple(recoveries)

    def _slots(self, component: str) -> ComponentSlots:
        """The component's slots; the agent's own keep their install record out of the applications'."""
        records = (
            agent_record_dir(self.settings.state_dir)
            if component == AGENT_COMPONENT_ID
            else self.settings.apps_dir
        )
        return ComponentSlots.open(self.settings.state_dir, records, component)

    def _on_trial(self, slots: ComponentSlots) -> Trial | None:
        """The trial of the agent's image if this agent is the one on trial (its measurement is the image)."""
        if slots.component_id != AGENT_COMPONENT_ID or self.settings.agent_sha256 is None:
            return None
        trial = slots.state().trial
        active = slots.active()
        if (
            trial is None
            or trial.failure is not None
            or trial.sha256 != self.settings.agent_sha256
            or active is None
            or active.package_sha256 != trial.sha256
        ):
            return None
        return trial

    def agent_trial(self) -> Trial | None:
        """The trial of the agent image this agent runs, still to be committed, or None."""
        if not (self.settings.slots_dir / AGENT_COMPONENT_ID).is_dir():
            return None
        return self._on_trial(self._slots(AGENT_COMPONENT_ID))

    async def commit_agent(self) -> None:
        """The agent on trial is healthy: keep its slot and tell the director ``installed``."""
        async with self._lock:
            slots = await asyncio.to_thread(self._slots, AGENT_COMPONENT_ID)
            trial = self._on_trial(slots)
            if trial is None:
                return
            await asyncio.to_thread(slots.commit)
            self._remember(
                UpdateResult(
                    deployment_id=trial.deployment_id,
                    component_id=AGENT_COMPONENT_ID,
                    version=trial.version,
                    sha256=trial.sha256,
                    state=UpdateState.INSTALLED,
                    at=self._clock.now(),
                )
            )
            logger.info("the agent runs %s and is healthy: kept", trial.version)
            await self._flush()

    async def check_once(self) -> Plan | None:
        async with self._lock:
            self.checks += 1
            installed = await asyncio.to_thread(self._installed)
            await self._flush(installed)
            try:
                plan = await asyncio.to_thread(self._client.check, installed)
            except UpdateRefused as refused:
                # the director hears it too: a device that cannot take its assignment is a failed one
                logger.error("update refused: %s (%s)", refused.message, refused.code)
                self.last_error = f"{refused.code}: {refused.message}"
                self._refusal = CheckRefusal(
                    code=refused.code, message=refused.message[:MAX_REASON_CHARS], at=self._clock.now()
                )
                await self._flush()
                raise
            self._refusal = None
            self._assignment_version = plan.assignment_version
            self._retry_at = None
            if not plan.images:
                self._apps.announce(SystemEvent(SystemEventKind.NO_UPDATE_AVAILABLE))
            for image in plan.images:
                await self._install(plan, image)
                if self.restarting:
                    break  # the agent stops now; the next one goes on with the rest
            self.last_error = None
            await self._flush()
            return plan

    async def _install(self, plan: Plan, image: PlannedImage) -> None:
        component = image.component_id
        deployment = plan.deployment_id
        assert deployment is not None  # a plan with images names its deployment
        if (deployment, image.sha256) in self._given_up:
            return  # it was tried for this deployment and rolled back: the director knows; wait for another
        now = self._clock.now()
        agent = image.kind is ImageKind.AGENT
        if agent != (component == AGENT_COMPONENT_ID):
            self._result(
                plan,
                image,
                UpdateState.FAILED,
                "agent_component_mismatch",
                f"an image of kind {image.kind.value} must name the agent's component {AGENT_COMPONENT_ID} "
                "if, and only if, it is the agent's",
            )
            return
        if plan.window is not None and not plan.window.contains(now):
            self._defer_until(plan.window.next_start(now))
            self._result(
                plan, image, UpdateState.DEFERRED, "outside_window", "outside the maintenance window"
            )
            return
        if not agent and await self._deferred_by_app(plan, image):
            return
        slots = await asyncio.to_thread(self._slots, component)
        self._result(plan, image, UpdateState.DOWNLOADING)
        try:
            downloaded = await self._fetch(slots, image)
        except TransportError as error:  # resumable: the next check goes on where this one stopped
            self._defer_until(now + dt.timedelta(seconds=self.settings.retry_seconds))
            self._result(plan, image, UpdateState.DOWNLOADING, error.code, error.message)
            logger.warning("the download of %s %s stopped: %s", component, image.version, error.message)
            return
        except (UpdateRefused, OSError) as error:
            code = error.code if isinstance(error, UpdateRefused) else "download_failed"
            self._result(plan, image, UpdateState.FAILED, code, str(error))
            logger.error("update of %s to %s failed: %s", component, image.version, error)
            return
        if not agent:
            self._apps.announce(
                SystemEvent(
                    SystemEventKind.UPDATE_STARTED, {"component_id": component, "version": image.version}
                )
            )
        switched = await asyncio.to_thread(slots.switch, deployment, self._clock.now())
        self._result(plan, image, UpdateState.TRIAL, downloaded=downloaded)
        await self._flush()
        if agent:  # the new agent commits itself once healthy; the launcher rolls back one that is not
            logger.info("the agent restarts on %s", image.version)
            self.restarting = True
            self._apps.restart_agent()
            return
        problem: str | None
        try:
            await self._apps.replace(switched.record, component)
            problem = await self._apps.trial(component, self.settings.trial_seconds)
            code = "app_unhealthy"
        except LaunchRefused as refused:
            problem, code = refused.message, refused.code
        if problem is None:
            await asyncio.to_thread(slots.commit)
            self._apps.deferral_done(component)
            self._result(plan, image, UpdateState.INSTALLED, downloaded=downloaded)
            logger.info("updated %s to %s", component, image.version)
            if self._on_installed is not None:
                self._on_installed()
            return
        logger.error("update of %s to %s rolled back: %s", component, image.version, problem)
        # the result is on disk before the rollback, so a power cut in between cannot lose it
        self._result(plan, image, UpdateState.ROLLED_BACK, code, problem, downloaded=downloaded)
        self._give_up(deployment, image.sha256)
        previous = await asyncio.to_thread(slots.roll_back, code)
        try:
            await self._apps.replace(previous, component)
        except LaunchRefused as refused:  # the previous slot passed before; say so if it no longer does
            logger.error("the previous %s does not launch either: %s", component, refused.message)

    async def _deferred_by_app(self, plan: Plan, image: PlannedImage) -> bool:
        """Whether the application defers its update: announced first (``update_pending``, once per
        deployment and image), then ``notice_seconds`` for it to call ``update.defer``."""
        component = image.component_id
        notice = self.settings.notice_seconds
        key = (plan.deployment_id or "", image.sha256)
        if notice > 0 and key not in self._announced:
            self._announced.add(key)
            self._apps.announce(
                SystemEvent(
                    SystemEventKind.UPDATE_PENDING,
                    {"component_id": component, "version": image.version, "notice_seconds": int(notice)},
                )
            )
            await self._sleep(notice)
        until = self._apps.deferred_until(component)
        if until is None or until <= self._clock.now():
            return False
        self._defer_until(until)
        self._result(
            plan, image, UpdateState.DEFERRED, "deferred_by_app", f"deferred until {until.isoformat()}"
        )
        return True

    async def _fetch(self, slots: ComponentSlots, image: PlannedImage) -> Downloaded:
        """The image staged in the inactive slot: the previous package kept there when it is the one (no
        download), else downloaded (resumably, as a delta when one applies) and verified."""
        restaged = await asyncio.to_thread(slots.restage, image.sha256, image.version)
        if restaged is not None:
            kept = slots.slot_dir(restaged.slot)
            return Downloaded(kept, bytes_downloaded=0, bytes_saved=image.target.length, via_delta=False)
        active = slots.active()
        target = await asyncio.to_thread(slots.download_path, image.sha256, image.target.length)
        have = active.package_path if active is not None else None
        downloaded = await asyncio.to_thread(self._client.download, image, target.path, have)
        await asyncio.to_thread(slots.stage, image.sha256, image.version, image.custom.signature_bytes())
        return downloaded

    @property
    def retry_at(self) -> dt.datetime | None:
        """When the last check's deferred or cut update is looked at again (before the next poll)."""
        return self._retry_at

    def _defer_until(self, moment: dt.datetime) -> None:
        self._retry_at = moment if self._retry_at is None else min(self._retry_at, moment)

    def _give_up(self, deployment_id: str, sha256: str) -> None:
        """An image that failed its trial is not tried again for the same deployment (kept on disk)."""
        self._given_up = [*self._given_up, (deployment_id, sha256)][-MAX_PENDING_RESULTS:]
        data = json.dumps(self._given_up).encode()
        write_private_file(self.settings.given_up_file, data)

    # ------------------------------------------------------------------ what the director hears

    def _installed(self) -> dict[str, tuple[str, str]]:
        records = (
            *load_install_records(self.settings.apps_dir),
            *load_install_records(agent_record_dir(self.settings.state_dir)),
        )
        return {record.component_id: (record.version, record.package_sha256) for record in records}

    def _result(
        self,
        plan: Plan,
        image: PlannedImage,
        state: UpdateState,
        code: str | None = None,
        message: str = "",
        *,
        downloaded: Downloaded | None = None,
    ) -> None:
        self._remember(
            UpdateResult(
                deployment_id=plan.deployment_id,
                component_id=image.component_id,
                version=image.version,
                sha256=image.sha256,
                state=state,
                code=code,
                message=message[:MAX_REASON_CHARS],
                bytes_downloaded=downloaded.bytes_downloaded if downloaded else 0,
                bytes_saved=downloaded.bytes_saved if downloaded else 0,
                at=self._clock.now(),
            )
        )

    def _remember(self, result: UpdateResult) -> None:
        # a newer state of the same update replaces the older one: the director needs only the last
        self._pending = [
            kept
            for kept in self._pending
            if (kept.deployment_id, kept.component_id, kept.sha256)
            != (result.deployment_id, result.component_id, result.sha256)
        ]
        self._pending.append(result)
        del self._pending[:-MAX_PENDING_RESULTS]
        self._save_results()

    async def _flush(self, installed: Mapping[str, tuple[str, str]] | None = None) -> None:
        """Send what the device runs (``installed``: read now if not given) and the results not yet
        delivered; keep them if the send fails."""
        if installed is None:
            installed = await asyncio.to_thread(self._installed)
        sent = list(self._pending)
        report = VersionReport(
            assignment_version=self._assignment_version,
            components=tuple(
                InstalledComponent(component_id=component, version=version, sha256=sha256)
                for component, (version, sha256) in sorted(installed.items())
            ),
            results=tuple(sent),
            refusal=self._refusal,
            sent_at=self._clock.now(),
        )
        try:
            await asyncio.to_thread(self._client.report, report)
        except TransportError as error:
            logger.warning("the update report is kept for later: %s", error.message)
            return
        self._pending = [result for result in self._pending if result not in sent]
        self._save_results()

    def pending_results(self) -> tuple[UpdateResult, ...]:
        return tuple(self._pending)

    def _load_given_up(self) -> list[tuple[str, str]]:
        return _load_kept(self.settings.given_up_file, _GIVEN_UP, "updates given up")

    def _load_results(self) -> list[UpdateResult]:
        return _load_kept(self.settings.results_file, _RESULTS, "kept update results")[-MAX_PENDING_RESULTS:]

    def _save_results(self) -> None:
        data = json.dumps([result.model_dump(mode="json") for result in self._pending]).encode()
        write_private_file(self.settings.results_file, data)


def _load_kept(path: Path, adapter: TypeAdapter[list[_T]], what: str) -> list[_T]:
    """A list the updater keeps on disk; none (with a warning if it is damaged) if it cannot be read."""
    try:
        return adapter.validate_json(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValidationError) as error:
        logger.warning("the %s in %s are unreadable, started afresh: %s", what, path, error)
        return []


def _recovered_message(component: str, failure: str | None) -> str:
    if component == AGENT_COMPONENT_ID and failure == AGENT_DID_NOT_START:
        return "the new agent did not start and commit itself: the launcher went back to the previous one"
    if component == AGENT_COMPONENT_ID and failure not in (None, INTERRUPTED):
        return (
            f"measured launch refused the new agent ({failure}): the launcher went back to the previous one"
        )
    return "the agent stopped during the trial (a power cut, a kill, a crash)"
