"""Rollouts that stop themselves: the pure core of deployments (ADR 0015). No I/O.

A deployment reaches a group's devices in **waves**. :func:`plan_waves` splits the devices, in an order
that depends only on the deployment (a seed) and the device ids, into waves whose cumulative sizes the
plan gives by count or percentage. :func:`judge` looks at how the devices already reached are doing and
says what to do next:

- ``ABORT`` as soon as an abort threshold is reached, whatever the wave: too many devices failed or rolled
  back (devices silent for longer than the report timeout count as failed), crash reports per device-hour
  above the group's rate before the rollout times a factor, or too many devices unhealthy (a crash loop or
  a refused launch since the update);
- ``OPEN_NEXT`` when the newest wave has installed at least the success threshold and has soaked for the
  plan's ``soak_seconds`` since (regressions that show only after an install get that long to show);
- ``COMPLETE`` when that is true of the last wave;
- ``HOLD`` otherwise.

:func:`assignable` applies a group's update policy to a deployment's images, and :func:`awaiting_evaluation`
says which agent images a Retail group may not get yet because no OS-evaluation group ran them first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from fleetward.registry.models import DeviceGroup, OsFeed, UpdatePolicy
from fleetward.wire.updates import ImageKind

MAX_WAVES = 20
_SEED_DOMAIN = b"fleetward-rollout-order-v1\x00"


@dataclass(frozen=True)
class WaveSpec:
    """How far one wave takes the rollout, cumulatively: ``count`` devices in all, or ``percent`` of the
    group (rounded up). The last wave of a plan always takes every remaining device."""

    count: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("a wave is either a count or a percentage")
        if self.count is not None:
            if not isinstance(self.count, int) or isinstance(self.count, bool):
                raise TypeError("a wave's count is an int")
            if self.count < 1:
                raise ValueError("a wave's count is at least 1")
        if self.percent is not None:
            if not isinstance(self.percent, (int, float)) or isinstance(self.percent, bool):
                raise TypeError("a wave's percentage is a number")
            if not 0 < self.percent <= 100:
                raise ValueError("a wave's percentage is above 0 and at most 100")

    def target(self, total: int) -> int:
        """How many devices of ``total`` the rollout has reached once this wave is open."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100 - 1e-9))

    @classmethod
    def parse(cls, text: str) -> WaveSpec:
        """``"10%"``, ``"25"`` or ``"all"``; ``ValueError`` otherwise."""
        value = text.strip().lower()
        if value == "all":
            return cls(percent=100)
        try:
            if value.endswith("%"):
                return cls(percent=float(value[:-1]))
            return cls(count=int(value))
        except ValueError as error:
            raise ValueError(f"a wave is N, N% or all, not {text[:20]!r} ({error})") from None

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return "all" if self.percent == 100 else f"{self.percent:g}%"


def _fraction(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} is a number")
    if not 0 <= value <= 1:
        raise ValueError(f"{name} is a fraction between 0 and 1, not {value}")


