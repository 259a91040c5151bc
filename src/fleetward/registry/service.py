"""The registry's shell: reads and writes tenants, operators, tokens, products, groups and devices.

Authorization is decided by the caller through ``Principal.require`` (the API does it per route); every
query here is scoped by the tenant it is given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Connection, Row

from fleetward.authority.keystore import KeyStore
from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import (
    ConfigurationError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from fleetward.registry import mfa
from fleetward.registry.access import Principal, format_scopes, parse_scopes
from fleetward.registry.models import (
    DEFAULT_GROUPS,
    ApiToken,
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Device,
    DeviceGroup,
    DeviceStatus,
    Operator,
    OsFeed,
    Product,
    Role,
    RoleAssignment,
    Scope,
    Tenant,
    UpdatePolicy,
)
from fleetward.store import events as event_log
from fleetward.store import trust
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import (
    api_tokens,
    device_groups,
    devices,
    operators,
    products,
    role_assignments,
    tenants,
)
from fleetward.store.schema import events as event_rows
from fleetward.store.trust import TrustBell, TrustChange, TrustKind
from fleetward.wire.identity import check_device_id, device_id_for, load_public_key
from fleetward.wire.identity import public_key_der as spki_der

_TOKEN = re.compile(r"^fwt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}$")


def _new_id() -> str:
    return str(uuid.uuid4())


def _secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


#: what the key that seals operators' TOTP secrets is derived for (KeyStore.derive)
_MFA_KEY_PURPOSE = "operator mfa v1"
MFA_ISSUER = "fleetward"


def _mfa_label(operator_id: str) -> str:
    """The associated data of an operator's sealed TOTP state: it opens for that operator only."""
    return f"operator {operator_id}"


