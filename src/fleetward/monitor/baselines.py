"""Baselines of the detection core: what is normal for a device and for its group, learned online (pure).

A device's traffic is cut into buckets (10 s by default). For each metric, :class:`OnlineStats` keeps an
exponentially weighted mean and variance of the bucket totals: a plain running mean and variance over the
first buckets (weight ``1/(n+1)``), then a fixed weight per bucket given by a half-life in seconds. Buckets
in which a device did nothing are zeros; :meth:`OnlineStats.learn_zeros` folds a run of them in at once.

A group's :class:`GroupStats` model the buckets of a typical member: members' buckets are gathered into a
batch, and each batch enters the group's statistics as a mixture (mean and variance of the batch, weighted
by the time it covers). A member's contribution is clipped at the group's own upper limit (and at its own
limit where its device judged it anomalous), so one misbehaving device does not move its group.

:func:`expectation` blends the two: the group is the prior of a device with little history, the device's
own statistics take over as it accumulates buckets (weight ``n / (n + n0)``). The standard deviation has a
floor (half the metric's floor level, and the Poisson ``sqrt(mean)`` for counts) so that a quiet device
sending three messages instead of one is not an anomaly, and a value is anomalous only when it is both
``z`` deviations above the mean and ``ratio`` times above the mean (or the floor level).

:class:`ReportJudge` does the same for the devices' security baseline reports: the connections the agent's
proxy blocked, listening ports and destinations the device (and its group) never had, and the reported
traffic against what the device's reports (and its group's) taught.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetward.monitor.detect_rules import SEVERITIES, Candidate, Evidence, FindingSeverity
from fleetward.wire.baseline import SecurityBaseline

if TYPE_CHECKING:
    from fleetward.monitor.detect import DetectionSettings

INFINITY = math.inf


def weight_per_step(step_seconds: float, half_life_seconds: float) -> float:
    """The EWMA weight of one step of ``step_seconds`` for a memory of ``half_life_seconds``."""
    return 1.0 - math.pow(2.0, -step_seconds / half_life_seconds)


class OnlineStats:
    """Exponentially weighted mean and variance of a few metrics, and how many steps were learned."""

    __slots__ = ("count", "mean", "var")

    def __init__(self, size: int) -> None:
        self.mean = [0.0] * size
        self.var = [0.0] * size
        self.count = 0.0

    def learn(self, values: Sequence[float], weight: float, limits: Sequence[float]) -> None:
        """One step: each value at or under its limit is learned; one over it (an anomaly) is not."""
        alpha = max(weight, 1.0 / (self.count + 1.0))
        keep = 1.0 - alpha
        mean, var = self.mean, self.var
        for index, value in enumerate(values):
            if value > limits[index]:
                continue
            old = mean[index]
            delta = value - old
            step = alpha * delta
            mean[index] = old + step
            var[index] = keep * (var[index] + delta * step)
        self.count += 1.0

    def learn_zeros(self, steps: int, weight: float) -> None:
        """``steps`` steps of zeros on every metric, in constant time."""
        if steps <= 0:
            return
        mean, var = self.mean, self.var
        count = self.count
        warm_until = 1.0 / weight if weight > 0 else INFINITY
        if count < warm_until:  # still a plain running mean: combine exactly with the zeros
            taken = int(min(steps, math.ceil(warm_until - count)))
            total = count + taken
            for index in range(len(mean)):
                old = mean[index]
                new = count * old / total
                var[index] = max(0.0, count * (var[index] + old * old) / total - new * new)
                mean[index] = new
            count = total
            steps -= taken
        if steps > 0:
            remain = (1.0 - weight) ** steps
            for index in range(len(mean)):
                old = mean[index]
                var[index] = remain * (var[index] + old * old * (1.0 - remain))
                mean[index] = remain * old
            count += steps
        self.count = count

    def restore(self, count: float, mean: Sequence[float], var: Sequence[float]) -> None:
        self.count = count
        self.mean[:] = mean
        self.var[:] = var


class GroupStats(OnlineStats):
    """A group's statistics, and the batch of members' buckets not folded in yet."""

    __slots__ = ("batch_count", "batch_index", "batch_squares", "batch_sums", "first_index", "keep", "limits")

    def __init__(self, size: int, weight: float) -> None:
        """``weight`` is the weight of one step's batch once the running-mean start is over."""
        super().__init__(size)
        self.keep = 1.0 - weight
        self.batch_sums = [0.0] * size
        self.batch_squares = [0.0] * size
        self.batch_count = 0
        #: the step the open batch belongs to, and the first step ever folded
        self.batch_index = -1
        self.first_index = -1
        #: the current upper limit of each metric: members' values are clipped to it
        self.limits = [INFINITY] * size

    def gather(self, index: int, values: Sequence[float], limits: Sequence[float], zeros: int) -> bool:
        """Add one member's bucket ``values`` of step ``index``, after ``zeros`` empty buckets of that member.
        Each value is clipped at the group's limit, and one the member judged anomalous (over ``limits``) at
        that limit too. Return whether an earlier batch was folded in first."""
        folded = False
        if index > self.batch_index:
            folded = self.batch_count > 0
            self._start(index)
        sums, squares, clip = self.batch_sums, self.batch_squares, self.limits
        for position, value in enumerate(values):
            if value > limits[position]:
                value = min(limits[position], clip[position])
            elif value > clip[position]:
                value = clip[position]
            sums[position] += value
            squares[position] += value * value
        self.batch_count += 1 + zeros
        return folded

    def _start(self, index: int) -> None:
        if self.batch_count > 0:
            self._fold(index)
        self.batch_index = index

    def _fold(self, next_index: int) -> None:
        count = float(self.batch_count)
        steps = max(1, next_index - self.batch_index)
        alpha = max(1.0 - self.keep**steps, count / (self.count + count))
        keep = 1.0 - alpha
        mean, var = self.mean, self.var
        for index in range(len(mean)):
            batch_mean = self.batch_sums[index] / count
            batch_var = max(0.0, self.batch_squares[index] / count - batch_mean * batch_mean)
            delta = batch_mean - mean[index]
            var[index] = keep * var[index] + alpha * batch_var + alpha * keep * delta * delta
            mean[index] += alpha * delta
            self.batch_sums[index] = 0.0
            self.batch_squares[index] = 0.0
        self.count += count
        self.batch_count = 0
        if self.first_index < 0:
            self.first_index = self.batch_index

    def span(self) -> int:
        """How many steps the folded batches cover."""
        return 0 if self.first_index < 0 else self.batch_index - self.first_index


