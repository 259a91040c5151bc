"""What the agent and the update service exchange (docs/wire.md, "Updates"; ADR 0015).

Two repositories must agree before a device installs anything, as in Uptane:

- the **image repository** is a TUF repository per tenant (root, targets with one delegated role per
  product, snapshot, timestamp; consistent snapshots). It says which images exist and what their bytes are.
  Each image is a target at :func:`target_path`; its ``custom`` field is a :class:`TargetCustom`.
- the **director** signs, for one device, the :class:`Assignment` of what it must run now: a TUF
  ``Metadata[Targets]`` whose targets are the images (same path, length and hashes as in the image
  repository) and whose extra fields name the device and the deployment. The director's keys are named by
  the image repository's root (field :data:`DIRECTOR_FIELD`), so rotating them is a root rotation signed
  by the offline root keys.

The device authenticates its requests with a :func:`device_token`: its operational key signs its
certificate's serial and the time, and the service checks it against the certificate it issued. It reports
what it runs and how each update went in a :class:`VersionReport`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Role, Root, TargetFile, Targets

from fleetward.errors import Unauthenticated, UpdateRefused
from fleetward.wire.reports import (
    MAX_REASON_CHARS,
    AwareDatetime,
    ComponentId,
    VersionText,
)

#: The field of the image repository's root that names the director's keys: ``{"keyids": [...],
#: "threshold": k}``; the keys themselves are in the root's ``keys``.
DIRECTOR_FIELD = "x-fleetward-director"
#: The fields of an assignment's ``signed`` part beside the standard targets fields.
DEVICE_FIELD = "x-fleetward-device"
DEPLOYMENT_FIELD = "x-fleetward-deployment"
#: An assignment's maintenance window: ``{"start": "HH:MM", "end": "HH:MM"}`` in UTC (absent: any time).
WINDOW_FIELD = "x-fleetward-window"
#: A product role's security floors: ``{component id: lowest version a device may install}``.
FLOORS_FIELD = "x-fleetward-floors"
#: The name under which an assignment is verified (it is not a role of the image repository).
DIRECTOR_ROLE = "director"

#: The largest assignment a device accepts (a handful of targets).
MAX_ASSIGNMENT_BYTES = 64 * 1024
#: How many components one device runs at most, and how many results one report carries.
MAX_COMPONENTS = 64

#: The authorization scheme of a device's update requests.
TOKEN_SCHEME = "FleetwardDevice"  # noqa: S105 - a scheme name, not a secret
_TOKEN_DOMAIN = b"fleetward-update-token-v1\x00"
_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")
#: An identifier the cloud made (a product, a deployment): lower-case letters, digits and dashes.
_ID = r"^[a-z0-9][a-z0-9-]{0,63}$"

IdText = Annotated[str, StringConstraints(pattern=_ID)]
Sha256Text = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
CodeText = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class ImageKind(StrEnum):
    """What an image installs: an application, or the agent itself."""

    APP = "app"
    AGENT = "agent"


def target_path(product_id: str, component_id: str, version: str) -> str:
    """Where an image is in the image repository: under its product's delegation."""
    return f"{product_id}/{component_id}/{version}/image.tar"


def delta_path(product_id: str, component_id: str, version: str, base_sha256: str) -> str:
    """Where the delta from the image with SHA-256 ``base_sha256`` to this version is."""
    return f"{product_id}/{component_id}/{version}/from-{base_sha256}.bsdiff"


def product_role(product_id: str) -> str:
    """The name of the delegated targets role that signs a product's images."""
    return f"product-{product_id}"


def product_paths(product_id: str) -> list[str]:
    """The path patterns of a product's delegation: python-tuf matches a pattern segment by segment (a
    ``*`` never spans a ``/``), so ``<product>/*`` would not cover the four segments of :func:`target_path`
    and :func:`delta_path`."""
    return [f"{product_id}/*/*/*"]


def product_of(path: str) -> str:
    """The product a target path belongs to (its first segment)."""
    return path.split("/", 1)[0]