class RegistryService:
    """Tenants, operators, roles, tokens, products, device groups and devices."""

    def __init__(
        self,
        database: Database,
        clock: Clock,
        limits: Limits,
        trust_bell: TrustBell | None = None,
        keystore: KeyStore | None = None,
    ) -> None:
        self._db = database
        self._clock = clock
        self._limits = limits
        self._trust_bell = trust_bell or TrustBell()
        #: seals operators' TOTP secrets; without it, operator MFA is unavailable
        self._keystore = keystore

    # ---------------------------------------------------------------- validation

    def _name(self, text: str, what: str) -> str:
        if not isinstance(text, str):
            raise InvalidInput(f"the {what} must be text")
        name = text.strip()
        if not name:
            raise InvalidInput(f"the {what} must not be empty")
        if len(name) > self._limits.max_name_chars:
            raise InvalidInput(f"the {what} is longer than {self._limits.max_name_chars} characters")
        if not name.isprintable():
            raise InvalidInput(f"the {what} contains control characters")
        return name

    def _description(self, text: str) -> str:
        if len(text) > self._limits.max_description_chars:
            raise InvalidInput(
                f"the description is longer than {self._limits.max_description_chars} characters"
            )
        return text

    # ---------------------------------------------------------------- operators and tokens

    def bootstrap(self, email: str, name: str) -> tuple[Operator, str]:
        """Create the first operator, allowed to create tenants, and its first token.

        Refused once any operator exists: later operators are created by an authenticated one.
        """
        with self._db.write() as connection:
            if connection.execute(sa.select(operators.c.id).limit(1)).first() is not None:
                raise Conflict("fleetward already has operators", code="already_initialised")
            operator = self._insert_operator(connection, email, name, can_create_tenants=True)
            _token, secret = self._insert_token(
                connection, operator.id, None, "bootstrap", frozenset(Scope), None
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=self._clock.now(),
                        kind="operator",
                        code="bootstrapped",
                        detail=f"first operator {operator.email} created",
                        actor=operator.email,
                    )
                ],
            )
        return operator, secret

    def create_operator(
        self, principal: Principal, email: str, name: str, can_create_tenants: bool = False
    ) -> tuple[Operator, str]:
        """Create an operator and a first unrestricted token (every scope) for them to start from.

        The token reaches only tenants where the new operator is given a role.
        """
        principal.require_tenant_creation()
        with self._db.write() as connection:
            operator = self._insert_operator(connection, email, name, can_create_tenants)
            event_log.record(
                connection,
                [
                    Event(
                        at=operator.created_at,
                        kind="operator",
                        code="created",
                        detail=f"operator {operator.email} created"
                        + (" (may create tenants)" if can_create_tenants else ""),
                        actor=principal.email,
                    )
                ],
            )
            _token, secret = self._insert_token(
                connection,
                operator.id,
                None,
                "first token",
                frozenset(Scope),
                self._clock.now() + dt.timedelta(days=self._limits.token_max_validity_days),
            )
        return operator, secret

    def _insert_operator(
        self, connection: Connection, email: str, name: str, can_create_tenants: bool
    ) -> Operator:
        email = email.strip().lower()
        if not _EMAIL.match(email):
            raise InvalidInput("the email address is not valid")
        if connection.execute(sa.select(operators.c.id).where(operators.c.email == email)).first():
            raise Conflict(f"an operator with email {email} exists", code="operator_exists")
        operator = Operator(
            id=_new_id(),
            email=email,
            name=self._name(name, "operator name"),
            can_create_tenants=can_create_tenants,
            created_at=self._clock.now(),
        )
        values = {key: value for key, value in operator.__dict__.items() if key != "mfa_enabled"}
        connection.execute(operators.insert().values(**values))
        return operator

    def list_operators(self, principal: Principal) -> list[Operator]:
        principal.require_tenant_creation()
        with self._db.read() as connection:
            rows = connection.execute(sa.select(operators).order_by(operators.c.email)).all()
        return [_operator(row) for row in rows]

    def create_token(
        self,
        principal: Principal,
        name: str,
        tenant_id: str | None,
        scopes: frozenset[Scope] | str,
        valid_days: int | None = None,
        *,
        for_email: str | None = None,
        mfa_code: str | None = None,
    ) -> tuple[ApiToken, str]:
        """A new token, never broader nor longer-lived than the caller's own token.

        For the caller, or (``for_email``) for another operator: only operators who may create tenants
        may do that, so that someone whose tokens all expired can be given a new one. A caller whose MFA
        is on gives a current TOTP code (``mfa_code``), whoever the token is for.
        """
        if for_email is not None:
            principal.require_tenant_creation()
        try:
            wanted = parse_scopes(scopes) if isinstance(scopes, str) else scopes
        except ValueError as error:
            raise InvalidInput(str(error), code="invalid_scope") from None
        if not wanted <= principal.token_scopes:
            raise InvalidInput(
                "a new token cannot carry scopes the current one lacks", code="scope_escalation"
            )
        if principal.token_tenant_id is not None and tenant_id != principal.token_tenant_id:
            raise InvalidInput(
                "a tenant-restricted token can only create tokens for the same tenant",
                code="scope_escalation",
            )
        if tenant_id is not None and for_email is None:
            principal.require(tenant_id, Scope.READ)
        days = valid_days or self._limits.token_max_validity_days
        if not 0 < days <= self._limits.token_max_validity_days:
            raise InvalidInput(f"a token is valid for 1 to {self._limits.token_max_validity_days} days")
        expires_at = self._clock.now() + dt.timedelta(days=days)
        if principal.token_expires_at is not None and expires_at > principal.token_expires_at:
            if valid_days is not None:
                raise InvalidInput("a new token cannot outlive the current one", code="scope_escalation")
            expires_at = principal.token_expires_at  # by default, as long as the current one allows
        self._require_second_factor(principal, mfa_code, "creating a token")
        with self._db.write() as connection:
            owner_id = principal.operator_id
            if for_email is not None:
                owner = connection.execute(
                    sa.select(operators.c.id).where(operators.c.email == for_email.strip().lower())
                ).first()
                if owner is None:
                    raise NotFound(f"no operator with email {for_email}", code="operator_not_found")
                owner_id = owner.id
            token, secret = self._insert_token(
                connection, owner_id, tenant_id, self._name(name, "token name"), wanted, expires_at
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=token.created_at,
                        kind="token",
                        code="created",
                        detail=f"token {token.id} ({format_scopes(wanted)}) "
                        f"for {for_email or principal.email}",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            return token, secret

    def _insert_token(
        self,
        connection: Connection,
        operator_id: str,
        tenant_id: str | None,
        name: str,
        scopes: frozenset[Scope],
        expires_at: dt.datetime | None,
    ) -> tuple[ApiToken, str]:
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        token = ApiToken(
            id=token_id,
            operator_id=operator_id,
            tenant_id=tenant_id,
            name=name,
            scopes=scopes,
            created_at=self._clock.now(),
            expires_at=expires_at,
            revoked_at=None,
        )
        connection.execute(
            api_tokens.insert().values(
                id=token.id,
                operator_id=operator_id,
                tenant_id=tenant_id,
                name=name,
                scopes=format_scopes(scopes),
                secret_sha256=_secret_sha256(secret),
                created_at=token.created_at,
                expires_at=expires_at,
            )
        )
        return token, f"fwt_{token_id}_{secret}"

    def list_tokens(self, principal: Principal) -> list[ApiToken]:
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(api_tokens)
                .where(api_tokens.c.operator_id == principal.operator_id)
                .order_by(api_tokens.c.created_at)
            ).all()
        return [_token(row) for row in rows]

    def revoke_token(self, principal: Principal, token_id: str) -> None:
        """Revoke one of the caller's tokens: itself with any scope, another only with the 'admin' scope."""
        if token_id != principal.token_id and Scope.ADMIN not in principal.token_scopes:
            raise PermissionDenied(
                "revoking another of your tokens needs a token with the 'admin' scope",
                code="token_scope_missing",
            )
        with self._db.write() as connection:
            result = connection.execute(
                api_tokens.update()
                .where(
                    api_tokens.c.id == token_id,
                    api_tokens.c.operator_id == principal.operator_id,
                    api_tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=self._clock.now())
            )
            if result.rowcount == 0:
                raise NotFound("you have no active token with that id", code="token_not_found")
            event_log.record(
                connection,
                [
                    Event(
                        at=self._clock.now(),
                        kind="token",
                        code="revoked",
                        detail=f"token {token_id} revoked",
                        actor=principal.email,
                    )
                ],
            )

    def authenticate(self, token_text: str) -> Principal:
        """The principal behind a bearer token; ``Unauthenticated`` for anything not a live token."""
        match = _TOKEN.match(token_text)
        if match is None:
            raise Unauthenticated("the API token is malformed", code="token_malformed")
        token_id, secret = match.groups()
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(api_tokens, operators.c.email, operators.c.can_create_tenants)
                .join(operators, operators.c.id == api_tokens.c.operator_id)
                .where(api_tokens.c.id == token_id)
            ).first()
            if row is None or not hmac.compare_digest(row.secret_sha256, _secret_sha256(secret)):
                raise Unauthenticated("the API token is not valid", code="token_invalid")
            if row.revoked_at is not None:
                raise Unauthenticated("the API token was revoked", code="token_revoked")
            if row.expires_at is not None and row.expires_at <= self._clock.now():
                raise Unauthenticated("the API token has expired", code="token_expired")
            roles = {
                assignment.tenant_id: Role(assignment.role)
                for assignment in connection.execute(
                    sa.select(role_assignments.c.tenant_id, role_assignments.c.role).where(
                        role_assignments.c.operator_id == row.operator_id
                    )
                )
            }
        return Principal(
            operator_id=row.operator_id,
            email=row.email,
            token_id=row.id,
            token_tenant_id=row.tenant_id,
            token_scopes=parse_scopes(row.scopes),
            roles=roles,
            can_create_tenants=row.can_create_tenants,
            token_expires_at=row.expires_at,
        )

    # ---------------------------------------------------------------- operator MFA (TOTP, RFC 6238)

    def mfa_status(self, principal: Principal) -> mfa.MfaStatus:
        """The caller's MFA: off, pending (enrolled, not confirmed) or on."""
        with self._db.read() as connection:
            sealed, enabled_at = self._mfa_row(connection, principal.operator_id, lock=False)
        return _mfa_status(sealed, enabled_at)

    def enroll_mfa(self, principal: Principal) -> mfa.MfaEnrollment:
        """A new TOTP secret for the caller, shown once; MFA is pending until :meth:`confirm_mfa`.

        Enrolling again while pending replaces the secret; while MFA is on, it is refused.
        """
        self._require_own_mfa_change(principal)
        secret = mfa.new_secret()
        account = principal.email.replace(":", "")
        enrollment = mfa.MfaEnrollment(
            mfa.base32_secret(secret), mfa.otpauth_uri(secret, account, MFA_ISSUER)
        )
        sealed = mfa.seal_state(self._mfa_key(), mfa.TotpState(secret), _mfa_label(principal.operator_id))
        with self._db.write() as connection:
            _sealed, enabled_at = self._mfa_row(connection, principal.operator_id)
            if enabled_at is not None:
                raise Conflict(
                    "your MFA is already on: disable it with a current code before enrolling again",
                    code="mfa_already_enabled",
                )
            connection.execute(
                operators.update()
                .where(operators.c.id == principal.operator_id)
                .values(mfa_secret_sealed=sealed, mfa_enabled_at=None)
            )
            event_log.record(
                connection,
                [self._mfa_event(principal, "mfa_enrolled", "enrolled a TOTP secret (pending confirmation)")],
            )
        return enrollment

    def confirm_mfa(self, principal: Principal, code: str) -> None:
        """Turn the caller's pending MFA on with a first code from the authenticator app."""
        self._require_own_mfa_change(principal)
        with self._db.write() as connection:
            sealed, enabled_at = self._mfa_row(connection, principal.operator_id)
            if sealed is None:
                raise Conflict(
                    "you have no MFA secret to confirm: enrol first (fleetward operator mfa enroll)",
                    code="mfa_not_enrolled",
                )
            if enabled_at is not None:
                raise Conflict("your MFA is already on", code="mfa_already_enabled")
            refusal = self._spend_code(connection, principal, sealed, code, "confirming MFA")
            if refusal is None:
                connection.execute(
                    operators.update()
                    .where(operators.c.id == principal.operator_id)
                    .values(mfa_enabled_at=self._clock.now())
                )
                event_log.record(connection, [self._mfa_event(principal, "mfa_enabled", "turned MFA on")])
        if refusal is not None:
            raise refusal  # after the commit, so that the refusal stays recorded

    def disable_mfa(self, principal: Principal, code: str) -> None:
        """Turn the caller's MFA off (or drop a pending enrolment), proven with a current code."""
        self._require_own_mfa_change(principal)
        with self._db.write() as connection:
            sealed, _enabled_at = self._mfa_row(connection, principal.operator_id)
            if sealed is None:
                raise Conflict("you have no MFA to disable", code="mfa_not_enrolled")
            refusal = self._spend_code(connection, principal, sealed, code, "disabling MFA")
            if refusal is None:
                connection.execute(
                    operators.update()
                    .where(operators.c.id == principal.operator_id)
                    .values(mfa_secret_sealed=None, mfa_enabled_at=None)
                )
                event_log.record(
                    connection,
                    [self._mfa_event(principal, "mfa_disabled", "turned MFA off", severity=Severity.WARNING)],
                )
        if refusal is not None:
            raise refusal

    def _require_second_factor(self, principal: Principal, code: str | None, purpose: str) -> None:
        """Return if the caller's MFA is off or ``code`` is current (and spend it); refuse otherwise."""
        with self._db.write() as connection:
            sealed, enabled_at = self._mfa_row(connection, principal.operator_id)
            if enabled_at is None or sealed is None:
                return
            refusal: PermissionDenied | None
            if code is None:
                refusal = PermissionDenied(
                    f"your MFA is on: {purpose} needs a current code from your authenticator app "
                    "(--mfa-code, or mfa_code in the API)",
                    code="mfa_required",
                )
                event_log.record(
                    connection,
                    [
                        self._mfa_event(
                            principal, "mfa_refused", f"{purpose} refused: no MFA code", Severity.WARNING
                        )
                    ],
                )
            else:
                refusal = self._spend_code(connection, principal, sealed, code, purpose)
        if refusal is not None:
            raise refusal

    def _spend_code(
        self, connection: Connection, principal: Principal, sealed: bytes, code: str, purpose: str
    ) -> PermissionDenied | None:
        """Check ``code`` against the sealed state and re-seal it with the step used; or the refusal.

        A refusal is recorded in ``connection``'s transaction: the caller commits it, then raises.
        After ``mfa_max_failures`` refusals in ``mfa_failure_window_seconds``, codes are not even looked at.
        """
        now = self._clock.now()
        window = dt.timedelta(seconds=self._limits.mfa_failure_window_seconds)
        failures = connection.execute(
            sa.select(sa.func.count())
            .select_from(event_rows)
            .where(
                event_rows.c.tenant_id.is_(None),
                event_rows.c.kind == "operator",
                event_rows.c.code == "mfa_refused",
                event_rows.c.actor == principal.email,
                event_rows.c.at > now - window,
            )
        ).scalar_one()
        if failures >= self._limits.mfa_max_failures:
            return PermissionDenied(
                f"too many refused MFA codes in the last {self._limits.mfa_failure_window_seconds} seconds: "
                "wait, then try again",
                code="mfa_throttled",
            )
        key, label = self._mfa_key(), _mfa_label(principal.operator_id)
        state = mfa.open_state(key, sealed, label)
        step = mfa.verify(state.secret, code, now, window_steps=1, last_used_step=state.last_used_step)
        if step is None:
            event_log.record(
                connection,
                [
                    self._mfa_event(
                        principal,
                        "mfa_refused",
                        f"{purpose} refused: wrong or reused MFA code",
                        Severity.WARNING,
                    )
                ],
            )
            return PermissionDenied("the MFA code is wrong, out of date or already used", code="mfa_invalid")
        connection.execute(
            operators.update()
            .where(operators.c.id == principal.operator_id)
            .values(mfa_secret_sealed=mfa.seal_state(key, mfa.TotpState(state.secret, step), label))
        )
        return None

    @staticmethod
    def _mfa_row(
        connection: Connection, operator_id: str, *, lock: bool = True
    ) -> tuple[bytes | None, dt.datetime | None]:
        """The operator's sealed TOTP state and when MFA was turned on; locked, unless told otherwise,
        for the rest of the transaction (so that a code is spent once)."""
        statement = sa.select(operators.c.mfa_secret_sealed, operators.c.mfa_enabled_at).where(
            operators.c.id == operator_id
        )
        row = connection.execute(statement.with_for_update() if lock else statement).one()
        return row.mfa_secret_sealed, row.mfa_enabled_at

    def _mfa_key(self) -> bytes:
        if self._keystore is None:
            raise ConfigurationError(
                "operator MFA needs the key store, and this registry was built without one"
            )
        return self._keystore.derive(_MFA_KEY_PURPOSE)

    @staticmethod
    def _require_own_mfa_change(principal: Principal) -> None:
        if Scope.ADMIN not in principal.token_scopes:
            raise PermissionDenied(
                "changing your MFA needs a token with the 'admin' scope", code="token_scope_missing"
            )

    def _mfa_event(
        self, principal: Principal, code: str, detail: str, severity: Severity = Severity.INFO
    ) -> Event:
        return Event(
            at=self._clock.now(),
            kind="operator",
            code=code,
            detail=f"operator {principal.email} {detail}" if code != "mfa_refused" else detail,
            severity=severity,
            actor=principal.email,
        )

    # ---------------------------------------------------------------- tenants and roles

    def create_tenant(self, principal: Principal, name: str) -> Tenant:
        """Create a tenant; its creator becomes its Administrator."""
        principal.require_tenant_creation()
        tenant = Tenant(id=_new_id(), name=self._name(name, "tenant name"), created_at=self._clock.now())
        with self._db.write() as connection:
            # Names are unique among the tenants you hold a role in; others' names are none of your business.
            mine = sa.select(role_assignments.c.tenant_id).where(
                role_assignments.c.operator_id == principal.operator_id
            )
            duplicate = sa.select(tenants.c.id).where(tenants.c.name == tenant.name, tenants.c.id.in_(mine))
            if connection.execute(duplicate).first():
                raise Conflict(f"you already have a tenant named {tenant.name!r}", code="tenant_exists")
            connection.execute(tenants.insert().values(**tenant.__dict__))
            connection.execute(
                role_assignments.insert().values(
                    tenant_id=tenant.id,
                    operator_id=principal.operator_id,
                    role=Role.ADMINISTRATOR.value,
                    created_at=tenant.created_at,
                )
            )
            event_log.record(
                connection,
                [self._event(tenant.id, principal, "tenant", "created", f"tenant {tenant.name}")],
            )
        return tenant

    def list_tenants(self, principal: Principal) -> list[Tenant]:
        visible = [tenant_id for tenant_id in principal.roles if principal.scopes_in(tenant_id)]
        if not visible:
            return []
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(tenants).where(tenants.c.id.in_(visible)).order_by(tenants.c.name)
            ).all()
        return [Tenant(id=row.id, name=row.name, created_at=row.created_at) for row in rows]

    def get_tenant(self, tenant_id: str) -> Tenant:
        with self._db.read() as connection:
            row = connection.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise NotFound("no such tenant", code="tenant_not_found")
        return Tenant(id=row.id, name=row.name, created_at=row.created_at)

    def assign_role(self, principal: Principal, tenant_id: str, email: str, role: Role) -> RoleAssignment:
        principal.require(tenant_id, Scope.ADMIN)
        email = email.strip().lower()
        now = self._clock.now()
        with self._db.write() as connection:
            operator_row = connection.execute(
                sa.select(operators.c.id).where(operators.c.email == email)
            ).first()
            if operator_row is None:
                raise NotFound(f"no operator with email {email}", code="operator_not_found")
            operator_id = operator_row.id
            existing = connection.execute(
                sa.select(role_assignments.c.role).where(
                    role_assignments.c.tenant_id == tenant_id,
                    role_assignments.c.operator_id == operator_id,
                )
            ).first()
            if existing is None:
                connection.execute(
                    role_assignments.insert().values(
                        tenant_id=tenant_id,
                        operator_id=operator_id,
                        role=role.value,
                        created_at=now,
                    )
                )
            else:
                if existing.role == Role.ADMINISTRATOR and role != Role.ADMINISTRATOR:
                    self._keep_an_administrator(connection, tenant_id, operator_id)
                connection.execute(
                    role_assignments.update()
                    .where(
                        role_assignments.c.tenant_id == tenant_id,
                        role_assignments.c.operator_id == operator_id,
                    )
                    .values(role=role.value)
                )
            event_log.record(
                connection,
                [self._event(tenant_id, principal, "role", "assigned", f"{email} is {role.value}")],
            )
        return RoleAssignment(tenant_id, operator_id, email, role, now)

    def list_roles(self, principal: Principal, tenant_id: str) -> list[RoleAssignment]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(role_assignments, operators.c.email)
                .join(operators, operators.c.id == role_assignments.c.operator_id)
                .where(role_assignments.c.tenant_id == tenant_id)
                .order_by(operators.c.email)
            ).all()
        return [
            RoleAssignment(row.tenant_id, row.operator_id, row.email, Role(row.role), row.created_at)
            for row in rows
        ]

    def remove_role(self, principal: Principal, tenant_id: str, email: str) -> None:
        principal.require(tenant_id, Scope.ADMIN)
        principal.require(tenant_id, Scope.DELETE)
        email = email.strip().lower()
        with self._db.write() as connection:
            row = connection.execute(
                sa.select(role_assignments.c.operator_id, role_assignments.c.role)
                .join(operators, operators.c.id == role_assignments.c.operator_id)
                .where(role_assignments.c.tenant_id == tenant_id, operators.c.email == email)
            ).first()
            if row is None:
                raise NotFound(f"{email} holds no role in this tenant", code="role_not_found")
            if row.role == Role.ADMINISTRATOR:
                self._keep_an_administrator(connection, tenant_id, row.operator_id)
            connection.execute(
                role_assignments.delete().where(
                    role_assignments.c.tenant_id == tenant_id,
                    role_assignments.c.operator_id == row.operator_id,
                )
            )
            event_log.record(
                connection,
                [self._event(tenant_id, principal, "role", "removed", f"{email} holds no role")],
            )

    @staticmethod
    def _keep_an_administrator(connection: Connection, tenant_id: str, leaving: str) -> None:
        others = connection.execute(
            sa.select(sa.func.count())
            .select_from(role_assignments)
            .where(
                role_assignments.c.tenant_id == tenant_id,
                role_assignments.c.role == Role.ADMINISTRATOR.value,
                role_assignments.c.operator_id != leaving,
            )
        ).scalar_one()
        if others == 0:
            raise Conflict("a tenant keeps at least one Administrator", code="last_administrator")

    # ---------------------------------------------------------------- products and groups

    def create_product(
        self, principal: Principal, tenant_id: str, name: str, description: str = ""
    ) -> tuple[Product, list[DeviceGroup]]:
        """Create a product and its five default device groups."""
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        product = Product(
            id=_new_id(),
            tenant_id=tenant_id,
            name=self._name(name, "product name"),
            description=self._description(description),
            created_at=now,
        )
        groups = [
            DeviceGroup(
                id=_new_id(),
                tenant_id=tenant_id,
                product_id=product.id,
                name=template.name,
                description=template.description,
                update_policy=template.update_policy,
                os_feed=template.os_feed,
                allow_crash_dumps=False,
                created_at=now,
            )
            for template in DEFAULT_GROUPS
        ]
        with self._db.write() as connection:
            self._refuse_duplicate(
                connection,
                sa.select(products.c.id).where(
                    products.c.tenant_id == tenant_id, products.c.name == product.name
                ),
                f"a product named {product.name!r} exists",
            )
            connection.execute(products.insert().values(**product.__dict__))
            connection.execute(device_groups.insert(), [_group_values(group) for group in groups])
            event_log.record(
                connection,
                [self._event(tenant_id, principal, "product", "created", f"product {product.name}")],
            )
        return product, groups

    def list_products(self, principal: Principal, tenant_id: str) -> list[Product]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(products)
                .where(products.c.tenant_id == tenant_id)
                .order_by(products.c.name)
                .limit(self._limits.max_list_items)
            ).all()
        return [_product(row) for row in rows]

    def get_product(self, principal: Principal, tenant_id: str, product: str) -> Product:
        """A product by id or by name."""
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return self._product_in(connection, tenant_id, product)

    def _product_in(self, connection: Connection, tenant_id: str, product: str) -> Product:
        row = connection.execute(
            sa.select(products).where(
                products.c.tenant_id == tenant_id,
                sa.or_(products.c.id == product, products.c.name == product),
            )
        ).first()
        if row is None:
            raise NotFound("no such product in this tenant", code="product_not_found")
        return _product(row)

    def update_product(self, principal: Principal, tenant_id: str, product: str, description: str) -> Product:
        principal.require(tenant_id, Scope.WRITE)
        with self._db.write() as connection:
            found = self._product_in(connection, tenant_id, product)
            connection.execute(
                products.update()
                .where(products.c.id == found.id)
                .values(description=self._description(description))
            )
            return self._product_in(connection, tenant_id, found.id)

    def delete_product(self, principal: Principal, tenant_id: str, product: str) -> None:
        principal.require(tenant_id, Scope.DELETE)
        with self._db.write() as connection:
            found = self._product_in(connection, tenant_id, product)
            self._refuse_duplicate(
                connection,
                sa.select(devices.c.id).where(devices.c.product_id == found.id).limit(1),
                "devices are assigned to this product; move them first",
                code="product_in_use",
            )
            connection.execute(device_groups.delete().where(device_groups.c.product_id == found.id))
            connection.execute(products.delete().where(products.c.id == found.id))
            event_log.record(
                connection,
                [self._event(tenant_id, principal, "product", "deleted", f"product {found.name}")],
            )

    def create_group(
        self,
        principal: Principal,
        tenant_id: str,
        product: str,
        name: str,
        description: str = "",
        update_policy: UpdatePolicy = UpdatePolicy.UPDATE_ALL,
        os_feed: OsFeed = OsFeed.RETAIL,
        allow_crash_dumps: bool = False,
    ) -> DeviceGroup:
        principal.require(tenant_id, Scope.WRITE)
        with self._db.write() as connection:
            found = self._product_in(connection, tenant_id, product)
            group = DeviceGroup(
                id=_new_id(),
                tenant_id=tenant_id,
                product_id=found.id,
                name=self._name(name, "device group name"),
                description=self._description(description),
                update_policy=UpdatePolicy(update_policy),
                os_feed=OsFeed(os_feed),
                allow_crash_dumps=allow_crash_dumps,
                created_at=self._clock.now(),
            )
            self._refuse_duplicate(
                connection,
                sa.select(device_groups.c.id).where(
                    device_groups.c.product_id == found.id, device_groups.c.name == group.name
                ),
                f"product {found.name} has a device group named {group.name!r}",
            )
            connection.execute(device_groups.insert().values(**_group_values(group)))
            event_log.record(
                connection,
                [self._event(tenant_id, principal, "device_group", "created", f"group {group.name}")],
            )
        return group

    def list_groups(
        self, principal: Principal, tenant_id: str, product: str | None = None
    ) -> list[DeviceGroup]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            statement = sa.select(device_groups).where(device_groups.c.tenant_id == tenant_id)
            if product is not None:
                found = self._product_in(connection, tenant_id, product)
                statement = statement.where(device_groups.c.product_id == found.id)
            rows = connection.execute(
                statement.order_by(device_groups.c.product_id, device_groups.c.name).limit(
                    self._limits.max_list_items
                )
            ).all()
        return [_group(row) for row in rows]

    def get_group(self, principal: Principal, tenant_id: str, group_id: str) -> DeviceGroup:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return self._group_in(connection, tenant_id, group_id)

    @staticmethod
    def _group_in(connection: Connection, tenant_id: str, group_id: str) -> DeviceGroup:
        return group_in(connection, tenant_id, group_id)

    def update_group(
        self,
        principal: Principal,
        tenant_id: str,
        group_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        update_policy: UpdatePolicy | None = None,
        os_feed: OsFeed | None = None,
        allow_crash_dumps: bool | None = None,
    ) -> DeviceGroup:
        principal.require(tenant_id, Scope.WRITE)
        changes: dict[str, object] = {}
        if name is not None:
            changes["name"] = self._name(name, "device group name")
        if description is not None:
            changes["description"] = self._description(description)
        if update_policy is not None:
            changes["update_policy"] = UpdatePolicy(update_policy).value
        if os_feed is not None:
            changes["os_feed"] = OsFeed(os_feed).value
        if allow_crash_dumps is not None:
            changes["allow_crash_dumps"] = allow_crash_dumps
        with self._db.write() as connection:
            group = self._group_in(connection, tenant_id, group_id)
            if "name" in changes and changes["name"] != group.name:
                self._refuse_duplicate(
                    connection,
                    sa.select(device_groups.c.id).where(
                        device_groups.c.product_id == group.product_id,
                        device_groups.c.name == changes["name"],
                    ),
                    f"the product has a device group named {changes['name']!r}",
                )
            if changes:
                connection.execute(
                    device_groups.update().where(device_groups.c.id == group.id).values(**changes)
                )
                event_log.record(
                    connection,
                    [
                        self._event(
                            tenant_id,
                            principal,
                            "device_group",
                            "updated",
                            f"group {group.name}: {', '.join(sorted(changes))}",
                        )
                    ],
                )
            return self._group_in(connection, tenant_id, group.id)

    def delete_group(self, principal: Principal, tenant_id: str, group_id: str) -> None:
        principal.require(tenant_id, Scope.DELETE)
        with self._db.write() as connection:
            group = self._group_in(connection, tenant_id, group_id)
            self._refuse_duplicate(
                connection,
                sa.select(devices.c.id).where(devices.c.group_id == group.id).limit(1),
                "devices are in this group; move them first",
                code="device_group_in_use",
            )
            connection.execute(device_groups.delete().where(device_groups.c.id == group.id))
            event_log.record(
                connection,
                [self._event(tenant_id, principal, "device_group", "deleted", f"group {group.name}")],
            )

    # ---------------------------------------------------------------- devices

    def claim_devices(
        self,
        principal: Principal,
        tenant_id: str,
        requests: Sequence[ClaimRequest],
        group_id: str | None = None,
    ) -> list[ClaimResult]:
        """Claim devices into the tenant, each once. One result per request, in order.

        A device claimed by another tenant is refused (and the refusal recorded); a device already in
        this tenant is reported as such and left as it is.
        """
        principal.require(tenant_id, Scope.WRITE)
        if not requests:
            raise InvalidInput("a claim names at least one device")
        if len(requests) > self._limits.max_bulk_claim:
            raise InvalidInput(
                f"a claim names at most {self._limits.max_bulk_claim} devices, not {len(requests)}",
                code="too_many_devices",
            )
        now = self._clock.now()
        results: list[ClaimResult | None] = [None] * len(requests)
        accepted: dict[str, tuple[int, bytes]] = {}
        for index, request in enumerate(requests):
            try:
                device_id = check_device_id(request.device_id)
                if len(request.public_key) > self._limits.max_public_key_bytes:
                    raise ValueError("the public key is larger than any P-256 key")
                key = load_public_key(request.public_key)
                if device_id_for(key) != device_id:
                    raise ValueError("the device id is not the SHA-256 of this public key")
            except ValueError as error:
                results[index] = ClaimResult(
                    str(request.device_id)[:64],
                    ClaimOutcome.REFUSED,
                    "invalid_identity",
                    str(error),
                )
                continue
            if device_id in accepted:
                results[index] = ClaimResult(
                    device_id, ClaimOutcome.REFUSED, "duplicate", "the device is named twice"
                )
                continue
            accepted[device_id] = (index, spki_der(key))
        refusals: list[Event] = []
        with self._db.write() as connection:
            product_id: str | None = None
            if group_id is not None:
                group = self._group_in(connection, tenant_id, group_id)
                product_id = group.product_id
            existing = {
                row.id: row.tenant_id
                for row in connection.execute(
                    sa.select(devices.c.id, devices.c.tenant_id).where(devices.c.id.in_(list(accepted)))
                )
            }
            new_rows = []
            claimed_ids: list[str] = []
            for device_id, (index, der) in accepted.items():
                owner = existing.get(device_id)
                if owner is None:
                    new_rows.append(
                        {
                            "id": device_id,
                            "tenant_id": tenant_id,
                            "public_key": der,
                            "product_id": product_id,
                            "group_id": group_id,
                            "status": DeviceStatus.ACTIVE.value,
                            "claimed_at": now,
                        }
                    )
                    results[index] = ClaimResult(device_id, ClaimOutcome.CLAIMED)
                    claimed_ids.append(device_id)
                elif owner == tenant_id:
                    results[index] = ClaimResult(device_id, ClaimOutcome.ALREADY_CLAIMED)
                else:
                    results[index] = ClaimResult(
                        device_id,
                        ClaimOutcome.REFUSED,
                        "claimed_elsewhere",
                        "the device is claimed by another tenant",
                    )
                    refusals.append(
                        Event(
                            at=now,
                            kind="claim",
                            code="claimed_elsewhere",
                            detail="claim refused: the device belongs to another tenant",
                            severity=Severity.WARNING,
                            tenant_id=tenant_id,
                            device_id=device_id,
                            actor=principal.email,
                        )
                    )
            if new_rows:
                connection.execute(devices.insert(), new_rows)
            claimed = [
                self._event(tenant_id, principal, "claim", "claimed", "device claimed", device_id=device_id)
                for device_id in claimed_ids
            ]
            event_log.record(connection, claimed + refusals)
        return [result for result in results if result is not None]

    def list_devices(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        group_id: str | None = None,
        product: str | None = None,
        status: DeviceStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Device]:
        principal.require(tenant_id, Scope.READ)
        limit = max(1, min(limit, self._limits.max_list_items))
        with self._db.read() as connection:
            statement = sa.select(devices).where(devices.c.tenant_id == tenant_id)
            if group_id is not None:
                statement = statement.where(devices.c.group_id == group_id)
            if product is not None:
                found = self._product_in(connection, tenant_id, product)
                statement = statement.where(devices.c.product_id == found.id)
            if status is not None:
                statement = statement.where(devices.c.status == DeviceStatus(status).value)
            rows = connection.execute(
                statement.order_by(devices.c.claimed_at, devices.c.id).limit(limit).offset(offset)
            ).all()
        return [_device(row) for row in rows]

    def get_device(self, principal: Principal, tenant_id: str, device_id: str) -> Device:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return device_in(connection, tenant_id, device_id)

    def move_device(
        self, principal: Principal, tenant_id: str, device_id: str, group_id: str | None
    ) -> Device:
        """Put a device in a group (and so in that group's product), or in none."""
        principal.require(tenant_id, Scope.WRITE)
        with self._db.write() as connection:
            device = device_in(connection, tenant_id, device_id)
            product_id = None
            if group_id is not None:
                product_id = self._group_in(connection, tenant_id, group_id).product_id
            connection.execute(
                devices.update()
                .where(devices.c.id == device.id, devices.c.tenant_id == tenant_id)
                .values(group_id=group_id, product_id=product_id)
            )
            event_log.record(
                connection,
                [
                    self._event(
                        tenant_id,
                        principal,
                        "device",
                        "moved",
                        f"device moved to group {group_id}" if group_id else "device removed from its group",
                        device_id=device.id,
                    )
                ],
            )
            return device_in(connection, tenant_id, device.id)

    def quarantine_device(self, principal: Principal, tenant_id: str, device_id: str, reason: str) -> Device:
        """Narrow a device to its twin: its session ends now and comes back with only the twin.

        Its certificates stay valid, so that it can still be remediated and released.
        """
        return self._set_quarantine(principal, tenant_id, device_id, quarantined=True, reason=reason)

    def release_device(self, principal: Principal, tenant_id: str, device_id: str) -> Device:
        """End a quarantine: the device's next session has its full topics again."""
        return self._set_quarantine(principal, tenant_id, device_id, quarantined=False, reason="released")

    def _set_quarantine(
        self, principal: Principal, tenant_id: str, device_id: str, *, quarantined: bool, reason: str
    ) -> Device:
        principal.require(tenant_id, Scope.WRITE)
        reason = self._description(reason.strip()) or "no reason given"
        with self._db.write() as connection:
            changed = set_quarantine(
                connection, tenant_id, device_id, quarantined, reason, principal.email, self._clock.now()
            )
        self._trust_bell.ring()
        return changed

    def list_platform_events(
        self, principal: Principal, *, device_id: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Event]:
        """Events of no tenant (operators, refusals of devices no tenant claimed): platform operators only."""
        principal.require_tenant_creation()
        with self._db.read() as connection:
            return event_log.query(
                connection,
                tenant_id=None,
                device_id=device_id,
                kind=kind,
                limit=max(1, min(limit, self._limits.max_list_items)),
            )

    def list_events(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        device_id: str | None = None,
        kind: str | None = None,
        since: dt.datetime | None = None,
        limit: int = 100,
        group_id: str | None = None,
        until: dt.datetime | None = None,
        code: str | None = None,
        severity: Severity | None = None,
    ) -> list[Event]:
        """The tenant's events, newest first, by device, group (its devices now), kind, code, severity and
        time (``since`` inclusive, ``until`` exclusive)."""
        principal.require(tenant_id, Scope.READ)
        if since is not None and until is not None and since > until:
            raise InvalidInput("since is after until", code="bad_time_range")
        with self._db.read() as connection:
            return event_log.query(
                connection,
                tenant_id=tenant_id,
                device_id=device_id,
                kind=kind,
                since=since,
                limit=max(1, min(limit, self._limits.max_list_items)),
                group_id=group_id,
                until=until,
                code=code,
                severity=severity,
            )

    # ---------------------------------------------------------------- helpers

    def _event(
        self,
        tenant_id: str,
        principal: Principal,
        kind: str,
        code: str,
        detail: str,
        device_id: str | None = None,
    ) -> Event:
        return Event(
            at=self._clock.now(),
            kind=kind,
            code=code,
            detail=detail,
            tenant_id=tenant_id,
            device_id=device_id,
            actor=principal.email,
        )

    @staticmethod
    def _refuse_duplicate(
        connection: Connection, statement: Any, message: str, code: str = "already_exists"
    ) -> None:
        if connection.execute(statement).first() is not None:
            raise Conflict(message, code=code)


