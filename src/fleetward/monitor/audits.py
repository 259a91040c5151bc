"""Audits: checks of a tenant's configuration, in the manner of AWS IoT Device Defender Audit (pure core).

Each check is a function over an :class:`AuditSnapshot` (what the shell,
:mod:`fleetward.monitor.audit_service`, read from the store and asked the hubs) that returns
:class:`Finding` records: a check, a severity, a subject (its kind and id) and one line an operator can act
on. No I/O, no clock: ``snapshot.now`` is the time of the audit. The thresholds are an :class:`AuditPolicy`.

=================================  ==========================================================================
check                              finds
=================================  ==========================================================================
``certificate_shared``             a device whose session is taken over again and again between addresses it
                                   returns to: two clients hold its certificate at once
``conflicting_client_id``          repeated CONNECTs refused: the client id is not the certificate's device
``revoked_certificate_connected``  a revoked, unexpired certificate a hub still holds a session with
``certificate_expiring``           an active device whose newest certificate expires within hours: it
                                   missed its daily attestation
``ca_expiring``                    a tenant CA (root, issuing), or the TUF root of its update repository,
                                   near the end of its validity
``weak_key``                       a device identity key, a valid certificate's key or a CA key below policy
``manifest_broader_than_use``      an application declaring ``AllowedConnections`` no device running it used
``version_below_floor``            a device running a component below its security floor
``operator_without_mfa``           an operator with a role in the tenant and no MFA
=================================  ==========================================================================

Only ``AllowedConnections`` is compared with use: devices report the connections the proxy let through
(``SecurityBaseline.allowed``), and nothing yet reports which peripherals an application opened.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleetward.agent.manifest import AllowedConnection, parse_manifest
from fleetward.bounds import check_positive
from fleetward.errors import InvalidInput
from fleetward.wire.versions import parse_version

MAX_DETAIL_CHARS = 500
MAX_SUBJECT_CHARS = 128  # audit_findings.subject_id


class AuditSeverity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


#: most severe first
SEVERITY_RANK: Mapping[AuditSeverity, int] = {
    AuditSeverity.CRITICAL: 0,
    AuditSeverity.HIGH: 1,
    AuditSeverity.MEDIUM: 2,
    AuditSeverity.LOW: 3,
}


class Check(StrEnum):
    CERTIFICATE_SHARED = "certificate_shared"
    CONFLICTING_CLIENT_ID = "conflicting_client_id"
    REVOKED_CERTIFICATE_CONNECTED = "revoked_certificate_connected"
    CERTIFICATE_EXPIRING = "certificate_expiring"
    CA_EXPIRING = "ca_expiring"
    WEAK_KEY = "weak_key"
    MANIFEST_BROADER_THAN_USE = "manifest_broader_than_use"
    VERSION_BELOW_FLOOR = "version_below_floor"
    OPERATOR_WITHOUT_MFA = "operator_without_mfa"


CHECKS: tuple[str, ...] = tuple(check.value for check in Check)


class SubjectKind(StrEnum):
    DEVICE = "device"
    CERTIFICATE = "certificate"
    CA = "ca"
    TUF_ROOT = "tuf_root"
    COMPONENT = "component"
    OPERATOR = "operator"
    #: the check itself (a note that findings were left out)
    CHECK = "check"


@dataclass(frozen=True)
class Finding:
    check: Check
    severity: AuditSeverity
    subject_kind: SubjectKind
    subject_id: str
    detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.detail, str) or not isinstance(self.subject_id, str):
            raise TypeError("a finding's subject id and detail are text")
        if not self.subject_id:
            raise ValueError("a finding names its subject")
        object.__setattr__(self, "subject_id", self.subject_id[:MAX_SUBJECT_CHARS])
        one_line = " ".join(self.detail.split())[:MAX_DETAIL_CHARS]
        object.__setattr__(self, "detail", one_line)
        object.__setattr__(self, "check", Check(self.check))
        object.__setattr__(self, "severity", AuditSeverity(self.severity))
        object.__setattr__(self, "subject_kind", SubjectKind(self.subject_kind))


@dataclass(frozen=True)
class AuditPolicy:
    """What the checks judge by, and how much the shell reads. Each value has its unit in its name."""

    #: how far back the checks of hub events look
    window_seconds: int = 24 * 3600
    #: certificate_shared: this many take-overs between at least that many addresses within the interval
    takeover_interval_seconds: int = 3600
    min_takeovers: int = 3
    min_takeover_addresses: int = 2
    #: conflicting_client_id: refused CONNECTs of one device within the window
    min_client_id_mismatches: int = 3
    #: certificate_expiring: a device certificate is 24 h; one this close to its end missed its renewal
    device_certificate_notice_seconds: int = 2 * 3600
    ca_notice_days: int = 90
    ca_critical_days: int = 30
    tuf_root_notice_days: int = 30
    tuf_root_critical_days: int = 7
    min_rsa_bits: int = 2048
    #: manifest_broader_than_use: how far back the baselines are read
    manifest_window_seconds: int = 7 * 24 * 3600
    #: findings kept per check and run (one more says how many were left out)
    max_findings_per_check: int = 1000
    #: what the shell reads at most: hub events, rows of a kind (devices, certificates, …), baselines
    max_events: int = 100_000
    max_rows: int = 200_000
    max_baselines: int = 20_000
    #: revoked certificates' devices asked about (the rest are reported as unknown), and at once
    max_probes: int = 10_000
    probe_concurrency: int = 32
    #: a schedule runs at most this often, and at least this often
    min_schedule_interval_seconds: int = 3600
    max_schedule_interval_seconds: int = 90 * 24 * 3600
    #: scheduled audits one ``run_due`` starts at most
    max_due_per_tick: int = 100
    allowed_curves: frozenset[str] = frozenset({"secp256r1", "secp384r1", "secp521r1"})

    def __post_init__(self) -> None:
        numbers = [item.name for item in fields(self) if item.name != "allowed_curves"]
        check_positive(self, "audit policy", only=numbers)
        if not isinstance(self.allowed_curves, frozenset) or not all(
            isinstance(name, str) for name in self.allowed_curves
        ):
            raise TypeError("audit policy allowed_curves is a frozenset of curve names")
        if (
            self.ca_critical_days > self.ca_notice_days
            or self.tuf_root_critical_days > self.tuf_root_notice_days
        ):
            raise ValueError("audit policy: a critical period cannot be longer than its notice period")
        if self.min_schedule_interval_seconds > self.max_schedule_interval_seconds:
            raise ValueError("audit policy: the shortest schedule interval is longer than the longest")


# ---------------------------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class TakeOver:
    """The hub ended a session because a newer connection of it arrived (event ``session_taken_over``)."""

    device_id: str
    at: dt.datetime
    #: the address of the connection that ended
    old_address: str
    #: the address of the connection that took over (``None``: not said, as across hubs)
    new_address: str | None


@dataclass(frozen=True)
class Refusal:
    """A CONNECT the hub refused with a device's valid certificate (event ``client_id_mismatch``)."""

    device_id: str
    at: dt.datetime


