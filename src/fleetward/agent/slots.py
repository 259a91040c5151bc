"""A/B slots for one component: an update lands in the slot that is not running, and a power cut at any
moment leaves the device on a complete package that measured launch accepts.

Layout, under the agent's state directory::

    slots/<component id>/a/package.tar        a package and its detached signature
    slots/<component id>/a/package.tar.sig
    slots/<component id>/b/package.tar.partial    a download in progress (resumable)
    slots/<component id>/state.json           the trial, the previous record, the download, the staged package
    apps/<component id>.toml                  the install record: what measured boot launches

**The install record is the one pointer to the active slot.** ``state.json`` never repeats it (two
pointers can disagree after a power cut); it holds what is in flight::

    {"format": 1,
     "trial": {"slot": "b", "version": "2.0.0", "sha256": "…", "deployment_id": "…",
               "started_at": "2026-01-01T00:00:00+00:00", "failure": null} | null,
     "previous": {"version": "1.0.0", "sha256": "…", "package": "slots/…/a/package.tar",
                  "signature": "slots/…/a/package.tar.sig"} | null,
     "download": {"slot": "b", "sha256": "…", "length": 1234} | null,
     "staged": {"slot": "b", "sha256": "…", "version": "2.0.0"} | null}

Both files are only ever replaced whole: a temporary file beside them, ``fsync``, ``rename``, ``fsync`` of
the directory (as :mod:`fleetward.agent.credential` does). The steps of an update, each durable before the
next starts:

1. :meth:`ComponentSlots.download_path`: ``state.json`` names the download (and forgets a previous package
   kept in that slot), then the inactive slot is emptied; the caller writes ``package.tar.partial``. A
   download of the same SHA-256 already named is resumed instead.
2. :meth:`~ComponentSlots.stage`: the partial file is synced, the signature written, the partial renamed
   to ``package.tar``, and ``state.json`` names the staged package.
3. :meth:`~ComponentSlots.switch`: ``state.json`` names the trial and the record running now (the
   previous one), then the install record is replaced to name the new slot. **That rename is the commit
   point**: before it the old package starts, after it the new one (on trial).
4. :meth:`~ComponentSlots.commit` ends the trial (the new slot stays; the previous one is kept for a later
   return to it without a download, :meth:`~ComponentSlots.restage`), or :meth:`~ComponentSlots.roll_back`
   records the failure, points the install record at the previous package again and discards the new one.

:meth:`~ComponentSlots.recover` runs at agent start, before measured boot. A trial still open then was cut
short (power cut, kill, crash during the health window): it counts as failed, ``"interrupted"``, and is
rolled back; a rollback that had begun is finished with its recorded reason. Everything else half done (a
trial whose install record was never replaced, a staged package never switched, a partial file no download
names, a temporary file of an interrupted write) is removed, so that the only packages left are the active
one, the previous one, and a resumable download. One agent owns a component's slots (``agent.lock``).

A :class:`StepHook`, called before and after each durable step, lets tests stop the process at each one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from fleetward.agent.config import read_install_record, render_install_record, sync_directory
from fleetward.agent.launch import InstallRecord
from fleetward.agent.package import PackageLimits, remove_tree
from fleetward.errors import ConfigurationError, Conflict
from fleetward.wire.identity import SHA256_HEX_PATTERN
from fleetward.wire.reports import COMPONENT_ID_PATTERN
from fleetward.wire.versions import check_version

SlotName = Literal["a", "b"]
Phase = Literal["before", "after"]

SLOTS: tuple[SlotName, SlotName] = ("a", "b")
PACKAGE_NAME = "package.tar"
SIGNATURE_NAME = "package.tar.sig"
PARTIAL_NAME = "package.tar.partial"
STATE_NAME = "state.json"
STATE_FORMAT = 1
#: The reason a trial the agent did not live through is reported with.
INTERRUPTED = "interrupted"
#: ``state.json`` is a few hundred bytes; a larger one is not ours.
MAX_STATE_BYTES = 64 * 1024

_DEPLOYMENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # wire.updates IdText
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")  # wire.updates CodeText


class StepHook(Protocol):
    """Told of each durable step, before and after it (tests stop the process there)."""

    def __call__(self, step: str, phase: Phase) -> None: ...


def no_hook(step: str, phase: Phase) -> None:
    """The default hook: nothing."""


# ------------------------------------------------------------------------------------------- records


def _check_slot(slot: str) -> None:
    if slot not in SLOTS:
        raise ValueError(f"a slot is 'a' or 'b', not {slot!r}")


def _check_sha256(sha256: str) -> None:
    if not isinstance(sha256, str) or not re.fullmatch(SHA256_HEX_PATTERN, sha256):
        raise ValueError("a SHA-256 is 64 lower-case hexadecimal characters")


@dataclass(frozen=True)
class Trial:
    """A package on trial in ``slot``; ``failure`` is set (a reason code) once its rollback has begun."""

    slot: SlotName
    version: str
    sha256: str
    deployment_id: str
    started_at: dt.datetime
    failure: str | None = None

    def __post_init__(self) -> None:
        _check_slot(self.slot)
        check_version(self.version)
        _check_sha256(self.sha256)
        if not isinstance(self.deployment_id, str) or not _DEPLOYMENT_ID.fullmatch(self.deployment_id):
            raise ValueError("a deployment id is 1 to 64 of a-z 0-9 -, starting with a letter or digit")
        if self.started_at.tzinfo is None:
            raise ValueError("a trial's start time is timezone-aware")
        if self.failure is not None and not _REASON.fullmatch(self.failure):
            raise ValueError("a failure reason is a code: a-z, 0-9 and _, starting with a letter")


@dataclass(frozen=True)
class PendingDownload:
    """A download into ``slot``'s ``package.tar.partial`` of the package with this hash and length."""

    slot: SlotName
    sha256: str
    length: int

    def __post_init__(self) -> None:
        _check_slot(self.slot)
        _check_sha256(self.sha256)
        if not 0 <= self.length <= PackageLimits().max_package_bytes:
            raise ValueError(f"a package is 0 to {PackageLimits().max_package_bytes} bytes")


