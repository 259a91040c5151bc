"""Routes of deployments and the director (ADR 0015).

Devices (``Authorization: FleetwardDevice …``): ``GET /updates/v1/assignment`` (the signed assignment, or
204 when nothing is assigned) and ``POST /updates/v1/report`` (a ``VersionReport``). Operators, under
``/v1/tenants/{tenant_id}``: create, list, show, abort and revert deployments of a device group, and see
where one device is with its update.

After anything that opens a wave the devices concerned are asked to check now, through the hub router.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from fleetward.api.deps import PrincipalDep, services
from fleetward.api.device_auth import DeviceDep
from fleetward.errors import InvalidInput
from fleetward.updates.check_now import Nudger
from fleetward.updates.deployments import Deployment, DeploymentService, DeviceUpdateStatus
from fleetward.updates.rollout import MAX_WAVES, RolloutPlan, WaveSpec
from fleetward.wire.updates import MAX_COMPONENTS, MaintenanceWindow, VersionReport

logger = logging.getLogger(__name__)

device_router = APIRouter(prefix="/updates/v1", tags=["updates (devices)"])
router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["deployments"])


def _deployments(request: Request) -> DeploymentService:
    return services(request).deployments


async def _check_now(request: Request) -> None:
    """Nudge the devices of the waves just opened (no-op without a hub router: devices poll)."""
    nudger: Nudger | None = getattr(request.app.state, "nudger", None)
    if nudger is not None:
        await _deployments(request).check_now(nudger)


# --------------------------------------------------------------------------- schemas


class WindowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: str = Field(pattern=r"^\d{2}:\d{2}$", description="HH:MM, UTC")
    end: str = Field(pattern=r"^\d{2}:\d{2}$", description="HH:MM, UTC")


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_ids: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=MAX_COMPONENTS)
    #: cumulative: ``["10%", "50%", "100%"]`` or ``["5", "20", "all"]``
    waves: list[Annotated[str, Field(max_length=8)]] = Field(
        default=["all"], min_length=1, max_length=MAX_WAVES
    )
    success_threshold: float = Field(default=0.9, ge=0, le=1)
    max_failure_fraction: float = Field(default=0.2, ge=0, le=1)
    report_timeout_seconds: int = Field(default=1800, ge=1, le=30 * 24 * 3600)
    crash_rate_factor: float = Field(default=2.0, ge=1, le=1000)
    min_crash_reports: int = Field(default=3, ge=1, le=1_000_000)
    max_unhealthy_fraction: float = Field(default=0.2, ge=0, le=1)
    soak_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    window: WindowBody | None = None

    def plan(self) -> RolloutPlan:
        try:
            return RolloutPlan(
                waves=tuple(WaveSpec.parse(text) for text in self.waves),
                success_threshold=self.success_threshold,
                max_failure_fraction=self.max_failure_fraction,
                report_timeout_seconds=self.report_timeout_seconds,
                crash_rate_factor=self.crash_rate_factor,
                min_crash_reports=self.min_crash_reports,
                max_unhealthy_fraction=self.max_unhealthy_fraction,
                soak_seconds=self.soak_seconds,
            )
        except (TypeError, ValueError) as error:
            raise InvalidInput(str(error), code="invalid_plan") from None

    def maintenance_window(self) -> MaintenanceWindow | None:
        if self.window is None:
            return None
        try:
            return MaintenanceWindow.from_dict(self.window.model_dump())
        except ValueError as error:
            raise InvalidInput(str(error), code="invalid_window") from None


class Abort(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1024)


class WaveProgressPublic(BaseModel):
    wave: int
    size: int
    opened: bool
    assigned: int
    downloading: int
    installed: int
    failed: int
    rolled_back: int
    silent: int


class PlanPublic(BaseModel):
    waves: list[str]
    success_threshold: float
    max_failure_fraction: float
    report_timeout_seconds: int
    crash_rate_factor: float
    min_crash_reports: int
    max_unhealthy_fraction: float
    soak_seconds: int


class DeploymentPublic(BaseModel):
    id: str
    group_id: str
    image_ids: list[str]
    previous_id: str | None
    state: str
    plan: PlanPublic
    window: dict[str, str] | None
    waves_opened: int
    waves: list[WaveProgressPublic]
    reason: str
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None

    @classmethod
    def of(cls, deployment: Deployment) -> DeploymentPublic:
        return cls(
            id=deployment.id,
            group_id=deployment.group_id,
            image_ids=list(deployment.image_ids),
            previous_id=deployment.previous_id,
            state=deployment.state.value,
            plan=PlanPublic.model_validate(deployment.plan.to_dict()),
            window=deployment.window.to_dict() if deployment.window else None,
            waves_opened=deployment.waves_opened,
            waves=[
                WaveProgressPublic(opened=counts.wave < deployment.waves_opened, **counts.__dict__)
                for counts in deployment.waves
            ],
            reason=deployment.reason,
            created_by=deployment.created_by,
            created_at=deployment.created_at,
            updated_at=deployment.updated_at,
            completed_at=deployment.completed_at,
        )


class RunningComponent(BaseModel):
    component_id: str
    version: str
    sha256: str


class DeviceUpdatePublic(BaseModel):
    device_id: str
    group_id: str | None
    deployment_id: str | None
    wave: int | None
    assignment_version: int
    state: str
    code: str | None
    message: str
    bytes_downloaded: int
    bytes_saved: int
    running: list[RunningComponent]
    pending_image_ids: list[str]
    assigned_at: dt.datetime | None
    reported_at: dt.datetime | None

    @classmethod
    def of(cls, status: DeviceUpdateStatus) -> DeviceUpdatePublic:
        fields = dict(status.__dict__)
        fields["running"] = [
            RunningComponent(component_id=c, version=v, sha256=s) for c, v, s in status.running
        ]
        fields["pending_image_ids"] = list(status.pending_image_ids)
        return cls(**fields)


class ReportAccepted(BaseModel):
    accepted: bool = True


# --------------------------------------------------------------------------- devices


@device_router.get(
    "/assignment",
    responses={
        200: {"content": {"application/json": {}}, "description": "the signed assignment (TUF targets)"},
        204: {"description": "nothing is assigned to this device"},
    },
)
async def get_assignment(request: Request, device: DeviceDep) -> Response:
    """What this device must run now, signed by the director; 204 when nothing is assigned."""
    data = await asyncio.to_thread(_deployments(request).assignment_for, device)
    await _check_now(request)
    if data is None:
        return Response(status_code=204)
    return Response(content=data, media_type="application/json", headers={"Cache-Control": "no-store"})


@device_router.post("/report")
async def post_report(request: Request, body: VersionReport, device: DeviceDep) -> ReportAccepted:
    """The device's versions and how its updates went; the rollout is judged again at once."""
    await asyncio.to_thread(_deployments(request).record_report, device, body)
    await _check_now(request)
    return ReportAccepted()


