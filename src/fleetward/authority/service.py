"""The authority's shell: CA hierarchies, enrollment batches, revocation, CRLs and reference values.

Enrollment is the hot path. The API checks what needs no stored state (``prepare``), then hands the
request to a batcher; :meth:`AuthorityService.process_enrollments` redeems the nonces, reads the devices
and the tenants' reference values, judges, signs and records a whole batch in one transaction.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from fleetward.authority import attestation, ca
from fleetward.authority.keystore import KeyStore
from fleetward.authority.nonces import Nonce, NonceCodec
from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import (
    AttestationRefused,
    Conflict,
    FleetwardError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from fleetward.registry.access import Principal
from fleetward.registry.models import DeviceStatus, Scope
from fleetward.registry.service import device_in
from fleetward.store import events as event_log
from fleetward.store import trust
from fleetward.store.database import Database
from fleetward.store.events import Event, EventBudget, Severity
from fleetward.store.parallel import ParallelMap
from fleetward.store.schema import (
    certificate_authorities,
    certificates,
    consumed_nonces,
    device_health,
    devices,
    reference_values,
    security_floors,
)
from fleetward.store.trust import TrustBell, TrustChange, TrustKind
from fleetward.wire.evidence import EnrollmentRequest, EnrollmentResponse, Measurement
from fleetward.wire.identity import check_device_id, load_public_key
from fleetward.wire.versions import check_version


class CaKind(StrEnum):
    ROOT = "root"
    ISSUING = "issuing"


class RevocationReason(StrEnum):
    """Why a certificate is revoked; the names of RFC 5280's reason codes."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key_compromise"
    AFFILIATION_CHANGED = "affiliation_changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation_of_operation"


@dataclass(frozen=True)
class Refusal:
    """A request refused before it reached the store; recorded with the next batch."""

    error: FleetwardError
    device_id: str | None
    #: the nonce the refused request presented, if it was a valid one: it is spent all the same
    nonce: Nonce | None = None


#: What the enrollment batcher carries: a parsed request to judge, or a refusal to record.
EnrollmentWork = EnrollmentRequest | Refusal


@dataclass(frozen=True)
class _Draft:
    """A signed certificate not yet recorded: it is answered only if the transaction confirms it."""

    nonce: Nonce
    answer: EnrollmentResponse
    row: dict[str, object]
    restricted: bool = False

    @property
    def device_id(self) -> str:
        return self.answer.device_id


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    tenant_id: str
    device_id: str
    issuer_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    pem: str


@dataclass(frozen=True)
class CaCertificate:
    id: str
    kind: CaKind
    active: bool
    not_after: dt.datetime
    pem: str


@dataclass(frozen=True)
class ReferenceValue:
    component: str
    version: str
    sha256: str


@dataclass(frozen=True)
class SecurityFloor:
    component: str
    minimum_version: str


@dataclass(frozen=True)
class _TenantIssuer:
    issuer: ca.Issuer
    chain_pem: tuple[str, str]


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