@dataclass(frozen=True)
class MaintenanceWindow:
    """The daily UTC window within which a device may install (``end`` before ``start`` spans midnight)."""

    start: dt.time
    end: dt.time

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("a maintenance window is in UTC, without a time zone")

    def contains(self, moment: dt.datetime) -> bool:
        now = moment.astimezone(dt.UTC).time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def next_start(self, moment: dt.datetime) -> dt.datetime:
        """The next time the window opens after ``moment`` (``moment`` itself if it is open)."""
        if self.contains(moment):
            return moment
        utc = moment.astimezone(dt.UTC)
        start = utc.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return start if start > utc else start + dt.timedelta(days=1)

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M")}

    @classmethod
    def from_dict(cls, value: object) -> MaintenanceWindow:
        if not isinstance(value, Mapping):
            raise ValueError("a maintenance window is an object with start and end")
        try:
            return cls(dt.time.fromisoformat(str(value["start"])), dt.time.fromisoformat(str(value["end"])))
        except (KeyError, ValueError):
            raise ValueError("a maintenance window has start and end as HH:MM") from None


class TargetCustom(BaseModel):
    """The ``custom`` field of an image target (and of the same target in an assignment)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    component_id: ComponentId
    version: VersionText
    kind: ImageKind = ImageKind.APP
    product_id: IdText
    #: the publisher's signature over the package (base64), which measured launch checks at every start
    publisher_signature: str = Field(max_length=1024)
    #: for a delta: the SHA-256 of the image it applies to, and the path of the image it produces
    delta_base_sha256: Sha256Text | None = None
    delta_of: str | None = Field(default=None, max_length=512)

    def signature_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.publisher_signature, validate=True)
        except (binascii.Error, ValueError):
            raise UpdateRefused(
                "the image's publisher signature is not base64", code="image_signature_malformed"
            ) from None


def custom_of(target: TargetFile) -> TargetCustom:
    """The target's ``custom`` field, checked; ``UpdateRefused`` if it is not one of ours."""
    try:
        return TargetCustom.model_validate(target.custom)
    except ValidationError as error:
        raise UpdateRefused(
            f"the target {target.path} does not describe an image: {error.errors()[0]['msg']}",
            code="target_malformed",
        ) from None


# --------------------------------------------------------------------------- the director's assignment


def director_role(root: Root) -> Role:
    """The director's keys and threshold as the image repository's root names them."""
    field = root.unrecognized_fields.get(DIRECTOR_FIELD)
    if not isinstance(field, Mapping):
        raise UpdateRefused("the repository's root names no director key", code="director_unknown")
    try:
        role = Role.from_dict(dict(field))
    except (KeyError, TypeError, ValueError):
        raise UpdateRefused("the root's director entry is malformed", code="director_unknown") from None
    if any(keyid not in root.keys for keyid in role.keyids):
        raise UpdateRefused("the root names a director key it does not hold", code="director_unknown")
    return role


def director_entry(keys: list[Key], threshold: int) -> dict[str, Any]:
    """The value of :data:`DIRECTOR_FIELD` for ``keys`` (each must also be added to the root's keys)."""
    return Role([key.keyid for key in keys], threshold).to_dict()


def assignment(
    device_id: str,
    deployment_id: str,
    targets: Mapping[str, TargetFile],
    *,
    version: int,
    expires: dt.datetime,
    window: MaintenanceWindow | None = None,
) -> Metadata[Targets]:
    """An unsigned assignment: ``device_id`` must run ``targets``, as deployment ``deployment_id`` says.

    ``expires`` is whole seconds: TUF's format has no fractions.
    """
    expires = expires.replace(microsecond=0)
    fields: dict[str, Any] = {DEVICE_FIELD: device_id, DEPLOYMENT_FIELD: deployment_id}
    if window is not None:
        fields[WINDOW_FIELD] = window.to_dict()
    signed = Targets(
        version=version,
        spec_version="1.0.31",
        expires=expires,
        targets=dict(targets),
        unrecognized_fields=fields,
    )
    return Metadata(signed)


