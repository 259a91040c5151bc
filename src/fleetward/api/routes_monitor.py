"""Operator routes of the monitor: alerts, device health and its history, playbooks, their runs (approve,
refuse, undo), notice destinations, and the tenant's detection rules."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, status

from fleetward.api import schemas_monitor as schemas
from fleetward.api.deps import PrincipalDep, services
from fleetward.errors import InvalidInput
from fleetward.monitor import alerts as alert_store
from fleetward.monitor.detect_rules import Rule, rules_from_json, rules_to_json
from fleetward.monitor.health_service import DeviceHealth
from fleetward.monitor.playbook_service import Destination, PlaybookRun
from fleetward.monitor.playbooks import Playbook, PlaybookSpec
from fleetward.monitor.service import Monitor
from fleetward.monitor.sinks import check_webhook_url
from fleetward.registry.models import Scope
from fleetward.store import events as event_log
from fleetward.store.events import Event
from fleetward.store.schema import detection_rules

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["monitor"])
Severity = Literal["low", "medium", "high", "critical"]


def _monitor(request: Request) -> Monitor | None:
    found: Monitor | None = getattr(request.app.state, "monitor", None)
    return found


def _health(item: DeviceHealth) -> schemas.HealthPublic:
    return schemas.HealthPublic.model_validate(item)


def _playbook(item: Playbook) -> schemas.PlaybookPublic:
    return schemas.PlaybookPublic(
        id=item.id,
        name=item.spec.name,
        spec=item.spec,
        created_by=item.created_by,
        created_at=item.created_at,
        updated_at=item.updated_at,
    )


def _run(item: PlaybookRun) -> schemas.PlaybookRunPublic:
    return schemas.PlaybookRunPublic.model_validate(item)


def _destination(item: Destination, secret: bytes | None = None) -> schemas.DestinationPublic:
    public = schemas.DestinationPublic.model_validate(item)
    return public.model_copy(update={"secret": secret.hex() if secret else None})


# ---------------------------------------------------------------------- alerts


@router.get("/alerts")
async def list_alerts(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    device_id: str | None = None,
    state: Literal["open", "acknowledged", "closed", "active"] | None = "active",
    min_severity: Severity | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.AlertPublic]:
    """Alerts, newest first; ``active`` (the default) is open and acknowledged ones."""
    principal.require(tenant_id, Scope.READ)
    database = services(request).database

    def read() -> list[alert_store.Alert]:
        with database.read() as connection:
            return alert_store.query(
                connection,
                tenant_id,
                device_id=device_id,
                state=state,
                min_severity=min_severity,
                limit=limit,
            )

    return [schemas.AlertPublic.model_validate(item) for item in await asyncio.to_thread(read)]


@router.get("/alerts/{alert_id}")
async def get_alert(
    request: Request, tenant_id: str, alert_id: int, principal: PrincipalDep
) -> schemas.AlertPublic:
    principal.require(tenant_id, Scope.READ)
    database = services(request).database

    def read() -> alert_store.Alert:
        with database.read() as connection:
            return alert_store.get(connection, tenant_id, alert_id)

    return schemas.AlertPublic.model_validate(await asyncio.to_thread(read))


@router.patch("/alerts/{alert_id}")
async def update_alert(
    request: Request, tenant_id: str, alert_id: int, body: schemas.AlertUpdate, principal: PrincipalDep
) -> schemas.AlertPublic:
    """Acknowledge an alert, or close it (final: a new finding opens a new alert)."""
    principal.require(tenant_id, Scope.WRITE)
    found = services(request)

    def write() -> alert_store.Alert:
        with found.database.write() as connection:
            return alert_store.set_state(
                connection, tenant_id, alert_id, body.state, principal.email, found.clock.now()
            )

    changed = await asyncio.to_thread(write)
    await asyncio.to_thread(found.health.recompute, [(tenant_id, changed.device_id)])
    return schemas.AlertPublic.model_validate(changed)


# ---------------------------------------------------------------------- health


@router.get("/health")
async def list_health(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    state: Literal["healthy", "at_risk", "unhealthy", "quarantined"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.HealthPublic]:
    """Devices' health, riskiest first."""
    found = await asyncio.to_thread(
        services(request).health.list_health, principal, tenant_id, state=state, limit=limit
    )
    return [_health(item) for item in found]


