"""Device health: what is known of a device, judged into a state with its reasons (the pure core).

:func:`judge` takes a :class:`HealthFacts` (attestation, certificate, software against the group's deployment
and the security floors, the security baseline's freshness, open alerts, standing) and returns a
:class:`HealthVerdict`: one of four states, a risk score from 0 to 100, and every reason, each with the state
it alone would lead to. The worst reason sets the state. :func:`access_for` is conditional access: what a
state lets a device do. The monitor's shell (``monitor/health_service.py``) gathers the facts from the store,
recomputes a device's health whenever one of them changes, and keeps the history.

=============  =====================================================================================
state          what it means, and what the device may do
=============  =====================================================================================
healthy        nothing wrong known: full hub topics, daily certificates
at_risk        something to look at (behind its deployment, a medium or high alert, a late baseline):
               full access still, the operator sees why
unhealthy      something wrong (a failed attestation, software below the floor, a critical alert of
               integrity): restricted (twin-only hub topics; certificates for remediation only)
quarantined    set aside by an operator or a playbook: restricted until released
=============  =====================================================================================
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class HealthState(StrEnum):
    HEALTHY = "healthy"
    AT_RISK = "at_risk"
    UNHEALTHY = "unhealthy"
    QUARANTINED = "quarantined"


_ORDER = {
    HealthState.HEALTHY: 0,
    HealthState.AT_RISK: 1,
    HealthState.UNHEALTHY: 2,
    HealthState.QUARANTINED: 3,
}

#: alert severities, as the detectors grade them, and the state an open alert of each leads to
_ALERT_STATE = {
    "low": HealthState.HEALTHY,
    "medium": HealthState.AT_RISK,
    "high": HealthState.AT_RISK,
    "critical": HealthState.UNHEALTHY,
}
#: the alerts that say the device itself is not what it should be; only these, when critical, restrict a
#: device by themselves. Volume and behaviour (a burst, a spike, failures) put it at risk at most: a
#: device draining its outbox after an outage looks like a flood, so a playbook or an operator decides
INTEGRITY_ALERTS = frozenset({"attestation_refused", "undeclared_destination"})
_ALERT_RISK = {"low": 5, "medium": 20, "high": 50, "critical": 80}

#: attestation refusals that say the device's software or identity is not what it should be (a nonce that
#: expired or was spent twice, a malformed request, say nothing about the device: they are not reasons)
TAMPERING_REFUSALS = frozenset(
    {
        "measurement_unknown",
        "measurement_below_floor",
        "evidence_signature_invalid",
        "quote_pcr_mismatch",
        "quote_nonce_mismatch",
        "csr_key_mismatch",
    }
)


@dataclass(frozen=True)
class HealthPolicy:
    """When facts turn into reasons. Times in seconds."""

    #: a device attests daily; past this without a pass it is late
    attestation_late_seconds: float = 26 * 3600
    certificate_expiring_seconds: float = 2 * 3600
    #: no security baseline report for this long (once the device has sent one) is a silent agent
    baseline_late_seconds: float = 30 * 60


@dataclass(frozen=True)
class OpenAlert:
    code: str
    severity: str  # low | medium | high | critical
    opened_at: dt.datetime


@dataclass(frozen=True)
class HealthFacts:
    """Everything health is judged on, as of ``now``. ``None`` means not known (yet)."""

    now: dt.datetime
    revoked: bool = False
    quarantined: bool = False
    quarantine_reason: str = ""
    last_attested_at: dt.datetime | None = None
    #: the newest refused attestation, if newer than the last pass: (code, when)
    attestation_refused: tuple[str, dt.datetime] | None = None
    certificate_not_after: dt.datetime | None = None
    #: components running below their security floor: (component, running, floor)
    below_floor: tuple[tuple[str, str, str], ...] = ()
    #: the device does not run its group's current deployment (and is not on its way to it)
    behind_deployment: str | None = None
    last_baseline_at: dt.datetime | None = None
    open_alerts: tuple[OpenAlert, ...] = ()


@dataclass(frozen=True)
class Reason:
    code: str
    detail: str
    state: HealthState
    risk: int


@dataclass(frozen=True)
class HealthVerdict:
    state: HealthState
    risk: int
    reasons: tuple[Reason, ...]

    @property
    def restricted(self) -> bool:
        """Conditional access: narrowed hub topics and remediation-only certificates."""
        return access_for(self.state).restricted


@dataclass(frozen=True)
class Access:
    restricted: bool
    #: operational certificates: the full daily one, or a short one that only lets it remediate
    certificate: str  # "full" | "remediation"


def access_for(state: HealthState) -> Access:
    """What a device in ``state`` may do: unhealthy and quarantined devices only remediate."""
    if state in (HealthState.UNHEALTHY, HealthState.QUARANTINED):
        return Access(restricted=True, certificate="remediation")
    return Access(restricted=False, certificate="full")


def judge(facts: HealthFacts, policy: HealthPolicy = HealthPolicy()) -> HealthVerdict:
    """The device's state, risk and reasons. Deterministic: the same facts give the same verdict."""
    reasons = [*_standing(facts), *_attestation(facts, policy), *_software(facts), *_signals(facts, policy)]
    state = max((reason.state for reason in reasons), key=_ORDER.__getitem__, default=HealthState.HEALTHY)
    risk = min(100, sum(reason.risk for reason in reasons))
    return HealthVerdict(state, risk, tuple(reasons))


