"""What a running agent shows of itself: the status snapshot, its file, and the applications' output logs.

The running agent writes ``status.json`` in its state directory (atomically: a reader sees the previous
snapshot or the next one, never half of one) every ``intervals.status_seconds`` and at each change that
matters (a certificate, a refusal, the end), and the last output of each application to
``logs/<component id>.stdout.log`` and ``.stderr.log``. ``fleetward agent status`` and ``agent app logs``
read them; they work without the agent running.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from fleetward.agent.config import write_private_file
from fleetward.errors import ConfigurationError
from fleetward.wire.evidence import EnrollmentResponse

MAX_STATUS_BYTES = 1024 * 1024

AppStateName = Literal[
    "pending",
    "refused",
    "starting",
    "running",
    "backing_off",
    "crash_loop",
    "storage_quota_exceeded",
    "stopped",
]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CertificateStatus(_Record):
    serial: str
    tenant_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    renew_at: dt.datetime | None = None

    @classmethod
    def of(cls, issued: EnrollmentResponse, renew_at: dt.datetime | None) -> CertificateStatus:
        """The status of the certificate ``issued``, renewed from ``renew_at``."""
        return cls(
            serial=issued.serial,
            tenant_id=issued.tenant_id,
            not_before=issued.not_before,
            not_after=issued.not_after,
            renew_at=renew_at,
        )


class LinkState(_Record):
    started: bool = False
    connected: bool = False
    quarantined: bool = False
    connects: int = 0
    failures: int = 0
    sent: int = 0
    acknowledged: int = 0
    last_error: str | None = None


class OutboxState(_Record):
    messages: int = 0
    bytes: int = 0
    in_flight: int = 0
    dropped: int = 0


class AppStatus(_Record):
    component_id: str
    version: str
    image_sha256: str
    state: AppStateName
    pid: int | None = None
    restart_count: int = 0
    #: the measured-launch refusal code, for a refused application
    reason: str | None = None
    message: str | None = None


class RefusalStatus(_Record):
    """The authority's last refusal, kept until a renewal succeeds."""

    code: str
    message: str
    at: dt.datetime


class UpdateStatus(_Record):
    """The updater: how many checks ran, the last one's refusal, what waits for the director."""

    checks: int = 0
    last_error: str | None = None
    #: results the director has not acknowledged yet
    pending_results: int = 0
    #: when a deferred or cut update is looked at again (before the next poll)
    retry_at: dt.datetime | None = None


class AgentStatus(_Record):
    format: Literal["fleetward-agent-status-v1"] = "fleetward-agent-status-v1"
    running: bool
    pid: int | None = None
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    device_id: str | None = None
    root_of_trust: str | None = None
    development_only: bool | None = None
    measurements: int = 0
    certificate: CertificateStatus | None = None
    link: LinkState = LinkState()
    outbox: OutboxState = OutboxState()
    reports_sent: int = 0
    reports_dropped: int = 0
    #: requests of applications for what their manifests do not declare
    violations: int = 0
    apps: tuple[AppStatus, ...] = ()
    last_refusal: RefusalStatus | None = None
    #: the agent's own measurement: the version and SHA-256 it runs (of its image, when it runs one)
    agent_version: str | None = None
    agent_sha256: str | None = None
    #: ``None`` when updates are not configured
    updates: UpdateStatus | None = None


def write_status(path: Path, status: AgentStatus) -> None:
    """Replace ``path`` with ``status`` atomically (mode 0600)."""
    write_private_file(path, status.model_dump_json(indent=1) + "\n")


def read_status(path: Path) -> AgentStatus | None:
    """The last snapshot an agent wrote, or ``None`` if none was."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror}") from None
    try:
        return AgentStatus.model_validate_json(data)
    except ValidationError:
        raise ConfigurationError(f"{path} is not an agent status file", code="status_unreadable") from None


# ----------------------------------------------------------------------------------------- output logs


def log_paths(logs_dir: Path, component_id: str) -> tuple[Path, Path]:
    """Where the last standard output and standard error of an application are kept."""
    return logs_dir / f"{component_id}.stdout.log", logs_dir / f"{component_id}.stderr.log"


class LogKeeper:
    """Writes each application's output tails to its log files, only when they changed."""

    def __init__(self, logs_dir: Path) -> None:
        self._dir = logs_dir
        self._written: dict[Path, str] = {}

    def keep(self, component_id: str, stdout: str, stderr: str) -> None:
        for path, text in zip(log_paths(self._dir, component_id), (stdout, stderr), strict=True):
            if self._written.get(path) != text and (text or path.exists()):
                write_private_file(path, text)
                self._written[path] = text


def read_log(path: Path, limit_bytes: int = MAX_STATUS_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(limit_bytes).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


# ----------------------------------------------------------------------------------------- the lock


class StateLock:
    """One agent per state directory: an exclusive ``flock`` on ``agent.lock``, held while it runs (and
    while ``fleetward agent enroll`` works). The file holds the holder's pid, for people."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor: int | None = None

    def __enter__(self) -> StateLock:
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ConfigurationError(
                f"an agent is running with the state directory {self.path.parent}", code="agent_running"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor = descriptor
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    @staticmethod
    def held(path: Path) -> bool:
        """Whether an agent holds the lock now."""
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
        return False
