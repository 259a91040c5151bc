"""Operator routes of audits, under ``/v1/tenants/{tenant_id}``: run the checks now (``POST /audits``), list
the runs, show one with its findings (paged), and set, show or remove the tenant's audit schedule
(``/audit-schedule``). The checks are named as in :data:`fleetward.monitor.audits.CHECKS`; an unknown name
is refused with ``audit_check_unknown``, naming the known ones.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from fleetward.api.deps import PrincipalDep, as_utc, services
from fleetward.monitor.audit_service import (
    AuditRun,
    AuditRunDetail,
    AuditSchedule,
    AuditService,
    StoredFinding,
)
from fleetward.monitor.audits import CHECKS

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["audits"])

CheckName = Annotated[str, Field(max_length=64)]
RunId = Annotated[str, Path(max_length=64)]


def _audits(request: Request) -> AuditService:
    return services(request).audits


# --------------------------------------------------------------------------- schemas


class AuditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the checks to run; none: all of them
    checks: list[CheckName] | None = Field(default=None, max_length=len(CHECKS))


class SeverityCountsPublic(BaseModel):
    critical: int
    high: int
    medium: int
    low: int


class AuditRunPublic(BaseModel):
    id: str
    trigger: str
    checks: list[str]
    state: str
    findings: int
    counts: SeverityCountsPublic
    started_by: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, run: AuditRun) -> AuditRunPublic:
        return cls(
            id=run.id,
            trigger=run.trigger.value,
            checks=list(run.checks),
            state=run.state.value,
            findings=run.findings,
            counts=SeverityCountsPublic(
                critical=run.counts.critical,
                high=run.counts.high,
                medium=run.counts.medium,
                low=run.counts.low,
            ),
            started_by=run.started_by,
            started_at=run.started_at,
            finished_at=run.finished_at,
        )


class AuditFindingPublic(BaseModel):
    id: int
    check: str
    severity: str
    subject_kind: str
    subject_id: str
    detail: str
    found_at: dt.datetime

    @classmethod
    def of(cls, finding: StoredFinding) -> AuditFindingPublic:
        return cls(
            id=finding.id,
            check=finding.check,
            severity=finding.severity,
            subject_kind=finding.subject_kind,
            subject_id=finding.subject_id,
            detail=finding.detail,
            found_at=finding.found_at,
        )


class AuditRunDetailPublic(BaseModel):
    run: AuditRunPublic
    findings: list[AuditFindingPublic]
    #: pass as ``after_id`` for the next page of findings; ``None``: this was the last
    next_after_id: int | None

    @classmethod
    def of(cls, detail: AuditRunDetail) -> AuditRunDetailPublic:
        return cls(
            run=AuditRunPublic.of(detail.run),
            findings=[AuditFindingPublic.of(item) for item in detail.findings],
            next_after_id=detail.next_after_id,
        )


class AuditSchedulePut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval_seconds: int = Field(ge=1, le=10 * 365 * 24 * 3600)
    #: the checks it runs; none: all of them (those added later too)
    checks: list[CheckName] | None = Field(default=None, max_length=len(CHECKS))


class AuditSchedulePublic(BaseModel):
    interval_seconds: int
    checks: list[str]
    next_run_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, schedule: AuditSchedule) -> AuditSchedulePublic:
        return cls(
            interval_seconds=schedule.interval_seconds,
            checks=list(schedule.checks),
            next_run_at=schedule.next_run_at,
            updated_at=schedule.updated_at,
        )


# --------------------------------------------------------------------------- routes


@router.post("/audits", status_code=201)
async def run_audit(
    request: Request, tenant_id: str, body: AuditCreate, principal: PrincipalDep
) -> AuditRunPublic:
    """Run the checks (all of them unless named) over the tenant now; the finished run."""
    run = await _audits(request).run(principal, tenant_id, body.checks)
    return AuditRunPublic.of(run)


@router.get("/audits")
async def list_audits(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    before: dt.datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[AuditRunPublic]:
    """The tenant's audit runs, newest first; page with ``before`` (the last run's ``started_at``)."""
    runs = await asyncio.to_thread(
        _audits(request).list_runs, principal, tenant_id, before=as_utc(before), limit=limit
    )
    return [AuditRunPublic.of(run) for run in runs]


@router.get("/audits/{run_id}")
async def get_audit(
    request: Request,
    tenant_id: str,
    run_id: RunId,
    principal: PrincipalDep,
    after_id: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditRunDetailPublic:
    """One run with a page of its findings, most severe first; page on with ``next_after_id``."""
    detail = await asyncio.to_thread(
        _audits(request).get_run, principal, tenant_id, run_id, after_id=after_id, limit=limit
    )
    return AuditRunDetailPublic.of(detail)


@router.put("/audit-schedule")
async def set_audit_schedule(
    request: Request, tenant_id: str, body: AuditSchedulePut, principal: PrincipalDep
) -> AuditSchedulePublic:
    """Audit the tenant every ``interval_seconds``, the first time one interval from now."""
    schedule = await asyncio.to_thread(
        _audits(request).set_schedule, principal, tenant_id, body.interval_seconds, body.checks
    )
    return AuditSchedulePublic.of(schedule)


@router.get("/audit-schedule")
async def get_audit_schedule(
    request: Request, tenant_id: str, principal: PrincipalDep
) -> AuditSchedulePublic:
    """The tenant's audit schedule (404 ``audit_schedule_not_found`` when it has none)."""
    schedule = await asyncio.to_thread(_audits(request).get_schedule, principal, tenant_id)
    return AuditSchedulePublic.of(schedule)


@router.delete("/audit-schedule", status_code=204)
async def delete_audit_schedule(request: Request, tenant_id: str, principal: PrincipalDep) -> Response:
    """Stop the tenant's scheduled audits (on-demand ones still run)."""
    await asyncio.to_thread(_audits(request).delete_schedule, principal, tenant_id)
    return Response(status_code=204)