@router.get("/devices/{device_id}/health")
async def device_health(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep, refresh: bool = False
) -> schemas.HealthPublic:
    """A device's health and every reason for it; ``refresh`` judges it again first."""
    health = services(request).health
    if refresh:
        principal.require(tenant_id, Scope.READ)
        await asyncio.to_thread(health.recompute, [(tenant_id, device_id)])
    return _health(await asyncio.to_thread(health.health_of, principal, tenant_id, device_id))


@router.get("/devices/{device_id}/health/history")
async def device_health_history(
    request: Request,
    tenant_id: str,
    device_id: str,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[schemas.HealthHistoryItem]:
    rows = await asyncio.to_thread(services(request).health.history, principal, tenant_id, device_id, limit)
    return [
        schemas.HealthHistoryItem(
            at=at, state=state, risk=risk, reasons=[schemas.HealthReason(**r) for r in reasons]
        )
        for at, state, risk, reasons in rows
    ]


# ---------------------------------------------------------------------- playbooks


@router.post("/playbooks", status_code=status.HTTP_201_CREATED)
async def create_playbook(
    request: Request, tenant_id: str, body: PlaybookSpec, principal: PrincipalDep
) -> schemas.PlaybookPublic:
    """Condition → actions; ``approval: operator`` makes each run wait for an operator."""
    created = await asyncio.to_thread(services(request).playbooks.create, principal, tenant_id, body)
    monitor = _monitor(request)
    if monitor is not None:
        monitor.forget_playbooks(tenant_id)
    return _playbook(created)


@router.get("/playbooks")
async def list_playbooks(
    request: Request, tenant_id: str, principal: PrincipalDep
) -> list[schemas.PlaybookPublic]:
    return [
        _playbook(item)
        for item in await asyncio.to_thread(services(request).playbooks.list_playbooks, principal, tenant_id)
    ]


@router.get("/playbooks/{playbook}")
async def get_playbook(
    request: Request, tenant_id: str, playbook: str, principal: PrincipalDep
) -> schemas.PlaybookPublic:
    """A playbook by id or name."""
    return _playbook(await asyncio.to_thread(services(request).playbooks.get, principal, tenant_id, playbook))


@router.patch("/playbooks/{playbook}")
async def enable_playbook(
    request: Request, tenant_id: str, playbook: str, body: schemas.PlaybookEnable, principal: PrincipalDep
) -> schemas.PlaybookPublic:
    changed = await asyncio.to_thread(
        services(request).playbooks.set_enabled, principal, tenant_id, playbook, body.enabled
    )
    monitor = _monitor(request)
    if monitor is not None:
        monitor.forget_playbooks(tenant_id)
    return _playbook(changed)


@router.delete("/playbooks/{playbook}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_playbook(request: Request, tenant_id: str, playbook: str, principal: PrincipalDep) -> None:
    await asyncio.to_thread(services(request).playbooks.delete, principal, tenant_id, playbook)
    monitor = _monitor(request)
    if monitor is not None:
        monitor.forget_playbooks(tenant_id)


@router.get("/playbook-runs")
async def list_runs(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    device_id: str | None = None,
    state: Literal["awaiting_approval", "done", "failed", "refused", "undone"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.PlaybookRunPublic]:
    found = await asyncio.to_thread(
        services(request).playbooks.runs, principal, tenant_id, device_id=device_id, state=state, limit=limit
    )
    return [_run(item) for item in found]


@router.get("/playbook-runs/{run_id}")
async def get_run(
    request: Request, tenant_id: str, run_id: str, principal: PrincipalDep
) -> schemas.PlaybookRunPublic:
    return _run(await asyncio.to_thread(services(request).playbooks.run, principal, tenant_id, run_id))


@router.post("/playbook-runs/{run_id}/{decision}")
async def decide_run(
    request: Request,
    tenant_id: str,
    run_id: str,
    decision: Literal["approve", "refuse", "undo"],
    principal: PrincipalDep,
) -> schemas.PlaybookRunPublic:
    """Approve a run awaiting approval (its actions run now), refuse it, or undo a run that acted."""
    found = services(request)
    if decision == "approve":
        run, notices = await asyncio.to_thread(found.playbooks.approve, principal, tenant_id, run_id)
        monitor = _monitor(request)
        if monitor is not None:
            for notice in notices:
                await monitor.send(notice)
    elif decision == "refuse":
        run = await asyncio.to_thread(found.playbooks.refuse, principal, tenant_id, run_id)
    else:
        run = await asyncio.to_thread(found.playbooks.undo, principal, tenant_id, run_id)
        monitor = _monitor(request)
        if monitor is not None:
            monitor.released(tenant_id, run.device_id)
    await asyncio.to_thread(found.health.recompute, [(tenant_id, run.device_id)])
    return _run(run)


# ---------------------------------------------------------------------- destinations


@router.post("/notice-destinations", status_code=status.HTTP_201_CREATED)
async def add_destination(
    request: Request, tenant_id: str, body: schemas.DestinationCreate, principal: PrincipalDep
) -> schemas.DestinationPublic:
    """Where ``notify`` actions send alerts. A webhook's signing secret is in this answer only."""
    options: dict[str, object] = {}
    if body.kind == "webhook":
        check_webhook_url(body.target)
    else:
        host, _, port = body.target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput("a syslog destination is host:port", code="destination_target")
        options["transport"] = body.syslog_transport
    destination, secret = await asyncio.to_thread(
        services(request).playbooks.add_destination,
        principal,
        tenant_id,
        body.name,
        body.kind,
        body.target,
        options,
    )
    return _destination(destination, secret)


@router.get("/notice-destinations")
async def list_destinations(
    request: Request, tenant_id: str, principal: PrincipalDep
) -> list[schemas.DestinationPublic]:
    found = await asyncio.to_thread(services(request).playbooks.destinations, principal, tenant_id)
    return [_destination(item) for item in found]


# ---------------------------------------------------------------------- detection rules


@router.get("/detection-rules")
async def get_rules(request: Request, tenant_id: str, principal: PrincipalDep) -> schemas.DetectionRules:
    """The tenant's own rules (empty: the shipped defaults apply)."""
    principal.require(tenant_id, Scope.READ)
    database = services(request).database

    def read() -> str | None:
        with database.read() as connection:
            found: str | None = connection.execute(
                sa.select(detection_rules.c.rules).where(detection_rules.c.tenant_id == tenant_id)
            ).scalar_one_or_none()
            return found

    stored = await asyncio.to_thread(read)
    return schemas.DetectionRules.model_validate_json(stored) if stored else schemas.DetectionRules(rules=[])


@router.put("/detection-rules")
async def set_rules(
    request: Request, tenant_id: str, body: schemas.DetectionRules, principal: PrincipalDep
) -> schemas.DetectionRules:
    """Replace the tenant's rules (validated as a whole); an empty list restores the defaults."""
    principal.require(tenant_id, Scope.ADMIN)
    rules: tuple[Rule, ...] = rules_from_json(body.model_dump_json())
    found = services(request)
    now = found.clock.now()
    text = rules_to_json(rules)

    def write() -> None:
        with found.database.write() as connection:
            connection.execute(detection_rules.delete().where(detection_rules.c.tenant_id == tenant_id))
            if rules:
                connection.execute(
                    detection_rules.insert().values(tenant_id=tenant_id, rules=text, updated_at=now)
                )
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="detection",
                        code="rules_changed",
                        detail=f"{len(rules)} detection rule(s) set"
                        if rules
                        else "detection rules reset to defaults",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )

    await asyncio.to_thread(write)
    monitor = _monitor(request)
    if monitor is not None:
        monitor.detector.set_rules(tenant_id, rules or None)
    return schemas.DetectionRules.model_validate_json(text) if rules else schemas.DetectionRules(rules=[])
