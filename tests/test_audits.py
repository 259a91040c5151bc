"""Audits: each check fires on its pattern and stays quiet just below it (the pure core, table-driven); the
shell over a real store with real certificates, tenant-scoped; the schedule claimed once by one of two
callers; the API and the CLI; and the hub's answer of which certificate a device is connected with."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fleetward.agent.baseline import BaselineCollector
from fleetward.agent.manifest import AllowedConnection, Capabilities, Manifest
from fleetward.agent.proxy import ConnectProxy
from fleetward.api import schemas
from fleetward.api.routes_audits import AuditCreate, AuditRunDetailPublic, AuditRunPublic
from fleetward.cli.main import app as cli_app
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services
from fleetward.errors import InvalidInput, NotFound, PermissionDenied
from fleetward.hub.routing import Answer
from fleetward.monitor.audit_service import (
    AuditRun,
    AuditService,
    AuditTrigger,
    BusSessionProbe,
    FakeSessionProbe,
    RunState,
    SessionProbe,
    run_schedules,
)
from fleetward.monitor.audits import (
    CHECKS,
    AuditPolicy,
    AuditSeverity,
    AuditSnapshot,
    Authority,
    Check,
    DeviceCertificate,
    DeviceKey,
    Finding,
    OperatorRole,
    PublishedApp,
    Refusal,
    RunningComponent,
    SubjectKind,
    TakeOver,
    TufRoot,
    parse_takeover,
    run_checks,
    select_checks,
)
from fleetward.monitor.reports import ReportStore, parse_report
from fleetward.registry.access import Principal
from fleetward.registry.models import Role
from fleetward.server import BackgroundServer
from fleetward.service_tls import ServiceTls
from fleetward.sim.fleet import SimulatedDevice
from fleetward.store import events as event_log
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import (
    certificate_authorities,
    certificates,
    device_updates,
    devices,
    images,
    operators,
    security_floors,
    tuf_metadata,
)
from fleetward.transport import trust
from fleetward.wire.baseline import AllowedConnection as UsedConnection
from fleetward.wire.baseline import SecurityBaseline
from tests.conftest import HubSetup, TenantSetup, healthy_software, make_tenant
from tests.waiting import eventually, wait_for

NOW = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
POLICY = AuditPolicy()
DEVICE = "d" * 64
OTHER = "e" * 64
APP = "2f1c6b0e-7a52-4d9b-9c1e-5b8f0a3d6e21"
APP_SHA = "ab" * 32


def at(minutes: float) -> dt.datetime:
    return NOW - dt.timedelta(minutes=minutes)


def judged(check: Check, snapshot: AuditSnapshot, policy: AuditPolicy = POLICY) -> list[Finding]:
    return list(run_checks(snapshot, [check], policy))


def snapshot(**values: object) -> AuditSnapshot:
    return AuditSnapshot(tenant_id="t", now=NOW, **values)  # type: ignore[arg-type]


# ============================================================================================ the pure checks


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (
            "a newer connection of the same session took over: 10.0.0.2:5001 (from 10.0.0.1:4000)",
            ("10.0.0.2", "10.0.0.1"),
        ),
        ("a newer connection of the same session took over: ::1:5001 (from ::2:4000)", ("::1", "::2")),
        ("a newer connection of the same device took over (from 10.0.0.1:4000)", (None, "10.0.0.1")),
        ("something else entirely", (None, None)),
    ],
)
def test_a_take_over_event_names_the_new_and_the_old_address(
    detail: str, expected: tuple[str | None, str | None]
) -> None:
    assert parse_takeover(detail) == expected


def takeovers(*moves: tuple[float, str, str | None], device: str = DEVICE) -> tuple[TakeOver, ...]:
    return tuple(TakeOver(device, at(minutes), old, new) for minutes, old, new in moves)


A, B, C, D = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"


@pytest.mark.parametrize(
    ("moves", "flagged"),
    [
        pytest.param([(50, A, B), (30, B, A), (10, A, B)], True, id="three-take-overs-back-and-forth"),
        pytest.param(
            [(50, A, B), (30, B, None), (10, A, B)], True, id="a-take-over-across-hubs-names-no-new"
        ),
        pytest.param([(30, B, A), (10, A, B)], False, id="two-take-overs-are-below-three"),
        pytest.param([(50, A, B)], False, id="a-device-that-moved-network-once"),
        pytest.param([(50, A, B), (30, B, C), (10, C, D)], False, id="moving-on-without-coming-back"),
        pytest.param(
            [(50, A, A), (30, A, A), (10, A, A), (5, A, A)], False, id="reconnects-from-one-address"
        ),
        pytest.param([(100, A, B), (50, B, A), (10, A, B)], False, id="spread-over-more-than-an-hour"),
        pytest.param(
            [(25 * 60, A, B), (24 * 60 + 30, B, A), (24 * 60 + 1, A, B)], False, id="before-the-window"
        ),
    ],
)
def test_a_certificate_is_shared_when_its_session_flips_between_addresses_within_an_hour(
    moves: list[tuple[float, str, str | None]], flagged: bool
) -> None:
    found = judged(Check.CERTIFICATE_SHARED, snapshot(takeovers=takeovers(*moves)))
    assert [(item.subject_id, item.severity) for item in found] == (
        [(DEVICE, AuditSeverity.CRITICAL)] if flagged else []
    )
    if flagged:
        assert "10.0.0.1, 10.0.0.2" in found[0].detail


@pytest.mark.parametrize(
    ("minutes", "flagged"),
    [([10, 20, 30], True), ([10, 20], False), ([10, 20, 25 * 60], False)],
)
def test_repeated_client_id_refusals_flag_the_device(minutes: list[float], flagged: bool) -> None:
    refusals = (*tuple(Refusal(DEVICE, at(value)) for value in minutes), Refusal(OTHER, at(1)))
    found = judged(Check.CONFLICTING_CLIENT_ID, snapshot(client_id_refusals=refusals))
    assert [item.subject_id for item in found] == ([DEVICE] if flagged else [])


def certificate(
    serial: str = "a1",
    *,
    device: str = DEVICE,
    issued_minutes_ago: float = 60,
    hours: float = 24,
    revoked: bool = False,
    active: bool = True,
    der: bytes = b"",
) -> DeviceCertificate:
    not_before = at(issued_minutes_ago)
    return DeviceCertificate(
        serial,
        device,
        not_before,
        not_before + dt.timedelta(hours=hours),
        at(5) if revoked else None,
        active,
        der,
    )


@pytest.mark.parametrize(
    ("held", "revoked", "expected"),
    [
        ({DEVICE: "a1"}, certificate(revoked=True), [("a1", AuditSeverity.CRITICAL)]),
        ({DEVICE: "b2"}, certificate(revoked=True), []),  # connected, but with another certificate
        ({DEVICE: None}, certificate(revoked=True), []),  # not connected: the hub ended it
        ({}, certificate(revoked=True), [("a1", AuditSeverity.MEDIUM)]),  # no answer: say so
        ({DEVICE: "a1"}, certificate(revoked=False), []),
        ({DEVICE: "a1"}, certificate(revoked=True, issued_minutes_ago=25 * 60), []),  # expired since
    ],
)
def test_a_revoked_certificate_is_reported_only_while_a_hub_holds_a_session_with_it(
    held: dict[str, str | None], revoked: DeviceCertificate, expected: list[tuple[str, AuditSeverity]]
) -> None:
    found = judged(Check.REVOKED_CERTIFICATE_CONNECTED, snapshot(certificates=(revoked,), sessions=held))
    assert [(item.subject_id, item.severity) for item in found] == expected


@pytest.mark.parametrize(
    ("owned", "flagged"),
    [
        pytest.param((certificate(issued_minutes_ago=22 * 60),), True, id="two-hours-left"),
        pytest.param((certificate(issued_minutes_ago=22 * 60 - 1),), False, id="two-hours-and-a-minute-left"),
        pytest.param((certificate(issued_minutes_ago=24 * 60 + 1),), False, id="expired-already"),
        pytest.param(
            (certificate("a1", issued_minutes_ago=23 * 60), certificate("b2", issued_minutes_ago=60)),
            False,
            id="renewed-since",
        ),
        pytest.param((certificate(issued_minutes_ago=23 * 60, active=False),), False, id="quarantined"),
        pytest.param((certificate(issued_minutes_ago=23 * 60, revoked=True),), False, id="revoked"),
    ],
)
def test_a_device_whose_newest_certificate_ends_within_two_hours_missed_its_attestation(
    owned: tuple[DeviceCertificate, ...], flagged: bool
) -> None:
    found = judged(Check.CERTIFICATE_EXPIRING, snapshot(certificates=owned))
    assert [(item.subject_id, item.severity) for item in found] == (
        [(DEVICE, AuditSeverity.MEDIUM)] if flagged else []
    )


def authority(days: float, *, kind: str = "issuing", active: bool = True, der: bytes = b"") -> Authority:
    return Authority("ca-1", kind, NOW + dt.timedelta(days=days), active, der)


@pytest.mark.parametrize(
    ("authorities", "root", "expected"),
    [
        ((authority(90),), None, [(SubjectKind.CA, AuditSeverity.HIGH)]),
        ((authority(90.01),), None, []),
        ((authority(30, kind="root"),), None, [(SubjectKind.CA, AuditSeverity.CRITICAL)]),
        ((authority(-3),), None, [(SubjectKind.CA, AuditSeverity.CRITICAL)]),
        ((authority(10, active=False),), None, []),  # rotated out
        ((), TufRoot(4, NOW + dt.timedelta(days=30)), [(SubjectKind.TUF_ROOT, AuditSeverity.HIGH)]),
        ((), TufRoot(4, NOW + dt.timedelta(days=30.01)), []),
        ((), TufRoot(4, NOW + dt.timedelta(days=7)), [(SubjectKind.TUF_ROOT, AuditSeverity.CRITICAL)]),
    ],
)
def test_cas_and_the_tuf_root_are_reported_as_their_end_nears(
    authorities: tuple[Authority, ...],
    root: TufRoot | None,
    expected: list[tuple[SubjectKind, AuditSeverity]],
) -> None:
    found = judged(Check.CA_EXPIRING, snapshot(authorities=authorities, tuf_root=root))
    assert [(item.subject_kind, item.severity) for item in found] == expected


def weak_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key the check must find


def spki(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_der(subject_key: object, *, serial: int = 0xA1) -> bytes:
    """A certificate for ``subject_key``'s public key, signed by a throwaway P-256 issuer."""
    issuer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(subject_key.public_key())  # type: ignore[attr-defined]
        .serial_number(serial)
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(hours=23))
        .sign(issuer, hashes.SHA256())
    )
    return built.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda: weak_rsa(), "an RSA key of 1024 bits", id="rsa-1024"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP192R1()), "an EC key on secp192r1", id="p-192"),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP256K1()), "an EC key on secp256k1", id="secp256k1"
        ),
        pytest.param(lambda: ed448.Ed448PrivateKey.generate(), "only RSA, EC and Ed25519", id="ed448"),
        pytest.param(lambda: dsa.generate_private_key(2048), "only RSA, EC and Ed25519", id="dsa"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), None, id="rsa-2048"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), None, id="p-256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), None, id="p-384"),
        pytest.param(lambda: ed25519.Ed25519PrivateKey.generate(), None, id="ed25519"),
    ],
)
def test_keys_below_policy_are_flagged_wherever_they_are(make: object, reason: str | None) -> None:
    key = make()  # type: ignore[operator]
    found = judged(
        Check.WEAK_KEY,
        snapshot(
            device_keys=(DeviceKey(DEVICE, spki(key)),),
            certificates=(certificate("c3", der=certificate_der(key)),),
        ),
    )
    if reason is None:
        assert found == []
        return
    assert [(item.subject_kind, item.subject_id) for item in found] == [
        (SubjectKind.CERTIFICATE, "c3"),
        (SubjectKind.DEVICE, DEVICE),
    ]
    assert all(reason in item.detail and item.severity is AuditSeverity.HIGH for item in found)