@dataclass(frozen=True)
class Assignment:
    """A verified assignment: what one device must run."""

    version: int
    device_id: str
    deployment_id: str
    expires: dt.datetime
    targets: Mapping[str, TargetFile]
    window: MaintenanceWindow | None = None


def verify_assignment(
    data: bytes, root: Root, *, device_id: str, now: dt.datetime, newer_than: int = 0
) -> Assignment:
    """Check an assignment's signatures against the director keys ``root`` names, its device, its expiry
    (a freeze attack) and that its version is above ``newer_than`` or equal to it (a rollback attack).

    Raises ``UpdateRefused`` with a code saying which check failed.
    """
    if len(data) > MAX_ASSIGNMENT_BYTES:
        raise UpdateRefused(
            f"the assignment is {len(data)} bytes, more than {MAX_ASSIGNMENT_BYTES}",
            code="assignment_too_large",
        )
    try:
        metadata = Metadata[Targets].from_bytes(data)
    except (RepositoryError, ValueError, TypeError, KeyError) as error:
        raise UpdateRefused(f"the assignment is malformed: {error}", code="assignment_malformed") from None
    if not isinstance(metadata.signed, Targets):
        raise UpdateRefused("the assignment is not targets metadata", code="assignment_malformed")
    role = director_role(root)
    payload = metadata.signed_bytes
    good = 0
    for keyid in role.keyids:
        signature = metadata.signatures.get(keyid)
        if signature is None:
            continue
        try:
            root.get_key(keyid).verify_signature(signature, payload)
        except UnverifiedSignatureError:
            continue
        good += 1
    if good < role.threshold:
        raise UpdateRefused(
            f"the assignment carries {good} valid director signature(s) of the {role.threshold} required",
            code="assignment_signature_invalid",
        )
    signed = metadata.signed
    fields = signed.unrecognized_fields
    if fields.get(DEVICE_FIELD) != device_id:
        raise UpdateRefused("the assignment is for another device", code="assignment_other_device")
    deployment = fields.get(DEPLOYMENT_FIELD)
    if not isinstance(deployment, str) or not re.fullmatch(_ID, deployment):
        raise UpdateRefused("the assignment names no deployment", code="assignment_malformed")
    if signed.is_expired(now):
        raise UpdateRefused(
            f"the assignment expired at {signed.expires.isoformat()}", code="assignment_expired"
        )
    if signed.version < newer_than:
        raise UpdateRefused(
            f"the assignment's version {signed.version} is older than the {newer_than} already seen",
            code="assignment_rollback",
        )
    try:
        window = MaintenanceWindow.from_dict(fields[WINDOW_FIELD]) if WINDOW_FIELD in fields else None
    except ValueError as error:
        raise UpdateRefused(
            f"the assignment's window is malformed: {error}", code="assignment_malformed"
        ) from None
    return Assignment(
        window=window,
        version=signed.version,
        device_id=device_id,
        deployment_id=deployment,
        expires=signed.expires,
        targets=dict(signed.targets),
    )


def check_agreement(assigned: TargetFile, listed: TargetFile | None) -> None:
    """A device installs only what both repositories agree on: the image repository must list the
    assigned target with the same length and hashes."""
    if listed is None:
        raise UpdateRefused(f"the image repository does not list {assigned.path}", code="target_not_listed")
    if listed.length != assigned.length or listed.hashes != assigned.hashes:
        raise UpdateRefused(
            f"the director and the image repository disagree about {assigned.path}", code="target_mismatch"
        )


# --------------------------------------------------------------------------- the device's token


def _token_message(serial: str, issued_at: int) -> bytes:
    return _TOKEN_DOMAIN + f"{serial}\x00{issued_at}".encode("ascii")