def group_in(connection: Connection, tenant_id: str, group_id: str) -> DeviceGroup:
    """The device group ``group_id`` of ``tenant_id``; ``NotFound`` whether it is unknown or another's."""
    row = connection.execute(
        sa.select(device_groups).where(device_groups.c.tenant_id == tenant_id, device_groups.c.id == group_id)
    ).first()
    if row is None:
        raise NotFound("no such device group in this tenant", code="device_group_not_found")
    return _group(row)


def device_in(connection: Connection, tenant_id: str, device_id: str) -> Device:
    """The device ``device_id`` of ``tenant_id``; ``NotFound`` whether it is unknown or another's."""
    row = connection.execute(
        sa.select(devices).where(devices.c.tenant_id == tenant_id, devices.c.id == device_id)
    ).first()
    if row is None:
        raise NotFound("no such device in this tenant", code="device_not_found")
    return _device(row)


def _operator(row: Row[Any]) -> Operator:
    return Operator(
        id=row.id,
        email=row.email,
        name=row.name,
        can_create_tenants=row.can_create_tenants,
        created_at=row.created_at,
        mfa_enabled=row.mfa_enabled_at is not None,
    )


def _mfa_status(sealed: bytes | None, enabled_at: dt.datetime | None) -> mfa.MfaStatus:
    if sealed is None:
        return mfa.MfaStatus.OFF
    return mfa.MfaStatus.PENDING if enabled_at is None else mfa.MfaStatus.ON


