"""What the application API hands requests to: small interfaces, their real defaults, and in-memory fakes.

The runtime wires each interface (:class:`~fleetward.agent.app_api.AppServices`):

=========================  =====================================  ========================================
interface                  real default                           fake (tests, simulator)
=========================  =====================================  ========================================
:class:`TelemetrySink`     the :class:`~fleetward.agent.outbox.Outbox` itself  :class:`MemoryTelemetry`
:class:`ViolationRecorder` (the runtime: a security event)        :class:`MemoryViolations`
:class:`StorageMeter`      :class:`DirectoryUsage`                any ``async (component_id) -> int``
:class:`UpdateDeferrals`   :class:`DeferralLedger`                :class:`DeferralLedger` with a FakeClock
:class:`CertificateSource` :class:`AppCredentialCopies`           :class:`StaticCertificates`
:class:`PowerControls`     (the runtime: reboot the device)       :class:`RecordingPowerControls`
system events              :class:`SystemEvents` (a broadcaster the runtime publishes into)
=========================  =====================================  ========================================
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import enum
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fleetward.agent.config import write_private_file
from fleetward.agent.credential import MAX_CREDENTIAL_BYTES, decode_credential
from fleetward.agent.sandbox import AppIdentity, measure_storage
from fleetward.clock import Clock, SystemClock
from fleetward.errors import ConfigurationError, Conflict, InvalidInput

logger = logging.getLogger(__name__)

#: Azure Sphere's longest deferral of one update: 167 hours.
DEFAULT_MAX_TOTAL_DEFERRAL_SECONDS = 167 * 3600
#: a deferral ledger holds a few entries per application; a larger file is not one
_MAX_LEDGER_BYTES = 256 * 1024


class TelemetrySink(Protocol):
    """Where an application's telemetry goes; :class:`~fleetward.agent.outbox.Outbox` is one as it is.
    Returns the message id. Applications never send ``critical`` messages (the outbox never drops those,
    so an application could crowd out the agent's own reports)."""

    async def put(
        self,
        body: bytes,
        properties: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        critical: bool = False,
    ) -> str: ...


class ViolationRecorder(Protocol):
    """Told each time an application asks for what its manifest does not declare (a security event)."""

    async def __call__(self, component_id: str, capability: str, detail: str | int | None) -> None: ...


class StorageMeter(Protocol):
    """The bytes an application's ``MutableStorage`` directory uses now."""

    async def __call__(self, component_id: str) -> int: ...


@dataclass(frozen=True)
class DeferralGrant:
    component_id: str
    granted_seconds: int
    remaining_seconds: int
    deferred_until: dt.datetime


class UpdateDeferrals(Protocol):
    """Records an application's request to defer updates; the updater reads it when one is pending."""

    async def defer(self, component_id: str, seconds: int) -> DeferralGrant: ...


@dataclass(frozen=True)
class CredentialPaths:
    certificate: Path
    key: Path
    #: the identity the certificate names (its CN): what an IoT Hub SDK connects as
    device_id: str = ""


class CertificateSource(Protocol):
    """The files of the device's operational certificate (with its chain) and key, readable by the
    application's user (``identity``; ``None`` when the agent is not root and applications run as it)."""

    async def paths_for(self, component_id: str, identity: AppIdentity | None) -> CredentialPaths: ...


class PowerControls(Protocol):
    """Carries out an application's power request. Never a real reboot in the tests."""

    async def reboot(self, component_id: str) -> None: ...


# ---------------------------------------------------------------------- defaults


class DirectoryUsage:
    """The default :class:`StorageMeter`: the supervisor's own measure of ``<storage_dir>/<component>``."""

    def __init__(self, storage_dir: Path, *, max_entries: int = 10_000) -> None:
        self._storage_dir = storage_dir
        self._max_entries = max_entries

    async def __call__(self, component_id: str) -> int:
        usage = await asyncio.to_thread(
            measure_storage, self._storage_dir / component_id, max_entries=self._max_entries
        )
        return usage.used_bytes


class DeferralLedger:
    """The default :class:`UpdateDeferrals`: per application, updates may be deferred until at most
    ``max_total_seconds`` after its first deferral; each request defers from now (never shortening an
    earlier one) and is cut to what remains. Once nothing remains, requests fail with
    ``deferral_exhausted`` until the updater calls :meth:`reset` (the update ran, or none is pending).

    With a ``path`` the ledger is kept on disk (``updates/deferrals.json`` in the agent's state), so that
    restarting the agent neither forgets a deferral nor gives an application its budget again.
    """

    def __init__(
        self,
        *,
        max_total_seconds: int = DEFAULT_MAX_TOTAL_DEFERRAL_SECONDS,
        clock: Clock | None = None,
        path: Path | None = None,
    ) -> None:
        if max_total_seconds <= 0:
            raise ValueError("max_total_seconds must be positive")
        self._max_total = dt.timedelta(seconds=max_total_seconds)
        self._clock = clock or SystemClock()
        self._path = path
        self._first: dict[str, dt.datetime] = {}
        self._until: dict[str, dt.datetime] = {}
        #: the latest grants, newest last (a few, for tests and status)
        self.grants: collections.deque[DeferralGrant] = collections.deque(maxlen=64)
        self._load()

    async def defer(self, component_id: str, seconds: int) -> DeferralGrant:
        if seconds <= 0:
            raise InvalidInput("a deferral is at least one second", code="invalid_request")
        now = self._clock.now()
        first = self._first.setdefault(component_id, now)
        cap = first + self._max_total
        if now >= cap:
            raise Conflict(
                f"updates were deferred for the {int(self._max_total.total_seconds())} s allowed already",
                code="deferral_exhausted",
            )
        until = min(now + dt.timedelta(seconds=seconds), cap)
        until = max(until, self._until.get(component_id, until))
        self._until[component_id] = until
        await asyncio.to_thread(self._save)
        grant = DeferralGrant(
            component_id=component_id,
            granted_seconds=int((until - now).total_seconds()),
            remaining_seconds=int((cap - until).total_seconds()),
            deferred_until=until,
        )
        self.grants.append(grant)
        return grant

    def deferred_until(self, component_id: str) -> dt.datetime | None:
        """Until when ``component_id`` asked that updates wait (``None``: it did not)."""
        until = self._until.get(component_id)
        return until if until is not None and until > self._clock.now() else None

    def reset(self, component_id: str) -> None:
        """The deferral budget of ``component_id`` starts afresh (the updater: the update ran)."""
        self._first.pop(component_id, None)
        self._until.pop(component_id, None)
        self._save()

    def _load(self) -> None:
        if self._path is None:
            return
        try:
            raw = json.loads(self._path.read_bytes()[:_MAX_LEDGER_BYTES])
            for component_id, entry in dict(raw).items():
                self._first[str(component_id)] = dt.datetime.fromisoformat(entry["first"])
                self._until[str(component_id)] = dt.datetime.fromisoformat(entry["until"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as error:
            # a damaged ledger is started afresh: the worst case is a budget given again, once
            logger.warning("the update deferrals in %s are unreadable, started afresh: %s", self._path, error)
            self._first.clear()
            self._until.clear()

    def _save(self) -> None:
        if self._path is None:
            return
        entries = {
            component_id: {"first": first.isoformat(), "until": self._until[component_id].isoformat()}
            for component_id, first in self._first.items()
            if component_id in self._until
        }
        write_private_file(self._path, json.dumps(entries).encode())


class AppCredentialCopies:
    """The default :class:`CertificateSource`: a copy of the operational credential for each application.

    The agent's credential file (:mod:`fleetward.agent.credential`) is readable by the agent alone. For an
    application with ``DeviceAuthentication`` this writes ``<directory>/<component id>/certificate.pem``
    (the certificate and its chain) and ``key.pem`` (the key, PKCS#8), both mode 0400 and owned by the
    application's user (the agent's when it is not root), in a directory of the agent's that others may
    traverse but not list (0711). It copies again whenever the credential changed (after a renewal), so the
    paths stay the same and the files stay current. The trade-off: an application that holds the key can
    present the device's identity by itself, until the certificate expires (one day by default) or the
    device is revoked; the agent cannot take a copy back. A device whose key lives in a TPM or a PKCS#11
    token has no key file to copy: use a source that refuses (``device_credentials_unavailable``).
    """

    def __init__(self, credential_file: Path, directory: Path) -> None:
        self._credential_file = credential_file
        self._directory = directory

    async def paths_for(self, component_id: str, identity: AppIdentity | None) -> CredentialPaths:
        return await asyncio.to_thread(self._copy, component_id, identity)

    def _copy(self, component_id: str, identity: AppIdentity | None) -> CredentialPaths:
        try:
            with open(self._credential_file, "rb") as handle:
                data = handle.read(MAX_CREDENTIAL_BYTES + 1)
        except FileNotFoundError:
            raise Conflict(
                "the device has no operational certificate yet", code="device_credentials_unavailable"
            ) from None
        credential = decode_credential(data, str(self._credential_file))
        issued = credential.issued
        chain = "".join(block.strip() + "\n" for block in (issued.certificate, *issued.chain))
        self._directory.mkdir(mode=0o711, parents=True, exist_ok=True)
        target = self._directory / component_id
        target.mkdir(mode=0o711, exist_ok=True)
        info = os.lstat(target)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigurationError(f"{target} is not a directory of the agent's")
        os.chmod(target, 0o711)  # noqa: S103 - the application traverses it; nobody lists it
        paths = CredentialPaths(
            certificate=target / "certificate.pem", key=target / "key.pem", device_id=issued.device_id
        )
        _replace_if_changed(paths.certificate, chain.encode("ascii"), identity)
        _replace_if_changed(paths.key, credential.key_pem(), identity)
        return paths


def _replace_if_changed(path: Path, content: bytes, identity: AppIdentity | None) -> None:
    try:
        info = os.lstat(path)
        with open(path, "rb") as handle:
            unchanged = handle.read(len(content) + 1) == content
        owner = identity.uid if identity else os.geteuid()
        if unchanged and stat.S_ISREG(info.st_mode) and info.st_uid == owner:
            return
    except FileNotFoundError:
        pass
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            if identity is not None:
                os.fchown(handle.fileno(), identity.uid, identity.gid)
            os.fchmod(handle.fileno(), 0o400)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- system events


class SystemEventKind(enum.StrEnum):
    """What ``SystemEventNotifications`` tells an application (Azure Sphere's SysEvent_Events)."""

    UPDATE_PENDING = "update_pending"
    UPDATE_STARTED = "update_started"
    NO_UPDATE_AVAILABLE = "no_update_available"
    REBOOT_PENDING = "reboot_pending"


@dataclass(frozen=True)
class SystemEvent:
    kind: SystemEventKind
    details: Mapping[str, str | int | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, SystemEventKind):
            raise TypeError("an event's kind is a SystemEventKind")
        if len(self.details) > 16:
            raise ValueError("an event has at most 16 details")
        for key, value in self.details.items():
            if not isinstance(key, str) or not 1 <= len(key) <= 64:
                raise ValueError("an event detail's key is 1 to 64 characters")
            if isinstance(value, str) and len(value) > 256:
                raise ValueError("an event detail's text is at most 256 characters")


class EventSubscriber(Protocol):
    def deliver_event(self, event: SystemEvent) -> None: ...


class SystemEvents:
    """Fans system events out to the applications that subscribed. :meth:`publish` never blocks: each
    subscriber queues the event (a connection that falls too far behind is closed, see the API)."""

    def __init__(self) -> None:
        self._subscribers: set[EventSubscriber] = set()

    def subscribe(self, subscriber: EventSubscriber) -> None:
        self._subscribers.add(subscriber)

    def unsubscribe(self, subscriber: EventSubscriber) -> None:
        self._subscribers.discard(subscriber)

    def publish(self, event: SystemEvent) -> int:
        """Hand ``event`` to every subscriber; the number of them."""
        subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.deliver_event(event)
        return len(subscribers)


# ---------------------------------------------------------------------- fakes


@dataclass(frozen=True)
class SentTelemetry:
    message_id: str
    body: bytes
    properties: tuple[tuple[str, str], ...]
    critical: bool


class MemoryTelemetry:
    """A :class:`TelemetrySink` that keeps what it is given. ``hold()`` makes puts wait until ``release()``
    (to test bounds on requests in progress)."""

    def __init__(self) -> None:
        self.messages: list[SentTelemetry] = []
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = 0

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def put(
        self,
        body: bytes,
        properties: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        critical: bool = False,
    ) -> str:
        pairs = tuple(properties.items()) if isinstance(properties, Mapping) else tuple(properties)
        self.waiting += 1
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1
        message_id = secrets.token_hex(16)
        self.messages.append(SentTelemetry(message_id, bytes(body), pairs, critical))
        return message_id


@dataclass(frozen=True)
class Violation:
    component_id: str
    capability: str
    detail: str | int | None


class MemoryViolations:
    """A :class:`ViolationRecorder` that keeps every violation in order."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []

    async def __call__(self, component_id: str, capability: str, detail: str | int | None) -> None:
        self.violations.append(Violation(component_id, capability, detail))


class RecordingPowerControls:
    """A :class:`PowerControls` that only records who asked: the simulator's and the tests'."""

    def __init__(self) -> None:
        self.reboots: list[str] = []

    async def reboot(self, component_id: str) -> None:
        self.reboots.append(component_id)


class StaticCertificates:
    """A :class:`CertificateSource` that answers fixed paths (or refuses, with ``paths=None``)."""

    def __init__(self, paths: CredentialPaths | None) -> None:
        self._paths = paths

    async def paths_for(self, component_id: str, identity: AppIdentity | None) -> CredentialPaths:
        if self._paths is None:
            raise Conflict("the device's key cannot be exported", code="device_credentials_unavailable")
        return self._paths