def test_a_weak_ca_key_is_critical_and_an_unreadable_key_is_reported_as_such() -> None:
    weak = weak_rsa()
    found = judged(
        Check.WEAK_KEY,
        snapshot(
            authorities=(authority(365, der=certificate_der(weak)),),
            device_keys=(DeviceKey(DEVICE, b"\x30\x03not a key"),),
        ),
    )
    assert [(item.subject_kind, item.severity) for item in found] == [
        (SubjectKind.CA, AuditSeverity.CRITICAL),
        (SubjectKind.DEVICE, AuditSeverity.HIGH),
    ]
    assert "cannot be read" in found[1].detail


def manifest(*connections: str, name: str = "panel-monitor") -> str:
    capabilities = Capabilities(
        allowed_connections=tuple(AllowedConnection.parse(entry) for entry in connections)
    )
    return (
        Manifest(name=name, component_id=APP, entry_point="bin/app", capabilities=capabilities)
        .to_json()
        .decode()
    )


@pytest.mark.parametrize(
    ("declared", "used", "reporting", "unused"),
    [
        (
            ("hub.example.com:8883", "api.example.com:443"),
            {("hub.example.com", 8883)},
            {DEVICE},
            ["api.example.com:443"],
        ),
        (("hub.example.com:8883",), {("hub.example.com", 8883)}, {DEVICE}, []),
        (("*.example.com",), {("eu.example.com", 443)}, {DEVICE}, []),
        (("*.example.com",), {("example.org", 443)}, {DEVICE}, ["*.example.com"]),
        (("10.0.0.5:502",), {("10.0.0.5", 502)}, {DEVICE}, []),
        (("hub.example.com:8883",), set(), {OTHER}, []),  # no device running it reported: no evidence
    ],
)
def test_a_manifest_declaring_destinations_no_device_used_is_reported_low(
    declared: tuple[str, ...], used: set[tuple[str, int]], reporting: set[str], unused: list[str]
) -> None:
    found = judged(
        Check.MANIFEST_BROADER_THAN_USE,
        snapshot(
            running=(
                RunningComponent(DEVICE, APP, "2.1.0", APP_SHA),
                RunningComponent(OTHER, "x", "1", "cd" * 32),
            ),
            apps=(PublishedApp(APP, "2.1.0", APP_SHA, manifest(*declared)),),
            used_connections=frozenset((APP, host, port) for host, port in used),
            baseline_devices=frozenset(reporting),
        ),
    )
    assert [item.detail.split("AllowedConnections ")[1].split(",")[0] for item in found] == unused
    assert all(item.severity is AuditSeverity.LOW and item.subject_id == APP for item in found)