class Floors:
    """Per metric: the floor level (the smallest mean a ratio is taken against) and whether it counts."""

    __slots__ = ("counts", "levels", "sd_floor_squared")

    def __init__(self, levels: Sequence[float], counts: Sequence[bool]) -> None:
        self.levels = tuple(levels)
        self.counts = tuple(counts)
        self.sd_floor_squared = tuple((level / 2.0) ** 2 for level in levels)


def expectation(
    device: OnlineStats,
    group: OnlineStats | None,
    prior_steps: float,
    floors: Floors,
    z: float,
    ratio: float,
    means: list[float],
    deviations: list[float],
    limits: list[float],
) -> bool:
    """Fill ``means``, ``deviations`` and ``limits`` (a value over its limit is anomalous) from a device's
    statistics and its group's (``None`` when there is no usable group). Return False, with infinite
    limits, when nothing is known enough to judge by."""
    count = device.count
    if group is None:
        if count < prior_steps:
            for index in range(len(limits)):
                limits[index] = INFINITY
            return False
        weight = 1.0
    else:
        weight = count / (count + prior_steps)
    rest = 1.0 - weight
    sqrt = math.sqrt
    device_means, device_vars = device.mean, device.var
    floor_squares, counts, levels = floors.sd_floor_squared, floors.counts, floors.levels
    for index in range(len(limits)):
        mean = device_means[index]
        var = device_vars[index]
        if group is not None:
            group_mean = group.mean[index]
            delta = mean - group_mean
            mean = weight * mean + rest * group_mean
            var = weight * var + rest * group.var[index] + weight * rest * delta * delta
        if var < floor_squares[index]:
            var = floor_squares[index]
        if var < mean and counts[index]:
            var = mean
        deviation = sqrt(var)
        means[index] = mean
        deviations[index] = deviation
        level = levels[index]
        limit = mean + z * deviation
        floor_limit = ratio * (mean if mean > level else level)
        limits[index] = limit if limit > floor_limit else floor_limit
    return True


def excess(value: float, mean: float, deviation: float, level: float, z: float, ratio: float) -> float:
    """How far past its limit ``value`` is: the smaller of its z-score over ``z`` and its ratio to the mean
    (or the floor level) over ``ratio``; 1 at the limit."""
    z_score = (value - mean) / deviation if deviation > 0 else INFINITY
    return min(z_score / z, value / max(mean, level) / ratio)


# ---------------------------------------------------------------------------------------------- reports

#: what the traffic baseline of security baseline reports learns (per second of the report's interval)
REPORT_METRICS: tuple[str, ...] = (
    "bytes_in_per_second",
    "bytes_out_per_second",
    "packets_in_per_second",
    "packets_out_per_second",
)