@dataclass(frozen=True)
class StagedPackage:
    """A complete package in ``slot``, not yet switched to."""

    slot: SlotName
    sha256: str
    version: str

    def __post_init__(self) -> None:
        _check_slot(self.slot)
        _check_sha256(self.sha256)
        check_version(self.version)


@dataclass(frozen=True)
class SlotState:
    """What ``state.json`` holds."""

    trial: Trial | None = None
    previous: InstallRecord | None = None
    download: PendingDownload | None = None
    staged: StagedPackage | None = None


@dataclass(frozen=True)
class DownloadTarget:
    """Where to write the package: append at ``offset`` (the bytes a resumed download already holds)."""

    path: Path
    offset: int
    slot: SlotName


@dataclass(frozen=True)
class SwitchedTo:
    """The install record now names ``record`` (on trial); ``previous`` is what ran before."""

    record: InstallRecord
    previous: InstallRecord | None
    trial: Trial


@dataclass(frozen=True)
class Recovery:
    """What :meth:`ComponentSlots.recover` found and did.

    ``failed`` is a trial the agent did not see through (``failure`` says why: ``"interrupted"``, or the
    reason of a rollback that a power cut cut short), now rolled back: the agent reports it. ``cleaned``
    says, for the log, what half-done work was removed. ``active`` is what measured boot should launch.
    """

    active: InstallRecord | None
    failed: Trial | None
    cleaned: tuple[str, ...]
    recovered_at: dt.datetime


# ------------------------------------------------------------------------------------------- the slots