@pytest.mark.parametrize(
    ("version", "floor", "flagged"),
    [("1.9.9", "2.0", True), ("2.0.0", "2.0", False), ("2.0.1", "2.0", False), ("10.0", "9.12", False)],
)
def test_a_device_running_a_component_below_its_floor_is_flagged(
    version: str, floor: str, flagged: bool
) -> None:
    found = judged(
        Check.VERSION_BELOW_FLOOR,
        snapshot(
            running=(RunningComponent(DEVICE, APP, version, APP_SHA),), floors={APP: floor, "other": "9"}
        ),
    )
    assert [(item.subject_id, item.severity) for item in found] == (
        [(DEVICE, AuditSeverity.HIGH)] if flagged else []
    )


def test_operators_without_mfa_are_high_for_administrators_and_medium_for_the_others() -> None:
    found = judged(
        Check.OPERATOR_WITHOUT_MFA,
        snapshot(
            operators=(
                OperatorRole("1", "ada@example.com", "Administrator", mfa_enabled=False),
                OperatorRole("2", "bob@example.com", "Reader", mfa_enabled=False),
                OperatorRole("3", "cy@example.com", "Administrator", mfa_enabled=True),
            )
        ),
    )
    assert [(item.subject_id, item.severity) for item in found] == [
        ("ada@example.com", AuditSeverity.HIGH),
        ("bob@example.com", AuditSeverity.MEDIUM),
    ]


