"""The detection core (pure): rules and their statistics, online baselines of devices and groups, the
judging of security baseline reports, tenants kept apart, bounded memory, snapshots of what was learned."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.errors import InvalidInput, PayloadTooLarge
from fleetward.monitor.detect import (
    DEFAULT_RULES,
    CloudSample,
    DetectionSettings,
    Detector,
    Finding,
    FindingSeverity,
    Rule,
)
from fleetward.monitor.detect_rules import MAX_RULES, graded, rules_from_json, rules_to_json
from fleetward.wire.baseline import BlockedConnection, Destination, ListeningPort, SecurityBaseline, Traffic

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
LOW, MEDIUM, HIGH, CRITICAL = (
    FindingSeverity.LOW,
    FindingSeverity.MEDIUM,
    FindingSeverity.HIGH,
    FindingSeverity.CRITICAL,
)


def sample(
    device: str = "d1", at: float = T0, *, tenant: str = "t1", group: str | None = "g1", **counts: Any
) -> CloudSample:
    return CloudSample(tenant, device, group, at, 1.0, **counts)


def codes(found: Iterable[Finding]) -> set[str]:
    return {finding.code for finding in found}


def learn_fleet(
    detector: Detector,
    devices: Sequence[str],
    *,
    seconds: int,
    start: float = T0,
    period: int = 10,
    tenant: str = "t1",
    group: str | None = "g1",
    messages: int = 1,
) -> list[Finding]:
    """Every device sends ``messages`` small messages every ``period`` seconds (each at its own phase)."""
    found: list[Finding] = []
    for second in range(seconds):
        batch = [
            sample(
                device,
                start + second,
                tenant=tenant,
                group=group,
                messages_in=messages,
                bytes_in=200 * messages,
            )
            for number, device in enumerate(devices)
            if (second + number) % period == 0
        ]
        found += detector.observe_many(batch)
    return found


# ---------------------------------------------------------------------------------------------- rules

RULES = {rule.name: rule for rule in DEFAULT_RULES}

#: (rule, a pattern that reaches its threshold, the same pattern just below it); a pattern is a list of
#: (second, counters)
RULE_PATTERNS = [
    (
        "authorization failures",
        [(second, {"authorization_failures": 1}) for second in (0, 15, 30, 45, 59)],
        [(second, {"authorization_failures": 1}) for second in (0, 15, 30, 45)],
    ),
    (
        "authorization failures",
        [(0, {"authorization_failures": 5})],
        [(0, {"authorization_failures": 4}), (61, {"authorization_failures": 4})],
    ),
    (
        "reconnect storm",
        [(30 * number, {"connection_attempts": 1}) for number in range(10)],
        [(30 * number, {"connection_attempts": 1}) for number in range(9)]
        + [(301, {"connection_attempts": 1})],
    ),
    (
        "many source addresses",
        [
            (0, {"source_addresses": frozenset({"10.0.0.1"})}),
            (20, {"source_addresses": frozenset({"10.0.0.2"})}),
            (59, {"source_addresses": frozenset({"10.0.0.3"})}),
        ],
        [
            (0, {"source_addresses": frozenset({"10.0.0.1"})}),
            (20, {"source_addresses": frozenset({"10.0.0.2"})}),
            (61, {"source_addresses": frozenset({"10.0.0.3"})}),
        ],
    ),
    (
        "message burst",
        [(0, {"messages_in": 75}), (1, {"messages_in": 75})],
        [(0, {"messages_in": 75}), (1, {"messages_in": 74}), (2, {"messages_in": 75})],
    ),
    (
        "message burst",
        [(0, {"messages_in": 150})],
        [(0, {"messages_in": 100}), (2, {"messages_in": 100}), (4, {"messages_in": 100})],
    ),
    (
        "sustained messages",
        [(second, {"messages_in": 80}) for second in range(5)],
        [(second, {"messages_in": 79}) for second in range(60)],
    ),
]


def run_pattern(
    detector: Detector, pattern: list[tuple[int, dict[str, Any]]], *, tenant: str = "t1"
) -> list[Finding]:
    found: list[Finding] = []
    for second, counters in pattern:
        found += detector.observe(sample("d1", T0 + second, tenant=tenant, **counters))
    return found


@pytest.mark.parametrize(("name", "reaching", "below"), RULE_PATTERNS)
def test_each_default_rule_fires_on_its_pattern_and_not_just_below_it(
    name: str, reaching: list[tuple[int, dict[str, Any]]], below: list[tuple[int, dict[str, Any]]]
) -> None:
    rule = RULES[name]
    detector = Detector()
    detector.set_rules("t1", [rule])
    found = run_pattern(detector, reaching)
    assert [finding.detector for finding in found] == [f"rule:{name}"]
    assert found[0].code == rule.code
    assert found[0].severity == rule.severity
    assert found[0].evidence[0].expected == rule.threshold
    assert found[0].evidence[0].observed >= rule.threshold
    quiet = Detector()
    quiet.set_rules("t1", [rule])
    assert run_pattern(quiet, below) == []


def test_the_shipped_rules_are_the_ones_the_brief_names() -> None:
    assert {(rule.code, rule.severity) for rule in DEFAULT_RULES} == {
        ("authorization_failures", HIGH),
        ("reconnect_storm", MEDIUM),
        ("many_source_addresses", MEDIUM),
        ("message_flood", HIGH),
    }


def percentile_rule(statistic: str, *, window: float = 10, threshold: float = 50) -> Rule:
    return Rule(
        name=f"{statistic} rule",
        metric="messages_in_per_second",
        statistic=statistic,
        window_seconds=window,
        comparator=">=",
        threshold=threshold,
        severity=MEDIUM,
        code="busy",
    )


@pytest.mark.parametrize(
    ("statistic", "busy_seconds", "fires"),
    [
        # 10 one-second slots, seconds without a sample are zeros; nearest rank: p50 is the 5th smallest,
        # p90 the 9th, p99 the 10th (the largest)
        ("p50", 5, False),
        ("p50", 6, True),
        ("p90", 1, False),
        ("p90", 2, True),
        ("p99", 1, True),
        ("max", 1, True),
    ],
)
def test_percentiles_are_over_the_seconds_of_the_window_missing_seconds_counting_as_zero(
    statistic: str, busy_seconds: int, fires: bool
) -> None:
    detector = Detector()
    detector.set_rules("t1", [percentile_rule(statistic)])
    found = run_pattern(detector, [(second, {"messages_in": 100}) for second in range(busy_seconds)])
    assert codes(found) == ({"busy"} if fires else set())


def test_a_percentile_below_its_threshold_does_not_fire() -> None:
    detector = Detector()
    detector.set_rules("t1", [percentile_rule("p50")])
    assert run_pattern(detector, [(second, {"messages_in": 49}) for second in range(30)]) == []


def test_long_windows_fold_into_sixty_slots_and_per_second_values_are_per_second_of_a_slot() -> None:
    rule = percentile_rule("max", window=300)  # 60 slots of 5 s
    detector = Detector()
    detector.set_rules("t1", [rule])
    assert run_pattern(detector, [(0, {"messages_in": 249})]) == []
    found = run_pattern(detector, [(600, {"messages_in": 250})])
    assert codes(found) == {"busy"}
    assert found[0].evidence[0].observed == 50
    assert "5 s slots" in found[0].evidence[0].detail


def test_rate_is_the_total_per_second_of_the_window_and_a_strict_comparator_needs_more() -> None:
    strict = Rule(
        name="steady",
        metric="bytes_in",
        statistic="rate",
        window_seconds=10,
        comparator=">",
        threshold=1000,
        severity=LOW,
        code="steady",
    )
    detector = Detector()
    detector.set_rules("t1", [strict])
    assert run_pattern(detector, [(second, {"bytes_in": 1000}) for second in range(20)]) == []
    found = run_pattern(detector, [(20, {"bytes_in": 1000}), (21, {"bytes_in": 1011})])
    assert codes(found) == {"steady"}
    assert found[0].evidence[0].observed == pytest.approx(1001.1)


def test_a_flood_is_found_within_two_seconds_of_samples_of_its_start() -> None:
    detector = Detector()
    assert learn_fleet(detector, ["d1", "d2"], seconds=600) == []
    start = T0 + 600
    found: list[Finding] = []
    for second in range(2):  # what the hub lets through: 100 per second
        found += detector.observe(sample("d1", start + second, messages_in=100, bytes_in=20_000))
    flood = [finding for finding in found if finding.code == "message_flood"]
    assert len(flood) == 1
    assert flood[0].severity == HIGH
    assert flood[0].at <= start + 1


def test_severities_are_graded_by_how_far_past_the_threshold() -> None:
    def severity(counters: dict[str, Any], code: str) -> FindingSeverity:
        found = [f for f in Detector().observe(sample(**counters)) if f.code == code]
        assert len(found) == 1
        return found[0].severity

    assert severity({"authorization_failures": 5}, "authorization_failures") == HIGH
    assert severity({"authorization_failures": 14}, "authorization_failures") == HIGH
    assert severity({"authorization_failures": 15}, "authorization_failures") == CRITICAL
    assert severity({"connection_attempts": 10}, "reconnect_storm") == MEDIUM
    assert severity({"connection_attempts": 20}, "reconnect_storm") == HIGH
    # one level above the rule's own severity at most
    assert severity({"connection_attempts": 10_000}, "reconnect_storm") == HIGH


@given(
    st.floats(0, 1e6, allow_nan=False), st.floats(0, 1e6, allow_nan=False), st.sampled_from(FindingSeverity)
)
def test_scores_rise_with_the_excess_and_lie_in_the_band_of_their_severity(
    one: float, other: float, floor: FindingSeverity
) -> None:
    bands = {LOW: (0.0, 0.6), MEDIUM: (0.6, 0.75), HIGH: (0.75, 0.9), CRITICAL: (0.9, 1.0)}
    small, large = sorted((one, other))
    small_score, small_severity = graded(small, floor, CRITICAL)
    large_score, large_severity = graded(large, floor, CRITICAL)
    assert 0.5 <= small_score <= large_score <= 1.0
    for score, severity in ((small_score, small_severity), (large_score, large_severity)):
        low, high = bands[severity]
        assert low <= score <= high
        assert list(FindingSeverity).index(severity) >= list(FindingSeverity).index(floor)


def test_a_repeated_finding_waits_for_repeat_seconds_unless_its_severity_rose() -> None:
    detector = Detector(DetectionSettings(repeat_seconds=60))
    found: list[Finding] = []
    for second in range(130):
        found += detector.observe(sample(at=T0 + second, messages_in=100))
    assert [f.at - T0 for f in found if f.code == "message_flood"] == [1, 61, 121]
    rising = Detector()
    first = rising.observe(sample(authorization_failures=5))
    worse = rising.observe(sample(at=T0 + 1, authorization_failures=30))
    again = rising.observe(sample(at=T0 + 2, authorization_failures=30))
    assert [f.severity for f in first + worse + again] == [HIGH, CRITICAL]


def test_rules_are_per_tenant_and_none_puts_the_defaults_back() -> None:
    detector = Detector()
    detector.set_rules("quiet-tenant", [])
    assert detector.observe(sample(tenant="quiet-tenant", authorization_failures=50)) == []
    assert codes(detector.observe(sample(tenant="other", authorization_failures=50))) == {
        "authorization_failures"
    }
    detector.set_rules("quiet-tenant", None)
    assert detector.rules("quiet-tenant") == DEFAULT_RULES
    assert codes(detector.observe(sample(tenant="quiet-tenant", at=T0 + 1, authorization_failures=50))) == {
        "authorization_failures"
    }


# ---------------------------------------------------------------------------------------------- rule records

GOOD_RULE: dict[str, Any] = {
    "name": "x",
    "metric": "messages_in",
    "statistic": "sum",
    "window_seconds": 10,
    "comparator": ">=",
    "threshold": 5,
    "severity": MEDIUM,
    "code": "x",
}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"name": ""}, ValueError),
        ({"name": "n" * 65}, ValueError),
        ({"name": "bad\nname"}, ValueError),
        ({"name": 5}, TypeError),
        ({"metric": "messages"}, ValueError),
        ({"metric": "source_addresses"}, ValueError),  # only with distinct
        ({"statistic": "distinct"}, ValueError),  # only on source_addresses
        ({"statistic": "mean"}, ValueError),
        ({"metric": "messages_in_per_second", "statistic": "sum"}, ValueError),
        ({"window_seconds": 0.5}, ValueError),
        ({"window_seconds": 24 * 3600 + 1}, ValueError),
        ({"window_seconds": math.inf}, ValueError),
        ({"window_seconds": "10"}, TypeError),
        ({"threshold": -1}, ValueError),
        ({"threshold": math.nan}, ValueError),
        ({"threshold": True}, TypeError),
        ({"comparator": "<"}, ValueError),
        ({"severity": "high"}, TypeError),
        ({"code": "Bad Code"}, ValueError),
        ({"code": "c" * 65}, ValueError),
    ],
)
def test_a_rule_refuses_bad_values_when_built(change: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Rule(**{**GOOD_RULE, **change})


rules = st.builds(
    Rule,
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.:-]{0,63}", fullmatch=True),
    metric=st.sampled_from(["messages_in", "bytes_out", "authorization_failures", "disconnects"]),
    statistic=st.sampled_from(["sum", "rate", "max", "p50", "p90", "p99"]),
    window_seconds=st.floats(1, 24 * 3600),
    comparator=st.sampled_from([">", ">="]),
    threshold=st.floats(0, 1e12),
    severity=st.sampled_from(FindingSeverity),
    code=st.from_regex(r"[a-z0-9][a-z0-9_]{0,63}", fullmatch=True),
)


@given(rules)
def test_a_rule_survives_its_json(rule: Rule) -> None:
    assert Rule.from_json(rule.to_json()) == rule


def test_a_tenants_rules_survive_their_json_and_refuse_bad_documents() -> None:
    assert rules_from_json(rules_to_json(DEFAULT_RULES)) == DEFAULT_RULES
    one = json.loads(DEFAULT_RULES[0].to_json())
    for document, error in (
        (b"{", InvalidInput),
        (json.dumps({"rules": [one, one]}), InvalidInput),  # two of one name
        (json.dumps({"rules": [{**one, "name": f"r{n}"} for n in range(MAX_RULES + 1)]}), InvalidInput),
        (json.dumps({"rules": [{**one, "window_seconds": 0}]}), InvalidInput),
        (json.dumps({"rules": [{**one, "extra": 1}]}), InvalidInput),
        (json.dumps({"rules": [{**one, "severity": "urgent"}]}), InvalidInput),
        (b" " * (64 * 1024 + 1), PayloadTooLarge),
    ):
        with pytest.raises(error):
            rules_from_json(document)
    with pytest.raises(InvalidInput):
        Rule.from_json(json.dumps({**one, "comparator": "=="}))
    with pytest.raises(InvalidInput):
        Detector().set_rules("t1", [replace(DEFAULT_RULES[0], name=f"r{n}") for n in range(MAX_RULES + 1)])


# ---------------------------------------------------------------------------------------------- baselines


def bucket_burst(
    detector: Detector, device: str, at: float, messages: int, *, tenant: str = "t1"
) -> list[Finding]:
    """``messages`` within one bucket, at most 40 per second (below every flood rule)."""
    found: list[Finding] = []
    second = 0
    while messages > 0:
        now = min(messages, 40)
        found += detector.observe(
            sample(device, at + second, tenant=tenant, messages_in=now, bytes_in=200 * now)
        )
        messages -= now
        second += 1
    return found


def test_a_learned_device_far_above_its_baseline_is_a_graded_traffic_spike_capped_at_high() -> None:
    detector = Detector()
    devices = [f"d{number}" for number in range(6)]
    assert learn_fleet(detector, devices, seconds=1800) == []
    at = T0 + 1800 + 0.5
    found = {
        messages: bucket_burst(detector, devices[index], at, messages)
        for index, messages in enumerate((12, 16, 30, 60, 120, 400))
    }
    assert found[12] == []  # a quiet device sending a dozen instead of one is not an anomaly
    # a burst comes over a few seconds: its finding is raised again each time its severity rises
    worst = {
        messages: [f.severity for f in items if f.code == "traffic_spike"][-1:]
        for messages, items in found.items()
        if messages != 12
    }
    assert worst == {16: [LOW], 30: [MEDIUM], 60: [HIGH], 120: [HIGH], 400: [HIGH]}
    spike = [f for f in found[60] if f.code == "traffic_spike"][-1]
    assert spike.detector == "baseline:messages_in"
    assert spike.evidence[0].metric == "messages_in"
    assert spike.evidence[0].observed == 60
    assert spike.evidence[0].expected == 15  # 3 times the floor level of 0.5 messages a second


def test_a_brand_new_device_in_a_learned_group_is_judged_by_its_group_from_its_first_minutes() -> None:
    detector = Detector()
    assert learn_fleet(detector, [f"d{number}" for number in range(20)], seconds=1800) == []
    at = T0 + 1800
    # a newcomer behaving like its group: nothing; one sending 4 messages a second: a traffic spike
    assert learn_fleet(detector, ["calm"], seconds=120, start=at) == []
    assert learn_fleet(detector, ["noisy"], seconds=60, start=at) == []
    found = bucket_burst(detector, "noisy", at + 60.5, 40)
    assert codes(found) == {"traffic_spike"}
    assert "group baseline" in found[0].evidence[0].detail
    # without a learned group, a device's first minutes are for learning
    alone = Detector()
    assert learn_fleet(alone, ["noisy"], seconds=60, start=at, group=None) == []
    assert bucket_burst(alone, "noisy", at + 60.5, 40) == []


def test_a_device_alone_is_judged_by_its_own_baseline_once_it_has_learned() -> None:
    detector = Detector()
    assert learn_fleet(detector, ["d1"], seconds=600, group=None) == []
    assert codes(bucket_burst(detector, "d1", T0 + 600.5, 60)) == {"traffic_spike"}


def test_an_attack_is_not_learned_a_ten_minute_flood_still_fires_at_its_end() -> None:
    detector = Detector()
    devices = [f"d{number}" for number in range(20)]
    assert learn_fleet(detector, devices, seconds=3600) == []
    start = T0 + 3600
    found: list[Finding] = []
    for second in range(600):  # 5 messages a second: under every rule, far above its baseline
        found += detector.observe(sample("d0", start + second, messages_in=5, bytes_in=1000))
    spikes = [f.at - start for f in found if f.code == "traffic_spike"]
    assert spikes[0] < 10
    assert spikes[-1] >= 540
    assert len(spikes) >= 9  # every repeat_seconds, all along
    # nor did it drag its group: a newcomer doing the same is still found by the group's baseline
    newcomer = bucket_burst(detector, "newcomer", start + 600.5, 50)
    assert codes(newcomer) == {"traffic_spike"}


def test_a_device_back_from_a_long_silence_may_send_its_backlog_when_it_reconnects() -> None:
    detector = Detector()
    devices = [f"d{number}" for number in range(10)]
    assert learn_fleet(detector, devices, seconds=1800, period=20) == []
    back = T0 + 1800 + 1500.5  # d0 was away 25 minutes: about 75 messages kept by its outbox
    assert learn_fleet(detector, devices[1:], seconds=1500, start=T0 + 1800, period=20) == []
    found = detector.observe(
        sample(
            "d0",
            back,
            messages_in=75,
            bytes_in=15_000,
            connection_attempts=1,
            source_addresses=frozenset({"10.0.0.1"}),
        )
    )
    assert found == []
    # the same burst out of the blue is a spike
    assert codes(bucket_burst(detector, "d1", back + 20, 75)) == {"traffic_spike"}


def test_one_device_attacking_does_not_drag_its_groups_baseline() -> None:
    """An attacking member's buckets enter its group clipped (at its own limit, and the group's): after ten
    minutes of one member sending 30 messages a second, its group expects of a newcomer what it did."""
    detector = Detector()
    devices = [f"d{number}" for number in range(20)]
    assert learn_fleet(detector, devices, seconds=3600) == []
    at = T0 + 3600

    def newcomers_limit(device: str, when: float) -> float:
        found = bucket_burst(detector, device, when, 60)
        return [f for f in found if f.code == "traffic_spike"][-1].evidence[0].expected

    before = newcomers_limit("early", at + 0.5)
    for second in range(600):
        detector.observe(sample("d0", at + second, messages_in=30, bytes_in=6000))
        detector.observe_many(
            sample(device, at + second, messages_in=1, bytes_in=200)
            for number, device in enumerate(devices[1:], 1)
            if (second + number) % 10 == 0
        )
    assert newcomers_limit("late", at + 600.5) <= before * 1.25


def test_a_chatty_device_back_from_an_outage_drains_its_outbox_at_the_hubs_rate_unnoticed() -> None:
    detector = Detector()
    devices = [f"d{number}" for number in range(10)]
    assert learn_fleet(detector, devices, seconds=3600, period=1) == []  # a message every second
    back = T0 + 3600 + 1200  # d0 was away for 20 minutes: 1,200 messages kept
    assert learn_fleet(detector, devices[1:], seconds=1200, start=T0 + 3600, period=1) == []
    found: list[Finding] = []
    left, second = 1200, 0
    while left > 0:  # the hub reads 200 at once, then 100 a second
        now = min(left, 200 if second == 0 else 100)
        found += detector.observe(
            sample(
                "d0", back + second, messages_in=now, bytes_in=200 * now, connection_attempts=int(second == 0)
            )
        )
        left, second = left - now, second + 1
    assert found == []
    # the credit (the backlog and some slack) is soon spent: more of the same is a flood again
    more: list[Finding] = []
    for extra in range(5):
        more += detector.observe(sample("d0", back + second + extra, messages_in=100))
    assert "message_flood" in codes(more)


def test_cloud_to_device_spikes_and_reconnects_stop_at_medium() -> None:
    detector = Detector()
    devices = [f"d{number}" for number in range(6)]
    assert learn_fleet(detector, devices, seconds=1800) == []
    at = T0 + 1800.5
    down = detector.observe(sample("d0", at, messages_out=40, bytes_out=4000_000))
    assert codes(down) == {"cloud_to_device_spike"}
    assert {f.severity for f in down} == {MEDIUM}
    detector.set_rules("t1", [])  # the reconnect storm rule aside
    storm = detector.observe(sample("d1", at, connection_attempts=9))
    assert codes(storm) == {"connection_spike"}
    assert {f.severity for f in storm} == {MEDIUM}


def test_a_device_that_always_used_one_address_is_noticed_on_a_new_one() -> None:
    detector = Detector()
    first = frozenset({"10.0.0.1"})
    detector.observe(sample("fixed", T0, connection_attempts=1, source_addresses=first))
    assert learn_fleet(detector, ["fixed"], seconds=600, start=T0 + 1) == []
    moved = detector.observe(
        sample("fixed", T0 + 700, connection_attempts=1, source_addresses=frozenset({"192.0.2.7"}))
    )
    assert [(f.code, f.severity) for f in moved] == [("new_source_address", LOW)]
    assert moved[0].evidence[0].detail == "192.0.2.7"
    # having moved once, it moves: the next address is no news
    again = detector.observe(
        sample("fixed", T0 + 900, connection_attempts=1, source_addresses=frozenset({"198.51.100.3"}))
    )
    assert again == []


# ---------------------------------------------------------------------------------------------- tenants


def test_tenants_are_apart_even_with_the_same_device_and_group_ids() -> None:
    detector = Detector()
    detector.set_rules("chatty", [])
    assert learn_fleet(detector, ["d1", "d2"], seconds=1800, tenant="chatty", period=1, messages=10) == []
    assert learn_fleet(detector, ["d1", "d2"], seconds=1800, tenant="quiet") == []
    at = T0 + 1800.5
    # the same 50 messages: nothing for the chatty tenant's d1, a spike for the quiet tenant's d1
    chatty: list[Finding] = []
    quiet: list[Finding] = []
    for second in range(5):
        chatty += detector.observe(sample("d1", at + second, tenant="chatty", messages_in=10, bytes_in=2000))
        quiet += detector.observe(sample("d1", at + second, tenant="quiet", messages_in=10, bytes_in=2000))
    assert chatty == []
    assert codes(quiet) == {"traffic_spike"}
    assert {f.tenant_id for f in quiet} == {"quiet"}
    # one tenant's rules and repeat state do not touch the other's
    assert detector.observe(sample("d1", at + 10, tenant="chatty", authorization_failures=9)) == []
    assert codes(detector.observe(sample("d1", at + 10, tenant="quiet", authorization_failures=9))) == {
        "authorization_failures"
    }
    # a group id names a different group in each tenant: a newcomer of "g1" is judged by its tenant's "g1"
    for tenant in ("quiet", "third"):
        assert learn_fleet(detector, ["new"], seconds=60, start=at + 100, tenant=tenant) == []
    assert codes(bucket_burst(detector, "new", at + 160.5, 40, tenant="quiet")) == {"traffic_spike"}
    assert bucket_burst(detector, "new", at + 160.5, 40, tenant="third") == []  # no prior: still learning


# ---------------------------------------------------------------------------------------------- memory


def test_memory_is_bounded_least_recently_seen_devices_groups_and_tenants_forgotten_first() -> None:
    detector = Detector(DetectionSettings(max_devices=2, max_groups=2, max_tenants=2))
    for number, device in enumerate(["d1", "d2", "d1", "d3"]):
        detector.observe(sample(device, T0 + number, group=f"g-{device}", messages_in=1))
    assert detector.snapshot_device("t1", "d2") is None
    assert detector.snapshot_device("t1", "d1") is not None
    assert detector.snapshot_device("t1", "d3") is not None
    assert detector.tracked == (1, 2, 2)
    detector.observe(sample("d9", T0 + 10, tenant="t2"))
    detector.observe(sample("d9", T0 + 11, tenant="t3"))
    assert detector.tracked[0] == 2
    assert detector.snapshot_device("t1", "d1") is None  # its tenant was the least recently seen
    for number in range(1000):
        detector.observe(sample(f"x{number}", T0 + 20, tenant=f"t{number % 7}", group=f"g{number}"))
    tenants, groups, devices = detector.tracked
    assert tenants <= 2
    assert groups <= 2
    assert devices <= 2


def test_forgetting_a_device_drops_what_it_learned() -> None:
    detector = Detector()
    assert learn_fleet(detector, ["d1"], seconds=600, group=None) == []
    detector.forget("t1", "d1")
    assert detector.snapshot_device("t1", "d1") is None
    assert bucket_burst(detector, "d1", T0 + 600.5, 60) == []  # learning again: more lenient, never stricter


# ---------------------------------------------------------------------------------------------- snapshots


def report(
    *,
    listening: Sequence[tuple[str, int]] = (("tcp", 22),),
    destinations: Sequence[tuple[str, int]] = (("20.50.1.10", 8883),),
    blocked: Sequence[tuple[str, int, int]] = (),
    bytes_out: int = 30_000,
    bytes_in: int = 20_000,
) -> SecurityBaseline:
    return SecurityBaseline(
        collected_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        interval_seconds=300,
        listening=tuple(
            ListeningPort(protocol=protocol, address="0.0.0.0", port=port)  # noqa: S104
            for protocol, port in listening
        ),
        destinations=tuple(Destination(address=a, port=p, times_seen=3) for a, p in destinations),
        blocked=tuple(BlockedConnection(component_id="app", host=h, port=p, count=c) for h, p, c in blocked),
        traffic=Traffic(
            bytes_in=bytes_in, bytes_out=bytes_out, packets_in=bytes_in // 300, packets_out=bytes_out // 400
        ),
    )


def test_a_snapshot_restores_what_a_device_learned_and_judges_the_same() -> None:
    original = Detector()
    assert learn_fleet(original, ["d1"], seconds=900, group=None) == []
    original.observe(sample("d1", T0 + 901, connection_attempts=1, source_addresses=frozenset({"10.0.0.1"})))
    for number in range(4):
        assert original.judge_baseline("t1", "d1", None, report(), T0 + 300 * number) == []
    data = original.snapshot_device("t1", "d1")
    assert data is not None
    assert len(data) < 4096
    restored = Detector()
    restored.restore_device("t1", "d1", data)
    assert restored.snapshot_device("t1", "d1") == data
    at = T0 + 1000.5
    for detector in (original, restored):
        assert codes(bucket_burst(detector, "d1", at, 60)) == {"traffic_spike"}
        news = detector.judge_baseline("t1", "d1", None, report(listening=(("tcp", 22), ("tcp", 4444))), at)
        assert [(f.code, f.severity) for f in news] == [("new_listening_port", MEDIUM)]
    assert restored.snapshot_device("t1", "other") is None


def _valid_snapshot() -> dict[str, Any]:
    detector = Detector()
    learn_fleet(detector, ["d1"], seconds=60, group=None)
    detector.judge_baseline("t1", "d1", None, report(), T0)
    data = detector.snapshot_device("t1", "d1")
    assert data is not None
    parsed: dict[str, Any] = json.loads(data)
    return parsed


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        lambda s: {**s, "format": "fleetward-detector-device-v2"},
        lambda s: {**s, "mean": s["mean"][:-1]},
        lambda s: {**s, "var": [-1.0] * 5},
        lambda s: {**s, "learned": "many"},
        lambda s: {**s, "extra": True},
        lambda s: {**s, "addresses": {"not-an-ip": 1.0}},
        lambda s: {**s, "reports": {**s["reports"], "ports": {"tcp/99999": 1}}},
        lambda s: {**s, "reports": {**s["reports"], "ports": {"sctp/22": 1}}},
        lambda s: {**s, "reports": {**s["reports"], "destinations": ["example.com:443"]}},
        lambda s: {**s, "reports": {**s["reports"], "count": -1}},
    ],
)
def test_restore_refuses_garbage(garbage: Any) -> None:
    data = garbage if isinstance(garbage, bytes) else json.dumps(garbage(_valid_snapshot())).encode()
    detector = Detector()
    with pytest.raises(InvalidInput):
        detector.restore_device("t1", "d1", data)
    assert detector.snapshot_device("t1", "d1") is None


def test_restore_refuses_non_finite_numbers_and_oversized_snapshots() -> None:
    text = json.dumps(_valid_snapshot())
    detector = Detector()
    with pytest.raises(InvalidInput):
        detector.restore_device("t1", "d1", text.replace('"learned":', '"learned":NaN,"x":', 1).encode())
    with pytest.raises(InvalidInput):
        detector.restore_device("t1", "d1", text.replace('"learned":', '"learned":1e999,"x":', 1).encode())
    with pytest.raises(PayloadTooLarge):
        detector.restore_device("t1", "d1", b" " * (64 * 1024 + 1))
    with pytest.raises(InvalidInput):
        detector.restore_device("t1", "d1", text)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- reports


def test_blocked_connections_are_undeclared_destinations_high_and_critical_when_many() -> None:
    detector = Detector()
    found = detector.judge_baseline("t1", "d1", "g1", report(blocked=[("evil.example", 4444, 3)]), T0)
    assert [(f.code, f.severity) for f in found] == [("undeclared_destination", HIGH)]
    assert found[0].evidence[0].detail == "evil.example:4444 (app)"
    assert found[0].evidence[0].observed == 3
    many_hosts = [(f"h{number}.example", 443, 1) for number in range(5)]
    worse = detector.judge_baseline("t1", "d2", "g1", report(blocked=many_hosts), T0)
    assert [(f.code, f.severity) for f in worse] == [("undeclared_destination", CRITICAL)]
    retries = detector.judge_baseline("t1", "d3", "g1", report(blocked=[("10.9.9.9", 22, 100)]), T0)
    assert [f.severity for f in retries] == [CRITICAL]


def test_a_new_listening_port_is_medium_after_a_few_reports_and_low_when_its_group_commonly_has_it() -> None:
    detector = Detector()
    for number in range(3):  # while a device's first reports come, its ports are learned
        assert detector.judge_baseline("t1", "d0", "g1", report(listening=[("tcp", 22 + number)]), T0) == []
    for number in range(1, 6):
        for second in range(3):
            assert detector.judge_baseline("t1", f"d{number}", "g1", report(), T0 + second) == []
    at = T0 + 300
    for number in range(1, 4):  # three of the group's five reporting devices start listening on 8080
        found = detector.judge_baseline(
            "t1", f"d{number}", "g1", report(listening=[("tcp", 22), ("tcp", 8080)]), at
        )
        assert [(f.code, f.severity) for f in found] == [
            ("new_listening_port", MEDIUM if number <= 2 else LOW)
        ]
    rare = detector.judge_baseline("t1", "d4", "g1", report(listening=[("tcp", 22), ("udp", 31337)]), at)
    assert [(f.code, f.severity) for f in rare] == [("new_listening_port", MEDIUM)]
    assert "udp/31337" in rare[0].evidence[0].detail
    assert (
        detector.judge_baseline("t1", "d4", "g1", report(listening=[("tcp", 22), ("udp", 31337)]), at + 300)
        == []
    )


def test_a_destination_neither_the_device_nor_two_of_its_group_had_is_low() -> None:
    detector = Detector()
    usual = [("20.50.1.10", 8883), ("162.159.200.1", 123)]
    for number in range(4):
        for at in range(3):
            assert (
                detector.judge_baseline("t1", f"d{number}", "g1", report(destinations=usual), T0 + at) == []
            )
    odd = detector.judge_baseline(
        "t1", "d0", "g1", report(destinations=[*usual, ("203.0.113.5", 443)]), T0 + 9
    )
    assert [(f.code, f.severity) for f in odd] == [("new_destination", LOW)]
    assert odd[0].evidence[0].detail == "203.0.113.5:443"
    # one device alone does not make it normal for the group; a second one does
    assert codes(
        detector.judge_baseline("t1", "d1", "g1", report(destinations=[("203.0.113.5", 443)]), T0 + 9)
    ) == {"new_destination"}
    assert (
        detector.judge_baseline("t1", "d2", "g1", report(destinations=[("203.0.113.5", 443)]), T0 + 9) == []
    )
    # a newcomer in a learned group is judged from its first report
    newcomer = detector.judge_baseline("t1", "new", "g1", report(destinations=[("2001:db8::9", 443)]), T0 + 9)
    assert [f.evidence[0].detail for f in newcomer] == ["[2001:db8::9]:443"]


def test_reported_traffic_far_above_the_devices_baseline_is_a_spike_received_traffic_at_most_medium() -> None:
    detector = Detector()
    for at in range(6):
        assert detector.judge_baseline("t1", "d1", None, report(), T0 + 300 * at) == []
    out = detector.judge_baseline("t1", "d1", None, report(bytes_out=30_000_000), T0 + 1800)
    assert [(f.code, f.severity) for f in out] == [("traffic_spike", HIGH)]
    assert out[0].detector == "baseline-report:traffic"
    assert {item.metric for item in out[0].evidence} == {"bytes_out_per_second", "packets_out_per_second"}
    download = detector.judge_baseline("t1", "d1", None, report(bytes_in=50_000_000), T0 + 3600)
    assert [(f.code, f.severity) for f in download] == [("traffic_spike", MEDIUM)]
    # the spike was not learned: the same again is a spike again
    assert codes(detector.judge_baseline("t1", "d1", None, report(bytes_out=30_000_000), T0 + 7200)) == {
        "traffic_spike"
    }


# ---------------------------------------------------------------------------------------------- properties

addresses = st.frozensets(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "192.0.2.1", "2001:db8::1", "198.51.100.9"]), max_size=5
)
counters = st.one_of(st.integers(0, 3), st.integers(0, 200), st.integers(0, 2**63 - 1))
samples = st.builds(
    CloudSample,
    tenant_id=st.sampled_from(["t1", "t2"]),
    device_id=st.sampled_from(["d1", "d2", "d3"]),
    group_id=st.sampled_from([None, "g1", "g2"]),
    at=st.one_of(st.floats(T0, T0 + 7200), st.floats(0, 1e10)),
    seconds=st.floats(0.001, 3600),
    messages_in=counters,
    bytes_in=counters,
    messages_out=counters,
    bytes_out=counters,
    authorization_failures=counters,
    connection_attempts=counters,
    disconnects=counters,
    source_addresses=addresses,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(samples, max_size=80), st.booleans())
def test_observe_never_raises_on_valid_samples_and_scores_stay_between_0_and_1(
    batch: list[CloudSample], ordered: bool
) -> None:
    detector = Detector(
        DetectionSettings(min_device_buckets=2, min_group_buckets=2, max_devices=4, max_groups=2)
    )
    detector.set_rules("t2", [percentile_rule("p90"), percentile_rule("max", window=3600)])
    if ordered:
        batch = sorted(batch, key=lambda item: item.at)
    found = detector.observe_many(batch[: len(batch) // 2])
    for item in batch[len(batch) // 2 :]:
        found += detector.observe(item)
    for finding in found:
        assert 0.0 <= finding.score <= 1.0
        assert isinstance(finding.severity, FindingSeverity)
        assert finding.evidence
        assert all(math.isfinite(item.observed) or item.observed == math.inf for item in finding.evidence)
    for tenant in ("t1", "t2"):
        for device in ("d1", "d2", "d3"):
            data = detector.snapshot_device(tenant, device)
            if data is not None:
                Detector().restore_device(tenant, device, data)


@pytest.mark.parametrize(
    "change",
    [
        {"tenant_id": ""},
        {"device_id": "d" * 129},
        {"group_id": ""},
        {"at": math.nan},
        {"at": -1.0},
        {"seconds": 0.0},
        {"messages_in": -1},
        {"bytes_in": 2**63},
        {"messages_out": 1.5},
        {"disconnects": True},
        {"source_addresses": frozenset(f"10.0.0.{n}" for n in range(9))},
        {"source_addresses": {"10.0.0.1"}},
    ],
)
def test_a_sample_refuses_bad_values_when_built(change: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        replace(sample(), **change)


def test_settings_refuse_values_that_are_not_positive() -> None:
    for change in (
        {"bucket_seconds": 0},
        {"max_devices": 1.5},
        {"ratio_threshold": 0.5},
        {"z_threshold": -1},
    ):
        with pytest.raises((TypeError, ValueError)):
            DetectionSettings(**change)
