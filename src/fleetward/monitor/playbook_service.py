"""Playbooks' shell: keeps playbooks and notice destinations, runs playbooks on alerts, undoes them.

A run is one playbook applied to one device. Its actions that change the store (quarantine, move to a
group, revoke the held certificates) happen in one transaction with the run's row and their events, so a
run is done entirely or not at all; notices go out afterwards through the monitor's sinks. A playbook that
waits for an operator leaves its run ``awaiting_approval`` until one approves (the actions run then) or
refuses it. Undoing a run (an operator, or the release policy once the device is remediated) reverses what
its actions did: released, moved back to the group it came from. A device has at most one active run per
playbook: a repeating alert does not pile up runs.

Every playbook acts only on devices of its own tenant: the alert's tenant picks the playbooks, and each
store action is scoped by that tenant (a group of another tenant named in a playbook is refused when it is
written and again when it runs).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from fleetward.authority.keystore import KeyStore
from fleetward.authority.service import AuthorityService
from fleetward.clock import Clock
from fleetward.errors import Conflict, FleetwardError, InvalidInput, NotFound
from fleetward.monitor import alerts as alert_store
from fleetward.monitor import playbooks as core
from fleetward.monitor.alerts import Alert
from fleetward.monitor.health_service import downgrade_in, group_deployment_installed
from fleetward.monitor.playbooks import Playbook, PlaybookSpec
from fleetward.monitor.sinks import check_webhook_url
from fleetward.registry.access import Principal
from fleetward.registry.models import DeviceStatus, Scope
from fleetward.registry.service import group_in, set_quarantine
from fleetward.store import events as event_log
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import devices, notice_destinations, playbook_runs, playbooks
from fleetward.store.trust import TrustBell

logger = logging.getLogger(__name__)

MONITOR_ACTOR = "monitor"
_ACTIVE_RUN_STATES = ("awaiting_approval", "done")


@dataclass(frozen=True)
class ActionOutcome:
    kind: str
    ok: bool
    detail: str
    #: what undoing it needs (the group the device came from)
    undo: dict[str, Any]


@dataclass(frozen=True)
class PlaybookRun:
    id: str
    tenant_id: str
    playbook_id: str
    playbook_name: str
    device_id: str
    alert_id: int | None
    state: str
    actions: list[dict[str, Any]]
    created_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    undone_by: str | None
    undone_at: dt.datetime | None
    detail: str


@dataclass(frozen=True)
class Destination:
    id: str
    tenant_id: str
    name: str
    kind: str  # webhook | syslog
    target: str
    options: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class PendingNotice:
    """A notice a run asked for: sent by the monitor once the run's transaction has committed."""

    destination: str
    run_id: str
    alert: Alert


def webhook_secret(keystore: KeyStore, tenant_id: str, destination_id: str) -> bytes:
    """The signing secret of a webhook: derived from the master key, never stored."""
    return keystore.derive(f"webhook {tenant_id} {destination_id}")


def _playbook(row: sa.Row[Any]) -> Playbook:
    spec = PlaybookSpec.model_validate(
        {
            "name": row.name,
            "enabled": row.enabled,
            "approval": row.approval,
            **json.loads(row.condition),
            "actions": json.loads(row.actions),
        }
    )
    return Playbook(row.id, row.tenant_id, spec, row.created_by, row.created_at, row.updated_at)


def _stored(spec: PlaybookSpec) -> dict[str, object]:
    extra = {"condition": spec.condition.model_dump(mode="json"), "release": None}
    if spec.release is not None:
        extra["release"] = spec.release.model_dump(mode="json")
    return {
        "name": spec.name,
        "enabled": spec.enabled,
        "approval": spec.approval.value,
        "condition": json.dumps(extra, separators=(",", ":")),
        "actions": json.dumps(
            [action.model_dump(mode="json") for action in spec.actions], separators=(",", ":")
        ),
    }


def _run(row: sa.Row[Any], names: dict[str, str]) -> PlaybookRun:
    return PlaybookRun(
        id=row.id,
        tenant_id=row.tenant_id,
        playbook_id=row.playbook_id,
        playbook_name=names.get(row.playbook_id, row.playbook_id),
        device_id=row.device_id,
        alert_id=row.alert_id,
        state=row.state,
        actions=json.loads(row.actions),
        created_at=row.created_at,
        decided_by=row.decided_by,
        decided_at=row.decided_at,
        undone_by=row.undone_by,
        undone_at=row.undone_at,
        detail=row.detail,
    )