def test_unknown_check_names_are_refused_naming_the_known_ones() -> None:
    assert select_checks(None) == tuple(Check)
    assert select_checks(["weak_key", "ca_expiring", "weak_key"]) == (Check.CA_EXPIRING, Check.WEAK_KEY)
    with pytest.raises(InvalidInput) as refused:
        select_checks(["weak_key", "bogus"])
    assert refused.value.code == "audit_check_unknown"
    assert "'bogus'" in refused.value.message
    assert all(name in refused.value.message for name in CHECKS)


def test_a_check_keeps_at_most_its_bound_of_findings_and_says_how_many_more() -> None:
    refusals = tuple(Refusal(f"{index:064x}", at(1)) for index in range(5) for _ in range(3))
    found = run_checks(
        snapshot(client_id_refusals=refusals),
        [Check.CONFLICTING_CLIENT_ID],
        AuditPolicy(max_findings_per_check=2),
    )
    assert [item.subject_kind for item in found] == [
        SubjectKind.DEVICE,
        SubjectKind.DEVICE,
        SubjectKind.CHECK,
    ]
    assert found[-1].detail.startswith("3 more findings")


def test_findings_are_one_bounded_line_and_come_most_severe_first() -> None:
    finding = Finding(
        Check.WEAK_KEY, AuditSeverity.LOW, SubjectKind.DEVICE, DEVICE, "two\nlines " + "x" * 900
    )
    assert "\n" not in finding.detail
    assert len(finding.detail) == 500
    found = run_checks(
        snapshot(
            operators=(OperatorRole("2", "bob@example.com", "Reader", mfa_enabled=False),),
            authorities=(authority(3),),
        ),
        [Check.OPERATOR_WITHOUT_MFA, Check.CA_EXPIRING],
        POLICY,
    )
    assert [item.severity for item in found] == [AuditSeverity.CRITICAL, AuditSeverity.MEDIUM]