class ComponentSlots:
    """One component's two slots, its ``state.json`` and its install record."""

    def __init__(
        self, state_dir: Path, apps_dir: Path, component_id: str, *, hook: StepHook = no_hook
    ) -> None:
        if not isinstance(component_id, str) or not re.fullmatch(COMPONENT_ID_PATTERN, component_id):
            raise ValueError("a component id is a lower-case GUID")
        self.component_id = component_id
        self.state_dir = state_dir.absolute()
        self.apps_dir = apps_dir.absolute()
        self.directory = self.state_dir / "slots" / component_id
        self.record_file = self.apps_dir / f"{component_id}.toml"
        self.state_file = self.directory / STATE_NAME
        self._hook = hook

    @classmethod
    def open(
        cls, state_dir: Path, apps_dir: Path, component_id: str, *, hook: StepHook = no_hook
    ) -> ComponentSlots:
        """The component's slots, their directories created (and made durable) if they are new."""
        slots = cls(state_dir, apps_dir, component_id, hook=hook)
        _make_directory(slots.apps_dir)
        for slot in SLOTS:
            _make_directory(slots.slot_dir(slot))
        return slots

    def slot_dir(self, slot: SlotName) -> Path:
        return self.directory / slot

    def slot_record(self, slot: SlotName, version: str, sha256: str) -> InstallRecord:
        return InstallRecord(
            component_id=self.component_id,
            version=version,
            package_sha256=sha256,
            package_path=self.slot_dir(slot) / PACKAGE_NAME,
            signature_path=self.slot_dir(slot) / SIGNATURE_NAME,
        )

    # --- reading

    def active(self) -> InstallRecord | None:
        """The install record measured boot launches, or None if the component has none."""
        if not self.record_file.exists():
            return None
        return read_install_record(self.record_file)

    def state(self) -> SlotState:
        """``state.json`` as it is on disk (empty if there is none yet)."""
        try:
            with self.state_file.open("rb") as handle:
                data = handle.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return SlotState()
        if len(data) > MAX_STATE_BYTES:
            raise ConfigurationError(f"{self.state_file} is larger than {MAX_STATE_BYTES} bytes")
        try:
            return self._decode(json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ConfigurationError(
                f"{self.state_file} is not a slot state: {error}", code="slot_state_unreadable"
            ) from None

    def slot_of(self, record: InstallRecord | None) -> SlotName | None:
        """The slot whose package ``record`` names, or None (no record, or a package outside the slots)."""
        if record is None:
            return None
        for slot in SLOTS:
            if record.package_path == self.slot_dir(slot) / PACKAGE_NAME:
                return slot
        return None

    # --- an update, step by step

    def download_path(self, sha256: str, length: int) -> DownloadTarget:
        """Where to download the package with ``sha256`` and ``length``: the inactive slot's partial file.

        The download named in ``state.json`` is resumed if it is of the same package (``offset`` is what
        the partial file already holds); otherwise the inactive slot is emptied first, after
        ``state.json`` stops naming any package kept there. The active slot is never touched.
        """
        wanted = PendingDownload(slot="a", sha256=sha256, length=length)  # validates; slot chosen below
        state = self.state()
        if state.trial is not None:
            raise Conflict("a trial is in progress: commit it or roll it back before the next download")
        active_slot = self.slot_of(self.active())
        pending = state.download
        if pending is not None and (pending.sha256, pending.length) == (sha256, length):
            partial = self.slot_dir(pending.slot) / PARTIAL_NAME
            size = _size(partial)
            if pending.slot != active_slot and size is not None and size <= length:
                return DownloadTarget(path=partial, offset=size, slot=pending.slot)
        slot = self._inactive_slot(active_slot, state)
        download = dataclasses.replace(wanted, slot=slot)
        previous = state.previous if self.slot_of(state.previous) != slot else None
        self._write_state(SlotState(previous=previous, download=download), "download.state")
        with self._step("download.clear"):
            for stale in {slot} | ({state.staged.slot} if state.staged is not None else set()):
                if stale != active_slot:
                    _empty(self.slot_dir(stale))
        partial = self.slot_dir(slot) / PARTIAL_NAME
        with self._step("download.create"):
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            sync_directory(partial.parent)
        return DownloadTarget(path=partial, offset=0, slot=slot)

    def stage(self, sha256: str, version: str, signature: bytes) -> StagedPackage:
        """Make the complete partial file (its hashes checked by the caller) the slot's package.

        The partial file is synced, the signature written beside it, the partial renamed to
        ``package.tar``, and ``state.json`` names the staged package.
        """
        check_version(version)
        if not isinstance(signature, bytes) or not 0 < len(signature) <= PackageLimits().max_signature_bytes:
            raise ValueError(f"a signature is 1 to {PackageLimits().max_signature_bytes} bytes")
        state = self.state()
        pending = state.download
        if pending is None or pending.sha256 != sha256:
            raise Conflict("no download of this package is in progress")
        directory = self.slot_dir(pending.slot)
        partial = directory / PARTIAL_NAME
        if _size(partial) != pending.length:
            raise Conflict(f"the download holds {_size(partial)} bytes, not the {pending.length} expected")
        with self._step("stage.sync"):
            descriptor = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _replace_file(directory / SIGNATURE_NAME, signature, "stage.signature", self._hook)
        with self._step("stage.rename"):
            os.replace(partial, directory / PACKAGE_NAME)
            sync_directory(directory)
        staged = StagedPackage(slot=pending.slot, sha256=sha256, version=version)
        self._write_state(dataclasses.replace(state, download=None, staged=staged), "stage.state")
        return staged

    def restage(self, sha256: str, version: str) -> StagedPackage | None:
        """Stage the previous package again, without a download, if it is the one with ``sha256``.

        Returns None (the caller downloads) when no previous package is kept or it is another one.
        """
        check_version(version)
        state = self.state()
        if state.trial is not None:
            raise Conflict("a trial is in progress: commit it or roll it back first")
        previous = state.previous
        slot = self.slot_of(previous)
        if previous is None or slot is None or previous.package_sha256 != sha256:
            return None
        staged = StagedPackage(slot=slot, sha256=sha256, version=version)
        self._write_state(SlotState(staged=staged), "restage.state")
        return staged

    def switch(self, deployment_id: str, now: dt.datetime) -> SwitchedTo:
        """Put the staged package on trial: ``state.json`` names the trial and the running record, then the
        install record is replaced to name the staged slot (the commit point)."""
        state = self.state()
        staged = state.staged
        if staged is None:
            raise Conflict("no package is staged")
        if state.trial is not None:
            raise Conflict("a trial is already in progress")
        trial = Trial(
            slot=staged.slot,
            version=staged.version,
            sha256=staged.sha256,
            deployment_id=deployment_id,
            started_at=now,
        )
        previous = self.active()
        if self.slot_of(previous) == staged.slot:
            raise Conflict("the staged package is in the active slot")
        record = self.slot_record(staged.slot, staged.version, staged.sha256)
        self._write_state(SlotState(trial=trial, previous=previous), "switch.state")
        self._write_record(record, "switch.record")
        return SwitchedTo(record=record, previous=previous, trial=trial)

    def commit(self) -> None:
        """End the trial: the new slot stays; the previous package is kept."""
        state = self.state()
        trial = state.trial
        if trial is None or trial.failure is not None:
            raise Conflict("no trial is in progress")
        if self.slot_of(self.active()) != trial.slot:
            raise Conflict("the install record does not name the slot on trial")
        self._write_state(dataclasses.replace(state, trial=None), "commit.state")

    def roll_back(self, reason: str) -> InstallRecord | None:
        """End the trial as failed (``reason``, a code such as ``crash_loop``): the install record names the
        previous package again (or is removed if there was none), and the failed package is discarded."""
        state = self.state()
        if state.trial is None:
            raise Conflict("no trial is in progress")
        return self._roll_back(state, state.trial.failure or reason)

    def mark_failed(self, reason: str) -> InstallRecord | None:
        """Begin a rollback without finishing it: ``state.json`` records the trial's failure (``reason``);
        the install record still names the trial's slot until :meth:`recover` (or :meth:`roll_back`)
        finishes the rollback and hands the failure to whoever reports it. Returns the record to run
        meanwhile: the previous one (None: what ran before the slots). The agent's launcher uses it, so
        that the agent it starts, not the launcher, reports the rollback."""
        if not _REASON.fullmatch(reason):
            raise ValueError("a failure reason is a code: a-z, 0-9 and _, starting with a letter")
        state = self.state()
        trial = state.trial
        if trial is None:
            raise Conflict("no trial is in progress")
        if trial.failure is None:
            state = dataclasses.replace(state, trial=dataclasses.replace(trial, failure=reason))
            self._write_state(state, "rollback.state")
        return state.previous

    def recover(self, now: dt.datetime) -> Recovery:
        """At agent start, before measured boot: finish or undo whatever a stop left half done."""
        cleaned: list[str] = []
        for directory in (self.apps_dir, self.directory, *(self.slot_dir(slot) for slot in SLOTS)):
            pattern = f".{self.record_file.name}.*.tmp" if directory == self.apps_dir else ".*.tmp"
            for temporary in directory.glob(pattern):
                temporary.unlink(missing_ok=True)
                cleaned.append(f"removed the temporary file {temporary.name} of an interrupted write")
        state = self.state()
        failed: Trial | None = None
        trial = state.trial
        if trial is not None:
            active = self.active()
            if trial.failure is not None:
                failed = trial
            elif (
                self.slot_of(active) == trial.slot
                and active is not None
                and active.package_sha256 == trial.sha256
            ):
                failed = dataclasses.replace(trial, failure=INTERRUPTED)
            if failed is not None:
                self._roll_back(state, failed.failure or INTERRUPTED)
                cleaned.append(f"rolled back the trial of {trial.version} ({failed.failure})")
                state = SlotState()  # what the rollback left in state.json
            else:
                state = dataclasses.replace(state, trial=None)
                cleaned.append(
                    f"abandoned the switch to {trial.version}: the install record was never replaced"
                )
        active = self.active()
        active_slot = self.slot_of(active)
        previous = state.previous
        if previous is not None and (
            (active is not None and previous.package_path == active.package_path)
            or (active_slot is not None and self.slot_of(previous) == active_slot)
            or not previous.package_path.exists()
        ):
            previous = None
        download = state.download
        if download is not None:
            size = _size(self.slot_dir(download.slot) / PARTIAL_NAME)
            if (
                download.slot in (active_slot, self.slot_of(previous))
                or size is None
                or size > download.length
            ):
                download = None
                cleaned.append("forgot a download whose partial file is unusable")
        if state.staged is not None:
            cleaned.append(f"removed the staged package {state.staged.version}: it was never switched to")
        recovered = SlotState(previous=previous, download=download)
        if recovered != state:
            self._write_state(recovered, "recover.state")
        keep = {
            *self._package_files(active_slot),
            *self._package_files(self.slot_of(previous)),
            *([self.slot_dir(download.slot) / PARTIAL_NAME] if download is not None else []),
        }
        for slot in SLOTS:
            directory = self.slot_dir(slot)
            removed = False
            for entry in sorted(directory.iterdir()):
                if entry not in keep:
                    remove_tree(entry)
                    removed = True
                    cleaned.append(f"removed {slot}/{entry.name}, which nothing names")
            if removed:
                sync_directory(directory)
        return Recovery(active=active, failed=failed, cleaned=tuple(cleaned), recovered_at=now)

    # --- the durable steps

    def _roll_back(self, state: SlotState, reason: str) -> InstallRecord | None:
        trial = state.trial
        assert trial is not None
        if trial.failure is None:
            state = dataclasses.replace(state, trial=dataclasses.replace(trial, failure=reason))
            self._write_state(state, "rollback.state")
        previous = state.previous
        if previous is not None:
            self._write_record(previous, "rollback.record")
        elif self.record_file.exists():
            with self._step("rollback.record"):
                self.record_file.unlink()
                sync_directory(self.apps_dir)
        self._write_state(SlotState(), "rollback.clear")
        if self.slot_of(previous) != trial.slot:
            with self._step("rollback.discard"):
                _empty(self.slot_dir(trial.slot))
        return previous

    def _inactive_slot(self, active_slot: SlotName | None, state: SlotState) -> SlotName:
        if active_slot is not None:
            return "b" if active_slot == "a" else "a"
        kept = self.slot_of(state.previous)  # the active package is outside the slots: spare the previous
        return "b" if kept == "a" else "a"

    def _package_files(self, slot: SlotName | None) -> tuple[Path, ...]:
        if slot is None:
            return ()
        return (self.slot_dir(slot) / PACKAGE_NAME, self.slot_dir(slot) / SIGNATURE_NAME)

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[None]:
        self._hook(step, "before")
        yield
        self._hook(step, "after")

    def _write_record(self, record: InstallRecord, step: str) -> None:
        text = render_install_record(record, self.apps_dir.parent)
        _replace_file(self.record_file, text.encode("utf-8"), step, self._hook)

    def _write_state(self, state: SlotState, step: str) -> None:
        data = json.dumps(self._encode(state), indent=1, sort_keys=True).encode("utf-8") + b"\n"
        _replace_file(self.state_file, data, step, self._hook)

    # --- state.json

    def _encode(self, state: SlotState) -> dict[str, object]:
        def shown(path: Path | None) -> str | None:
            if path is None:
                return None
            return str(path.relative_to(self.state_dir)) if path.is_relative_to(self.state_dir) else str(path)

        trial = state.trial
        previous = state.previous
        return {
            "format": STATE_FORMAT,
            "trial": None
            if trial is None
            else {
                "slot": trial.slot,
                "version": trial.version,
                "sha256": trial.sha256,
                "deployment_id": trial.deployment_id,
                "started_at": trial.started_at.isoformat(),
                "failure": trial.failure,
            },
            "previous": None
            if previous is None
            else {
                "version": previous.version,
                "sha256": previous.package_sha256,
                "package": shown(previous.package_path),
                "signature": shown(previous.signature_path),
            },
            "download": None if state.download is None else dataclasses.asdict(state.download),
            "staged": None if state.staged is None else dataclasses.asdict(state.staged),
        }

    def _decode(self, raw: object) -> SlotState:
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise ValueError(f"not format {STATE_FORMAT}")

        def path(text: object) -> Path:
            if not isinstance(text, str) or not text:
                raise ValueError("a path is a non-empty string")
            return self.state_dir / text  # an absolute path stays as it is

        trial = raw.get("trial")
        previous = raw.get("previous")
        download = raw.get("download")
        staged = raw.get("staged")
        return SlotState(
            trial=None
            if trial is None
            else Trial(
                slot=trial["slot"],
                version=trial["version"],
                sha256=trial["sha256"],
                deployment_id=trial["deployment_id"],
                started_at=dt.datetime.fromisoformat(trial["started_at"]),
                failure=trial.get("failure"),
            ),
            previous=None
            if previous is None
            else InstallRecord(
                component_id=self.component_id,
                version=previous["version"],
                package_sha256=previous["sha256"],
                package_path=path(previous["package"]),
                signature_path=path(previous["signature"]) if previous.get("signature") else None,
            ),
            download=None if download is None else PendingDownload(**download),
            staged=None if staged is None else StagedPackage(**staged),
        )


# ------------------------------------------------------------------------------------------- files


def _replace_file(path: Path, data: bytes, step: str, hook: StepHook) -> None:
    """Replace ``path`` whole: a temporary file beside it (synced), a rename, a sync of the directory.

    Two durable steps for the hook: ``<step>.temp`` (the temporary file) and ``<step>`` (the rename).
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    hook(f"{step}.temp", "before")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        hook(f"{step}.temp", "after")
        hook(step, "before")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)
    hook(step, "after")


def _make_directory(directory: Path) -> None:
    """Create ``directory`` (0700) and its missing parents, each entry made durable."""
    if directory.is_dir():
        return
    _make_directory(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    sync_directory(directory.parent)


def _empty(directory: Path) -> None:
    """Remove everything in ``directory`` and make the removal durable."""
    for entry in directory.iterdir():
        remove_tree(entry)
    sync_directory(directory)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