class PlaybookService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        trust_bell: TrustBell,
        authority: AuthorityService,
        keystore: KeyStore,
    ) -> None:
        self._db = database
        self._clock = clock
        self._trust_bell = trust_bell
        self._authority = authority
        self._keystore = keystore

    # ---------------------------------------------------------------- playbooks

    def create(self, principal: Principal, tenant_id: str, spec: PlaybookSpec) -> Playbook:
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        with self._db.write() as connection:
            self._check_spec(connection, tenant_id, spec)
            count = connection.execute(
                sa.select(sa.func.count()).select_from(playbooks).where(playbooks.c.tenant_id == tenant_id)
            ).scalar_one()
            if count >= core.MAX_PLAYBOOKS_PER_TENANT:
                raise Conflict(
                    f"a tenant has at most {core.MAX_PLAYBOOKS_PER_TENANT} playbooks", code="too_many"
                )
            if connection.execute(
                sa.select(playbooks.c.id).where(
                    playbooks.c.tenant_id == tenant_id, playbooks.c.name == spec.name
                )
            ).first():
                raise Conflict(f"a playbook named {spec.name!r} exists", code="playbook_exists")
            playbook_id = str(uuid.uuid4())
            connection.execute(
                playbooks.insert().values(
                    id=playbook_id,
                    tenant_id=tenant_id,
                    created_by=principal.email,
                    created_at=now,
                    updated_at=now,
                    **_stored(spec),
                )
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="playbook",
                        code="playbook_created",
                        detail=f"playbook {spec.name!r} ({spec.approval.value}): "
                        + ", ".join(action.kind for action in spec.actions),
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            return self._get(connection, tenant_id, playbook_id)

    def _check_spec(self, connection: Connection, tenant_id: str, spec: PlaybookSpec) -> None:
        """What a playbook names must be the tenant's own: groups, destinations."""
        for action in spec.actions:
            if isinstance(action, core.MoveToGroup):
                group_in(connection, tenant_id, action.group_id)  # NotFound for another tenant's group
            if isinstance(action, core.Notify):
                self._destination(connection, tenant_id, action.destination)
        for group_id in spec.condition.group_ids:
            group_in(connection, tenant_id, group_id)

    def _get(self, connection: Connection, tenant_id: str, playbook_id: str) -> Playbook:
        row = connection.execute(
            sa.select(playbooks).where(
                playbooks.c.tenant_id == tenant_id,
                sa.or_(playbooks.c.id == playbook_id, playbooks.c.name == playbook_id),
            )
        ).first()
        if row is None:
            raise NotFound("no such playbook in this tenant", code="playbook_not_found")
        return _playbook(row)

    def get(self, principal: Principal, tenant_id: str, playbook_id: str) -> Playbook:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return self._get(connection, tenant_id, playbook_id)

    def list_playbooks(self, principal: Principal, tenant_id: str) -> list[Playbook]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return self.of_tenant(connection, tenant_id)

    @staticmethod
    def of_tenant(connection: Connection, tenant_id: str) -> list[Playbook]:
        rows = connection.execute(
            sa.select(playbooks).where(playbooks.c.tenant_id == tenant_id).order_by(playbooks.c.name)
        )
        return [_playbook(row) for row in rows]

    def set_enabled(self, principal: Principal, tenant_id: str, playbook_id: str, enabled: bool) -> Playbook:
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        with self._db.write() as connection:
            playbook = self._get(connection, tenant_id, playbook_id)
            connection.execute(
                playbooks.update()
                .where(playbooks.c.id == playbook.id)
                .values(enabled=enabled, updated_at=now)
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="playbook",
                        code="playbook_enabled" if enabled else "playbook_disabled",
                        detail=f"playbook {playbook.spec.name!r} {'enabled' if enabled else 'disabled'}",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            return self._get(connection, tenant_id, playbook.id)

    def delete(self, principal: Principal, tenant_id: str, playbook_id: str) -> None:
        principal.require(tenant_id, Scope.DELETE)
        with self._db.write() as connection:
            playbook = self._get(connection, tenant_id, playbook_id)
            if connection.execute(
                sa.select(playbook_runs.c.id).where(playbook_runs.c.playbook_id == playbook.id).limit(1)
            ).first():
                raise Conflict("the playbook has runs: disable it instead", code="playbook_has_runs")
            connection.execute(playbooks.delete().where(playbooks.c.id == playbook.id))
            event_log.record(
                connection,
                [
                    Event(
                        at=self._clock.now(),
                        kind="playbook",
                        code="playbook_deleted",
                        detail=f"playbook {playbook.spec.name!r} deleted",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )

    # ---------------------------------------------------------------- destinations

    def add_destination(
        self, principal: Principal, tenant_id: str, name: str, kind: str, target: str, options: dict[str, Any]
    ) -> tuple[Destination, bytes | None]:
        """Add where notices go; a webhook's signing secret is returned here (and by ``webhook_secret``)."""
        principal.require(tenant_id, Scope.ADMIN)
        if kind not in ("webhook", "syslog"):
            raise InvalidInput("a destination is a webhook or syslog", code="destination_kind")
        destination_id = str(uuid.uuid4())
        now = self._clock.now()
        with self._db.write() as connection:
            if connection.execute(
                sa.select(notice_destinations.c.id).where(
                    notice_destinations.c.tenant_id == tenant_id, notice_destinations.c.name == name
                )
            ).first():
                raise Conflict(f"a destination named {name!r} exists", code="destination_exists")
            connection.execute(
                notice_destinations.insert().values(
                    id=destination_id,
                    tenant_id=tenant_id,
                    name=name,
                    kind=kind,
                    target=target,
                    options=json.dumps(options, separators=(",", ":")),
                    created_at=now,
                )
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="playbook",
                        code="destination_added",
                        # the webhook's scheme, host and port only: a URL's path often holds a token
                        detail=f"{kind} destination {name!r} → "
                        + (check_webhook_url(target) if kind == "webhook" else target),
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            destination = self._destination(connection, tenant_id, name)
        secret = webhook_secret(self._keystore, tenant_id, destination_id) if kind == "webhook" else None
        return destination, secret

    def destinations(self, principal: Principal, tenant_id: str) -> list[Destination]:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(notice_destinations)
                .where(notice_destinations.c.tenant_id == tenant_id)
                .order_by(notice_destinations.c.name)
            )
            return [self._destination_of(row) for row in rows]

    def destination(self, tenant_id: str, name: str) -> Destination:
        with self._db.read() as connection:
            return self._destination(connection, tenant_id, name)

    def _destination(self, connection: Connection, tenant_id: str, name: str) -> Destination:
        row = connection.execute(
            sa.select(notice_destinations).where(
                notice_destinations.c.tenant_id == tenant_id, notice_destinations.c.name == name
            )
        ).first()
        if row is None:
            raise NotFound(f"no destination named {name[:64]!r} in this tenant", code="destination_not_found")
        return self._destination_of(row)

    @staticmethod
    def _destination_of(row: sa.Row[Any]) -> Destination:
        return Destination(
            row.id, row.tenant_id, row.name, row.kind, row.target, json.loads(row.options), row.created_at
        )

    # ---------------------------------------------------------------- runs

    def trigger(
        self, connection: Connection, alert: Alert, tenant_playbooks: Sequence[Playbook]
    ) -> tuple[list[PlaybookRun], list[PendingNotice]]:
        """Run (or put before an operator) each playbook the alert triggers, in the caller's transaction."""
        facts = core.AlertFacts(
            alert.tenant_id, alert.device_id, alert.group_id, alert.code, alert.severity, alert.score
        )
        runs: list[PlaybookRun] = []
        notices: list[PendingNotice] = []
        for playbook in core.matching(tenant_playbooks, facts):
            active = connection.execute(
                sa.select(playbook_runs.c.id).where(
                    playbook_runs.c.tenant_id == alert.tenant_id,
                    playbook_runs.c.playbook_id == playbook.id,
                    playbook_runs.c.device_id == alert.device_id,
                    playbook_runs.c.state.in_(_ACTIVE_RUN_STATES),
                )
            ).first()
            if active is not None:
                continue
            run_id = str(uuid.uuid4())
            now = self._clock.now()
            automatic = playbook.spec.approval is core.Approval.AUTOMATIC
            connection.execute(
                playbook_runs.insert().values(
                    id=run_id,
                    tenant_id=alert.tenant_id,
                    playbook_id=playbook.id,
                    device_id=alert.device_id,
                    alert_id=alert.id,
                    state="awaiting_approval",
                    actions="[]",
                    created_at=now,
                    detail=f"alert {alert.id} {alert.code} ({alert.severity})",
                )
            )
            if automatic:
                notices += self._execute(connection, run_id, playbook, alert, MONITOR_ACTOR)
            else:
                event_log.record(
                    connection,
                    [
                        Event(
                            at=now,
                            kind="playbook",
                            code="run_awaiting_approval",
                            detail=f"playbook {playbook.spec.name!r} awaits an operator's approval "
                            f"for alert {alert.id} {alert.code}",
                            severity=Severity.WARNING,
                            tenant_id=alert.tenant_id,
                            device_id=alert.device_id,
                            actor=MONITOR_ACTOR,
                        )
                    ],
                )
            runs.append(self._run_in(connection, alert.tenant_id, run_id))
        return runs, notices

    def _execute(
        self, connection: Connection, run_id: str, playbook: Playbook, alert: Alert, actor: str
    ) -> list[PendingNotice]:
        """Do the run's actions; each one's outcome (and what undoing it needs) goes in the run's row."""
        tenant_id, device_id = alert.tenant_id, alert.device_id
        now = self._clock.now()
        who = f"playbook:{playbook.spec.name}" if actor == MONITOR_ACTOR else actor
        reason = f"playbook {playbook.spec.name!r} on alert {alert.id} {alert.code} ({alert.severity})"
        outcomes: list[ActionOutcome] = []
        notices: list[PendingNotice] = []
        for action in playbook.spec.actions:
            try:
                outcomes.append(self._act(connection, action, tenant_id, device_id, who, reason))
            except FleetwardError as error:
                outcomes.append(ActionOutcome(action.kind, False, f"{error.message} ({error.code})", {}))
            if isinstance(action, core.Notify):
                notices.append(PendingNotice(action.destination, run_id, alert))
        state = "done" if all(outcome.ok for outcome in outcomes) else "failed"
        connection.execute(
            playbook_runs.update()
            .where(playbook_runs.c.id == run_id)
            .values(
                state=state,
                actions=json.dumps([outcome.__dict__ for outcome in outcomes], separators=(",", ":")),
                decided_by=actor,
                decided_at=now,
            )
        )
        event_log.record(
            connection,
            [
                Event(
                    at=now,
                    kind="playbook",
                    code=f"run_{state}",
                    detail=f"{reason}: " + "; ".join(f"{item.kind}: {item.detail}" for item in outcomes),
                    severity=Severity.WARNING,
                    tenant_id=tenant_id,
                    device_id=device_id,
                    actor=who,
                )
            ],
        )
        return notices

    def _act(
        self,
        connection: Connection,
        action: core.Action,
        tenant_id: str,
        device_id: str,
        who: str,
        reason: str,
    ) -> ActionOutcome:
        if isinstance(action, core.Notify):
            return ActionOutcome(action.kind, True, f"sent to {action.destination}", {})
        if isinstance(action, core.Quarantine):
            why = action.reason or reason
            set_quarantine(connection, tenant_id, device_id, True, why[:1000], who, self._clock.now())
            return ActionOutcome(action.kind, True, "quarantined: hub topics narrowed to the twin", {})
        if isinstance(action, core.MoveToGroup):
            group = group_in(connection, tenant_id, action.group_id)
            before = connection.execute(
                sa.select(devices.c.group_id, devices.c.product_id).where(
                    devices.c.id == device_id, devices.c.tenant_id == tenant_id
                )
            ).one()
            connection.execute(
                devices.update()
                .where(devices.c.id == device_id, devices.c.tenant_id == tenant_id)
                .values(group_id=group.id, product_id=group.product_id)
            )
            return ActionOutcome(
                action.kind,
                True,
                f"moved to group {group.name!r} (and its deployment)",
                {"group_id": before.group_id, "product_id": before.product_id},
            )
        count = self._authority.revoke_held_certificates(connection, tenant_id, device_id, who, reason)
        return ActionOutcome(action.kind, True, f"{count} certificate(s) revoked", {})

    def approve(
        self, principal: Principal, tenant_id: str, run_id: str
    ) -> tuple[PlaybookRun, list[PendingNotice]]:
        principal.require(tenant_id, Scope.WRITE)
        with self._db.write() as connection:
            run = self._run_in(connection, tenant_id, run_id)
            if run.state != "awaiting_approval":
                raise Conflict(f"the run is {run.state}, not awaiting approval", code="run_not_awaiting")
            playbook = self._get(connection, tenant_id, run.playbook_id)
            alert = alert_store.get(connection, tenant_id, run.alert_id or 0)
            notices = self._execute(connection, run.id, playbook, alert, principal.email)
            done = self._run_in(connection, tenant_id, run_id)
        self._trust_bell.ring()
        return done, notices

    def refuse(self, principal: Principal, tenant_id: str, run_id: str) -> PlaybookRun:
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        with self._db.write() as connection:
            run = self._run_in(connection, tenant_id, run_id)
            if run.state != "awaiting_approval":
                raise Conflict(f"the run is {run.state}, not awaiting approval", code="run_not_awaiting")
            connection.execute(
                playbook_runs.update()
                .where(playbook_runs.c.id == run.id)
                .values(state="refused", decided_by=principal.email, decided_at=now)
            )
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="playbook",
                        code="run_refused",
                        detail=f"run {run.id} of playbook {run.playbook_name!r} refused",
                        tenant_id=tenant_id,
                        device_id=run.device_id,
                        actor=principal.email,
                    )
                ],
            )
            return self._run_in(connection, tenant_id, run_id)

    def undo(self, principal: Principal, tenant_id: str, run_id: str) -> PlaybookRun:
        principal.require(tenant_id, Scope.WRITE)
        with self._db.write() as connection:
            undone = self.undo_in(connection, tenant_id, run_id, principal.email, "undone by an operator")
        self._trust_bell.ring()
        return undone

    def undo_in(
        self, connection: Connection, tenant_id: str, run_id: str, actor: str, why: str
    ) -> PlaybookRun:
        """Reverse what the run's actions did, in the caller's transaction (who rings the trust bell)."""
        run = self._run_in(connection, tenant_id, run_id)
        if run.state not in ("done", "failed"):
            raise Conflict(f"the run is {run.state}: nothing to undo", code="run_not_undoable")
        now = self._clock.now()
        notes: list[str] = []
        for action in reversed(run.actions):
            if not action.get("ok"):
                continue
            kind = action.get("kind")
            if kind == "quarantine":
                device_status = connection.execute(
                    sa.select(devices.c.status).where(
                        devices.c.id == run.device_id, devices.c.tenant_id == tenant_id
                    )
                ).scalar_one_or_none()
                if device_status == DeviceStatus.QUARANTINED.value:
                    set_quarantine(connection, tenant_id, run.device_id, False, why, actor, now)
                    notes.append("released")
            elif kind == "move_to_group":
                undo = action.get("undo") or {}
                connection.execute(
                    devices.update()
                    .where(devices.c.id == run.device_id, devices.c.tenant_id == tenant_id)
                    .values(group_id=undo.get("group_id"), product_id=undo.get("product_id"))
                )
                notes.append("moved back to its group")
            elif kind == "revoke_certificate":
                notes.append("revoked certificates stay revoked (the device attests for new ones)")
        closed = alert_store.close_of_device(connection, tenant_id, run.device_id, actor, now)
        if closed:
            notes.append(f"{closed} alert(s) closed")
        connection.execute(
            playbook_runs.update()
            .where(playbook_runs.c.id == run.id)
            .values(state="undone", undone_by=actor, undone_at=now)
        )
        event_log.record(
            connection,
            [
                Event(
                    at=now,
                    kind="playbook",
                    code="run_undone",
                    detail=f"run {run.id} of playbook {run.playbook_name!r} undone ({why}): "
                    + (", ".join(notes) or "nothing to reverse"),
                    tenant_id=tenant_id,
                    device_id=run.device_id,
                    actor=actor,
                )
            ],
        )
        return self._run_in(connection, tenant_id, run_id)

    def release_remediated(self) -> list[PlaybookRun]:
        """The release policy: undo each done run whose device passed a fresh attestation on the software
        of its group's deployment and has been quiet since (``playbooks.release_due``)."""
        released: list[PlaybookRun] = []
        with self._db.read() as connection:
            candidates = connection.execute(
                sa.select(playbook_runs.c.id, playbook_runs.c.tenant_id).where(
                    playbook_runs.c.state == "done"
                )
            ).all()
        for candidate in candidates:
            with self._db.write() as connection:
                run = self._run_in(connection, candidate.tenant_id, candidate.id)
                if run.state != "done" or run.decided_at is None:
                    continue
                if not any(action.get("kind") in ("quarantine", "move_to_group") for action in run.actions):
                    continue
                playbook = self._get(connection, run.tenant_id, run.playbook_id)
                device = connection.execute(
                    sa.select(devices.c.last_attested_at, devices.c.group_id).where(
                        devices.c.id == run.device_id, devices.c.tenant_id == run.tenant_id
                    )
                ).first()
                if device is None:
                    continue
                installed, installed_at = group_deployment_installed(
                    connection, run.tenant_id, run.device_id, device.group_id
                )
                facts = core.RemediationFacts(
                    set_aside_at=run.decided_at,
                    last_attested_at=device.last_attested_at,
                    runs_group_deployment=installed,
                    installed_at=installed_at,
                    downgrade=downgrade_in(connection, run.tenant_id, run.device_id, _home_group(run)),
                    alerts_since=alert_store.raised_since(
                        connection, run.tenant_id, run.device_id, run.decided_at, run.alert_id
                    ),
                )
                due, why = core.release_due(_release_policy(playbook), facts)
                if due:
                    released.append(
                        self.undo_in(connection, run.tenant_id, run.id, MONITOR_ACTOR, f"released: {why}")
                    )
        if released:
            self._trust_bell.ring()
        return released

    def _run_in(self, connection: Connection, tenant_id: str, run_id: str) -> PlaybookRun:
        row = connection.execute(
            sa.select(playbook_runs).where(
                playbook_runs.c.tenant_id == tenant_id, playbook_runs.c.id == run_id
            )
        ).first()
        if row is None:
            raise NotFound("no such playbook run in this tenant", code="run_not_found")
        name = connection.execute(
            sa.select(playbooks.c.name).where(playbooks.c.id == row.playbook_id)
        ).scalar_one()
        return _run(row, {row.playbook_id: name})

    def runs(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        device_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[PlaybookRun]:
        principal.require(tenant_id, Scope.READ)
        statement = (
            sa.select(playbook_runs)
            .where(playbook_runs.c.tenant_id == tenant_id)
            .order_by(playbook_runs.c.created_at.desc())
            .limit(limit)
        )
        if device_id is not None:
            statement = statement.where(playbook_runs.c.device_id == device_id)
        if state is not None:
            statement = statement.where(playbook_runs.c.state == state)
        with self._db.read() as connection:
            names = {
                row.id: row.name
                for row in connection.execute(
                    sa.select(playbooks.c.id, playbooks.c.name).where(playbooks.c.tenant_id == tenant_id)
                )
            }
            return [_run(row, names) for row in connection.execute(statement)]

    def run(self, principal: Principal, tenant_id: str, run_id: str) -> PlaybookRun:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            return self._run_in(connection, tenant_id, run_id)


def _home_group(run: PlaybookRun) -> str | None:
    """The group the run moved the device out of (None: it did not move it)."""
    for action in run.actions:
        if action.get("kind") == "move_to_group" and action.get("ok"):
            group_id = (action.get("undo") or {}).get("group_id")
            return str(group_id) if group_id is not None else None
    return None


def _release_policy(playbook: Playbook) -> core.ReleasePolicy | None:
    return playbook.spec.release


def parse_spec(data: object) -> PlaybookSpec:
    """A playbook from its JSON form, or InvalidInput saying what is wrong."""
    try:
        return PlaybookSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the playbook"
        raise InvalidInput(
            f"the playbook is malformed at {where}: {first['msg']}", code="playbook_malformed"
        ) from None
