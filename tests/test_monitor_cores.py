"""The monitor's pure cores: device health and conditional access, and playbooks' matching and release."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from fleetward.monitor.health import (
    TAMPERING_REFUSALS,
    HealthFacts,
    HealthState,
    OpenAlert,
    access_for,
    judge,
)
from fleetward.monitor.playbooks import (
    AlertFacts,
    Condition,
    MoveToGroup,
    Playbook,
    PlaybookSpec,
    Quarantine,
    ReleasePolicy,
    RemediationFacts,
    matching,
    release_due,
)
from fleetward.monitor.service import TAMPERING_SEVERITY

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def facts(**values: object) -> HealthFacts:
    base: dict[str, object] = {
        "now": NOW,
        "last_attested_at": NOW - HOUR,
        "certificate_not_after": NOW + 23 * HOUR,
        "last_baseline_at": NOW - dt.timedelta(minutes=5),
    }
    base.update(values)
    return HealthFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "state", "code"),
    [
        ({}, HealthState.HEALTHY, None),
        ({"revoked": True}, HealthState.UNHEALTHY, "revoked"),
        ({"quarantined": True, "quarantine_reason": "rogue"}, HealthState.QUARANTINED, "quarantined"),
        ({"attestation_refused": ("measurement_unknown", NOW)}, HealthState.UNHEALTHY, "attestation_failed"),
        ({"last_attested_at": None, "certificate_not_after": None}, HealthState.AT_RISK, "never_attested"),
        ({"last_attested_at": NOW - 30 * HOUR}, HealthState.AT_RISK, "attestation_late"),
        ({"certificate_not_after": NOW - HOUR}, HealthState.AT_RISK, "certificate_expired"),
        (
            {"certificate_not_after": NOW + dt.timedelta(minutes=30)},
            HealthState.AT_RISK,
            "certificate_expiring",
        ),
        ({"below_floor": (("c1", "1.0", "2.0"),)}, HealthState.UNHEALTHY, "below_floor"),
        ({"behind_deployment": "its update failed"}, HealthState.AT_RISK, "behind_deployment"),
        ({"last_baseline_at": NOW - 2 * HOUR}, HealthState.AT_RISK, "baseline_late"),
        (
            {"open_alerts": (OpenAlert("new_destination", "low", NOW),)},
            HealthState.HEALTHY,
            "alert:new_destination",
        ),
        (
            {"open_alerts": (OpenAlert("traffic_spike", "medium", NOW),)},
            HealthState.AT_RISK,
            "alert:traffic_spike",
        ),
        # a high alert alone does not restrict a device (a playbook may): a drain looks like a burst
        (
            {"open_alerts": (OpenAlert("message_flood", "high", NOW),)},
            HealthState.AT_RISK,
            "alert:message_flood",
        ),
        (
            {"open_alerts": (OpenAlert("undeclared_destination", "critical", NOW),)},
            HealthState.UNHEALTHY,
            "alert:undeclared_destination",
        ),
        (
            {"open_alerts": (OpenAlert("attestation_refused", "critical", NOW),)},
            HealthState.UNHEALTHY,
            "alert:attestation_refused",
        ),
        # volume and behaviour, however far past normal, put a device at risk only: a playbook decides
        (
            {"open_alerts": (OpenAlert("message_flood", "critical", NOW),)},
            HealthState.AT_RISK,
            "alert:message_flood",
        ),
    ],
)
def test_each_fact_leads_to_its_state_with_a_reason_saying_why(
    values: dict[str, object], state: HealthState, code: str | None
) -> None:
    verdict = judge(facts(**values))
    assert verdict.state is state
    assert [reason.code for reason in verdict.reasons] == ([code] if code else [])
    assert 0 <= verdict.risk <= 100


def test_the_worst_reason_sets_the_state_and_risk_adds_up_to_a_hundred_at_most() -> None:
    verdict = judge(
        facts(
            quarantined=True,
            attestation_refused=("quote_pcr_mismatch", NOW),
            below_floor=(("c1", "1.0", "2.0"), ("c2", "1.0", "3.0")),
            open_alerts=(OpenAlert("a", "critical", NOW), OpenAlert("b", "low", NOW)),
        )
    )
    assert verdict.state is HealthState.QUARANTINED
    assert verdict.risk == 100
    # the worst alert is listed first
    assert [reason.code for reason in verdict.reasons if reason.code.startswith("alert:")] == [
        "alert:a",
        "alert:b",
    ]


def test_a_refused_attestation_older_than_the_last_pass_is_not_a_reason() -> None:
    # the shell only hands over a refusal newer than the last pass; judge trusts it
    assert judge(facts(attestation_refused=None)).state is HealthState.HEALTHY


@pytest.mark.parametrize(
    ("state", "restricted", "certificate"),
    [
        (HealthState.HEALTHY, False, "full"),
        (HealthState.AT_RISK, False, "full"),
        (HealthState.UNHEALTHY, True, "remediation"),
        (HealthState.QUARANTINED, True, "remediation"),
    ],
)
def test_conditional_access_restricts_unhealthy_and_quarantined_devices_only(
    state: HealthState, restricted: bool, certificate: str
) -> None:
    access = access_for(state)
    assert (access.restricted, access.certificate) == (restricted, certificate)


def test_judging_is_deterministic() -> None:
    values = facts(open_alerts=(OpenAlert("b", "high", NOW), OpenAlert("a", "high", NOW)))
    assert judge(values) == judge(values)


# ---------------------------------------------------------------------- playbooks


def playbook(name: str, tenant_id: str = "t1", **condition: object) -> Playbook:
    spec = PlaybookSpec(name=name, condition=Condition.model_validate(condition), actions=(Quarantine(),))
    return Playbook(f"id-{name}", tenant_id, spec, "op@example.com", NOW, NOW)


def alert(**values: object) -> AlertFacts:
    base: dict[str, object] = {
        "tenant_id": "t1",
        "device_id": "d1",
        "group_id": "g1",
        "code": "undeclared_destination",
        "severity": "high",
        "score": 0.9,
    }
    base.update(values)
    return AlertFacts(**base)  # type: ignore[arg-type]


def test_a_playbook_matches_its_codes_severity_score_and_groups_only() -> None:
    books = [
        playbook("any-high"),
        playbook("codes", codes=("message_flood",)),
        playbook("critical", min_severity="critical"),
        playbook("score", min_score=0.95),
        playbook("group", group_ids=("g2",)),
        playbook("low-in-g1", min_severity="low", group_ids=("g1",)),
    ]
    assert [book.spec.name for book in matching(books, alert())] == ["any-high", "low-in-g1"]
    assert [book.spec.name for book in matching(books, alert(code="message_flood", severity="critical"))] == [
        "any-high",
        "codes",
        "critical",
        "low-in-g1",
    ]


def test_a_playbook_never_acts_on_an_alert_of_another_tenant() -> None:
    assert matching([playbook("theirs", tenant_id="t2", min_severity="low")], alert()) == []


def test_a_disabled_playbook_matches_nothing() -> None:
    book = playbook("off")
    off = Playbook(book.id, book.tenant_id, book.spec.model_copy(update={"enabled": False}), "x", NOW, NOW)
    assert matching([off], alert()) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "", "actions": [{"kind": "quarantine"}]},
        {"name": "x", "actions": []},
        {"name": "x", "actions": [{"kind": "format_disk"}]},
        {"name": "x", "actions": [{"kind": "quarantine"}] * 9},
        {"name": "x", "actions": [{"kind": "quarantine"}], "condition": {"min_score": 2}},
        {"name": "x", "actions": [{"kind": "quarantine"}], "condition": {"codes": ["Not A Code"]}},
        {"name": "x", "actions": [{"kind": "move_to_group"}]},
        {"name": "x", "actions": [{"kind": "quarantine"}], "surprise": 1},
    ],
)
def test_a_malformed_playbook_is_refused_when_built(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PlaybookSpec.model_validate(bad)


def test_a_playbook_round_trips_through_json() -> None:
    spec = PlaybookSpec(
        name="set aside",
        actions=(MoveToGroup(group_id="g-quarantine"), Quarantine(reason="rogue")),
        release=ReleasePolicy(quiet_severity="high"),
    )
    assert PlaybookSpec.model_validate_json(spec.model_dump_json()) == spec


SET_ASIDE = NOW - HOUR


@pytest.mark.parametrize(
    ("values", "due", "why"),
    [
        ({}, True, "fresh attestation"),
        ({"runs_group_deployment": False}, False, "does not run"),
        ({"last_attested_at": None}, False, "no attestation"),
        ({"last_attested_at": SET_ASIDE - HOUR}, False, "no attestation"),
        # attested after the quarantine but before installing the remediation: not yet
        (
            {
                "installed_at": NOW - dt.timedelta(minutes=5),
                "last_attested_at": NOW - dt.timedelta(minutes=10),
            },
            False,
            "no attestation",
        ),
        ({"alerts_since": ("critical",)}, False, "alert(s)"),
        # what setting it aside does to its connections (a spike of reconnects) does not hold it back
        ({"alerts_since": ("low", "medium", "high")}, True, "fresh attestation"),
        # its group still deploys the vulnerable release: going back would undo the remediation
        (
            {"downgrade": "panel-monitor 2.2.1, below the 2.2.2 it runs"},
            False,
            "take it back to panel-monitor 2.2.1",
        ),
    ],
)
def test_a_device_is_released_once_it_attests_on_remediated_software_and_stays_quiet(
    values: dict[str, object], due: bool, why: str
) -> None:
    base: dict[str, object] = {
        "set_aside_at": SET_ASIDE,
        "last_attested_at": NOW - dt.timedelta(minutes=1),
        "runs_group_deployment": True,
        "installed_at": NOW - dt.timedelta(minutes=2),
        "alerts_since": (),
    }
    base.update(values)
    released, reason = release_due(ReleasePolicy(), RemediationFacts(**base))  # type: ignore[arg-type]
    assert released is due
    assert why in reason


def test_a_playbook_without_a_release_policy_releases_only_by_an_operator() -> None:
    facts_ = RemediationFacts(SET_ASIDE, NOW, True, None, ())
    assert release_due(None, facts_)[0] is False
    assert release_due(ReleasePolicy(on_remediation=False), facts_)[0] is False


def test_every_tampering_refusal_has_a_severity_in_the_monitor() -> None:
    assert set(TAMPERING_SEVERITY) == TAMPERING_REFUSALS