def device_token(key: ec.EllipticCurvePrivateKey, serial: str, issued_at: int) -> str:
    """The ``Authorization`` header value for a device's update requests."""
    signature = key.sign(_token_message(serial, issued_at), ec.ECDSA(hashes.SHA256()))
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
    return f"{TOKEN_SCHEME} serial={serial},t={issued_at},sig={encoded}"


@dataclass(frozen=True)
class DeviceToken:
    serial: str
    issued_at: int
    signature: bytes

    @classmethod
    def parse(cls, header: str) -> DeviceToken:
        """The token in an ``Authorization`` header; ``Unauthenticated`` if it is not one."""
        scheme, _, rest = header.partition(" ")
        if scheme != TOKEN_SCHEME or len(header) > 512:
            raise Unauthenticated(f"an update request needs a {TOKEN_SCHEME} token", code="token_missing")
        fields = dict(part.partition("=")[::2] for part in rest.split(","))
        try:
            serial, issued_at = fields["serial"], int(fields["t"])
            signature = base64.urlsafe_b64decode(fields["sig"] + "=" * (-len(fields["sig"]) % 4))
        except (KeyError, ValueError, binascii.Error):
            raise Unauthenticated("the device token is malformed", code="token_malformed") from None
        if not _SERIAL.fullmatch(serial):
            raise Unauthenticated("the device token's serial is malformed", code="token_malformed")
        return cls(serial, issued_at, signature)

    def verify(self, public_key: ec.EllipticCurvePublicKey, now: int, max_age_seconds: int) -> None:
        """Check the signature and the time (``Unauthenticated`` if either fails)."""
        if abs(now - self.issued_at) > max_age_seconds:
            raise Unauthenticated("the device token is too old or from the future", code="token_expired")
        try:
            public_key.verify(
                self.signature, _token_message(self.serial, self.issued_at), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise Unauthenticated("the device token's signature is not valid", code="token_invalid") from None


# --------------------------------------------------------------------------- what the device reports


class UpdateState(StrEnum):
    """Where one component's update is on one device."""

    DOWNLOADING = "downloading"
    TRIAL = "trial"  # switched to, waiting to come up healthy
    INSTALLED = "installed"  # came up healthy: kept
    ROLLED_BACK = "rolled_back"  # did not come up healthy: the previous slot runs again
    FAILED = "failed"  # refused or failed before the switch: the device runs what it ran
    DEFERRED = "deferred"  # an application asked to wait, or outside the maintenance window


#: The states after which a device has finished with an update, well or badly.
FINAL_STATES = frozenset({UpdateState.INSTALLED, UpdateState.ROLLED_BACK, UpdateState.FAILED})


class InstalledComponent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    component_id: ComponentId
    version: VersionText
    sha256: Sha256Text


class UpdateResult(BaseModel):
    """How one component's update went, as far as it got."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    deployment_id: IdText
    component_id: ComponentId
    version: VersionText
    sha256: Sha256Text
    state: UpdateState
    code: CodeText | None = None
    message: str = Field(default="", max_length=MAX_REASON_CHARS)
    bytes_downloaded: int = Field(default=0, ge=0)
    bytes_saved: int = Field(default=0, ge=0, description="bytes a delta spared against the full image")
    at: AwareDatetime


class CheckRefusal(BaseModel):
    """Why the device's last check refused what it was given (metadata, the assignment, a target): it
    installed nothing. A device that keeps refusing cannot take its assignment; the director counts it
    as failed."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    code: CodeText
    message: str = Field(default="", max_length=MAX_REASON_CHARS)
    at: AwareDatetime


class VersionReport(BaseModel):
    """What a device runs, the assignment it last verified, and how its updates went."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["version_report"] = "version_report"
    assignment_version: int = Field(default=0, ge=0)
    components: tuple[InstalledComponent, ...] = Field(default=(), max_length=MAX_COMPONENTS)
    results: tuple[UpdateResult, ...] = Field(default=(), max_length=MAX_COMPONENTS)
    #: set when the last check refused what it was given (``None`` once a check succeeds)
    refusal: CheckRefusal | None = None
    sent_at: AwareDatetime
