"""What the agent reports about its applications: crashes, crash loops, refused launches, storage quotas.

The reports are device-independent: they name the application (its component id and the SHA-256 of its
package) but not the device, which the hub link adds from its session when it carries them to the cloud.
Every text field is bounded, so a report is small whatever the application wrote.

:meth:`CrashReport.signature` groups alike crashes: two crashes of the same component with the same exit
status and the same last line of error output, once numbers and addresses are normalised, share one
signature, so the cloud can count them as one problem seen many times.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import signal as signals
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fleetward.wire.identity import Sha256Hex
from fleetward.wire.versions import check_version

#: A GUID, lower-case: the component id of an application (Azure Sphere's ``ComponentId``).
COMPONENT_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
#: The longest error tail a report carries: the last 8 KiB the application wrote to standard error.
MAX_ERROR_TAIL_CHARS = 8 * 1024
MAX_REASON_CHARS = 1024

_CRASH_SIGNATURE_DOMAIN = b"fleetward-crash-signature-v1\x00"
# order matters: addresses first, then hexadecimal runs (ids, hashes: digits and letters a-f mixed, four
# characters or more), then decimal numbers
_HEX_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]+")
_HEX_RUN = re.compile(r"\b(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{4,}\b")
_NUMBER = re.compile(r"(?<![0-9])[0-9]+(?![0-9]|x\?)")
_SPACES = re.compile(r"\s+")


def _check_aware(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("must be timezone-aware")
    return moment


ComponentId = Annotated[str, StringConstraints(pattern=COMPONENT_ID_PATTERN, min_length=36, max_length=36)]
AwareDatetime = Annotated[dt.datetime, AfterValidator(_check_aware)]
VersionText = Annotated[str, StringConstraints(max_length=64), AfterValidator(check_version)]


def signal_name(number: int) -> str:
    """``SIGSEGV`` for 11, and ``SIG<n>`` for a number this platform has no name for."""
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def normalise_line(line: str) -> str:
    """A line with its addresses, hexadecimal ids and numbers replaced, so alike crashes compare equal."""
    line = _HEX_ADDRESS.sub("0x?", line)  # the number rule below skips this one: it ends on "x?"
    line = _HEX_RUN.sub("<hex>", line)
    line = _NUMBER.sub("<n>", line)
    return _SPACES.sub(" ", line).strip()


def last_line(text: str) -> str:
    """The last line of ``text`` that is not blank, or the empty string."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line
    return ""


class CrashReport(BaseModel):
    """An application exited or was killed without the agent asking it to stop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["crash"] = "crash"
    component_id: ComponentId
    image_sha256: Sha256Hex
    exit_code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=64)
    error_tail: str = Field(default="", max_length=MAX_ERROR_TAIL_CHARS)
    occurred_at: AwareDatetime
    restart_count: int = Field(ge=0, description="how many times the agent had restarted it before")

    @model_validator(mode="after")
    def _exit_code_or_signal(self) -> CrashReport:
        if (self.exit_code is None) == (self.signal is None):
            raise ValueError("a crash has either an exit code or a signal, not both and not neither")
        return self

    @property
    def exit_status(self) -> str:
        """``exit 3`` or ``SIGSEGV``."""
        if self.signal is not None:
            return signal_name(self.signal)
        return f"exit {self.exit_code}"

    def signature(self) -> str:
        """SHA-256 (hex) over the component, the exit status and the normalised last line of the tail."""
        parts = (self.component_id, self.exit_status, normalise_line(last_line(self.error_tail)))
        digest = hashlib.sha256(_CRASH_SIGNATURE_DOMAIN)
        for part in parts:
            encoded = part.encode("utf-8", "replace")
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
        return digest.hexdigest()


class CrashLoopReport(BaseModel):
    """An application crashed too often in a window: the agent stopped restarting it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["crash_loop"] = "crash_loop"
    component_id: ComponentId
    image_sha256: Sha256Hex
    crashes: int = Field(ge=1)
    window_seconds: float = Field(gt=0)
    occurred_at: AwareDatetime


class LaunchRefusedReport(BaseModel):
    """An application package failed measured launch: it was not started and not measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["launch_refused"] = "launch_refused"
    component_id: ComponentId
    version: VersionText
    image_sha256: Sha256Hex = Field(description="the SHA-256 the install record expected")
    reason: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    message: str = Field(max_length=MAX_REASON_CHARS)
    occurred_at: AwareDatetime


class StorageQuotaReport(BaseModel):
    """An application used more storage than its manifest's ``MutableStorage`` allows: it was stopped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["storage_quota_exceeded"] = "storage_quota_exceeded"
    component_id: ComponentId
    image_sha256: Sha256Hex
    used_bytes: int = Field(ge=0)
    quota_bytes: int = Field(ge=0)
    entries: int = Field(ge=0, description="files and directories counted")
    occurred_at: AwareDatetime


class CapabilityDeniedReport(BaseModel):
    """An application used what its manifest does not declare (an API operation, a peripheral, a
    connection the proxy refused): it was refused, and this is the security event the cloud sees."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["capability_denied"] = "capability_denied"
    component_id: ComponentId
    capability: Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9]{0,63}$")]
    detail: str = Field(
        default="", max_length=MAX_REASON_CHARS, description="a pin, a host:port, an operation"
    )
    occurred_at: AwareDatetime


AgentReport = Annotated[
    CrashReport | CrashLoopReport | LaunchRefusedReport | StorageQuotaReport | CapabilityDeniedReport,
    Field(discriminator="kind"),
]