class DeviceReports:
    """What a device's security baseline reports taught: its ports, destinations and traffic."""

    __slots__ = ("count", "destinations", "ports", "stats")

    def __init__(self) -> None:
        self.count = 0
        #: port ("tcp/22") -> the report count when last seen
        self.ports: dict[str, int] = {}
        #: destination ("10.0.0.9:443") -> None, least recently seen first
        self.destinations: dict[str, None] = {}
        self.stats = OnlineStats(len(REPORT_METRICS))


class GroupReports:
    """What a group's devices' reports taught: how many devices had each port and destination, traffic."""

    __slots__ = ("destinations", "limits", "ports", "reporters", "stats")

    def __init__(self) -> None:
        self.reporters = 0
        self.ports: dict[str, int] = {}
        self.destinations: dict[str, int] = {}
        self.stats = OnlineStats(len(REPORT_METRICS))
        self.limits = [INFINITY] * len(REPORT_METRICS)


def destination_key(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class ReportJudge:
    """Judges a device's :class:`SecurityBaseline` against what its reports and its group's taught, then
    learns from it. Returns candidates; the detector grades them and holds back repeats."""

    def __init__(self, settings: DetectionSettings) -> None:
        self.settings = settings
        self.floors = Floors(
            (
                settings.report_bytes_floor_per_second,
                settings.report_bytes_floor_per_second,
                settings.report_packets_floor_per_second,
                settings.report_packets_floor_per_second,
            ),
            (False,) * len(REPORT_METRICS),
        )
        self.group_weight = weight_per_step(1.0, settings.group_report_half_life_reports)

    def judge(
        self, state: DeviceReports, group: GroupReports | None, report: SecurityBaseline
    ) -> list[Candidate]:
        found: list[Candidate] = []
        self._blocked(report, found)
        self._ports(state, group, report, found)
        self._destinations(state, group, report, found)
        self._traffic(state, group, report, found)
        state.count += 1
        return found

    def _blocked(self, report: SecurityBaseline, found: list[Candidate]) -> None:
        """Connections the agent's proxy refused: an application reached for what it did not declare."""
        if not report.blocked:
            return
        settings = self.settings
        total = sum(item.count for item in report.blocked)
        hosts = {item.host.lower() for item in report.blocked}
        many = max(total / settings.blocked_critical_count, len(hosts) / settings.blocked_critical_hosts)
        entries = sorted(report.blocked, key=lambda item: (-item.count, item.host, item.port))
        first = entries[0]
        found.append(
            Candidate(
                "baseline-report:blocked",
                "undeclared_destination",
                max(1.0, 3.0 * many),  # critical (3 times past high) at the bounds of many
                FindingSeverity.HIGH,
                FindingSeverity.CRITICAL,
                f"the agent's proxy blocked {total} connection(s) to {len(hosts)} undeclared host(s), "
                f"first {first.host}:{first.port} ({first.component_id})",
                tuple(
                    Evidence(
                        "blocked_destination",
                        item.count,
                        0,
                        report.interval_seconds,
                        f"{item.host}:{item.port} ({item.component_id})",
                    )
                    for item in entries[: settings.max_evidence]
                ),
            )
        )

    def _ports(
        self,
        state: DeviceReports,
        group: GroupReports | None,
        report: SecurityBaseline,
        found: list[Candidate],
    ) -> None:
        settings = self.settings
        listening: dict[str, set[str]] = {}
        for item in report.listening:
            listening.setdefault(f"{item.protocol}/{item.port}", set()).add(item.address)
        new = sorted(key for key in listening if key not in state.ports)
        if new and state.count >= settings.min_reports:
            common_at = max(2.0, settings.common_port_fraction * (group.reporters if group else 0))
            uncommon = [key for key in new if group is None or group.ports.get(key, 0) < common_at]
            common = [key for key in new if key not in uncommon]
            floor = FindingSeverity.MEDIUM if uncommon else FindingSeverity.LOW
            found.append(
                Candidate(
                    "baseline-report:ports",
                    "new_listening_port",
                    1.0 + 0.25 * (len(new) - 1),
                    floor,
                    floor,
                    f"listening on {len(new)} port(s) it never had: {', '.join((uncommon or common)[:4])}"
                    + ("" if uncommon else " (common in its group)"),
                    tuple(
                        Evidence(
                            "listening_port",
                            1,
                            0 if group is None else group.ports.get(key, 0),
                            report.interval_seconds,
                            f"{key} on {', '.join(sorted(listening[key])[:4])}"
                            + (" (common in its group)" if key in common else ""),
                        )
                        for key in (uncommon + common)[: settings.max_evidence]
                    ),
                )
            )
        for key in listening:
            room = group is not None and (key in group.ports or len(group.ports) < settings.max_group_ports)
            if key not in state.ports and group is not None and room:
                group.ports[key] = group.ports.get(key, 0) + 1
            state.ports[key] = state.count
        while len(state.ports) > settings.max_known_ports:
            del state.ports[min(state.ports, key=state.ports.__getitem__)]

    def _destinations(
        self,
        state: DeviceReports,
        group: GroupReports | None,
        report: SecurityBaseline,
        found: list[Candidate],
    ) -> None:
        """A destination is known when the device had it, or two devices of its group did (one device
        alone, a rogue one, does not make a destination normal for its group)."""
        settings = self.settings
        seen: dict[str, int] = {}
        for item in report.destinations:
            key = destination_key(item.address, item.port)
            seen[key] = seen.get(key, 0) + item.times_seen
        learned = state.count >= settings.min_reports or (
            group is not None and group.stats.count >= settings.min_group_reports
        )
        new = [
            key
            for key in seen
            if key not in state.destinations and (group is None or group.destinations.get(key, 0) < 2)
        ]
        if new and learned:
            new.sort(key=lambda key: (-seen[key], key))
            found.append(
                Candidate(
                    "baseline-report:destinations",
                    "new_destination",
                    1.0 + 0.05 * (len(new) - 1),
                    FindingSeverity.LOW,
                    FindingSeverity.LOW,
                    f"talked to {len(new)} destination(s) its group does not: {', '.join(new[:3])}",
                    tuple(
                        Evidence("destination", seen[key], 0, report.interval_seconds, key)
                        for key in new[: settings.max_evidence]
                    ),
                )
            )
        for key in seen:
            if key not in state.destinations and group is not None:
                count = group.destinations.pop(key, 0)
                if count or len(group.destinations) < settings.max_group_destinations:
                    group.destinations[key] = count + 1
            state.destinations.pop(key, None)
            state.destinations[key] = None
        while len(state.destinations) > settings.max_known_destinations:
            del state.destinations[next(iter(state.destinations))]

    def _traffic(
        self,
        state: DeviceReports,
        group: GroupReports | None,
        report: SecurityBaseline,
        found: list[Candidate],
    ) -> None:
        settings = self.settings
        seconds = report.interval_seconds
        traffic = report.traffic
        values = [
            traffic.bytes_in / seconds,
            traffic.bytes_out / seconds,
            traffic.packets_in / seconds,
            traffic.packets_out / seconds,
        ]
        size = len(REPORT_METRICS)
        means, deviations, limits = [0.0] * size, [0.0] * size, [INFINITY] * size
        prior = group.stats if group is not None and group.stats.count >= settings.min_group_reports else None
        z, ratio = settings.z_threshold, settings.ratio_threshold
        expectation(
            state.stats, prior, settings.min_reports, self.floors, z, ratio, means, deviations, limits
        )
        over = [index for index in range(size) if values[index] > limits[index]]
        if over:
            levels = self.floors.levels
            ceiling = settings.baseline_max_severity
            if not any(REPORT_METRICS[index].endswith("out_per_second") for index in over):
                # only what the device received: a download (an update) more likely than an attack
                ceiling = min(ceiling, FindingSeverity.MEDIUM, key=SEVERITIES.index)
            found.append(
                Candidate(
                    "baseline-report:traffic",
                    "traffic_spike",
                    max(excess(values[i], means[i], deviations[i], levels[i], z, ratio) for i in over),
                    FindingSeverity.LOW,
                    ceiling,
                    "reported traffic far above its baseline: "
                    + ", ".join(f"{REPORT_METRICS[index]} {values[index]:.0f}" for index in over),
                    tuple(
                        Evidence(
                            REPORT_METRICS[index],
                            values[index],
                            limits[index],
                            seconds,
                            f"mean {means[index]:.3g}, {state.stats.count:.0f} reports learned",
                        )
                        for index in over
                    ),
                )
            )
        state.stats.learn(values, weight_per_step(seconds, settings.report_half_life_seconds), limits)
        if group is not None:
            clipped = [min(values[index], limits[index], group.limits[index]) for index in range(size)]
            group.stats.learn(clipped, self.group_weight, group.limits)
            unused = [0.0] * size
            expectation(
                group.stats,
                None,
                settings.min_group_reports,
                self.floors,
                z,
                ratio,
                unused,
                unused,
                group.limits,
            )