@dataclass(frozen=True)
class DeviceCertificate:
    """An operational certificate of the tenant that has not expired."""

    serial: str
    device_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    #: the device's status is active (neither revoked nor quarantined)
    device_active: bool
    #: DER; empty when the shell did not need it (no key check)
    der: bytes = b""


@dataclass(frozen=True)
class Authority:
    """One of the tenant's CAs."""

    id: str
    kind: str  # root | issuing
    not_after: dt.datetime
    active: bool
    der: bytes


@dataclass(frozen=True)
class DeviceKey:
    device_id: str
    public_key: bytes  # DER SubjectPublicKeyInfo


@dataclass(frozen=True)
class TufRoot:
    """The newest version of the tenant's TUF root metadata."""

    version: int
    expires_at: dt.datetime


@dataclass(frozen=True)
class RunningComponent:
    """What a device last reported running (``device_updates.components``)."""

    device_id: str
    component_id: str
    version: str
    sha256: str


@dataclass(frozen=True)
class PublishedApp:
    """An application image of the tenant that some device runs, with its manifest (JSON)."""

    component_id: str
    version: str
    sha256: str
    manifest: str


@dataclass(frozen=True)
class OperatorRole:
    operator_id: str
    email: str
    role: str
    mfa_enabled: bool


@dataclass(frozen=True)
class AuditSnapshot:
    """What the checks judge; the shell fills in what the checks it runs need."""

    tenant_id: str
    now: dt.datetime
    takeovers: tuple[TakeOver, ...] = ()
    client_id_refusals: tuple[Refusal, ...] = ()
    certificates: tuple[DeviceCertificate, ...] = ()
    #: what the hubs said of the devices of revoked certificates: the serial each is connected with, or
    #: ``None`` (not connected); a device missing here was not answered for
    sessions: Mapping[str, str | None] = field(default_factory=dict)
    authorities: tuple[Authority, ...] = ()
    device_keys: tuple[DeviceKey, ...] = ()
    tuf_root: TufRoot | None = None
    running: tuple[RunningComponent, ...] = ()
    apps: tuple[PublishedApp, ...] = ()
    #: (component id, host, port) the proxies let through, from the baselines of the manifest window
    used_connections: frozenset[tuple[str, str, int]] = frozenset()
    #: devices that sent a baseline in the manifest window (what says use was reported at all)
    baseline_devices: frozenset[str] = frozenset()
    #: the shell read only the newest ``max_baselines`` of the window
    baselines_truncated: bool = False
    floors: Mapping[str, str] = field(default_factory=dict)
    operators: tuple[OperatorRole, ...] = ()