@pytest.mark.parametrize(
    "values",
    [{"min_takeovers": 0}, {"max_rows": -1}, {"ca_critical_days": 100}, {"allowed_curves": ["secp256r1"]}],
)
def test_a_policy_with_a_bad_value_is_refused_when_built(values: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        AuditPolicy(**values)  # type: ignore[arg-type]


# ======================================================================================== the agent's part


async def test_the_proxy_hands_allowed_connections_to_the_baseline_and_blocked_ones_apart(
    tmp_path: Path,
) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "dev").write_text("Inter-|\n face |\n")
    collector = BaselineCollector(tmp_path)
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    declared = Capabilities(allowed_connections=(AllowedConnection.parse(f"127.0.0.1:{port}"),))
    proxy = ConnectProxy(APP, declared, on_blocked=collector.blocked, on_allowed=collector.allowed)
    async with proxy:
        proxy.start(socket.create_server(("127.0.0.1", 0)))
        for target in (f"127.0.0.1:{port}", f"127.0.0.1:{port}", "127.0.0.1:9"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            await reader.readuntil(b"\r\n\r\n")
            writer.close()
            await writer.wait_closed()
    server.close()
    await server.wait_closed()
    baseline = collector.report(dt.datetime.now(dt.UTC))
    assert baseline.allowed == (UsedConnection(component_id=APP, host="127.0.0.1", port=port, count=2),)
    assert [(item.host, item.port) for item in baseline.blocked] == [("127.0.0.1", 9)]
    kept = parse_report("security-baseline", baseline.model_dump_json().encode())
    assert SecurityBaseline.model_validate_json(kept.body).allowed == baseline.allowed
    assert collector.report(dt.datetime.now(dt.UTC)).allowed == ()


# ============================================================================================ the shell


def with_audits(services: Services, probe: SessionProbe, policy: AuditPolicy | None = None) -> Services:
    """The services with their audits asking ``probe`` which sessions are live."""
    audits = AuditService(services.database, services.clock, services.settings.limits, probe, policy=policy)
    return dataclasses.replace(services, audits=audits)


@pytest.fixture
def probe() -> FakeSessionProbe:
    return FakeSessionProbe()


@pytest.fixture
def audited(services: Services, probe: FakeSessionProbe) -> Services:
    return with_audits(services, probe)


@pytest.fixture
def audit_server(audited: Services) -> Iterator[BackgroundServer]:
    with BackgroundServer(audited, port=audited.settings.port) as running:
        yield running


@pytest.fixture
def operator_client(audit_server: BackgroundServer, admin_token: str) -> Iterator[FleetwardClient]:
    with FleetwardClient(audit_server.url, admin_token) as client:
        yield client


@pytest.fixture
def farm(operator_client: FleetwardClient) -> TenantSetup:
    return make_tenant(operator_client, "solar-farm")


@pytest.fixture
def lab(operator_client: FleetwardClient) -> TenantSetup:
    return make_tenant(operator_client, "micro-lab")


def enrolled(server: BackgroundServer, tenant: TenantSetup, name: str) -> SimulatedDevice:
    device = SimulatedDevice(name, healthy_software())
    tenant.claim(device)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            await device.enroll(server.url, http)

    asyncio.run(run())
    return device


def record_events(services: Services, *items: Event) -> None:
    with services.database.write() as connection:
        event_log.record(connection, items)


def hub_event(
    tenant_id: str, device_id: str, code: str, detail: str, minutes_ago: float, now: dt.datetime
) -> Event:
    return Event(
        at=now - dt.timedelta(minutes=minutes_ago),
        kind="hub",
        code=code,
        detail=detail,
        severity=Severity.WARNING,
        tenant_id=tenant_id,
        device_id=device_id,
    )


def taken_over(
    tenant_id: str, device_id: str, new: str, old: str, minutes_ago: float, now: dt.datetime
) -> Event:
    detail = f"a newer connection of the same session took over: {new}:40001 (from {old}:40002)"
    return hub_event(tenant_id, device_id, "session_taken_over", detail, minutes_ago, now)


def principal_of(services: Services, token: str) -> Principal:
    return services.registry.authenticate(token)


def seed_weak_material(database: Database, tenant_id: str, now: dt.datetime) -> tuple[str, str]:
    """A legacy device row with an RSA-1024 identity key, and a valid certificate on a P-192 key issued
    under the tenant's issuing CA: what the key check must find. Returns (device id, serial)."""
    weak = weak_rsa()
    device_id = hashlib.sha256(spki(weak)).hexdigest()
    p192 = ec.generate_private_key(ec.SECP192R1())
    serial = secrets.token_hex(8)
    with database.write() as connection:
        issuer = connection.execute(
            sa.select(certificate_authorities.c.id).where(
                certificate_authorities.c.tenant_id == tenant_id, certificate_authorities.c.kind == "issuing"
            )
        ).scalar_one()
        connection.execute(
            devices.insert().values(
                id=device_id, tenant_id=tenant_id, public_key=spki(weak), status="active", claimed_at=now
            )
        )
        connection.execute(
            certificates.insert().values(
                serial=serial,
                tenant_id=tenant_id,
                device_id=device_id,
                issuer_id=issuer,
                public_key_sha256=hashlib.sha256(spki(p192)).hexdigest(),
                not_before=now - dt.timedelta(hours=1),
                not_after=now + dt.timedelta(hours=23),
                der=certificate_der(p192, serial=int(serial, 16)),
            )
        )
    return device_id, serial


def seed_running_app(services: Services, tenant: TenantSetup, device_id: str, now: dt.datetime) -> None:
    """The device runs panel-monitor 2.1.0 (two destinations declared), below a floor of 2.2, and its
    baseline says it used one of the two."""
    with services.database.write() as connection:
        connection.execute(
            images.insert().values(
                id=str(secrets.token_hex(8)),
                tenant_id=tenant.id,
                product_id=tenant.product.id,
                component_id=APP,
                kind="app",
                version="2.1.0",
                sha256=APP_SHA,
                length=1,
                target_path=f"{APP}/2.1.0",
                publisher_signature=b"-",
                manifest=manifest("hub.example.com:8883", "api.example.com:443"),
                created_by="test",
                created_at=now,
            )
        )
        components = [{"component_id": APP, "version": "2.1.0", "sha256": APP_SHA}]
        connection.execute(
            device_updates.insert().values(
                tenant_id=tenant.id,
                device_id=device_id,
                assignment_version=0,
                state="installed",
                components=json.dumps(components),
            )
        )
        connection.execute(
            security_floors.insert().values(
                tenant_id=tenant.id, component=APP, minimum_version="2.2", updated_at=now
            )
        )
    baseline = SecurityBaseline(
        collected_at=now - dt.timedelta(minutes=1),
        interval_seconds=300,
        allowed=(UsedConnection(component_id=APP, host="hub.example.com", port=8883, count=4),),
    )
    ReportStore(services.database, services.clock).record(
        tenant.id, device_id, parse_report("security-baseline", baseline.model_dump_json().encode())
    )


def summary(detail_findings: object) -> set[tuple[str, str, str, str]]:
    return {
        (item.check, item.severity, item.subject_kind, item.subject_id)
        for item in detail_findings  # type: ignore[attr-defined]
    }


def test_an_audit_over_a_real_store_finds_each_pattern_of_its_tenant_and_nothing_of_another(
    audited: Services,
    audit_server: BackgroundServer,
    farm: TenantSetup,
    lab: TenantSetup,
    admin_token: str,
    probe: FakeSessionProbe,
    clock: FakeClock,
) -> None:
    shared, clean, elsewhere = (
        enrolled(audit_server, tenant, name)
        for tenant, name in ((farm, "panel-001"), (farm, "panel-002"), (lab, "room-001"))
    )
    now = clock.now()
    # panel-001's certificate is in two places at once; the lab's device shows the very same pattern
    for tenant, device in ((farm, shared), (lab, elsewhere)):
        record_events(
            audited,
            taken_over(tenant.id, device.device_id, B, A, 40, now),
            taken_over(tenant.id, device.device_id, A, B, 30, now),
            taken_over(tenant.id, device.device_id, B, A, 20, now),
            *(
                hub_event(tenant.id, device.device_id, "client_id_mismatch", "refused", 5, now)
                for _ in range(3)
            ),
        )
    # panel-002 moved network once: not shared
    record_events(audited, taken_over(farm.id, clean.device_id, B, A, 10, now))
    # panel-001's certificate is revoked, but a hub still holds a session with it
    revoked = farm.certificates(shared.device_id)[0].serial
    farm.client.post(
        f"/v1/tenants/{farm.id}/certificates/{revoked}/revoke",
        schemas.Revoke(reason="key_compromise"),
        schemas.CertificatePublic,
    )
    probe.sessions[(farm.id, shared.device_id)] = revoked
    probe.sessions[(lab.id, elsewhere.device_id)] = farm.certificates(shared.device_id)[0].serial
    weak_device, weak_serial = seed_weak_material(audited.database, farm.id, now)
    seed_running_app(audited, farm, clean.device_id, now)

    principal = principal_of(audited, admin_token)
    run = asyncio.run(audited.audits.run(principal, farm.id))
    assert run.state is RunState.FINISHED
    assert run.trigger is AuditTrigger.ON_DEMAND
    assert run.checks == CHECKS
    detail = audited.audits.get_run(principal, farm.id, run.id, limit=1000)
    found = summary(detail.findings)
    assert found == {
        ("certificate_shared", "critical", "device", shared.device_id),
        ("conflicting_client_id", "high", "device", shared.device_id),
        ("revoked_certificate_connected", "critical", "certificate", revoked),
        ("weak_key", "high", "device", weak_device),
        ("weak_key", "high", "certificate", weak_serial),
        ("manifest_broader_than_use", "low", "component", APP),
        ("version_below_floor", "high", "device", clean.device_id),
        ("operator_without_mfa", "high", "operator", "admin@example.com"),
    }
    assert "api.example.com:443" in next(item.detail for item in detail.findings if item.subject_id == APP)
    assert not any(elsewhere.device_id in item.subject_id + item.detail for item in detail.findings)
    assert probe.asked == [(farm.id, shared.device_id)]  # only the tenant's revoked certificates' devices
    assert (run.findings, run.counts.critical, run.counts.high, run.counts.low) == (8, 2, 5, 1)
    assert [item.severity for item in detail.findings][:2] == ["critical", "critical"]
    finished = [event for event in farm.events(kind="audit") if event.code == "audit_finished"]
    assert len(finished) == 1
    assert "8 findings (2 critical, 5 high, 0 medium, 1 low)" in finished[0].detail
    assert finished[0].actor == "admin@example.com"

    # the lab's own audit sees its device, never the farm's
    lab_run = asyncio.run(audited.audits.run(principal, lab.id, ["certificate_shared", "weak_key"]))
    lab_found = summary(audited.audits.get_run(principal, lab.id, lab_run.id).findings)
    assert lab_found == {("certificate_shared", "critical", "device", elsewhere.device_id)}
    with pytest.raises(NotFound):
        audited.audits.get_run(principal, lab.id, run.id)
    assert [item.id for item in audited.audits.list_runs(principal, farm.id)] == [run.id]

    # operators with MFA on are not reported
    with audited.database.write() as connection:
        connection.execute(operators.update().values(mfa_enabled_at=now))
    again = asyncio.run(audited.audits.run(principal, farm.id, ["operator_without_mfa"]))
    assert again.findings == 0
    assert again.checks == ("operator_without_mfa",)


def test_findings_page_by_id_and_a_run_that_fails_is_marked_failed(
    audited: Services, farm: TenantSetup, admin_token: str, clock: FakeClock
) -> None:
    now = clock.now()
    record_events(
        audited,
        *(
            hub_event(farm.id, f"{index:064x}", "client_id_mismatch", "refused", 1, now)
            for index in range(5)
            for _ in range(3)
        ),
    )
    principal = principal_of(audited, admin_token)
    run = asyncio.run(audited.audits.run(principal, farm.id, ["conflicting_client_id"]))
    first = audited.audits.get_run(principal, farm.id, run.id, limit=2)
    second = audited.audits.get_run(principal, farm.id, run.id, after_id=first.next_after_id, limit=2)
    third = audited.audits.get_run(principal, farm.id, run.id, after_id=second.next_after_id, limit=2)
    subjects = [item.subject_id for page in (first, second, third) for item in page.findings]
    assert subjects == [f"{index:064x}" for index in range(5)]
    assert third.next_after_id is None
    with pytest.raises(InvalidInput):
        audited.audits.get_run(principal, farm.id, run.id, limit=100_000)

    class Failing(FakeSessionProbe):
        async def connected_serial(self, tenant_id: str, device_id: str) -> str | None:
            raise RuntimeError("a bug, not a transport failure")

    broken = with_audits(audited, Failing()).audits
    seed_weak_material(audited.database, farm.id, now)
    with audited.database.write() as connection:
        connection.execute(certificates.update().values(revoked_at=now))
    clock.advance(1)
    with pytest.raises(RuntimeError):
        asyncio.run(broken.run(principal, farm.id, ["revoked_certificate_connected"]))
    assert audited.audits.list_runs(principal, farm.id)[0].state is RunState.FAILED


def test_the_expiry_checks_read_the_tenant_s_cas_its_tuf_root_and_its_devices_certificates(
    audited: Services,
    audit_server: BackgroundServer,
    farm: TenantSetup,
    admin_token: str,
    clock: FakeClock,
) -> None:
    device = enrolled(audit_server, farm, "panel-001")
    principal = principal_of(audited, admin_token)
    not_after = farm.certificates(device.device_id)[0].not_after

    def expiring() -> set[tuple[str, str, str, str]]:
        run = asyncio.run(audited.audits.run(principal, farm.id, ["certificate_expiring", "ca_expiring"]))
        return summary(audited.audits.get_run(principal, farm.id, run.id).findings)

    assert expiring() == set()
    clock.advance((not_after - clock.now()).total_seconds() - 2 * 3600 - 60)
    assert expiring() == set()
    clock.advance(120)
    assert expiring() == {("certificate_expiring", "medium", "device", device.device_id)}
    now = clock.now()
    with audited.database.write() as connection:
        root = connection.execute(
            certificate_authorities.update()
            .where(certificate_authorities.c.tenant_id == farm.id, certificate_authorities.c.kind == "root")
            .values(not_after=now + dt.timedelta(days=20))
            .returning(certificate_authorities.c.id)
        ).scalar_one()
        connection.execute(
            tuf_metadata.insert().values(
                tenant_id=farm.id,
                role="root",
                version=1000,
                body=b"{}",
                expires_at=now + dt.timedelta(days=25),
                created_at=now,
            )
        )
    assert expiring() == {
        ("certificate_expiring", "medium", "device", device.device_id),
        ("ca_expiring", "critical", "ca", root),
        ("ca_expiring", "high", "tuf_root", "root v1000"),
    }


async def test_a_schedule_runs_once_when_due_even_with_two_processes_calling_run_due(
    audited: Services, farm: TenantSetup, admin_token: str, clock: FakeClock
) -> None:
    principal = principal_of(audited, admin_token)
    schedule = audited.audits.set_schedule(principal, farm.id, 3600, ["operator_without_mfa"])
    assert schedule.next_run_at == clock.now() + dt.timedelta(hours=1)
    other_database = Database(audited.database.url.render_as_string(hide_password=False))
    other = AuditService(other_database, clock, audited.settings.limits, FakeSessionProbe())
    try:
        assert await audited.audits.run_due(clock.now()) == []
        clock.advance(3600)
        first, second = await asyncio.gather(audited.audits.run_due(clock.now()), other.run_due(clock.now()))
        assert len(first + second) == 1
        assert await audited.audits.run_due(clock.now()) == []
        assert await other.run_due(clock.now()) == []
        runs = audited.audits.list_runs(principal, farm.id)
        assert [(run.trigger, run.started_by, run.checks) for run in runs] == [
            (AuditTrigger.SCHEDULE, None, ("operator_without_mfa",))
        ]
        clock.advance(3 * 3600)  # missed runs are not caught up: one now, the next an interval on
        assert len(await other.run_due(clock.now())) == 1
        assert audited.audits.get_schedule(principal, farm.id).next_run_at == clock.now() + dt.timedelta(
            hours=1
        )
    finally:
        other_database.dispose()
    audited.audits.delete_schedule(principal, farm.id)
    with pytest.raises(NotFound):
        audited.audits.get_schedule(principal, farm.id)
    with pytest.raises(InvalidInput) as refused:
        audited.audits.set_schedule(principal, farm.id, 60)
    assert refused.value.code == "audit_interval_out_of_range"


async def test_the_schedule_loop_runs_what_is_due_once_until_cancelled(
    audited: Services, farm: TenantSetup, admin_token: str, clock: FakeClock
) -> None:
    principal = principal_of(audited, admin_token)
    audited.audits.set_schedule(principal, farm.id, 3600)
    clock.advance(3600)
    loop = asyncio.create_task(run_schedules(audited.audits, clock, every_seconds=0.02))

    async def runs() -> list[AuditRun]:
        return await asyncio.to_thread(audited.audits.list_runs, principal, farm.id)

    async def finished() -> list[AuditRun]:
        return [run for run in await runs() if run.state is RunState.FINISHED]

    try:
        await eventually(finished, what="the scheduled run")
        await asyncio.sleep(0.2)  # ten more rounds: nothing else is due
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert [(run.trigger, run.checks) for run in await runs()] == [(AuditTrigger.SCHEDULE, CHECKS)]


def test_the_api_refuses_unknown_checks_and_another_tenant_s_token_reads_no_runs(
    audited: Services,
    audit_server: BackgroundServer,
    operator_client: FleetwardClient,
    farm: TenantSetup,
    lab: TenantSetup,
    admin_token: str,
) -> None:
    with pytest.raises(InvalidInput) as refused:
        farm.client.post(
            f"/v1/tenants/{farm.id}/audits", AuditCreate(checks=["weak_key", "bogus"]), AuditRunPublic
        )
    assert refused.value.code == "audit_check_unknown"
    assert "'bogus'" in refused.value.message
    assert "operator_without_mfa" in refused.value.message
    run = farm.client.post(
        f"/v1/tenants/{farm.id}/audits", AuditCreate(checks=["operator_without_mfa"]), AuditRunPublic
    )
    assert (run.state, run.findings, run.counts.high) == ("finished", 1, 1)
    shown = farm.client.get(f"/v1/tenants/{farm.id}/audits/{run.id}", AuditRunDetailPublic)
    assert [(item.check, item.subject_id) for item in shown.findings] == [
        ("operator_without_mfa", "admin@example.com")
    ]
    assert [item.id for item in farm.client.get_list(f"/v1/tenants/{farm.id}/audits", AuditRunPublic)] == [
        run.id
    ]

    admin = principal_of(audited, admin_token)
    _bob, bob_token = audited.registry.create_operator(admin, "bob@example.com", "Bob")
    audited.registry.assign_role(
        principal_of(audited, admin_token), lab.id, "bob@example.com", Role.ADMINISTRATOR
    )
    with FleetwardClient(audit_server.url, bob_token) as bob:
        for path in (f"/v1/tenants/{farm.id}/audits", f"/v1/tenants/{farm.id}/audits/{run.id}"):
            with pytest.raises(PermissionDenied):
                bob.get(path, AuditRunDetailPublic)
        with pytest.raises(NotFound):
            bob.get(f"/v1/tenants/{lab.id}/audits/{run.id}", AuditRunDetailPublic)
        with pytest.raises(PermissionDenied):
            bob.post(f"/v1/tenants/{farm.id}/audits", AuditCreate(), AuditRunPublic)
        assert bob.get_list(f"/v1/tenants/{lab.id}/audits", AuditRunPublic) == []


def test_the_cli_runs_lists_shows_and_schedules_audits(
    audit_server: BackgroundServer, farm: TenantSetup, admin_token: str, tmp_path: Path
) -> None:
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    env["FLEETWARD_CLI_CONFIG"] = str(tmp_path / "cli.json")
    options = ["--url", audit_server.url, "--token", admin_token, "--tenant", farm.id]

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli_app, [*options, *args], env=env)
        assert result.exit_code == code, f"{args}: {result.output}{result.exception!r}"
        return result.stdout

    shown = " ".join(
        run("audit", "run", "--check", "operator_without_mfa").split()
    )  # as wrapped for 80 columns
    assert "1 findings: 0 critical, 1 high" in shown
    assert "admin@example.com" in shown
    runs = json.loads(run("--json", "audit", "list"))
    assert [(item["trigger"], item["findings"]) for item in runs] == [("on_demand", 1)]
    detail = json.loads(run("--json", "audit", "show", runs[0]["id"]))
    assert [item["subject_id"] for item in detail["findings"]] == ["admin@example.com"]
    schedule = json.loads(run("--json", "audit", "schedule", "--every", "24h", "--check", "weak_key"))
    assert (schedule["interval_seconds"], schedule["checks"]) == (86400, ["weak_key"])
    assert "weak_key" in run("audit", "schedule")
    run("audit", "schedule", "--off")
    refused = CliRunner().invoke(cli_app, [*options, "audit", "run", "--check", "bogus"], env=env)
    assert isinstance(refused.exception, InvalidInput)
    assert refused.exception.code == "audit_check_unknown"
    run("audit", "schedule", "--every", "soon", code=1)