class OperatorWithoutMfa(NamedTuple):
    operator_id: str
    email: str
    role: Role


def operators_without_mfa(connection: Connection, tenant_id: str) -> list[OperatorWithoutMfa]:
    """The operators holding a role in ``tenant_id`` whose MFA is not on (off, or enrolled but not
    confirmed), by email: what the audit check "operators without MFA" reports."""
    rows = connection.execute(
        sa.select(operators.c.id, operators.c.email, role_assignments.c.role)
        .join(role_assignments, role_assignments.c.operator_id == operators.c.id)
        .where(role_assignments.c.tenant_id == tenant_id, operators.c.mfa_enabled_at.is_(None))
        .order_by(operators.c.email)
    ).all()
    return [OperatorWithoutMfa(row.id, row.email, Role(row.role)) for row in rows]


def _token(row: Row[Any]) -> ApiToken:
    return ApiToken(
        id=row.id,
        operator_id=row.operator_id,
        tenant_id=row.tenant_id,
        name=row.name,
        scopes=parse_scopes(row.scopes),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def _product(row: Row[Any]) -> Product:
    return Product(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        description=row.description,
        created_at=row.created_at,
    )


def _group(row: Row[Any]) -> DeviceGroup:
    return DeviceGroup(
        id=row.id,
        tenant_id=row.tenant_id,
        product_id=row.product_id,
        name=row.name,
        description=row.description,
        update_policy=UpdatePolicy(row.update_policy),
        os_feed=OsFeed(row.os_feed),
        allow_crash_dumps=row.allow_crash_dumps,
        created_at=row.created_at,
    )


def _group_values(group: DeviceGroup) -> dict[str, object]:
    values = dict(group.__dict__)
    values["update_policy"] = group.update_policy.value
    values["os_feed"] = group.os_feed.value
    return values


def _device(row: Row[Any]) -> Device:
    key = load_public_key(row.public_key)
    return Device(
        id=row.id,
        tenant_id=row.tenant_id,
        public_key_pem=key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii"),
        product_id=row.product_id,
        group_id=row.group_id,
        status=DeviceStatus(row.status),
        claimed_at=row.claimed_at,
        revoked_at=row.revoked_at,
        last_attested_at=row.last_attested_at,
    )


def set_quarantine(
    connection: Connection,
    tenant_id: str,
    device_id: str,
    quarantined: bool,
    reason: str,
    actor: str,
    now: dt.datetime,
) -> Device:
    """Quarantine or release a device in the caller's transaction (an operator's request, or a playbook's).

    The caller rings the trust bell once the transaction commits.
    """
    wanted, kind = (
        (DeviceStatus.QUARANTINED, TrustKind.QUARANTINED)
        if quarantined
        else (DeviceStatus.ACTIVE, TrustKind.RELEASED)
    )
    device = device_in(connection, tenant_id, device_id)
    if device.status is DeviceStatus.REVOKED:
        raise Conflict("the device is revoked", code="device_revoked")
    if device.status is wanted:
        raise Conflict(f"the device is already {wanted.value}", code=f"already_{wanted.value}")
    connection.execute(
        devices.update()
        .where(devices.c.id == device.id, devices.c.tenant_id == tenant_id)
        .values(status=wanted.value)
    )
    trust.record(connection, [TrustChange(tenant_id, device.id, kind, now)])
    event_log.record(
        connection,
        [
            Event(
                at=now,
                kind="quarantine",
                code=kind.value,
                detail=f"device {kind.value}: {reason}",
                severity=Severity.WARNING if quarantined else Severity.INFO,
                tenant_id=tenant_id,
                device_id=device.id,
                actor=actor,
            )
        ],
    )
    return device_in(connection, tenant_id, device.id)