def _standing(facts: HealthFacts) -> list[Reason]:
    if facts.revoked:
        return [Reason("revoked", "the device is revoked", HealthState.UNHEALTHY, 100)]
    if facts.quarantined:
        why = facts.quarantine_reason or "no reason given"
        return [Reason("quarantined", f"quarantined: {why}", HealthState.QUARANTINED, 60)]
    return []


def _attestation(facts: HealthFacts, policy: HealthPolicy) -> list[Reason]:
    reasons: list[Reason] = []
    if facts.attestation_refused is not None:
        code, at = facts.attestation_refused
        reasons.append(
            Reason(
                "attestation_failed",
                f"its last attestation was refused ({code}) at {at.isoformat(timespec='seconds')}",
                HealthState.UNHEALTHY,
                70,
            )
        )
    if facts.last_attested_at is None:
        reasons.append(Reason("never_attested", "it has never passed attestation", HealthState.AT_RISK, 20))
    elif (facts.now - facts.last_attested_at).total_seconds() > policy.attestation_late_seconds:
        hours = (facts.now - facts.last_attested_at).total_seconds() / 3600
        reasons.append(
            Reason("attestation_late", f"no attestation passed for {hours:.0f} h", HealthState.AT_RISK, 20)
        )
    if facts.certificate_not_after is not None and facts.last_attested_at is not None:
        left = (facts.certificate_not_after - facts.now).total_seconds()
        if left <= 0:
            reasons.append(
                Reason(
                    "certificate_expired", "its operational certificate has expired", HealthState.AT_RISK, 20
                )
            )
        elif left <= policy.certificate_expiring_seconds:
            reasons.append(
                Reason(
                    "certificate_expiring",
                    f"its operational certificate expires in {left / 60:.0f} min without a renewal",
                    HealthState.AT_RISK,
                    10,
                )
            )
    return reasons


def _software(facts: HealthFacts) -> list[Reason]:
    reasons = [
        Reason(
            "below_floor",
            f"{component} runs {running}, below its security floor {floor}",
            HealthState.UNHEALTHY,
            60,
        )
        for component, running, floor in facts.below_floor
    ]
    if facts.behind_deployment is not None:
        reasons.append(Reason("behind_deployment", facts.behind_deployment, HealthState.AT_RISK, 10))
    return reasons


def _signals(facts: HealthFacts, policy: HealthPolicy) -> list[Reason]:
    reasons: list[Reason] = []
    if (
        facts.last_baseline_at is not None
        and (facts.now - facts.last_baseline_at).total_seconds() > policy.baseline_late_seconds
    ):
        minutes = (facts.now - facts.last_baseline_at).total_seconds() / 60
        reasons.append(
            Reason("baseline_late", f"no security baseline for {minutes:.0f} min", HealthState.AT_RISK, 15)
        )
    for alert in _worst_first(facts.open_alerts):
        state = _ALERT_STATE.get(alert.severity, HealthState.AT_RISK)
        if alert.code not in INTEGRITY_ALERTS:
            state = min(state, HealthState.AT_RISK, key=_ORDER.__getitem__)
        reasons.append(
            Reason(
                f"alert:{alert.code}",
                f"open {alert.severity} alert {alert.code} "
                f"since {alert.opened_at.isoformat(timespec='seconds')}",
                state,
                _ALERT_RISK.get(alert.severity, 20),
            )
        )
    return reasons


def _worst_first(alerts: Sequence[OpenAlert]) -> list[OpenAlert]:
    rank = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    return sorted(alerts, key=lambda alert: (rank.get(alert.severity, 4), alert.opened_at, alert.code))