# ======================================================================================== the hub's answer


def test_the_hub_s_state_answer_carries_the_serial_and_an_older_hub_s_answer_still_reads() -> None:
    answer = Answer(connected=True, serial="a1b2c3")
    assert Answer.decode(answer.encode()) == answer
    older = json.loads(Answer(connected=True).encode())
    del older["serial"]
    assert Answer.decode(json.dumps(older).encode()) == Answer(connected=True)
    with pytest.raises(ValueError, match="serial"):
        Answer.decode(Answer(connected=True, serial="not hex").encode())


@pytest.fixture
def audited_hub(hub_services: Services, tmp_path: Path, service_tls: ServiceTls) -> Iterator[HubSetup]:
    """The ``hub`` fixture's server, with audits asking the real hub over the bus."""
    services = with_audits(hub_services, BusSessionProbe(hub_services.bus, hub_services.settings.limits))
    _operator, token = services.registry.bootstrap("admin@example.com", "Admin")
    with (
        BackgroundServer(services, port=services.settings.port) as server,
        FleetwardClient(server.url, token, ca_file=service_tls.ca_file) as client,
    ):
        yield HubSetup(services, server, service_tls, token, make_tenant(client), tmp_path)


async def test_the_hub_says_a_revoked_certificate_is_connected_only_while_it_is(
    audited_hub: HubSetup,
) -> None:
    hub = audited_hub
    tenant = hub.tenant
    device = SimulatedDevice("panel-001", healthy_software())
    await asyncio.to_thread(tenant.claim, device)
    async with httpx.AsyncClient(verify=trust(hub.tls.ca_file), timeout=30) as http:
        await device.enroll(hub.server.url, http)
        old_serial = (await asyncio.to_thread(tenant.certificates, device.device_id))[0].serial
        await device.enroll(hub.server.url, http)  # renewed: a second certificate, a new serial

    def revoked_connected() -> list[str]:
        run = tenant.client.post(
            f"/v1/tenants/{tenant.id}/audits",
            AuditCreate(checks=["revoked_certificate_connected"]),
            AuditRunPublic,
        )
        shown = tenant.client.get(f"/v1/tenants/{tenant.id}/audits/{run.id}", AuditRunDetailPublic)
        return [f"{item.severity} {item.subject_id}" for item in shown.findings]

    def revoke_quietly(serial: str) -> None:
        """Revoked in the store only: no trust change, as if the hubs had missed it."""
        with hub.services.database.write() as connection:
            connection.execute(
                certificates.update()
                .where(certificates.c.serial == serial)
                .values(revoked_at=hub.services.clock.now())
            )

    # the hub's take-over event names both addresses, as the certificate_shared check reads them
    with contextlib.suppress(aiomqtt.MqttError):  # the first connection is ended under its feet
        async with hub.mqtt(device), hub.mqtt(device):
            pass
    takeover = await asyncio.to_thread(
        wait_for,
        lambda: [event for event in hub.hub_events() if event.code == "session_taken_over"],
        "the take-over event",
    )
    assert parse_takeover(takeover[0].detail) == ("127.0.0.1", "127.0.0.1")

    serials = {item.serial for item in await asyncio.to_thread(tenant.certificates, device.device_id)}
    new_serial = (serials - {old_serial}).pop()
    await asyncio.to_thread(revoke_quietly, old_serial)
    async with hub.mqtt(device):
        # connected, but with the new certificate: the revoked one holds no session
        assert await asyncio.to_thread(revoked_connected) == []
        await asyncio.to_thread(revoke_quietly, new_serial)
        assert await asyncio.to_thread(revoked_connected) == [f"critical {new_serial}"]
    # disconnected: no hub holds the device any more (nobody answers on its subject)
    await asyncio.to_thread(wait_for, lambda: revoked_connected() == [], "the session to end")