# ---------------------------------------------------------------------------------------------- the checks


def address_of(peer: str) -> str:
    """``10.0.0.1:5000`` → ``10.0.0.1``; ``::1:5000`` (how the hub writes IPv6 peers) → ``::1``."""
    host, separator, port = peer.strip().rpartition(":")
    return host.strip("[]") if separator and port.isdigit() else peer.strip()


def parse_takeover(detail: str) -> tuple[str | None, str | None]:
    """The (new, old) addresses in a ``session_taken_over`` event's detail:
    ``a newer connection of the same session took over: <new ip:port> (from <old ip:port>)``."""
    text, _, source = detail.rpartition(" (from ")
    old = address_of(source.removesuffix(")")) if source.endswith(")") and text else None
    _, colon, newer = (text or detail).partition("took over: ")
    new = address_of(newer) if colon and newer.strip() else None
    return new or None, old or None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def _short(device_id: str) -> str:
    return device_id[:16] + "…" if len(device_id) > 16 else device_id


def certificate_shared(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    since = snapshot.now - dt.timedelta(seconds=policy.window_seconds)
    by_device: dict[str, list[TakeOver]] = defaultdict(list)
    for takeover in snapshot.takeovers:
        if takeover.at >= since:
            by_device[takeover.device_id].append(takeover)
    findings = []
    for device_id, items in sorted(by_device.items()):
        items.sort(key=lambda item: item.at)
        # Each take-over moves the session from its old address to the new one; where a take-over does not
        # say the new address, the next one's old address is it.
        moves: list[tuple[dt.datetime, str, str]] = []
        for index, item in enumerate(items):
            new = item.new_address or (items[index + 1].old_address if index + 1 < len(items) else None)
            if new is not None and new != item.old_address:
                moves.append((item.at, item.old_address, new))
        worst = _worst_interval(moves, policy)
        if worst is not None:
            count, addresses, seconds = worst
            shown = ", ".join(sorted(addresses)[:4]) + (", …" if len(addresses) > 4 else "")
            findings.append(
                Finding(
                    Check.CERTIFICATE_SHARED,
                    AuditSeverity.CRITICAL,
                    SubjectKind.DEVICE,
                    device_id,
                    f"{count} session take-overs back and forth between {len(addresses)} addresses "
                    f"({shown}) within {_minutes(seconds)}: two clients hold this device's certificate; "
                    "revoke the device's certificates and have it attest again",
                )
            )
    return findings


def _worst_interval(
    moves: Sequence[tuple[dt.datetime, str, str]], policy: AuditPolicy
) -> tuple[int, set[str], float] | None:
    """The most take-overs within one interval that go back to an address they left, if enough."""
    best: tuple[int, set[str], float] | None = None
    limit = dt.timedelta(seconds=policy.takeover_interval_seconds)
    end = 0
    for start in range(len(moves)):
        end = max(end, start)
        while end + 1 < len(moves) and moves[end + 1][0] - moves[start][0] <= limit:
            end += 1
        window = moves[start : end + 1]
        path: list[str] = []
        for _at, old, new in window:
            for address in (old, new):
                if not path or path[-1] != address:
                    path.append(address)
        addresses = set(path)
        returned = len(path) > len(addresses)  # an address came back after another
        if (
            len(window) >= policy.min_takeovers
            and len(addresses) >= policy.min_takeover_addresses
            and returned
            and (best is None or len(window) > best[0])
        ):
            best = (len(window), addresses, (window[-1][0] - window[0][0]).total_seconds())
    return best


def conflicting_client_id(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    since = snapshot.now - dt.timedelta(seconds=policy.window_seconds)
    counts = Counter(item.device_id for item in snapshot.client_id_refusals if item.at >= since)
    return [
        Finding(
            Check.CONFLICTING_CLIENT_ID,
            AuditSeverity.HIGH,
            SubjectKind.DEVICE,
            device_id,
            f"{count} CONNECTs with this device's certificate refused within "
            f"{_minutes(policy.window_seconds)} because the MQTT client id was not the device id: a "
            "misconfigured client, or another one holding the certificate; find which and fix or revoke it",
        )
        for device_id, count in sorted(counts.items())
        if count >= policy.min_client_id_mismatches
    ]


def revoked_certificate_connected(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    findings = []
    for certificate in snapshot.certificates:
        if certificate.revoked_at is None or certificate.not_after <= snapshot.now:
            continue
        revoked = f"{certificate.revoked_at:%Y-%m-%d %H:%M} UTC"
        if certificate.device_id not in snapshot.sessions:
            findings.append(
                Finding(
                    Check.REVOKED_CERTIFICATE_CONNECTED,
                    AuditSeverity.MEDIUM,
                    SubjectKind.CERTIFICATE,
                    certificate.serial,
                    f"no hub answered whether device {_short(certificate.device_id)} is connected with this "
                    f"certificate (revoked {revoked}); run the audit again",
                )
            )
        elif snapshot.sessions[certificate.device_id] == certificate.serial:
            findings.append(
                Finding(
                    Check.REVOKED_CERTIFICATE_CONNECTED,
                    AuditSeverity.CRITICAL,
                    SubjectKind.CERTIFICATE,
                    certificate.serial,
                    f"device {_short(certificate.device_id)} is connected with this certificate, revoked "
                    f"{revoked}: its hub did not end the session; quarantine the device and check that every "
                    "hub follows the trust feed",
                )
            )
    return findings


def certificate_expiring(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    newest: dict[str, DeviceCertificate] = {}
    for certificate in snapshot.certificates:
        if not certificate.device_active or certificate.revoked_at is not None:
            continue
        known = newest.get(certificate.device_id)
        if known is None or certificate.not_before > known.not_before:
            newest[certificate.device_id] = certificate
    notice = dt.timedelta(seconds=policy.device_certificate_notice_seconds)
    findings = []
    for device_id, certificate in sorted(newest.items()):
        left = certificate.not_after - snapshot.now
        if dt.timedelta(0) < left <= notice:
            findings.append(
                Finding(
                    Check.CERTIFICATE_EXPIRING,
                    AuditSeverity.MEDIUM,
                    SubjectKind.DEVICE,
                    device_id,
                    f"its newest certificate ({certificate.serial}) expires in "
                    f"{_minutes(left.total_seconds())}: the device missed its daily attestation; check that "
                    "it is online and can reach the authority",
                )
            )
    return findings


def ca_expiring(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    findings = []
    for authority in snapshot.authorities:
        if not authority.active:
            continue
        days = (authority.not_after - snapshot.now).total_seconds() / 86400
        if days <= policy.ca_notice_days:
            severity = AuditSeverity.CRITICAL if days <= policy.ca_critical_days else AuditSeverity.HIGH
            when = f"expired {-days:.0f} days ago" if days < 0 else f"expires in {days:.0f} days"
            findings.append(
                Finding(
                    Check.CA_EXPIRING,
                    severity,
                    SubjectKind.CA,
                    authority.id,
                    f"the tenant's {authority.kind} CA {when} ({authority.not_after:%Y-%m-%d}): rotate it "
                    "before devices can no longer be issued certificates or verified",
                )
            )
    root = snapshot.tuf_root
    if root is not None:
        days = (root.expires_at - snapshot.now).total_seconds() / 86400
        if days <= policy.tuf_root_notice_days:
            severity = AuditSeverity.CRITICAL if days <= policy.tuf_root_critical_days else AuditSeverity.HIGH
            when = f"expired {-days:.0f} days ago" if days < 0 else f"expires in {days:.0f} days"
            findings.append(
                Finding(
                    Check.CA_EXPIRING,
                    severity,
                    SubjectKind.TUF_ROOT,
                    f"root v{root.version}",
                    f"the update repository's TUF root metadata {when} ({root.expires_at:%Y-%m-%d}): sign "
                    "a new root version with the offline root keys, or devices stop taking updates",
                )
            )
    return findings


def key_weakness(key: object, policy: AuditPolicy) -> str | None:
    """Why a public key is below policy, or ``None`` when it is not."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < policy.min_rsa_bits:
            return f"an RSA key of {key.key_size} bits (at least {policy.min_rsa_bits})"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in policy.allowed_curves:
            return f"an EC key on {key.curve.name} (allowed: {', '.join(sorted(policy.allowed_curves))})"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return f"a {type(key).__name__.removeprefix('_')} key (only RSA, EC and Ed25519 keys are allowed)"


def _public_key(der: bytes, *, certificate: bool) -> object:
    """The public key in a certificate or a SubjectPublicKeyInfo; ``ValueError`` if it cannot be read."""
    try:
        if certificate:
            return x509.load_der_x509_certificate(der).public_key()
        return serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(str(error)[:120] or type(error).__name__) from None


def _weak(der: bytes, *, certificate: bool, policy: AuditPolicy) -> str | None:
    try:
        return key_weakness(_public_key(der, certificate=certificate), policy)
    except ValueError as error:
        return f"a key that cannot be read ({error})"


def weak_key(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    # (subject kind, subject, whose key, severity, DER, a certificate rather than a SubjectPublicKeyInfo)
    keys: list[tuple[SubjectKind, str, str, AuditSeverity, bytes, bool]] = []
    keys.extend(
        (SubjectKind.CA, item.id, f"the {item.kind} CA's key", AuditSeverity.CRITICAL, item.der, True)
        for item in snapshot.authorities
        if item.not_after > snapshot.now
    )
    keys.extend(
        (
            SubjectKind.DEVICE,
            item.device_id,
            "the device's identity key",
            AuditSeverity.HIGH,
            item.public_key,
            False,
        )
        for item in snapshot.device_keys
    )
    keys.extend(
        (
            SubjectKind.CERTIFICATE,
            item.serial,
            f"the key of device {_short(item.device_id)}'s certificate",
            AuditSeverity.HIGH,
            item.der,
            True,
        )
        for item in snapshot.certificates
        if item.revoked_at is None and item.der
    )
    findings = []
    for kind, subject, whose, severity, der, certificate in keys:
        reason = _weak(der, certificate=certificate, policy=policy)
        if reason is not None:
            findings.append(
                Finding(
                    Check.WEAK_KEY,
                    severity,
                    kind,
                    subject,
                    f"{whose} is {reason}: replace it with a P-256 key",
                )
            )
    return findings


def _connection(host: str, port: int) -> AllowedConnection | None:
    try:
        return AllowedConnection.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except ValueError:
        return None


def _newest(apps: Iterable[PublishedApp]) -> PublishedApp:
    def order(app: PublishedApp) -> tuple[int, int, int, int]:
        try:
            return parse_version(app.version)
        except ValueError:
            return (-1, 0, 0, 0)

    return max(apps, key=order)


def manifest_broader_than_use(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    runners: dict[str, set[str]] = defaultdict(set)
    running_images: set[tuple[str, str]] = set()
    for item in snapshot.running:
        runners[item.component_id].add(item.device_id)
        running_images.add((item.component_id, item.sha256))
    used: dict[str, list[AllowedConnection]] = defaultdict(list)
    for component_id, host, port in snapshot.used_connections:
        connection = _connection(host, port)
        if connection is not None:
            used[component_id].append(connection)
    by_component: dict[str, list[PublishedApp]] = defaultdict(list)
    for app in snapshot.apps:
        if (app.component_id, app.sha256) in running_images:
            by_component[app.component_id].append(app)
    days = policy.manifest_window_seconds / 86400
    scope = f" (of the newest {policy.max_baselines} baselines)" if snapshot.baselines_truncated else ""
    findings = []
    for component_id, apps in sorted(by_component.items()):
        reporting = runners[component_id] & snapshot.baseline_devices
        if not reporting:
            continue  # nobody running it reported: no evidence either way
        newest = _newest(apps)
        unused: dict[str, str] = {}
        for app in apps:
            try:
                manifest = parse_manifest(app.manifest.encode("utf-8"))
            except InvalidInput:
                continue  # published images were checked when published; an unreadable one says nothing
            for entry in manifest.capabilities.allowed_connections:
                if not any(entry.allows(connection) for connection in used[component_id]):
                    unused.setdefault(str(entry), manifest.name)
        for entry_text, name in sorted(unused.items()):
            findings.append(
                Finding(
                    Check.MANIFEST_BROADER_THAN_USE,
                    AuditSeverity.LOW,
                    SubjectKind.COMPONENT,
                    component_id,
                    f"{name} (newest running {newest.version}) declares AllowedConnections {entry_text}, "
                    f"which none of the {len(reporting)} reporting devices running it connected to in "
                    f"{days:g} days{scope}; remove it from the manifest (least privilege)",
                )
            )
    return findings


def version_below_floor(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    findings = []
    for item in snapshot.running:
        floor = snapshot.floors.get(item.component_id)
        if floor is None:
            continue
        try:
            below = parse_version(item.version) < parse_version(floor)
        except ValueError:
            continue  # a floor or a report that is no version is refused where it is written
        if below:
            findings.append(
                Finding(
                    Check.VERSION_BELOW_FLOOR,
                    AuditSeverity.HIGH,
                    SubjectKind.DEVICE,
                    item.device_id,
                    f"runs component {item.component_id} {item.version}, below its security floor {floor}: "
                    "deploy a version at or above the floor to its group (attestation will refuse it)",
                )
            )
    return findings


def operator_without_mfa(snapshot: AuditSnapshot, policy: AuditPolicy) -> list[Finding]:
    return [
        Finding(
            Check.OPERATOR_WITHOUT_MFA,
            AuditSeverity.HIGH if operator.role == "Administrator" else AuditSeverity.MEDIUM,
            SubjectKind.OPERATOR,
            operator.email,
            f"holds the {operator.role} role in this tenant without MFA: ask them to enrol "
            "(fleetward operator mfa enroll), or remove the role",
        )
        for operator in sorted(snapshot.operators, key=lambda item: item.email)
        if not operator.mfa_enabled
    ]


CHECK_FUNCTIONS: Mapping[Check, Callable[[AuditSnapshot, AuditPolicy], list[Finding]]] = {
    Check.CERTIFICATE_SHARED: certificate_shared,
    Check.CONFLICTING_CLIENT_ID: conflicting_client_id,
    Check.REVOKED_CERTIFICATE_CONNECTED: revoked_certificate_connected,
    Check.CERTIFICATE_EXPIRING: certificate_expiring,
    Check.CA_EXPIRING: ca_expiring,
    Check.WEAK_KEY: weak_key,
    Check.MANIFEST_BROADER_THAN_USE: manifest_broader_than_use,
    Check.VERSION_BELOW_FLOOR: version_below_floor,
    Check.OPERATOR_WITHOUT_MFA: operator_without_mfa,
}


def select_checks(names: Collection[str] | None) -> tuple[Check, ...]:
    """The checks named (``None`` or none: all of them), in the order of :data:`CHECKS`; an unknown name is
    refused, naming the known ones."""
    if not names:
        return tuple(Check)
    if len(names) > 4 * len(CHECKS):
        raise InvalidInput(f"name at most {len(CHECKS)} checks", code="audit_check_unknown")
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise InvalidInput(
            f"unknown audit check {str(unknown[0])[:64]!r}; the checks are {', '.join(CHECKS)}",
            code="audit_check_unknown",
        )
    wanted = set(names)
    return tuple(check for check in Check if check.value in wanted)


def run_checks(snapshot: AuditSnapshot, checks: Iterable[Check], policy: AuditPolicy) -> tuple[Finding, ...]:
    """The findings of ``checks``, most severe first; past ``max_findings_per_check`` of one check, a last
    finding says how many more there were."""
    found: list[Finding] = []
    for check in checks:
        findings = sorted(
            CHECK_FUNCTIONS[check](snapshot, policy),
            key=lambda item: (SEVERITY_RANK[item.severity], item.subject_kind, item.subject_id, item.detail),
        )
        kept = findings[: policy.max_findings_per_check]
        found.extend(kept)
        if len(findings) > len(kept):
            found.append(
                Finding(
                    check,
                    kept[-1].severity,
                    SubjectKind.CHECK,
                    check.value,
                    f"{len(findings) - len(kept)} more findings of this check were left out (at most "
                    f"{policy.max_findings_per_check} are kept per run)",
                )
            )
    found.sort(key=lambda item: SEVERITY_RANK[item.severity])  # stable: each check's order stays
    return tuple(found)
