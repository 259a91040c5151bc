"""The pure core of rollouts: how devices are split into waves, when a wave opens the next, when a rollout
stops itself, and what a group's update policy lets through. No store, no server."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetward.registry.models import DeviceGroup, OsFeed, UpdatePolicy
from fleetward.updates.rollout import (
    CrashBaseline,
    Decision,
    DeviceProgress,
    DeviceState,
    RolloutPlan,
    RolloutProgress,
    WaveSpec,
    assignable,
    awaiting_evaluation,
    count_waves,
    judge,
    plan_waves,
)

NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)

device_ids = st.lists(st.text("0123456789abcdef", min_size=8, max_size=8), max_size=300, unique=True)
wave_specs = st.one_of(
    st.lists(st.integers(1, 400), min_size=1, max_size=6, unique=True).map(
        lambda counts: tuple(WaveSpec(count=c) for c in sorted(counts))
    ),
    st.lists(st.integers(1, 100), min_size=1, max_size=6, unique=True).map(
        lambda percents: tuple(WaveSpec(percent=p) for p in sorted(percents))
    ),
)


@given(device_ids, wave_specs, st.text(max_size=8))
def test_every_device_is_in_exactly_one_wave_and_the_plan_is_deterministic(
    ids: list[str], waves: tuple[WaveSpec, ...], seed: str
) -> None:
    plan = RolloutPlan(waves=waves)
    planned = plan_waves(ids, plan, seed=seed)
    flat = [device for wave in planned for device in wave]
    assert sorted(flat) == sorted(ids)
    assert len(planned) <= len(waves)
    assert plan_waves(list(reversed(ids)), plan, seed=seed) == planned
    if ids:
        assert all(planned), "no wave is empty when there are devices"
    else:
        assert planned == ((),)


@given(device_ids.filter(lambda ids: len(ids) >= 10), st.lists(st.integers(1, 99), min_size=1, max_size=4))
def test_cumulative_percentages_bound_each_wave(ids: list[str], percents: list[int]) -> None:
    specs = (*tuple(WaveSpec(percent=p) for p in sorted(set(percents))), WaveSpec(percent=100))
    planned = plan_waves(ids, RolloutPlan(waves=specs))
    reached = 0
    for wave, spec in zip(planned, specs, strict=False):
        reached += len(wave)
        assert reached >= spec.target(len(ids))
    assert reached == len(ids)


def test_counts_are_cumulative_and_the_last_wave_takes_the_rest() -> None:
    ids = [f"d{i:03d}" for i in range(30)]
    planned = plan_waves(ids, RolloutPlan(waves=(WaveSpec(count=5), WaveSpec(count=20), WaveSpec(count=21))))
    assert [len(wave) for wave in planned] == [5, 15, 10]


def test_two_seeds_start_with_different_devices() -> None:
    ids = [f"d{i:03d}" for i in range(100)]
    plan = RolloutPlan(waves=(WaveSpec(count=5), WaveSpec(percent=100)))
    assert plan_waves(ids, plan, seed="a")[0] != plan_waves(ids, plan, seed="b")[0]


@pytest.mark.parametrize(
    ("text", "spec"),
    [("10%", WaveSpec(percent=10)), ("5", WaveSpec(count=5)), ("all", WaveSpec(percent=100))],
)
def test_wave_specs_parse_and_print(text: str, spec: WaveSpec) -> None:
    assert WaveSpec.parse(text) == spec
    assert WaveSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "0", "-3", "0%", "101%", "ten", "5.5"])
def test_bad_wave_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any of the value errors
        WaveSpec.parse(text)


@pytest.mark.parametrize(
    "change",
    [
        {"waves": ()},
        {"waves": (WaveSpec(count=10), WaveSpec(count=5))},
        {"success_threshold": 1.5},
        {"max_failure_fraction": -0.1},
        {"report_timeout_seconds": 0},
        {"crash_rate_factor": 0.5},
        {"min_crash_reports": 0},
    ],
)
def test_plans_validate_when_built(change: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        RolloutPlan(**change)  # type: ignore[arg-type]


@given(
    st.builds(
        RolloutPlan,
        waves=wave_specs,
        success_threshold=st.floats(0, 1),
        max_failure_fraction=st.floats(0, 1),
        report_timeout_seconds=st.integers(1, 10**6),
        crash_rate_factor=st.floats(1, 100),
        min_crash_reports=st.integers(1, 100),
        max_unhealthy_fraction=st.floats(0, 1),
    )
)
def test_plans_survive_their_json_form(plan: RolloutPlan) -> None:
    assert RolloutPlan.from_dict(plan.to_dict()) == plan


# --------------------------------------------------------------------------- judging


def device(
    index: int, wave: int, state: DeviceState, *, minutes_ago: float = 5, heard_minutes_ago: float | None = 1
) -> DeviceProgress:
    return DeviceProgress(
        device_id=f"d{index:03d}",
        wave=wave,
        state=state,
        assigned_at=NOW - dt.timedelta(minutes=minutes_ago),
        reported_at=None if heard_minutes_ago is None else NOW - dt.timedelta(minutes=heard_minutes_ago),
    )


def progress(
    opened: int, sizes: tuple[int, ...], devices: list[DeviceProgress], **kw: object
) -> RolloutProgress:
    return RolloutProgress(waves_opened=opened, wave_sizes=sizes, devices=tuple(devices), **kw)  # type: ignore[arg-type]


PLAN = RolloutPlan(waves=(WaveSpec(count=10), WaveSpec(percent=100)))


def test_the_next_wave_opens_only_once_the_success_threshold_is_reached() -> None:
    eight = [device(i, 0, DeviceState.INSTALLED) for i in range(8)]
    rest = [device(i, 0, DeviceState.DOWNLOADING) for i in range(8, 10)]
    assert judge(PLAN, progress(1, (10, 90), eight + rest), NOW).decision is Decision.HOLD
    nine = [device(i, 0, DeviceState.INSTALLED) for i in range(9)] + [device(9, 0, DeviceState.TRIAL)]
    verdict = judge(PLAN, progress(1, (10, 90), nine), NOW)
    assert verdict.decision is Decision.OPEN_NEXT
    assert "9 of 10" in verdict.reason


def test_the_last_wave_reaching_the_threshold_completes_the_rollout() -> None:
    first = [device(i, 0, DeviceState.INSTALLED) for i in range(10)]
    second = [device(i, 1, DeviceState.INSTALLED) for i in range(10, 20)]
    assert judge(PLAN, progress(2, (10, 10), first + second), NOW).decision is Decision.COMPLETE


def test_an_empty_group_completes_at_once() -> None:
    assert judge(RolloutPlan(), progress(1, (0,), []), NOW).decision is Decision.COMPLETE


def test_failures_and_rollbacks_abort_and_say_the_figures() -> None:
    devices = [device(i, 0, DeviceState.INSTALLED) for i in range(8)]
    devices += [device(8, 0, DeviceState.FAILED), device(9, 0, DeviceState.ROLLED_BACK)]
    verdict = judge(PLAN, progress(1, (10, 90), devices), NOW)
    assert verdict.decision is Decision.ABORT
    assert verdict.code == "failures"
    assert "2 failed or rolled back" in verdict.reason
    assert "20%" in verdict.reason


def test_one_failure_below_the_threshold_holds() -> None:
    devices = [device(i, 0, DeviceState.DOWNLOADING) for i in range(9)] + [device(9, 0, DeviceState.FAILED)]
    assert judge(PLAN, progress(1, (10, 90), devices), NOW).decision is Decision.HOLD


def test_devices_silent_past_the_timeout_count_as_failed() -> None:
    plan = RolloutPlan(waves=PLAN.waves, report_timeout_seconds=600)
    quiet = [device(i, 0, DeviceState.ASSIGNED, minutes_ago=11, heard_minutes_ago=None) for i in range(3)]
    fine = [device(i, 0, DeviceState.INSTALLED) for i in range(3, 10)]
    verdict = judge(plan, progress(1, (10, 90), quiet + fine), NOW)
    assert (verdict.decision, verdict.code) == (Decision.ABORT, "silent")
    not_yet = [device(i, 0, DeviceState.ASSIGNED, minutes_ago=9, heard_minutes_ago=None) for i in range(3)]
    assert judge(plan, progress(1, (10, 90), not_yet + fine), NOW).decision is Decision.HOLD


def test_a_report_resets_the_silence_clock_but_a_finished_device_is_never_silent() -> None:
    plan = RolloutPlan(report_timeout_seconds=600)
    assert not device(0, 0, DeviceState.DOWNLOADING, minutes_ago=60, heard_minutes_ago=2).silent(NOW, 600)
    assert device(0, 0, DeviceState.DOWNLOADING, minutes_ago=60, heard_minutes_ago=20).silent(NOW, 600)
    assert not device(0, 0, DeviceState.INSTALLED, minutes_ago=60, heard_minutes_ago=50).silent(NOW, 600)
    assert plan.report_timeout_seconds == 600


def crashing(index: int, crashes: int, *, hours: float = 1) -> DeviceProgress:
    return DeviceProgress(
        f"d{index:03d}", 0, DeviceState.INSTALLED, NOW - dt.timedelta(hours=hours), NOW, crashes=crashes
    )


def test_crash_reports_above_the_rate_before_the_rollout_abort() -> None:
    # before: 10 crashes over 100 device-hours = 0.1 per device-hour; now: 4 over 10 = 0.4
    baseline = CrashBaseline(crashes=10, device_seconds=100 * 3600)
    devices = [crashing(i, 1 if i < 4 else 0) for i in range(10)]
    verdict = judge(PLAN, progress(1, (10, 90), devices, baseline=baseline), NOW)
    assert (verdict.decision, verdict.code) == (Decision.ABORT, "crash_rate")
    assert "4 crash reports" in verdict.reason


def test_crashes_at_the_usual_rate_or_too_few_do_not_abort() -> None:
    baseline = CrashBaseline(crashes=30, device_seconds=100 * 3600)  # 0.3 per device-hour
    usual = [crashing(i, 1 if i < 4 else 0) for i in range(10)]  # 0.4 < 2 x 0.3
    assert judge(PLAN, progress(1, (10, 90), usual, baseline=baseline), NOW).decision is Decision.OPEN_NEXT
    few = [crashing(i, 1 if i < 2 else 0) for i in range(10)]  # below min_crash_reports, no baseline
    assert judge(PLAN, progress(1, (10, 90), few), NOW).decision is Decision.OPEN_NEXT


def test_unhealthy_devices_abort() -> None:
    devices = [device(i, 0, DeviceState.INSTALLED) for i in range(10)]
    sick = [
        DeviceProgress(d.device_id, 0, d.state, d.assigned_at, d.reported_at, unhealthy=True)
        for d in devices[:2]
    ]
    verdict = judge(PLAN, progress(1, (10, 90), sick + devices[2:]), NOW)
    assert (verdict.decision, verdict.code) == (Decision.ABORT, "unhealthy")


def test_wave_counts_tally_each_state_and_the_silent() -> None:
    devices = [
        device(0, 0, DeviceState.INSTALLED),
        device(1, 0, DeviceState.FAILED),
        device(2, 0, DeviceState.TRIAL),
        device(3, 1, DeviceState.ASSIGNED, minutes_ago=60, heard_minutes_ago=None),
        device(4, 1, DeviceState.ROLLED_BACK),
    ]
    first, second = count_waves(progress(2, (3, 5), devices), 1800, NOW)
    assert (first.installed, first.failed, first.downloading, first.size) == (1, 1, 1, 3)
    assert (second.assigned, second.rolled_back, second.silent) == (1, 1, 1)


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class FakeImage:
    id: str
    kind: str


APP_IMAGE = FakeImage("app-1", "app")
AGENT_IMAGE = FakeImage("agent-1", "agent")


def group(policy: UpdatePolicy, feed: OsFeed = OsFeed.RETAIL) -> DeviceGroup:
    return DeviceGroup("g", "t", "p", "Production", "", policy, feed, False, NOW)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (UpdatePolicy.UPDATE_ALL, (APP_IMAGE, AGENT_IMAGE)),
        (UpdatePolicy.NO_THIRD_PARTY_APP_UPDATES, (AGENT_IMAGE,)),
        (UpdatePolicy.NO_UPDATES, ()),
    ],
)
def test_update_policies_filter_what_is_assigned(
    policy: UpdatePolicy, expected: tuple[FakeImage, ...]
) -> None:
    assert assignable([APP_IMAGE, AGENT_IMAGE], group(policy)) == expected


def test_retail_groups_get_agent_images_only_after_an_os_evaluation_group() -> None:
    retail = group(UpdatePolicy.UPDATE_ALL)
    assert awaiting_evaluation([APP_IMAGE, AGENT_IMAGE], retail, set()) == (AGENT_IMAGE,)
    assert awaiting_evaluation([APP_IMAGE, AGENT_IMAGE], retail, {"agent-1"}) == ()
    evaluation = group(UpdatePolicy.UPDATE_ALL, OsFeed.RETAIL_EVAL)
    assert awaiting_evaluation([AGENT_IMAGE], evaluation, set()) == ()


def test_a_wave_that_succeeded_opens_the_next_only_after_soaking() -> None:
    plan = RolloutPlan(waves=(WaveSpec(count=1), WaveSpec(percent=100)), soak_seconds=600)
    start = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    installed = DeviceProgress(
        "d1", 0, DeviceState.INSTALLED, assigned_at=start, reported_at=start + dt.timedelta(seconds=30)
    )
    progress = RolloutProgress(waves_opened=1, wave_sizes=(1, 3), devices=(installed,))
    early = judge(plan, progress, start + dt.timedelta(seconds=300))
    assert (early.decision, early.code) == (Decision.HOLD, "soaking")
    assert judge(plan, progress, start + dt.timedelta(seconds=631)).decision is Decision.OPEN_NEXT


def test_a_device_that_defers_holds_its_wave_back_instead_of_going_silent() -> None:
    plan = RolloutPlan(waves=(WaveSpec(count=1), WaveSpec(percent=100)), report_timeout_seconds=60)
    start = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    deferred = DeviceProgress("d1", 0, DeviceState.DEFERRED, assigned_at=start, reported_at=start)
    progress = RolloutProgress(waves_opened=1, wave_sizes=(1, 3), devices=(deferred,))
    verdict = judge(plan, progress, start + dt.timedelta(hours=5))
    assert (verdict.decision, verdict.code) == (Decision.HOLD, "waiting")
