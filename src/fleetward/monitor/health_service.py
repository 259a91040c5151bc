"""Device health's shell: gathers a device's facts from the store, judges them, keeps the verdict.

:meth:`HealthService.recompute` is called whenever an input may have changed (an alert, an attestation, a
quarantine or release, an update report) and by a periodic sweep (certificates age, baselines go late). A
verdict that differs from the stored one is written with a history row and an event; when conditional
access changes (``restricted``), a trust change is recorded so that every hub narrows or widens the device's
sessions (``store/trust.py``), and the authority issues it remediation certificates only.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetward.clock import Clock
from fleetward.errors import NotFound
from fleetward.monitor import alerts as alert_store
from fleetward.monitor.health import (
    TAMPERING_REFUSALS,
    HealthFacts,
    HealthPolicy,
    HealthState,
    HealthVerdict,
    OpenAlert,
    judge,
)
from fleetward.registry.access import Principal
from fleetward.registry.models import DeviceStatus, Scope
from fleetward.store import events as event_log
from fleetward.store import trust
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import (
    certificates,
    deployments,
    device_health,
    device_health_history,
    device_reports,
    device_updates,
    devices,
    events,
    images,
    security_floors,
)
from fleetward.store.trust import TrustBell, TrustChange, TrustKind
from fleetward.wire.baseline import BASELINE_REPORT
from fleetward.wire.versions import parse_version

MAX_HISTORY = 500


@dataclass(frozen=True)
class DeviceHealth:
    device_id: str
    state: HealthState
    risk: int
    restricted: bool
    reasons: list[dict[str, object]]
    computed_at: dt.datetime
    changed_at: dt.datetime


@dataclass(frozen=True)
class HealthChange:
    device_id: str
    tenant_id: str
    before: HealthState | None
    after: HealthVerdict


def _reasons_json(verdict: HealthVerdict) -> str:
    return json.dumps(
        [
            {"code": reason.code, "detail": reason.detail, "state": reason.state.value, "risk": reason.risk}
            for reason in verdict.reasons
        ],
        separators=(",", ":"),
    )


def newest_deployment(connection: Connection, tenant_id: str, group_id: str) -> str | None:
    """The deployment the group runs or is rolling out (None: none, or its last one was aborted)."""
    row = connection.execute(
        sa.select(deployments.c.id, deployments.c.state)
        .where(deployments.c.tenant_id == tenant_id, deployments.c.group_id == group_id)
        .order_by(deployments.c.created_at.desc())
        .limit(1)
    ).first()
    if row is None or row.state not in ("current", "rolling_out"):
        return None
    return str(row.id)


def group_deployment_installed(
    connection: Connection, tenant_id: str, device_id: str, group_id: str | None
) -> tuple[bool, dt.datetime | None]:
    """Whether the device runs its group's newest deployment (a group without one asks nothing), and
    when it said it had installed it."""
    wanted = newest_deployment(connection, tenant_id, group_id) if group_id is not None else None
    if wanted is None:
        return True, None
    row = connection.execute(
        sa.select(
            device_updates.c.deployment_id, device_updates.c.state, device_updates.c.installed_at
        ).where(device_updates.c.device_id == device_id, device_updates.c.tenant_id == tenant_id)
    ).first()
    if row is None or row.deployment_id != wanted or row.state != "installed":
        return False, None
    return True, row.installed_at


def downgrade_in(connection: Connection, tenant_id: str, device_id: str, group_id: str | None) -> str | None:
    """What the device would be downgraded to if it went into ``group_id`` now, or None: a device joining a
    group is given its current deployment (not one still rolling out), and that may hold an older version
    of a component the device runs."""
    if group_id is None:
        return None
    wanted = connection.execute(
        sa.select(deployments.c.id)
        .where(
            deployments.c.tenant_id == tenant_id,
            deployments.c.group_id == group_id,
            deployments.c.state == "current",
        )
        .order_by(deployments.c.created_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    if wanted is None:
        return None
    image_ids = json.loads(
        connection.execute(sa.select(deployments.c.image_ids).where(deployments.c.id == wanted)).scalar_one()
    )
    deployed = {
        row.component_id: row.version
        for row in connection.execute(
            sa.select(images.c.component_id, images.c.version).where(
                images.c.tenant_id == tenant_id, images.c.id.in_(image_ids)
            )
        )
    }
    row = connection.execute(
        sa.select(device_updates.c.components).where(
            device_updates.c.device_id == device_id, device_updates.c.tenant_id == tenant_id
        )
    ).first()
    for item in json.loads(row.components) if row is not None else []:
        older = deployed.get(str(item.get("component_id")))
        try:
            if older is not None and parse_version(older) < parse_version(str(item.get("version"))):
                return f"{item['component_id']} {older}, below the {item['version']} it runs"
        except ValueError:
            continue
    return None


def gather(connection: Connection, tenant_id: str, device_id: str, now: dt.datetime) -> HealthFacts:
    """Everything :func:`judge` needs of one device, read in the caller's transaction."""
    device = connection.execute(
        sa.select(devices.c.status, devices.c.last_attested_at, devices.c.group_id)
        .where(devices.c.id == device_id, devices.c.tenant_id == tenant_id)
        .with_for_update()  # two processes judging one device take turns (in a write transaction)
    ).first()
    if device is None:
        raise NotFound("no such device in this tenant", code="device_not_found")
    quarantine_reason = ""
    if device.status == DeviceStatus.QUARANTINED.value:
        quarantine_reason = (
            connection.execute(
                sa.select(events.c.detail)
                .where(
                    events.c.tenant_id == tenant_id,
                    events.c.device_id == device_id,
                    events.c.kind == "quarantine",
                    events.c.code == TrustKind.QUARANTINED.value,
                )
                .order_by(events.c.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            or ""
        )
        quarantine_reason = quarantine_reason.removeprefix("device quarantined: ")
    refused = connection.execute(
        sa.select(events.c.code, events.c.at)
        .where(
            events.c.tenant_id == tenant_id,
            events.c.device_id == device_id,
            events.c.kind == "attestation",
            events.c.code.in_(sorted(TAMPERING_REFUSALS)),
        )
        .order_by(events.c.id.desc())
        .limit(1)
    ).first()
    attestation_refused = None
    if refused is not None and (device.last_attested_at is None or refused.at > device.last_attested_at):
        attestation_refused = (str(refused.code), refused.at)
    not_after = connection.execute(
        sa.select(sa.func.max(certificates.c.not_after)).where(
            certificates.c.tenant_id == tenant_id,
            certificates.c.device_id == device_id,
            certificates.c.revoked_at.is_(None),
        )
    ).scalar_one()
    last_baseline = connection.execute(
        sa.select(sa.func.max(device_reports.c.received_at)).where(
            device_reports.c.tenant_id == tenant_id,
            device_reports.c.device_id == device_id,
            device_reports.c.kind == BASELINE_REPORT,
        )
    ).scalar_one()
    return HealthFacts(
        now=now,
        revoked=device.status == DeviceStatus.REVOKED.value,
        quarantined=device.status == DeviceStatus.QUARANTINED.value,
        quarantine_reason=quarantine_reason,
        last_attested_at=device.last_attested_at,
        attestation_refused=attestation_refused,
        certificate_not_after=not_after,
        below_floor=_below_floor(connection, tenant_id, device_id),
        behind_deployment=_behind(connection, tenant_id, device_id, device.group_id),
        last_baseline_at=last_baseline,
        open_alerts=tuple(
            OpenAlert(alert.code, alert.severity, alert.opened_at)
            for alert in alert_store.open_of(connection, tenant_id, device_id)
        ),
    )


def _below_floor(connection: Connection, tenant_id: str, device_id: str) -> tuple[tuple[str, str, str], ...]:
    row = connection.execute(
        sa.select(device_updates.c.components).where(
            device_updates.c.device_id == device_id, device_updates.c.tenant_id == tenant_id
        )
    ).first()
    if row is None:
        return ()
    floors = {
        item.component: item.minimum_version
        for item in connection.execute(
            sa.select(security_floors.c.component, security_floors.c.minimum_version).where(
                security_floors.c.tenant_id == tenant_id
            )
        )
    }
    found: list[tuple[str, str, str]] = []
    for item in json.loads(row.components):
        floor = floors.get(str(item.get("component_id")))
        try:
            if floor is not None and parse_version(str(item.get("version"))) < parse_version(floor):
                found.append((str(item["component_id"]), str(item["version"]), floor))
        except ValueError:
            continue  # validated when reported; a floor in another format compares with nothing
    return tuple(found)


def _behind(connection: Connection, tenant_id: str, device_id: str, group_id: str | None) -> str | None:
    if group_id is None:
        return None
    wanted = newest_deployment(connection, tenant_id, group_id)
    if wanted is None:
        return None
    row = connection.execute(
        sa.select(device_updates.c.deployment_id, device_updates.c.state, device_updates.c.code).where(
            device_updates.c.device_id == device_id, device_updates.c.tenant_id == tenant_id
        )
    ).first()
    if row is None or row.deployment_id != wanted:
        return None  # not reached yet by the rollout: on its way, not behind
    if row.state in ("failed", "rolled_back"):
        return f"its update to deployment {wanted} {row.state.replace('_', ' ')} ({row.code or 'no code'})"
    return None


class HealthService:
    def __init__(
        self, database: Database, clock: Clock, trust_bell: TrustBell, policy: HealthPolicy | None = None
    ):
        self._db = database
        self._clock = clock
        self._trust_bell = trust_bell
        self._policy = policy or HealthPolicy()

    def recompute(self, devices_of: Iterable[tuple[str, str]]) -> list[HealthChange]:
        """Judge each (tenant, device) again; store what changed. Rings the trust bell if access changed."""
        changes: list[HealthChange] = []
        narrowed = False
        for tenant_id, device_id in sorted(set(devices_of)):
            with self._db.write() as connection:
                try:
                    change, access_changed = self._recompute_one(connection, tenant_id, device_id)
                except NotFound:
                    continue
            narrowed = narrowed or access_changed
            if change is not None:
                changes.append(change)
        if narrowed:
            self._trust_bell.ring()
        return changes

    def _recompute_one(
        self, connection: Connection, tenant_id: str, device_id: str
    ) -> tuple[HealthChange | None, bool]:
        now = self._clock.now()
        verdict = judge(gather(connection, tenant_id, device_id, now), self._policy)
        stored = connection.execute(
            sa.select(device_health).where(device_health.c.device_id == device_id)
        ).first()
        reasons = _reasons_json(verdict)
        if stored is not None and stored.state == verdict.state.value and stored.reasons == reasons:
            connection.execute(
                device_health.update()
                .where(device_health.c.device_id == device_id)
                .values(computed_at=now, risk=verdict.risk)
            )
            return None, False
        values = {
            "tenant_id": tenant_id,
            "state": verdict.state.value,
            "risk": verdict.risk,
            "reasons": reasons,
            "restricted": verdict.restricted,
            "computed_at": now,
        }
        state_changed = stored is None or stored.state != verdict.state.value
        if stored is None:
            connection.execute(device_health.insert().values(device_id=device_id, changed_at=now, **values))
        else:
            if state_changed:
                values["changed_at"] = now
            connection.execute(
                device_health.update().where(device_health.c.device_id == device_id).values(**values)
            )
        before = HealthState(stored.state) if stored is not None else None
        if not state_changed:
            return None, False
        connection.execute(
            device_health_history.insert().values(
                tenant_id=tenant_id,
                device_id=device_id,
                at=now,
                state=verdict.state.value,
                risk=verdict.risk,
                reasons=reasons,
            )
        )
        was_restricted = bool(stored.restricted) if stored is not None else False
        access_changed = was_restricted != verdict.restricted
        worst = verdict.reasons[0].detail if verdict.reasons else "nothing wrong known"
        # The log says when health changed; a device's first verdict (a new device: never attested)
        # and a revoked device's (its revocation is logged already) are in the history only.
        revoked = any(reason.code == "revoked" for reason in verdict.reasons)
        noteworthy = not revoked and (before is not None or verdict.restricted)
        recorded = [
            Event(
                at=now,
                kind="health",
                code=f"health_{verdict.state.value}",
                detail=f"health {before.value if before else 'unknown'} → {verdict.state.value} "
                f"(risk {verdict.risk}): {worst}",
                severity=Severity.WARNING if verdict.restricted else Severity.INFO,
                tenant_id=tenant_id,
                device_id=device_id,
                actor="monitor",
            )
        ][: 1 if noteworthy else 0]
        # A quarantine narrows by itself (the registry records its own trust change); only health that
        # restricts or frees a device that is not quarantined needs one here.
        if (
            access_changed
            and not revoked
            and verdict.state is not HealthState.QUARANTINED
            and before is not HealthState.QUARANTINED
        ):
            kind = TrustKind.QUARANTINED if verdict.restricted else TrustKind.RELEASED
            trust.record(connection, [TrustChange(tenant_id, device_id, kind, now)])
            recorded.append(
                Event(
                    at=now,
                    kind="access",
                    code="access_restricted" if verdict.restricted else "access_restored",
                    detail=(
                        "conditional access: hub topics narrowed to the twin, "
                        "certificates for remediation only"
                        if verdict.restricted
                        else "conditional access: full hub topics and daily certificates again"
                    ),
                    severity=Severity.WARNING if verdict.restricted else Severity.INFO,
                    tenant_id=tenant_id,
                    device_id=device_id,
                    actor="monitor",
                )
            )
        else:
            access_changed = False
        event_log.record(connection, recorded)
        return HealthChange(device_id, tenant_id, before, verdict), access_changed

    def devices_to_sweep(self, limit: int = 10_000) -> list[tuple[str, str]]:
        """Devices whose health may change with time alone: every claimed device not revoked."""
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(devices.c.tenant_id, devices.c.id)
                .where(devices.c.status != DeviceStatus.REVOKED.value)
                .order_by(devices.c.id)
                .limit(limit)
            )
            return [(row.tenant_id, row.id) for row in rows]

    # ---------------------------------------------------------------- operators

    def health_of(self, principal: Principal, tenant_id: str, device_id: str) -> DeviceHealth:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(device_health).where(
                    device_health.c.device_id == device_id, device_health.c.tenant_id == tenant_id
                )
            ).first()
        if row is None:
            raise NotFound("no health is known of this device yet", code="health_unknown")
        return _health(row)

    def list_health(
        self, principal: Principal, tenant_id: str, *, state: str | None = None, limit: int = 100
    ) -> list[DeviceHealth]:
        principal.require(tenant_id, Scope.READ)
        statement = (
            sa.select(device_health)
            .where(device_health.c.tenant_id == tenant_id)
            .order_by(device_health.c.risk.desc(), device_health.c.device_id)
            .limit(limit)
        )
        if state is not None:
            statement = statement.where(device_health.c.state == HealthState(state).value)
        with self._db.read() as connection:
            return [_health(row) for row in connection.execute(statement)]

    def history(
        self, principal: Principal, tenant_id: str, device_id: str, limit: int = 100
    ) -> list[tuple[dt.datetime, str, int, list[dict[str, object]]]]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(device_health_history)
                .where(
                    device_health_history.c.tenant_id == tenant_id,
                    device_health_history.c.device_id == device_id,
                )
                .order_by(device_health_history.c.id.desc())
                .limit(min(limit, MAX_HISTORY))
            )
            return [(row.at, row.state, row.risk, json.loads(row.reasons)) for row in rows]


def _health(row: sa.Row[object]) -> DeviceHealth:
    mapping = row._mapping
    return DeviceHealth(
        device_id=mapping["device_id"],
        state=HealthState(mapping["state"]),
        risk=int(mapping["risk"]),
        restricted=bool(mapping["restricted"]),
        reasons=json.loads(mapping["reasons"]),
        computed_at=mapping["computed_at"],
        changed_at=mapping["changed_at"],
    )
