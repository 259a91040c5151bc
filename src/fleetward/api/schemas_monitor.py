"""API shapes of the monitor: alerts, device health, playbooks and their runs, notice destinations."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetward.monitor.playbooks import PlaybookSpec


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlertPublic(_Public):
    id: int
    device_id: str
    group_id: str | None
    detector: str
    code: str
    severity: str
    score: float
    summary: str
    evidence: list[dict[str, Any]]
    state: str
    count: int
    opened_at: dt.datetime
    last_seen_at: dt.datetime
    closed_at: dt.datetime | None
    closed_by: str | None


class AlertUpdate(_Strict):
    state: Literal["acknowledged", "closed"]


class HealthReason(_Public):
    code: str
    detail: str
    state: str
    risk: int


class HealthPublic(_Public):
    device_id: str
    state: str
    risk: int
    restricted: bool
    reasons: list[HealthReason]
    computed_at: dt.datetime
    changed_at: dt.datetime


class HealthHistoryItem(_Public):
    at: dt.datetime
    state: str
    risk: int
    reasons: list[HealthReason]


class PlaybookPublic(_Public):
    id: str
    name: str
    spec: PlaybookSpec
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime


class PlaybookEnable(_Strict):
    enabled: bool


class ActionOutcomePublic(_Public):
    kind: str
    ok: bool
    detail: str


class PlaybookRunPublic(_Public):
    id: str
    playbook_id: str
    playbook_name: str
    device_id: str
    alert_id: int | None
    state: str
    actions: list[ActionOutcomePublic]
    created_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    undone_by: str | None
    undone_at: dt.datetime | None
    detail: str


class DestinationCreate(_Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
    kind: Literal["webhook", "syslog"]
    #: a webhook's https:// URL (http:// only to loopback), or a syslog collector's host:port
    target: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    syslog_transport: Literal["udp", "tcp", "tls"] = "tls"


class DestinationPublic(_Public):
    id: str
    name: str
    kind: str
    target: str
    options: dict[str, Any]
    created_at: dt.datetime
    #: a webhook's signing secret (hex), shown when it is created: receivers check X-Fleetward-Signature
    secret: str | None = None


class DetectionRules(_Strict):
    """A tenant's own detection rules (``detect.Rule`` as JSON); an empty list restores the defaults."""

    rules: list[dict[str, Any]] = Field(max_length=64)