@dataclass(frozen=True)
class RolloutPlan:
    """The waves of a rollout and the thresholds that open the next one or stop it."""

    waves: tuple[WaveSpec, ...] = (WaveSpec(percent=100),)
    #: the fraction of the newest wave that must have installed before the next opens
    success_threshold: float = 0.9
    #: abort when this fraction of the devices reached failed, rolled back or stayed silent
    max_failure_fraction: float = 0.2
    #: a device that has not reported for this long since it was assigned counts as failed
    report_timeout_seconds: int = 1800
    #: abort when the devices reached crash this many times more often (per device-hour) than the group
    #: did before the rollout ...
    crash_rate_factor: float = 2.0
    #: ... and reported at least this many crashes
    min_crash_reports: int = 3
    #: abort when this fraction of the devices reached is unhealthy (crash loop, refused launch)
    max_unhealthy_fraction: float = 0.2
    #: once a wave reached the success threshold, the next opens only after this long without an abort,
    #: so that regressions that show after an install (crashes, devices turning unhealthy) are seen first
    soak_seconds: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.waves, tuple) or not all(isinstance(w, WaveSpec) for w in self.waves):
            raise TypeError("a plan's waves are a tuple of WaveSpec")
        if not 1 <= len(self.waves) <= MAX_WAVES:
            raise ValueError(f"a rollout has 1 to {MAX_WAVES} waves")
        counts = [wave.count for wave in self.waves if wave.count is not None]
        percents = [wave.percent for wave in self.waves if wave.percent is not None]
        if counts != sorted(set(counts)) or percents != sorted(set(percents)):
            raise ValueError("waves are cumulative: each goes further than the one before")
        _fraction(self.success_threshold, "success_threshold")
        _fraction(self.max_failure_fraction, "max_failure_fraction")
        _fraction(self.max_unhealthy_fraction, "max_unhealthy_fraction")
        if not isinstance(self.report_timeout_seconds, int) or self.report_timeout_seconds < 1:
            raise ValueError("report_timeout_seconds is a positive int")
        if not isinstance(self.min_crash_reports, int) or self.min_crash_reports < 1:
            raise ValueError("min_crash_reports is a positive int")
        if not isinstance(self.crash_rate_factor, (int, float)) or self.crash_rate_factor < 1:
            raise ValueError("crash_rate_factor is a number of at least 1")
        if not isinstance(self.soak_seconds, int) or self.soak_seconds < 0:
            raise ValueError("soak_seconds is an int of at least 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "waves": [str(wave) for wave in self.waves],
            "success_threshold": self.success_threshold,
            "max_failure_fraction": self.max_failure_fraction,
            "report_timeout_seconds": self.report_timeout_seconds,
            "crash_rate_factor": self.crash_rate_factor,
            "min_crash_reports": self.min_crash_reports,
            "max_unhealthy_fraction": self.max_unhealthy_fraction,
            "soak_seconds": self.soak_seconds,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> RolloutPlan:
        """The plan :meth:`to_dict` wrote; ``ValueError`` for anything else."""
        try:
            return cls(
                waves=tuple(WaveSpec.parse(str(text)) for text in value["waves"]),
                success_threshold=float(value["success_threshold"]),
                max_failure_fraction=float(value["max_failure_fraction"]),
                report_timeout_seconds=int(value["report_timeout_seconds"]),
                crash_rate_factor=float(value["crash_rate_factor"]),
                min_crash_reports=int(value["min_crash_reports"]),
                max_unhealthy_fraction=float(value["max_unhealthy_fraction"]),
                soak_seconds=int(value.get("soak_seconds", 0)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a rollout plan: {error}") from None


def _order_key(seed: str, device_id: str) -> bytes:
    return hashlib.sha256(_SEED_DOMAIN + seed.encode() + b"\x00" + device_id.encode()).digest()


def plan_waves(
    device_ids: Iterable[str], plan: RolloutPlan, *, seed: str = ""
) -> tuple[tuple[str, ...], ...]:
    """The devices of each wave: each device in exactly one, the last wave takes the rest.

    Deterministic: the same devices, plan and seed give the same waves, in whatever order the devices
    come. The order within the fleet is a hash of the seed and the device id, so that two deployments
    (two seeds) do not always start with the same devices. Waves that would be empty (a small group) are
    left out; with no devices at all there is one empty wave.
    """
    ordered = sorted(set(device_ids), key=lambda device_id: (_order_key(seed, device_id), device_id))
    total = len(ordered)
    waves: list[tuple[str, ...]] = []
    reached = 0
    for index, spec in enumerate(plan.waves):
        target = total if index == len(plan.waves) - 1 else max(reached, spec.target(total))
        if target > reached:
            waves.append(tuple(ordered[reached:target]))
            reached = target
    return tuple(waves) or ((),)


# --------------------------------------------------------------------------- judging a rollout


class DeviceState(StrEnum):
    """Where a device is with the deployment it was assigned (``wire.updates.UpdateState`` plus
    ``assigned``: nothing heard yet)."""

    ASSIGNED = "assigned"
    DOWNLOADING = "downloading"
    TRIAL = "trial"
    DEFERRED = "deferred"
    INSTALLED = "installed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


FAILED_STATES = frozenset({DeviceState.ROLLED_BACK, DeviceState.FAILED})
DONE_STATES = FAILED_STATES | {DeviceState.INSTALLED}


@dataclass(frozen=True)
class DeviceProgress:
    """One device the rollout reached."""

    device_id: str
    wave: int
    state: DeviceState
    assigned_at: dt.datetime
    #: when it last reported (``None``: not since it was assigned)
    reported_at: dt.datetime | None = None
    #: crash reports (crash, crash_loop) since it was assigned
    crashes: int = 0
    #: whether it reported a crash loop or a refused launch since it was assigned
    unhealthy: bool = False

    def silent(self, now: dt.datetime, timeout_seconds: int) -> bool:
        """Not finished, and nothing heard for longer than the timeout. A device that said it defers (its
        maintenance window, an application's deferral) is waiting, not silent: it holds its wave back
        instead of failing it."""
        if self.state in DONE_STATES or self.state is DeviceState.DEFERRED:
            return False
        heard = self.reported_at or self.assigned_at
        return (now - heard).total_seconds() > timeout_seconds


@dataclass(frozen=True)
class CrashBaseline:
    """The group's crash reports before the rollout, over so many device-seconds."""

    crashes: int = 0
    device_seconds: float = 0.0

    @property
    def per_device_hour(self) -> float:
        return self.crashes * 3600 / self.device_seconds if self.device_seconds > 0 else 0.0


@dataclass(frozen=True)
class RolloutProgress:
    """What :func:`judge` needs: how many waves are open, how big each is, and the devices reached."""

    waves_opened: int
    wave_sizes: tuple[int, ...]
    devices: tuple[DeviceProgress, ...] = ()
    baseline: CrashBaseline = field(default_factory=CrashBaseline)

    def __post_init__(self) -> None:
        if not 1 <= self.waves_opened <= len(self.wave_sizes):
            raise ValueError("a rollout has opened between one wave and all of them")


class Decision(StrEnum):
    OPEN_NEXT = "open_next"
    HOLD = "hold"
    COMPLETE = "complete"
    ABORT = "abort"


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    #: for an abort, which threshold: failures, silent, crash_rate, unhealthy
    code: str
    reason: str


@dataclass(frozen=True)
class WaveCounts:
    """How one wave is doing."""

    wave: int
    size: int
    assigned: int = 0
    downloading: int = 0
    installed: int = 0
    failed: int = 0
    rolled_back: int = 0
    silent: int = 0


def count_waves(progress: RolloutProgress, timeout_seconds: int, now: dt.datetime) -> tuple[WaveCounts, ...]:
    """Per wave: the devices assigned (not heard from yet), downloading (or in trial, or deferred),
    installed, failed, rolled back, and among the unfinished those silent past the timeout."""
    names = ("assigned", "downloading", "installed", "failed", "rolled_back", "silent")
    tallies = [dict.fromkeys(names, 0) for _ in progress.wave_sizes]
    for device in progress.devices:
        if not 0 <= device.wave < len(tallies):
            continue
        tally = tallies[device.wave]
        if device.state in (DeviceState.INSTALLED, DeviceState.FAILED, DeviceState.ROLLED_BACK):
            tally[device.state.value] += 1
        elif device.state is DeviceState.ASSIGNED:
            tally["assigned"] += 1
        else:
            tally["downloading"] += 1
        if device.silent(now, timeout_seconds):
            tally["silent"] += 1
    return tuple(
        WaveCounts(wave=index, size=size, **tally)
        for index, (size, tally) in enumerate(zip(progress.wave_sizes, tallies, strict=True))
    )


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def judge(plan: RolloutPlan, progress: RolloutProgress, now: dt.datetime) -> Verdict:
    """What a rollout should do now. Abort thresholds are checked first, over every device reached."""
    reached = progress.devices
    total = len(reached)
    if total:
        failed = sum(1 for device in reached if device.state in FAILED_STATES)
        silent = sum(1 for device in reached if device.silent(now, plan.report_timeout_seconds))
        if failed + silent > 0 and failed + silent >= plan.max_failure_fraction * total:
            code = "failures" if failed >= silent else "silent"
            return Verdict(
                Decision.ABORT,
                code,
                f"{failed} failed or rolled back"
                + (f" and {silent} silent for over {plan.report_timeout_seconds} s" if silent else "")
                + f" of {total} device(s) reached ({_percent(failed + silent, total)}; the plan allows "
                f"under {plan.max_failure_fraction:.0%})",
            )
        unhealthy = sum(1 for device in reached if device.unhealthy)
        if unhealthy > 0 and unhealthy >= plan.max_unhealthy_fraction * total:
            return Verdict(
                Decision.ABORT,
                "unhealthy",
                f"{unhealthy} of {total} devices reached are unhealthy (crash loop or refused launch) "
                f"({_percent(unhealthy, total)}; the plan allows under {plan.max_unhealthy_fraction:.0%})",
            )
        crashes = sum(device.crashes for device in reached)
        device_seconds = sum(max(0.0, (now - device.assigned_at).total_seconds()) for device in reached)
        if crashes >= plan.min_crash_reports and device_seconds > 0:
            rate = crashes * 3600 / device_seconds
            before = progress.baseline.per_device_hour
            if rate > plan.crash_rate_factor * before:
                return Verdict(
                    Decision.ABORT,
                    "crash_rate",
                    f"{crashes} crash reports from {total} devices reached: {rate:.3g} per device-hour, "
                    f"above {plan.crash_rate_factor:g} × the {before:.3g} before the rollout",
                )
    newest = progress.waves_opened - 1
    in_wave = [device for device in reached if device.wave == newest]
    installed = sum(1 for device in in_wave if device.state is DeviceState.INSTALLED)
    size = len(in_wave)
    ready = size == 0 or installed >= plan.success_threshold * size
    last = progress.waves_opened == len(progress.wave_sizes)
    figures = f"wave {newest + 1}: {installed} of {size} installed ({_percent(installed, size)})"
    if not ready:
        return Verdict(Decision.HOLD, "waiting", f"{figures}, {plan.success_threshold:.0%} needed to go on")
    if plan.soak_seconds and size:
        # the wave became ready with its last install: it soaks from then on
        ready_at = max(
            device.reported_at or device.assigned_at
            for device in in_wave
            if device.state is DeviceState.INSTALLED
        )
        left = plan.soak_seconds - (now - ready_at).total_seconds()
        if left > 0:
            return Verdict(Decision.HOLD, "soaking", f"{figures}, soaking for {left:.0f} s more")
    if last:
        return Verdict(Decision.COMPLETE, "complete", f"{figures}: the rollout is complete")
    return Verdict(Decision.OPEN_NEXT, "open_next", f"{figures}: opening wave {newest + 2}")


# --------------------------------------------------------------------------- update policies


class ImageFacts(Protocol):
    """What the policies need to know of an image (``updates.models.Image`` has it)."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> str: ...


ImageT = TypeVar("ImageT", bound=ImageFacts)


def assignable(images: Sequence[ImageT], group: DeviceGroup) -> tuple[ImageT, ...]:
    """The images the group's update policy lets its devices receive: all of them (UpdateAll), only the
    agent's (No3rdPartyAppUpdates: applications come from the developer), or none (NoUpdates)."""
    if group.update_policy is UpdatePolicy.NO_UPDATES:
        return ()
    if group.update_policy is UpdatePolicy.NO_THIRD_PARTY_APP_UPDATES:
        return tuple(image for image in images if image.kind == ImageKind.AGENT.value)
    return tuple(images)


def awaiting_evaluation(
    images: Sequence[ImageT], group: DeviceGroup, evaluated: Collection[str]
) -> tuple[ImageT, ...]:
    """The agent images a Retail group may not get yet: no OS-evaluation group of its product has run them
    (``evaluated`` holds the ids of images those groups completed a rollout of)."""
    if group.os_feed is not OsFeed.RETAIL:
        return ()
    return tuple(
        image for image in images if image.kind == ImageKind.AGENT.value and image.id not in evaluated
    )
