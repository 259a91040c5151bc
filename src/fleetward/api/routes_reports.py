"""Operator routes of device reports: application failures (listed, and aggregated by signature as JSON
or CSV) and each device's latest security baseline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from fleetward.api import schemas
from fleetward.api.deps import PrincipalDep, as_utc, services
from fleetward.monitor.reports import ReportKind, ReportStore, StoredReport, failures_csv
from fleetward.registry.models import Scope
from fleetward.wire.baseline import SecurityBaseline

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["reports"])


def _reports(request: Request) -> ReportStore:
    return services(request).reports


def _public(report: StoredReport) -> schemas.ReportPublic:
    return schemas.ReportPublic(
        id=report.id,
        device_id=report.device_id,
        kind=report.kind,
        component_id=report.component_id,
        signature=report.signature,
        headline=report.headline,
        occurred_at=report.occurred_at,
        received_at=report.received_at,
        report=json.loads(report.body),
    )


@router.get("/reports")
async def list_reports(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    kind: ReportKind | None = None,
    device_id: str | None = None,
    group_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    after_id: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.ReportPublic]:
    """What devices reported, oldest first, by kind, device, group and time; page with ``after_id``."""
    principal.require(tenant_id, Scope.READ)
    found = await asyncio.to_thread(
        _reports(request).reports,
        tenant_id,
        kind=kind,
        device_id=device_id,
        group_id=group_id,
        since=as_utc(since),
        until=as_utc(until),
        after_id=after_id,
        limit=limit,
    )
    return [_public(report) for report in found]


@router.get(
    "/failures",
    response_model=list[schemas.FailureSignaturePublic],
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
async def failures(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    device_id: str | None = None,
    group_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    format: Literal["json", "csv"] = "json",
) -> list[schemas.FailureSignaturePublic] | Response:
    """Application failures grouped by signature, the most frequent first; ``format=csv`` for a download."""
    principal.require(tenant_id, Scope.READ)
    rows = await asyncio.to_thread(
        _reports(request).failures,
        tenant_id,
        device_id=device_id,
        group_id=group_id,
        since=as_utc(since),
        until=as_utc(until),
    )
    if format == "csv":
        return Response(
            failures_csv(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="failures.csv"'},
        )
    return [
        schemas.FailureSignaturePublic(
            signature=row.signature,
            kind=row.kind,
            component_id=row.component_id,
            headline=row.headline,
            count=row.count,
            devices=row.devices,
            first_seen=row.first_seen,
            last_seen=row.last_seen,
        )
        for row in rows
    ]


@router.get("/devices/{device_id}/baseline")
async def latest_baseline(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep
) -> schemas.BaselinePublic:
    """The device's latest security baseline: listening ports, connections, destinations, blocked, traffic."""
    principal.require(tenant_id, Scope.READ)
    report = await asyncio.to_thread(_reports(request).latest_baseline, tenant_id, device_id)
    return schemas.BaselinePublic(
        device_id=report.device_id,
        received_at=report.received_at,
        baseline=SecurityBaseline.model_validate_json(report.body),
    )