# --------------------------------------------------------------------------- operators


@router.post("/device-groups/{group_id}/deployments", status_code=201)
async def create_deployment(
    request: Request, tenant_id: str, group_id: str, body: DeploymentCreate, principal: PrincipalDep
) -> DeploymentPublic:
    """Start rolling images out to a group: the first wave is assigned (and asked to check) at once."""
    created = await asyncio.to_thread(
        functools.partial(
            _deployments(request).create,
            principal,
            tenant_id,
            group_id,
            body.image_ids,
            body.plan(),
            body.maintenance_window(),
        )
    )
    await _check_now(request)
    return DeploymentPublic.of(created)


@router.get("/device-groups/{group_id}/deployments")
async def list_deployments(
    request: Request,
    tenant_id: str,
    group_id: str,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[DeploymentPublic]:
    """The group's deployments, newest first."""
    found = await asyncio.to_thread(
        functools.partial(_deployments(request).list_deployments, principal, tenant_id, group_id, limit=limit)
    )
    return [DeploymentPublic.of(deployment) for deployment in found]


@router.post("/device-groups/{group_id}/deployments/revert", status_code=201)
async def revert(
    request: Request, tenant_id: str, group_id: str, principal: PrincipalDep
) -> DeploymentPublic:
    """Give the whole group the images of the deployment before its newest one, at once."""
    created = await asyncio.to_thread(_deployments(request).revert, principal, tenant_id, group_id)
    await _check_now(request)
    return DeploymentPublic.of(created)


@router.get("/deployments/{deployment_id}")
async def get_deployment(
    request: Request, tenant_id: str, deployment_id: str, principal: PrincipalDep
) -> DeploymentPublic:
    """A deployment with its progress per wave."""
    found = await asyncio.to_thread(_deployments(request).get, principal, tenant_id, deployment_id)
    return DeploymentPublic.of(found)


@router.post("/deployments/{deployment_id}/abort")
async def abort(
    request: Request, tenant_id: str, deployment_id: str, principal: PrincipalDep, body: Abort | None = None
) -> DeploymentPublic:
    """Stop a rollout: the devices it reached are assigned the previous deployment again."""
    reason = body.reason if body is not None else ""
    aborted = await asyncio.to_thread(
        _deployments(request).abort, principal, tenant_id, deployment_id, reason
    )
    await _check_now(request)
    return DeploymentPublic.of(aborted)


@router.get("/devices/{device_id}/update")
async def device_update(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep
) -> DeviceUpdatePublic:
    """Where the device is with its update: what it must run, runs, has pending, and why it failed."""
    status = await asyncio.to_thread(_deployments(request).device_status, principal, tenant_id, device_id)
    return DeviceUpdatePublic.of(status)
