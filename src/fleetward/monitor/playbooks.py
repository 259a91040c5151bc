"""Playbooks: when an alert matches a condition, what to do about its device (the pure core).

A :class:`Playbook` is a condition over alerts (codes, lowest severity, lowest score, groups) and a list of
actions; ``approval`` says whether the actions run at once (``automatic``) or wait for an operator
(``operator``). :func:`matching` picks the playbooks an alert triggers; :func:`release_due` says when a
device a playbook set aside may come back (the release policy). The shell (``playbook_service.py``) keeps
playbooks and their runs, does the actions in the store, and undoes them.

=====================  ================================================================  ==================
action                 what it does                                                      undone by
=====================  ================================================================  ==================
``notify``             sends the alert to a destination (webhook, syslog/CEF)            nothing to undo
``quarantine``         narrows the device to its twin; certificates for remediation only release
``move_to_group``      moves the device into a group (with it, that group's deployment:  moving it back
                       how a remediation release is pushed)
``revoke_certificate`` revokes the certificate the device holds now: its session ends;   (stays revoked: the
                       it must attest again for a new one                                device re-attests)
=====================  ================================================================  ==================
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

MAX_PLAYBOOKS_PER_TENANT = 64
MAX_ACTIONS = 8
_SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}

Code = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_:.-]{1,64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]


class Approval(StrEnum):
    AUTOMATIC = "automatic"
    OPERATOR = "operator"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Condition(_Strict):
    """Which alerts trigger the playbook: every field given must hold (an empty condition matches all)."""

    codes: tuple[Code, ...] = Field(default=(), max_length=32)
    min_severity: Literal["low", "medium", "high", "critical"] = "high"
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)
    #: only devices of these groups (ids); empty: any group
    group_ids: tuple[Annotated[str, StringConstraints(max_length=36)], ...] = Field(default=(), max_length=32)


class Notify(_Strict):
    kind: Literal["notify"] = "notify"
    destination: Name


class Quarantine(_Strict):
    kind: Literal["quarantine"] = "quarantine"
    reason: Annotated[str, StringConstraints(max_length=512)] = ""


class MoveToGroup(_Strict):
    kind: Literal["move_to_group"] = "move_to_group"
    group_id: Annotated[str, StringConstraints(min_length=1, max_length=36)]


class RevokeCertificate(_Strict):
    kind: Literal["revoke_certificate"] = "revoke_certificate"


Action = Annotated[Notify | Quarantine | MoveToGroup | RevokeCertificate, Field(discriminator="kind")]


class ReleasePolicy(_Strict):
    """When a device this playbook set aside comes back by itself: after a fresh attestation on the
    software of its (quarantine) group's deployment, with no new alert at or above ``quiet_severity``."""

    on_remediation: bool = True
    #: critical by default: the fresh attestation on the remediated software is what vouches for the
    #: device; setting it aside and remediating it (sessions ended, re-attestations, the update's download,
    #: reports of the incident still in flight) makes alerts of its own, up to high, that say nothing new.
    #: A device that misbehaves again after its release is set aside again by the same playbook.
    quiet_severity: Literal["low", "medium", "high", "critical"] = "critical"


class PlaybookSpec(_Strict):
    """What an operator writes (JSON or the CLI's options)."""

    name: Name
    condition: Condition = Condition()
    actions: tuple[Action, ...] = Field(min_length=1, max_length=MAX_ACTIONS)
    approval: Approval = Approval.AUTOMATIC
    release: ReleasePolicy | None = ReleasePolicy()
    enabled: bool = True


actions_adapter: TypeAdapter[tuple[Action, ...]] = TypeAdapter(tuple[Action, ...])


@dataclass(frozen=True)
class Playbook:
    id: str
    tenant_id: str
    spec: PlaybookSpec
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class AlertFacts:
    """An alert as playbooks see it."""

    tenant_id: str
    device_id: str
    group_id: str | None
    code: str
    severity: str
    score: float


def matches(condition: Condition, alert: AlertFacts) -> bool:
    if condition.codes and alert.code not in condition.codes:
        return False
    if _SEVERITY_RANK.get(alert.severity, -1) < _SEVERITY_RANK[condition.min_severity]:
        return False
    if alert.score < condition.min_score:
        return False
    return not condition.group_ids or alert.group_id in condition.group_ids


def matching(playbooks: Iterable[Playbook], alert: AlertFacts) -> list[Playbook]:
    """The enabled playbooks of the alert's tenant that it triggers, by name (a stable order)."""
    return sorted(
        (
            playbook
            for playbook in playbooks
            if playbook.tenant_id == alert.tenant_id
            and playbook.spec.enabled
            and matches(playbook.spec.condition, alert)
        ),
        key=lambda playbook: playbook.spec.name,
    )


@dataclass(frozen=True)
class RemediationFacts:
    """What the release policy looks at for one device set aside at ``set_aside_at``."""

    set_aside_at: dt.datetime
    last_attested_at: dt.datetime | None
    #: the device runs its group's current deployment (what it was moved to, or what its group runs)
    runs_group_deployment: bool
    #: when it reported that deployment installed (None: no deployment to install)
    installed_at: dt.datetime | None
    #: severities of the alerts raised on the device since it was set aside
    alerts_since: Sequence[str]
    #: what going back to its group would downgrade it to (the group still deploys an older release)
    downgrade: str | None = None


def release_due(policy: ReleasePolicy | None, facts: RemediationFacts) -> tuple[bool, str]:
    """Whether the device may come back now, and why (or why not)."""
    if policy is None or not policy.on_remediation:
        return False, "the playbook releases only by an operator"
    if not facts.runs_group_deployment:
        return False, "it does not run its group's deployment yet"
    since = max(facts.set_aside_at, facts.installed_at or facts.set_aside_at)
    if facts.last_attested_at is None or facts.last_attested_at <= since:
        return False, "no attestation passed on the remediated software yet"
    if facts.downgrade is not None:
        return False, f"its group would take it back to {facts.downgrade}"
    quiet = _SEVERITY_RANK[policy.quiet_severity]
    loud = [severity for severity in facts.alerts_since if _SEVERITY_RANK.get(severity, 0) >= quiet]
    if loud:
        return False, f"{len(loud)} alert(s) at or above {policy.quiet_severity} since it was set aside"
    return True, "it passed a fresh attestation on remediated software and has been quiet since"