class AuthorityService:
    """Certificates for devices that prove who they are and what they run."""

    def __init__(
        self,
        database: Database,
        keystore: KeyStore,
        clock: Clock,
        limits: Limits,
        public_url: str,
        trust_bell: TrustBell | None = None,
    ) -> None:
        self._db = database
        self._keys = keystore
        self._clock = clock
        self._limits = limits
        self._public_url = public_url.rstrip("/")
        self._codec = NonceCodec(
            keystore.derive("attestation nonce"), dt.timedelta(seconds=limits.nonce_ttl_seconds)
        )
        self._issuers: dict[str, _TenantIssuer] = {}
        self._verifiers = ParallelMap(os.cpu_count() or 1, name="verifier")
        # A device id is the hash of its key, so a parsed key never goes stale.
        self._identity_key = functools.lru_cache(maxsize=65536)(load_public_key)
        self._lock = threading.Lock()
        self._device_events = EventBudget(limits.refusal_events_per_device_per_minute)
        self._unattributed_events = EventBudget(limits.unattributed_refusal_events_per_minute)
        #: Rung after a revocation commits: the hub ends the sessions it no longer trusts.
        self.trust_bell = trust_bell or TrustBell()

    # ---------------------------------------------------------------- hierarchy

    def crl_url(self, tenant_id: str, kind: CaKind = CaKind.ISSUING) -> str:
        suffix = "" if kind is CaKind.ISSUING else "/root"
        return f"{self._public_url}/v1/tenants/{tenant_id}/crl{suffix}"

    def ensure_hierarchy(self, tenant_id: str) -> None:
        """Create the tenant's root and issuing CA unless they exist."""
        with self._db.write() as connection:
            self._issuer(connection, tenant_id)
        self.trust_bell.ring()  # the hub trusts the new CA at once

    def _issuer(self, connection: Connection, tenant_id: str) -> _TenantIssuer:
        """The tenant's issuing CA, created with its root if the tenant has none yet."""
        cached = self._issuers.get(tenant_id)
        if cached is not None:
            return cached
        with self._lock:
            rows = self._active_cas(connection, tenant_id)
            created = CaKind.ISSUING not in rows
            if created:
                self._create_hierarchy(connection, tenant_id)
                rows = self._active_cas(connection, tenant_id)
            loaded = self._load_issuer(tenant_id, rows[CaKind.ROOT], rows[CaKind.ISSUING])
            if not created:  # cache only what is committed: this transaction may still roll back
                self._issuers[tenant_id] = loaded
            return loaded

    @staticmethod
    def _active_cas(connection: Connection, tenant_id: str) -> dict[str, Any]:
        return {
            row.kind: row
            for row in connection.execute(
                sa.select(certificate_authorities).where(
                    certificate_authorities.c.tenant_id == tenant_id,
                    certificate_authorities.c.active.is_(True),
                )
            )
        }

    def _load_issuer(self, tenant_id: str, root_row: Any, issuing_row: Any) -> _TenantIssuer:
        root = x509.load_der_x509_certificate(root_row.certificate)
        certificate = x509.load_der_x509_certificate(issuing_row.certificate)
        key = self._keys.unseal(issuing_row.sealed_key, _key_label(tenant_id, issuing_row.id))
        issuer = ca.Issuer(
            id=issuing_row.id,
            tenant_id=tenant_id,
            key=key,
            certificate=certificate,
            root=root,
            crl_url=self.crl_url(tenant_id),
        )
        return _TenantIssuer(issuer, (_pem(certificate), _pem(root)))

    def _create_hierarchy(self, connection: Connection, tenant_id: str) -> None:
        now = self._clock.now()
        root_id, issuing_id = str(uuid.uuid4()), str(uuid.uuid4())
        root_key = ec.generate_private_key(ec.SECP384R1())
        root = ca.build_root_ca(
            root_key, tenant_id, now, dt.timedelta(days=self._limits.root_ca_validity_days)
        )
        issuing_key = ec.generate_private_key(ec.SECP256R1())
        issuing = ca.build_issuing_ca(
            root_key,
            root,
            issuing_key,
            tenant_id,
            now,
            dt.timedelta(days=self._limits.issuing_ca_validity_days),
            self.crl_url(tenant_id, CaKind.ROOT),
        )
        crl_validity = dt.timedelta(seconds=self._limits.crl_validity_seconds)
        for ca_id, kind, certificate, key in (
            (root_id, CaKind.ROOT, root, root_key),
            (issuing_id, CaKind.ISSUING, issuing, issuing_key),
        ):
            crl = ca.build_crl(key, certificate, [], 1, now, crl_validity)
            connection.execute(
                certificate_authorities.insert().values(
                    id=ca_id,
                    tenant_id=tenant_id,
                    kind=kind.value,
                    certificate=certificate.public_bytes(serialization.Encoding.DER),
                    sealed_key=self._keys.seal(key, _key_label(tenant_id, ca_id)),
                    not_after=certificate.not_valid_after_utc,
                    active=True,
                    crl_number=1,
                    crl=crl.public_bytes(serialization.Encoding.DER),
                    created_at=now,
                )
            )
        event_log.record(
            connection,
            [
                Event(
                    at=now,
                    kind="authority",
                    code="hierarchy_created",
                    detail="root CA (P-384) and issuing CA (P-256) created; keys sealed at rest",
                    tenant_id=tenant_id,
                )
            ],
        )

    def chain_pem(self, principal: Principal, tenant_id: str) -> list[str]:
        """The issuing CA then the root CA, PEM."""
        principal.require(tenant_id, Scope.READ)
        with self._db.write() as connection:
            return list(self._issuer(connection, tenant_id).chain_pem)

    def ca_certificates(self, principal: Principal, tenant_id: str) -> list[CaCertificate]:
        principal.require(tenant_id, Scope.READ)
        self.ensure_hierarchy(tenant_id)
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(certificate_authorities)
                .where(certificate_authorities.c.tenant_id == tenant_id)
                .order_by(certificate_authorities.c.created_at, certificate_authorities.c.kind)
            ).all()
        return [
            CaCertificate(
                id=row.id,
                kind=CaKind(row.kind),
                active=row.active,
                not_after=row.not_after,
                pem=_pem(x509.load_der_x509_certificate(row.certificate)),
            )
            for row in rows
        ]

    def proof_of_possession(
        self, principal: Principal, tenant_id: str, verification_code: str, kind: CaKind
    ) -> str:
        """A certificate with CN = ``verification_code`` signed by the tenant's root or issuing CA."""
        principal.require(tenant_id, Scope.ADMIN)
        code = verification_code.strip()
        if not 1 <= len(code) <= 64 or not code.isalnum():
            raise InvalidInput("a verification code is 1 to 64 letters and digits")
        with self._db.write() as connection:
            self._issuer(connection, tenant_id)
            row = connection.execute(
                sa.select(certificate_authorities).where(
                    certificate_authorities.c.tenant_id == tenant_id,
                    certificate_authorities.c.kind == kind.value,
                    certificate_authorities.c.active.is_(True),
                )
            ).one()
            key = self._keys.unseal(row.sealed_key, _key_label(tenant_id, row.id))
            certificate = x509.load_der_x509_certificate(row.certificate)
            proof = ca.build_proof_of_possession(key, certificate, code, self._clock.now())
            event_log.record(
                connection,
                [
                    Event(
                        at=self._clock.now(),
                        kind="authority",
                        code="proof_of_possession",
                        detail=f"proof-of-possession certificate signed by the {kind.value} CA",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
        return _pem(proof)

    # ---------------------------------------------------------------- attestation

    def issue_nonce(self, device_id: str) -> Nonce:
        """A challenge for ``device_id``. Costs no storage: see ``nonces.py``."""
        try:
            check_device_id(device_id)
        except ValueError as error:
            raise InvalidInput(str(error), code="device_id_malformed") from None
        return self._codec.issue(device_id, self._clock.now())

    def prepare(self, request: EnrollmentRequest) -> attestation.PreparedEnrollment:
        """Checks that need no store; raises :class:`AttestationRefused`."""
        return attestation.prepare(request, self._codec, self._clock.now(), self._limits)

    def parse_enrollment(self, body: bytes) -> EnrollmentRequest:
        """An enrollment request from JSON bytes, or :class:`InvalidInput` saying what is wrong."""
        if len(body) > self._limits.max_request_bytes:
            raise PayloadTooLarge(f"the request is larger than {self._limits.max_request_bytes} bytes")
        try:
            return EnrollmentRequest.model_validate_json(body)
        except ValidationError as error:
            raise InvalidInput(
                f"the enrollment request is malformed: {_first_problem(error)}",
                code="enrollment_malformed",
            ) from None

    def process_enrollments(
        self, batch: Sequence[EnrollmentWork]
    ) -> list[EnrollmentResponse | FleetwardError]:
        """Check, judge, sign and record a batch. One answer per item, in order.

        Runs on the batcher's thread. The checks and the signing happen outside the write transaction,
        so that several worker processes (or nodes on PostgreSQL) sign side by side; the transaction
        only redeems the nonces, confirms each device is still in good standing, and records. Signature
        checks release the GIL, so they run on the verifier threads.
        """
        now = self._clock.now()
        work = self._verifiers.map_all(lambda item: self._prepared_or_refused(item, now), batch)
        with self._db.read() as connection:
            standings = self._standings(connection, {item.device_id for item in work if item.device_id})
            policies = {
                tenant_id: self._policy(connection, tenant_id)
                for tenant_id in {standing.tenant_id for standing in standings.values()}
            }
        judged = self._verifiers.map_all(
            lambda item: self._judged(item, standings.get(item.device_id or ""), policies), work
        )
        drafts = [
            item if isinstance(item, Refusal) else self._draft(item, standings[item.device_id], now)
            for item in judged
        ]
        with self._db.write() as connection:
            drafts = self._refuse_replays(connection, drafts)
            drafts = self._refuse_fallen(connection, drafts)
            answers: list[EnrollmentResponse | FleetwardError] = []
            recorded: list[Event] = []
            issued_rows: list[dict[str, object]] = []
            for draft in drafts:
                if isinstance(draft, Refusal):
                    standing = standings.get(draft.device_id or "")
                    tenant_id = standing.tenant_id if standing else None
                    if self._refusal_events_allowed(draft.device_id, tenant_id, now):
                        recorded.append(self._refusal_event(now, draft.error, draft.device_id, tenant_id))
                    answers.append(draft.error)
                    continue
                issued = draft.answer
                issued_rows.append(draft.row)
                recorded.append(
                    Event(
                        at=now,
                        kind="attestation",
                        code="certificate_issued",
                        detail=f"certificate {issued.serial} issued until {issued.not_after.isoformat()}"
                        + (" (for remediation: the device is restricted)" if draft.restricted else ""),
                        tenant_id=issued.tenant_id,
                        device_id=issued.device_id,
                    )
                )
                answers.append(issued)
            if issued_rows:
                connection.execute(certificates.insert(), issued_rows)
                connection.execute(
                    devices.update()
                    .where(devices.c.id == sa.bindparam("device"))
                    .values(last_attested_at=now),
                    [{"device": row["device_id"]} for row in issued_rows],
                )
            event_log.record(connection, recorded)
        return answers

    def _refuse_fallen(
        self, connection: Connection, drafts: list[_Draft | Refusal]
    ) -> list[_Draft | Refusal]:
        """Refuse what was judged on a standing that changed since: revoked (or released) meanwhile.

        On PostgreSQL the device rows stay locked until commit, so a revocation cannot slip in between.
        """
        wanted = sorted({draft.device_id for draft in drafts if isinstance(draft, _Draft)})
        if not wanted:
            return drafts
        current = {
            row.id: (row.tenant_id, row.status)
            for row in connection.execute(
                sa.select(devices.c.id, devices.c.tenant_id, devices.c.status)
                .where(devices.c.id.in_(wanted))
                .with_for_update()
            )
        }
        checked: list[_Draft | Refusal] = []
        for draft in drafts:
            standing = current.get(draft.device_id)
            if isinstance(draft, _Draft) and (
                standing is None
                or standing[0] != draft.answer.tenant_id
                or standing[1] == DeviceStatus.REVOKED.value
            ):
                fallen = AttestationRefused("the device is revoked", code="device_revoked")
                checked.append(Refusal(fallen, draft.device_id))
                continue
            checked.append(draft)
        return checked

    def _refuse_replays(
        self, connection: Connection, drafts: list[_Draft | Refusal]
    ) -> list[_Draft | Refusal]:
        """Redeem each valid nonce presented, refused request or not; refuse those redeemed before.

        "Before" includes earlier in this batch: the first request to present a nonce spends it.
        """
        fresh = self._redeem(connection, [draft.nonce for draft in drafts if draft.nonce is not None])
        checked: list[_Draft | Refusal] = []
        for draft in drafts:
            if isinstance(draft, _Draft) and draft.nonce.nonce_id not in fresh:
                replayed = AttestationRefused(
                    "the nonce was already used; ask for a new one", code="nonce_replayed"
                )
                checked.append(Refusal(replayed, draft.device_id))
                continue
            if draft.nonce is not None:
                fresh.discard(draft.nonce.nonce_id)
            checked.append(draft)
        return checked

    @staticmethod
    def _judged(
        item: attestation.PreparedEnrollment | Refusal,
        standing: attestation.DeviceStanding | None,
        policies: dict[str, attestation.ReferencePolicy],
    ) -> attestation.PreparedEnrollment | Refusal:
        if isinstance(item, Refusal):
            return item
        policy = policies[standing.tenant_id] if standing else attestation.ReferencePolicy()
        try:
            attestation.judge(item, standing, policy)
        except AttestationRefused as refused:
            return Refusal(refused, item.device_id, item.nonce)
        return item

    def _draft(
        self, accepted: attestation.PreparedEnrollment, standing: attestation.DeviceStanding, now: dt.datetime
    ) -> _Draft:
        """Sign the operational certificate: the answer, and the row that will record it."""
        tenant_issuer = self._signing_issuer(standing.tenant_id)
        serial = x509.random_serial_number()
        certificate = ca.issue_operational_certificate(
            tenant_issuer.issuer,
            accepted.csr_public_key,
            accepted.device_id,
            serial,
            now,
            # conditional access: a restricted device gets a certificate only long enough to remediate
            dt.timedelta(
                seconds=self._limits.remediation_certificate_seconds
                if standing.restricted
                else self._limits.certificate_validity_seconds
            ),
            dt.timedelta(seconds=self._limits.certificate_backdate_seconds),
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        row: dict[str, object] = {
            "serial": f"{serial:x}",
            "tenant_id": standing.tenant_id,
            "device_id": accepted.device_id,
            "issuer_id": tenant_issuer.issuer.id,
            "public_key_sha256": accepted.request.evidence.csr_key_sha256,
            "not_before": not_before,
            "not_after": not_after,
            "der": der,
        }
        answer = EnrollmentResponse(
            device_id=accepted.device_id,
            tenant_id=standing.tenant_id,
            serial=f"{serial:x}",
            certificate=ca.der_to_pem(der),
            chain=list(tenant_issuer.chain_pem),
            not_before=not_before,
            not_after=not_after,
            renew_after=now + (not_after - now) / 2,
        )
        return _Draft(accepted.nonce, answer, row, standing.restricted)

    def _signing_issuer(self, tenant_id: str) -> _TenantIssuer:
        cached = self._issuers.get(tenant_id)
        if cached is not None:
            return cached
        with self._db.write() as connection:  # rare: the tenant's first enrollment since start
            return self._issuer(connection, tenant_id)

    def _prepared_or_refused(
        self, item: EnrollmentWork, now: dt.datetime
    ) -> attestation.PreparedEnrollment | Refusal:
        if isinstance(item, Refusal):
            return item
        try:
            return attestation.prepare(item, self._codec, now, self._limits)
        except AttestationRefused as refused:
            evidence = item.evidence
            try:  # a valid nonce is spent by any request that presents it, whatever the verdict
                nonce: Nonce | None = self._codec.open(evidence.nonce, evidence.device_id, now)
            except AttestationRefused:
                nonce = None
            return Refusal(refused, evidence.device_id, nonce)

    def _standings(
        self, connection: Connection, device_ids: set[str]
    ) -> dict[str, attestation.DeviceStanding]:
        if not device_ids:
            return {}
        rows = connection.execute(
            sa.select(
                devices.c.id,
                devices.c.tenant_id,
                devices.c.public_key,
                devices.c.status,
                device_health.c.restricted,
            )
            .outerjoin(device_health, device_health.c.device_id == devices.c.id)
            .where(devices.c.id.in_(sorted(device_ids)))
        )
        return {
            row.id: attestation.DeviceStanding(
                device_id=row.id,
                tenant_id=row.tenant_id,
                identity_key=self._identity_key(bytes(row.public_key)),
                revoked=row.status == DeviceStatus.REVOKED.value,
                restricted=row.status == DeviceStatus.QUARANTINED.value or bool(row.restricted),
            )
            for row in rows
        }

    def _redeem(self, connection: Connection, nonces: list[Nonce]) -> set[str]:
        """Record the nonces as used; return the ids that were not used before."""
        wanted = {nonce.nonce_id: nonce.expires_at for nonce in nonces}
        if not wanted:
            return set()
        # One cached statement, executed many: SQLAlchemy batches the rows and gathers RETURNING.
        statement = self._db.insert_or_ignore(consumed_nonces).returning(consumed_nonces.c.nonce_id)
        rows = connection.execute(
            statement, [{"nonce_id": key, "expires_at": value} for key, value in wanted.items()]
        )
        return {row.nonce_id for row in rows}

    def _policy(self, connection: Connection, tenant_id: str) -> attestation.ReferencePolicy:
        references = frozenset(
            (row.component, row.version, row.sha256)
            for row in connection.execute(
                sa.select(
                    reference_values.c.component,
                    reference_values.c.version,
                    reference_values.c.sha256,
                ).where(reference_values.c.tenant_id == tenant_id)
            )
        )
        floors = {
            row.component: row.minimum_version
            for row in connection.execute(
                sa.select(security_floors.c.component, security_floors.c.minimum_version).where(
                    security_floors.c.tenant_id == tenant_id
                )
            )
        }
        return attestation.ReferencePolicy(references=references, floors=floors)

    def _refusal_events_allowed(self, device_id: str | None, tenant_id: str | None, now: dt.datetime) -> bool:
        """Within budget: per claimed device, and all together for requests no tenant claims (a stranger
        can make up any number of device ids)."""
        if tenant_id is None:
            return self._unattributed_events.allow("unattributed", now)
        return self._device_events.allow(device_id or "", now)

    @staticmethod
    def _refusal_event(
        now: dt.datetime, error: FleetwardError, device_id: str | None, tenant_id: str | None
    ) -> Event:
        return Event(
            at=now,
            kind="attestation",
            code=error.code,
            detail=f"refused: {error.message}",
            severity=Severity.WARNING,
            tenant_id=tenant_id,
            device_id=device_id,
        )

    def close(self) -> None:
        self._verifiers.close()

    def purge_expired_nonces(self) -> int:
        """Forget redeemed nonces that have expired anyway; returns how many."""
        with self._db.write() as connection:
            result = connection.execute(
                consumed_nonces.delete().where(consumed_nonces.c.expires_at < self._clock.now())
            )
        return int(result.rowcount)

    # ---------------------------------------------------------------- revocation

    def revoke_device(
        self,
        principal: Principal,
        tenant_id: str,
        device_id: str,
        reason: RevocationReason = RevocationReason.UNSPECIFIED,
    ) -> int:
        """Refuse the device any new certificate and revoke those it holds. Returns how many."""
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        with self._db.write() as connection:
            device = device_in(connection, tenant_id, device_id)
            if device.status is DeviceStatus.REVOKED:
                raise Conflict("the device is already revoked", code="already_revoked")
            connection.execute(
                devices.update()
                .where(devices.c.id == device.id, devices.c.tenant_id == tenant_id)
                .values(status=DeviceStatus.REVOKED.value, revoked_at=now)
            )
            count = self._revoke_certificates(
                connection,
                tenant_id,
                sa.and_(certificates.c.device_id == device.id, certificates.c.not_after > now),
                reason,
                now,
            )
            trust.record(connection, [TrustChange(tenant_id, device.id, TrustKind.DEVICE_REVOKED, now)])
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="revocation",
                        code="device_revoked",
                        detail=f"device revoked ({reason.value}); {count} certificate(s) revoked",
                        severity=Severity.WARNING,
                        tenant_id=tenant_id,
                        device_id=device.id,
                        actor=principal.email,
                    )
                ],
            )
        self.trust_bell.ring()
        return count

    def revoke_certificate(
        self,
        principal: Principal,
        tenant_id: str,
        serial: str,
        reason: RevocationReason = RevocationReason.UNSPECIFIED,
    ) -> CertificateRecord:
        principal.require(tenant_id, Scope.WRITE)
        serial = serial.lower().removeprefix("0x")
        now = self._clock.now()
        with self._db.write() as connection:
            record = self._certificate_in(connection, tenant_id, serial)
            if record.revoked_at is not None:
                raise Conflict("the certificate is already revoked", code="already_revoked")
            self._revoke_certificates(connection, tenant_id, certificates.c.serial == serial, reason, now)
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="revocation",
                        code="certificate_revoked",
                        detail=f"certificate {serial} revoked ({reason.value})",
                        severity=Severity.WARNING,
                        tenant_id=tenant_id,
                        device_id=record.device_id,
                        actor=principal.email,
                    )
                ],
            )
            revoked = self._certificate_in(connection, tenant_id, serial)
        self.trust_bell.ring()
        return revoked

    def revoke_held_certificates(
        self, connection: Connection, tenant_id: str, device_id: str, actor: str, reason: str
    ) -> int:
        """Revoke every certificate the device holds now, in the caller's transaction (a playbook's
        action): its sessions end, and it must attest again for a new one. The caller rings the bell."""
        now = self._clock.now()
        count = self._revoke_certificates(
            connection,
            tenant_id,
            sa.and_(certificates.c.device_id == device_id, certificates.c.not_after > now),
            RevocationReason.KEY_COMPROMISE,
            now,
        )
        event_log.record(
            connection,
            [
                Event(
                    at=now,
                    kind="revocation",
                    code="certificate_revoked",
                    detail=f"{count} certificate(s) revoked: {reason}"[:2000],
                    severity=Severity.WARNING,
                    tenant_id=tenant_id,
                    device_id=device_id,
                    actor=actor,
                )
            ],
        )
        return count

    def _revoke_certificates(
        self,
        connection: Connection,
        tenant_id: str,
        condition: Any,
        reason: RevocationReason,
        now: dt.datetime,
    ) -> int:
        where = sa.and_(certificates.c.tenant_id == tenant_id, certificates.c.revoked_at.is_(None), condition)
        revoked = connection.execute(
            sa.select(certificates.c.serial, certificates.c.device_id, certificates.c.issuer_id).where(where)
        ).all()
        connection.execute(
            certificates.update().where(where).values(revoked_at=now, revocation_reason=reason.value)
        )
        for issuer_id in {row.issuer_id for row in revoked}:
            self._regenerate_crl(connection, tenant_id, issuer_id, now)
        trust.record(
            connection,
            [
                TrustChange(tenant_id, row.device_id, TrustKind.CERTIFICATE_REVOKED, now, serial=row.serial)
                for row in revoked
            ],
        )
        return len(revoked)

    def _regenerate_crl(self, connection: Connection, tenant_id: str, ca_id: str, now: dt.datetime) -> bytes:
        row = connection.execute(
            sa.select(certificate_authorities).where(
                certificate_authorities.c.tenant_id == tenant_id,
                certificate_authorities.c.id == ca_id,
            )
        ).one()
        key = self._keys.unseal(row.sealed_key, _key_label(tenant_id, row.id))
        certificate = x509.load_der_x509_certificate(row.certificate)
        entries: Iterable[ca.RevokedEntry] = ()
        if row.kind == CaKind.ISSUING:
            # An expired certificate is refused anyway: the CRL lists only those still valid.
            entries = [
                ca.RevokedEntry(
                    serial=int(entry.serial, 16),
                    revoked_at=entry.revoked_at,
                    reason=x509.ReasonFlags[entry.revocation_reason],
                )
                for entry in connection.execute(
                    sa.select(
                        certificates.c.serial,
                        certificates.c.revoked_at,
                        certificates.c.revocation_reason,
                    ).where(
                        certificates.c.issuer_id == ca_id,
                        certificates.c.revoked_at.is_not(None),
                        certificates.c.not_after > now,
                    )
                )
            ]
        number = int(row.crl_number) + 1
        crl = ca.build_crl(
            key,
            certificate,
            entries,
            number,
            now,
            dt.timedelta(seconds=self._limits.crl_validity_seconds),
        )
        der = crl.public_bytes(serialization.Encoding.DER)
        connection.execute(
            certificate_authorities.update()
            .where(certificate_authorities.c.id == ca_id)
            .values(crl_number=number, crl=der)
        )
        return der

    def crl_der(self, tenant_id: str, kind: CaKind = CaKind.ISSUING) -> bytes:
        """The tenant's current CRL (public), re-signed once half its validity has passed."""
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(certificate_authorities.c.id, certificate_authorities.c.crl).where(
                    certificate_authorities.c.tenant_id == tenant_id,
                    certificate_authorities.c.kind == kind.value,
                    certificate_authorities.c.active.is_(True),
                )
            ).first()
        if row is None:
            raise NotFound("no such tenant, or it has no CA yet", code="crl_not_found")
        now = self._clock.now()
        half = dt.timedelta(seconds=self._limits.crl_validity_seconds / 2)
        if row.crl is not None:
            next_update = x509.load_der_x509_crl(row.crl).next_update_utc
            if next_update is not None and next_update - now > half:
                return bytes(row.crl)
        with self._db.write() as connection:
            return self._regenerate_crl(connection, tenant_id, row.id, now)

    # ---------------------------------------------------------------- certificates

    def list_certificates(
        self, principal: Principal, tenant_id: str, device_id: str | None = None, limit: int = 100
    ) -> list[CertificateRecord]:
        principal.require(tenant_id, Scope.READ)
        statement = sa.select(certificates).where(certificates.c.tenant_id == tenant_id)
        if device_id is not None:
            statement = statement.where(certificates.c.device_id == device_id)
        limit = max(1, min(limit, self._limits.max_list_items))
        with self._db.read() as connection:
            rows = connection.execute(statement.order_by(certificates.c.not_before.desc()).limit(limit)).all()
        return [_certificate_record(row) for row in rows]

    def get_certificate(self, principal: Principal, tenant_id: str, serial: str) -> CertificateRecord:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return self._certificate_in(connection, tenant_id, serial.lower().removeprefix("0x"))

    @staticmethod
    def _certificate_in(connection: Connection, tenant_id: str, serial: str) -> CertificateRecord:
        row = connection.execute(
            sa.select(certificates).where(
                certificates.c.tenant_id == tenant_id, certificates.c.serial == serial
            )
        ).first()
        if row is None:
            raise NotFound("no such certificate in this tenant", code="certificate_not_found")
        return _certificate_record(row)

    # ---------------------------------------------------------------- reference values

    def add_reference_values(
        self, principal: Principal, tenant_id: str, values: Sequence[ReferenceValue]
    ) -> int:
        """Register what devices of the tenant may run. Returns how many were new."""
        principal.require(tenant_id, Scope.WRITE)
        if not values or len(values) > self._limits.max_list_items:
            raise InvalidInput(f"register 1 to {self._limits.max_list_items} reference values at a time")
        checked = [_checked_reference(value) for value in values]
        now = self._clock.now()
        with self._db.write() as connection:
            before = self._count_references(connection, tenant_id)
            connection.execute(
                self._db.insert_or_ignore(reference_values),
                [
                    {
                        "tenant_id": tenant_id,
                        "component": value.component,
                        "version": value.version,
                        "sha256": value.sha256,
                        "created_at": now,
                    }
                    for value in checked
                ],
            )
            added = self._count_references(connection, tenant_id) - before
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="reference_value",
                        code="added",
                        detail=f"{added} reference value(s) registered: "
                        + ", ".join(f"{v.component} {v.version}" for v in checked[:10]),
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
        return added

    @staticmethod
    def _count_references(connection: Connection, tenant_id: str) -> int:
        return int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(reference_values)
                .where(reference_values.c.tenant_id == tenant_id)
            ).scalar_one()
        )

    def list_reference_values(
        self, principal: Principal, tenant_id: str, component: str | None = None
    ) -> list[ReferenceValue]:
        principal.require(tenant_id, Scope.READ)
        statement = sa.select(reference_values).where(reference_values.c.tenant_id == tenant_id)
        if component is not None:
            statement = statement.where(reference_values.c.component == component)
        with self._db.read() as connection:
            rows = connection.execute(
                statement.order_by(reference_values.c.component, reference_values.c.version).limit(
                    self._limits.max_list_items
                )
            ).all()
        return [ReferenceValue(row.component, row.version, row.sha256) for row in rows]

    def remove_reference_value(self, principal: Principal, tenant_id: str, value: ReferenceValue) -> None:
        principal.require(tenant_id, Scope.DELETE)
        with self._db.write() as connection:
            result = connection.execute(
                reference_values.delete().where(
                    reference_values.c.tenant_id == tenant_id,
                    reference_values.c.component == value.component,
                    reference_values.c.version == value.version,
                    reference_values.c.sha256 == value.sha256,
                )
            )
            if result.rowcount == 0:
                raise NotFound("no such reference value", code="reference_value_not_found")
            event_log.record(
                connection,
                [
                    Event(
                        at=self._clock.now(),
                        kind="reference_value",
                        code="removed",
                        detail=f"reference value {value.component} {value.version} removed",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )

    def set_floor(
        self, principal: Principal, tenant_id: str, component: str, minimum_version: str
    ) -> SecurityFloor:
        """Refuse attestation of ``component`` below ``minimum_version`` from now on."""
        principal.require(tenant_id, Scope.WRITE)
        reference = _checked_reference(ReferenceValue(component, minimum_version, "0" * 64))
        now = self._clock.now()
        with self._db.write() as connection:
            connection.execute(
                security_floors.delete().where(
                    security_floors.c.tenant_id == tenant_id,
                    security_floors.c.component == reference.component,
                )
            )
            connection.execute(
                security_floors.insert().values(
                    tenant_id=tenant_id,
                    component=reference.component,
                    minimum_version=reference.version,
                    updated_at=now,
                )
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="security_floor",
                        code="set",
                        detail=f"{reference.component} must be at least {reference.version}",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
        return SecurityFloor(reference.component, reference.version)

    def list_floors(self, principal: Principal, tenant_id: str) -> list[SecurityFloor]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(security_floors)
                .where(security_floors.c.tenant_id == tenant_id)
                .order_by(security_floors.c.component)
            ).all()
        return [SecurityFloor(row.component, row.minimum_version) for row in rows]


def _key_label(tenant_id: str, ca_id: str) -> str:
    return f"tenant:{tenant_id}:ca:{ca_id}"


def _checked_reference(value: ReferenceValue) -> ReferenceValue:
    try:
        measurement = Measurement(name=value.component, version=value.version, sha256=value.sha256)
    except ValidationError as error:
        raise InvalidInput(f"reference value refused: {_first_problem(error)}") from None
    check_version(measurement.version)
    return ReferenceValue(measurement.name, measurement.version, measurement.sha256)


def _first_problem(error: ValidationError) -> str:
    problem = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in problem["loc"]) or "body"
    return f"{where}: {problem['msg']}"


def _certificate_record(row: Any) -> CertificateRecord:
    return CertificateRecord(
        serial=row.serial,
        tenant_id=row.tenant_id,
        device_id=row.device_id,
        issuer_id=row.issuer_id,
        not_before=row.not_before,
        not_after=row.not_after,
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
        pem=_pem(x509.load_der_x509_certificate(row.der)),
    )
