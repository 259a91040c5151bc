"""The detection core: what the hub saw of each device, and its security baselines, judged into findings.

Pure: no I/O, no clock (every time comes in the inputs), no threads; the same inputs give the same findings.
The monitor's shell feeds it and stores what it finds.

Once per second the hub hands over a :class:`CloudSample` for every device that did anything (seconds
without one are zeros). :class:`Detector` judges each sample three ways:

- **rules** (:mod:`fleetward.monitor.detect_rules`): thresholds on a statistic over a sliding window, the
  shipped :data:`DEFAULT_RULES` or a tenant's own (:meth:`Detector.set_rules`);
- **baselines** (:mod:`fleetward.monitor.baselines`): per device and per group, the mean and variance of
  each metric over buckets of ``bucket_seconds``, learned online. A bucket far above what is expected of the
  device (its group's baseline while it has little history of its own) is a ``traffic_spike`` (or a
  ``cloud_to_device_spike``, a ``connection_spike``), judged as soon as the partial bucket passes the
  limit. Anomalous values are not learned, so a flood lasting hours is still a flood at its end. A device
  that reconnects after a silence may send its backlog (what its outbox kept, what the hub held for it)
  at the hub's full rate: it is credited with what its baseline says it would have sent meanwhile, and
  what it sends is charged to that credit before rules and baselines see it;
- **source addresses**: a device that always connected from one address and connects from another (once
  it has history) is a LOW ``new_source_address``; one that changes addresses (a cellular link) is not.

Every few minutes the device's agent reports a :class:`~fleetward.wire.baseline.SecurityBaseline`;
:meth:`Detector.judge_baseline` finds connections the agent's proxy blocked (``undeclared_destination``),
listening ports the device never had (``new_listening_port``: LOW when its group commonly has them),
destinations neither it nor two devices of its group ever had (``new_destination``), and traffic far above
its reports' baseline (``traffic_spike``).

A finding's ``score`` (0.5 at the threshold, towards 1 far past it) sets its severity
(:func:`~fleetward.monitor.detect_rules.graded`). The same (device, code) is reported again only after
``repeat_seconds``, or sooner if its severity rose.

Memory is bounded: at most ``max_devices`` devices, ``max_groups`` groups and ``max_tenants`` tenants are
remembered, the least recently seen forgotten first. Forgetting only makes the detector more lenient with
that device until it has learned again. :meth:`Detector.snapshot_device` and
:meth:`Detector.restore_device` keep what a device's baselines learned across restarts. Tenants are apart:
every piece of state is kept under its tenant, and group ids are per tenant.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fleetward.bounds import check_positive
from fleetward.errors import InvalidInput, PayloadTooLarge
from fleetward.monitor.baselines import (
    REPORT_METRICS,
    DeviceReports,
    Floors,
    GroupReports,
    GroupStats,
    OnlineStats,
    ReportJudge,
    excess,
    expectation,
    weight_per_step,
)
from fleetward.monitor.detect_rules import (
    DEFAULT_RULES,
    Candidate,
    CompiledRule,
    Evidence,
    Finding,
    FindingSeverity,
    Rule,
    RuleSet,
    Window,
    WindowSpec,
    graded,
    severity_rank,
)
from fleetward.wire.baseline import SecurityBaseline

__all__ = [
    "BASELINE_METRICS",
    "DEFAULT_RULES",
    "CloudSample",
    "DetectionSettings",
    "Detector",
    "Evidence",
    "Finding",
    "FindingSeverity",
    "Rule",
]

MAX_ID_CHARS = 128
MAX_SAMPLE_ADDRESSES = 8
MAX_SAMPLE_SECONDS = 3600.0
_MAX_COUNTER = 2**63 - 1

#: what the bucket baselines learn, in this order, and the code of a finding on each
BASELINE_METRICS: tuple[str, ...] = (
    "messages_in",
    "bytes_in",
    "messages_out",
    "bytes_out",
    "connection_attempts",
)
_BASELINE_CODES = (
    "traffic_spike",
    "traffic_spike",
    "cloud_to_device_spike",
    "cloud_to_device_spike",
    "connection_spike",
)
#: what the device sends is its own doing; what the cloud sends it, and how often it reconnects, is weaker
#: evidence of compromise: those findings stop at medium (below what restricts a device)
_DEVICE_DRIVEN = (True, True, False, False, False)
_IS_COUNT = (True, False, True, False, True)
#: what queues up while a device is away: its telemetry in its outbox, cloud-to-device messages in the hub
_BACKLOG_METRICS = 4
#: every this many buckets, a device's rule windows that hold only zeros are dropped (memory)
_IDLE_CHECK_BUCKETS = 6


def _identifier(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} is a string")
    if not 1 <= len(value) <= MAX_ID_CHARS:
        raise ValueError(f"{what} is 1 to {MAX_ID_CHARS} characters")


@dataclass(frozen=True, slots=True)
class CloudSample:
    """What the hub saw of one device (or one of its module sessions, aggregated) over one interval."""

    tenant_id: str
    device_id: str
    group_id: str | None  # the device's group (group baselines); None: not in a group
    at: float  # end of the interval, seconds since the epoch
    seconds: float  # length of the interval (normally 1.0)
    messages_in: int = 0  # PUBLISH packets from the device
    bytes_in: int = 0
    messages_out: int = 0  # PUBLISH packets to the device
    bytes_out: int = 0
    authorization_failures: int = 0  # topic/subscription refusals, refused CONNECTs with a valid cert
    connection_attempts: int = 0  # CONNECTs (accepted or not)
    disconnects: int = 0  # sessions that ended (any reason)
    source_addresses: frozenset[str] = frozenset()  # peer IPs seen in the interval (at most 8)

    def __post_init__(self) -> None:
        _identifier(self.tenant_id, "a sample's tenant_id")
        _identifier(self.device_id, "a sample's device_id")
        if self.group_id is not None:
            _identifier(self.group_id, "a sample's group_id")
        for what, value in (("at", self.at), ("seconds", self.seconds)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"a sample's {what} is a number")
            if not math.isfinite(value):
                raise ValueError(f"a sample's {what} is finite")
        if self.at < 0:
            raise ValueError("a sample's at is seconds since the epoch, not negative")
        if not 0 < self.seconds <= MAX_SAMPLE_SECONDS:
            raise ValueError(f"a sample covers more than 0 and at most {MAX_SAMPLE_SECONDS:g} seconds")
        for name in (
            "messages_in",
            "bytes_in",
            "messages_out",
            "bytes_out",
            "authorization_failures",
            "connection_attempts",
            "disconnects",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"a sample's {name} is an int")
            if not 0 <= value <= _MAX_COUNTER:
                raise ValueError(f"a sample's {name} is between 0 and 2**63 - 1")
        addresses = self.source_addresses
        if not isinstance(addresses, frozenset):
            raise TypeError("a sample's source_addresses are a frozenset")
        if len(addresses) > MAX_SAMPLE_ADDRESSES:
            raise ValueError(f"a sample holds at most {MAX_SAMPLE_ADDRESSES} source addresses")
        for address in addresses:
            if not isinstance(address, str) or not 1 <= len(address) <= 45:
                raise ValueError("a source address is an IP address as text")


_INT_SETTINGS = frozenset(
    {
        "min_device_buckets",
        "min_group_buckets",
        "max_backlog_buckets",
        "max_devices",
        "max_groups",
        "max_tenants",
        "max_source_addresses",
        "group_report_half_life_reports",
        "min_reports",
        "min_group_reports",
        "blocked_critical_count",
        "blocked_critical_hosts",
        "max_known_ports",
        "max_known_destinations",
        "max_group_ports",
        "max_group_destinations",
        "max_evidence",
        "max_snapshot_bytes",
    }
)


@dataclass(frozen=True)
class DetectionSettings:
    """How the detector learns and judges, and how much it may remember. Checked when built."""

    #: the baselines learn buckets of this length (the hub's 1 s samples added up)
    bucket_seconds: float = 10.0
    #: how fast a device's baseline forgets: a bucket this old weighs half a new one
    learn_half_life_seconds: float = 1800.0
    group_half_life_seconds: float = 3600.0
    #: buckets after which a device's own baseline weighs as much as its group's (and, without a group,
    #: after which it is judged by its own)
    min_device_buckets: int = 30
    #: members' buckets a group must have learned before it is a prior
    min_group_buckets: int = 100
    #: a bucket is anomalous when it is this many standard deviations above the expected mean ...
    z_threshold: float = 5.0
    #: ... and this many times the mean (or the metric's floor level, if higher)
    ratio_threshold: float = 3.0
    #: floor levels: no finding for less than ratio_threshold times this much (per second), from the
    #: device, to it (a command batch, one 64 KiB configuration message), and connection attempts
    messages_floor_per_second: float = 0.5
    bytes_floor_per_second: float = 2048.0
    cloud_to_device_messages_floor_per_second: float = 2.0
    cloud_to_device_bytes_floor_per_second: float = 16384.0
    connections_floor_per_second: float = 0.1
    #: the longest silence whose backlog a reconnecting device is credited with, in buckets ...
    max_backlog_buckets: int = 360
    #: ... and how long after the reconnect the credit lasts
    backlog_drain_seconds: float = 300.0
    #: a statistical anomaly is a reason to look, not proof: its severity stops here (and at medium for
    #: what the device does not drive: cloud-to-device traffic, reconnects, traffic it received)
    baseline_max_severity: FindingSeverity = FindingSeverity.HIGH
    #: the same (device, code) is reported again only after this long, unless its severity rose
    repeat_seconds: float = 60.0
    max_devices: int = 100_000
    max_groups: int = 10_000
    max_tenants: int = 10_000
    #: addresses remembered per device (as known, and for the distinct-address rules)
    max_source_addresses: int = 16
    # security baseline reports
    report_half_life_seconds: float = 6 * 3600.0
    group_report_half_life_reports: int = 1000
    #: reports of a device before a new port, destination or traffic level of it is a finding ...
    min_reports: int = 3
    #: ... unless its group has learned this many
    min_group_reports: int = 10
    #: a port this fraction of a group's reporting devices listen on is common in the group
    common_port_fraction: float = 0.2
    report_bytes_floor_per_second: float = 2048.0
    report_packets_floor_per_second: float = 20.0
    #: blocked connections in one report, or distinct hosts, that make undeclared_destination critical
    blocked_critical_count: int = 100
    blocked_critical_hosts: int = 5
    max_known_ports: int = 64
    max_known_destinations: int = 256
    max_group_ports: int = 1024
    max_group_destinations: int = 4096
    #: evidence entries of one finding
    max_evidence: int = 16
    max_snapshot_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        numbers = [name for name in self.__dataclass_fields__ if name != "baseline_max_severity"]
        check_positive(
            self, "detection setting", fractional=lambda name: name not in _INT_SETTINGS, only=numbers
        )
        if self.ratio_threshold < 1:
            raise ValueError("detection setting ratio_threshold is at least 1")
        if self.common_port_fraction > 1:
            raise ValueError("detection setting common_port_fraction is a fraction, at most 1")
        if not isinstance(self.baseline_max_severity, FindingSeverity):
            raise TypeError("detection setting baseline_max_severity is a FindingSeverity")


# ---------------------------------------------------------------------------------------------- state


class _Tenant:
    __slots__ = ("devices", "groups", "ruleset", "tenant_id")

    def __init__(self, tenant_id: str, ruleset: RuleSet) -> None:
        self.tenant_id = tenant_id
        self.ruleset = ruleset
        self.devices: dict[str, _Device] = {}
        self.groups: dict[str, _Group] = {}


class _Group:
    __slots__ = ("group_id", "learned", "reports", "stats", "tenant")

    def __init__(self, tenant: _Tenant, group_id: str, weight: float) -> None:
        self.tenant = tenant
        self.group_id = group_id
        self.stats = GroupStats(len(BASELINE_METRICS), weight)
        self.learned = False
        self.reports: GroupReports | None = None


class _Device:
    __slots__ = (
        "addresses",
        "bucket",
        "credit",
        "credit_until",
        "device_id",
        "gap",
        "group_id",
        "limits",
        "reconnected",
        "reported",
        "reports",
        "ruleset",
        "stats",
        "tenant",
        "values",
        "windows",
    )

    def __init__(self, tenant: _Tenant, device_id: str, group_id: str | None) -> None:
        size = len(BASELINE_METRICS)
        self.tenant = tenant
        self.device_id = device_id
        self.group_id = group_id
        self.ruleset: RuleSet | None = None
        self.windows: list[Window | None] = []
        #: the open bucket (its index), the empty buckets before it (not learned yet), whether it holds a
        #: reconnect after them, and its sums so far
        self.bucket = -1
        self.gap = 0
        self.reconnected = False
        #: a reconnecting device's backlog not sent yet (messages and bytes each way), and until when
        self.credit: list[float] | None = None
        self.credit_until = 0.0
        self.values = [0] * size
        self.stats = OnlineStats(size)
        #: what the open bucket is judged against (its means and deviations are worked out again when
        #: needed: rarely)
        self.limits = [math.inf] * size
        #: source address -> when last seen
        self.addresses: dict[str, float] = {}
        #: code -> (when last reported, severity rank)
        self.reported: dict[str, tuple[float, int]] | None = None
        self.reports: DeviceReports | None = None


# ---------------------------------------------------------------------------------------------- snapshot

SNAPSHOT_FORMAT = "fleetward-detector-device-v1"
_PORT_KEY = re.compile(r"^(tcp|udp)/[0-9]{1,5}$")
_Finite = Annotated[float, Field(ge=0, le=1e300, allow_inf_nan=False)]
_Address = Annotated[str, StringConstraints(max_length=45)]


class _ReportsSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    count: int = Field(ge=0, le=2**40)
    learned: _Finite
    mean: tuple[_Finite, ...] = Field(min_length=len(REPORT_METRICS), max_length=len(REPORT_METRICS))
    var: tuple[_Finite, ...] = Field(min_length=len(REPORT_METRICS), max_length=len(REPORT_METRICS))
    ports: dict[Annotated[str, StringConstraints(max_length=9)], Annotated[int, Field(ge=0, le=2**40)]] = (
        Field(max_length=1024)
    )
    destinations: tuple[Annotated[str, StringConstraints(max_length=60)], ...] = Field(max_length=4096)


class _DeviceSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: Literal["fleetward-detector-device-v1"] = "fleetward-detector-device-v1"
    learned: _Finite
    mean: tuple[_Finite, ...] = Field(min_length=len(BASELINE_METRICS), max_length=len(BASELINE_METRICS))
    var: tuple[_Finite, ...] = Field(min_length=len(BASELINE_METRICS), max_length=len(BASELINE_METRICS))
    addresses: dict[_Address, _Finite] = Field(max_length=1024)
    reports: _ReportsSnapshot | None = None


def _is_destination_key(key: str) -> bool:
    host, separator, port = key.rpartition(":")
    if not separator or not port.isdigit() or int(port) > 65535:
        return False
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- detector


class Detector:
    """The learned state of the detection core, and the judging of samples and baseline reports by it."""

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        self.settings = settings = settings or DetectionSettings()
        self._default_rules = RuleSet(DEFAULT_RULES)
        self._rules: dict[str, RuleSet] = {}
        #: tenants, devices and groups, least recently seen first
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._devices: OrderedDict[_Device, None] = OrderedDict()
        self._groups: OrderedDict[_Group, None] = OrderedDict()
        self._bucket_seconds = settings.bucket_seconds
        #: the means and deviations of the latest expectation worked out (see _expect)
        self._means = [0.0] * len(BASELINE_METRICS)
        self._deviations = [0.0] * len(BASELINE_METRICS)
        self._device_weight = weight_per_step(settings.bucket_seconds, settings.learn_half_life_seconds)
        self._group_weight = weight_per_step(settings.bucket_seconds, settings.group_half_life_seconds)
        bucket = settings.bucket_seconds
        self._floors = Floors(
            (
                settings.messages_floor_per_second * bucket,
                settings.bytes_floor_per_second * bucket,
                settings.cloud_to_device_messages_floor_per_second * bucket,
                settings.cloud_to_device_bytes_floor_per_second * bucket,
                settings.connections_floor_per_second * bucket,
            ),
            _IS_COUNT,
        )
        self._reports = ReportJudge(settings)

    # ------------------------------------------------------------------ configuration and memory

    def set_rules(self, tenant_id: str, rules: Sequence[Rule] | None) -> None:
        """Judge ``tenant_id``'s devices by ``rules`` instead of :data:`DEFAULT_RULES` (``None``: the
        defaults again). :class:`InvalidInput` for more than 64 rules, two of one name, or more tenants with
        their own rules than ``max_tenants``."""
        _identifier(tenant_id, "a tenant id")
        if rules is None:
            self._rules.pop(tenant_id, None)
            ruleset = self._default_rules
        else:
            ruleset = RuleSet(rules)
            if tenant_id not in self._rules and len(self._rules) >= self.settings.max_tenants:
                raise InvalidInput(
                    f"at most {self.settings.max_tenants} tenants have rules of their own",
                    code="too_many_rule_sets",
                )
            self._rules[tenant_id] = ruleset
        tenant = self._tenants.get(tenant_id)
        if tenant is not None:
            tenant.ruleset = ruleset

    def rules(self, tenant_id: str) -> tuple[Rule, ...]:
        return self._rules.get(tenant_id, self._default_rules).rules

    def forget(self, tenant_id: str, device_id: str) -> None:
        """Drop what was learned of a device (its baselines start again from its group's)."""
        tenant = self._tenants.get(tenant_id)
        device = tenant.devices.pop(device_id, None) if tenant is not None else None
        if device is not None:
            del self._devices[device]

    @property
    def tracked(self) -> tuple[int, int, int]:
        """How many tenants, groups and devices the detector remembers."""
        return len(self._tenants), len(self._groups), len(self._devices)

    def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is not None:
            self._tenants.move_to_end(tenant_id)
            return tenant
        while len(self._tenants) >= self.settings.max_tenants:
            _, oldest = self._tenants.popitem(last=False)
            for device in oldest.devices.values():
                del self._devices[device]
            for group in oldest.groups.values():
                del self._groups[group]
        tenant = self._tenants[tenant_id] = _Tenant(
            tenant_id, self._rules.get(tenant_id, self._default_rules)
        )
        return tenant

    def _device(self, tenant: _Tenant, device_id: str, group_id: str | None) -> _Device:
        device = tenant.devices.get(device_id)
        if device is not None:
            self._devices.move_to_end(device)
            return device
        while len(self._devices) >= self.settings.max_devices:
            oldest, _ = self._devices.popitem(last=False)
            del oldest.tenant.devices[oldest.device_id]
        device = tenant.devices[device_id] = _Device(tenant, device_id, group_id)
        self._devices[device] = None
        return device

    def _group(self, tenant: _Tenant, group_id: str) -> _Group:
        group = tenant.groups.get(group_id)
        if group is not None:
            self._groups.move_to_end(group)
            return group
        while len(self._groups) >= self.settings.max_groups:
            oldest, _ = self._groups.popitem(last=False)
            del oldest.tenant.groups[oldest.group_id]
        group = tenant.groups[group_id] = _Group(tenant, group_id, self._group_weight)
        self._groups[group] = None
        return group

    # ------------------------------------------------------------------ findings

    def _due(self, device: _Device, code: str, severity: FindingSeverity, at: float) -> bool:
        """Whether a finding of ``code`` may be reported now; if so, remember that it was."""
        rank = severity_rank(severity)
        reported = device.reported
        if reported is None:
            reported = device.reported = {}
        last = reported.get(code)
        if last is not None and at - last[0] < self.settings.repeat_seconds and rank <= last[1]:
            return False
        reported[code] = (at, rank)
        return True

    def _emit(self, device: _Device, candidate: Candidate, at: float, found: list[Finding]) -> None:
        """Grade ``candidate`` and add it to ``found``, unless it repeats one reported lately."""
        score, severity = graded(candidate.excess, candidate.floor, candidate.ceiling)
        if self._due(device, candidate.code, severity, at):
            found.append(
                Finding(
                    device.tenant.tenant_id,
                    device.device_id,
                    candidate.detector,
                    candidate.code,
                    severity,
                    score,
                    candidate.summary,
                    candidate.evidence,
                    at,
                )
            )

    # ------------------------------------------------------------------ samples

    def observe(self, sample: CloudSample) -> list[Finding]:
        """Judge one sample (and learn from it)."""
        found: list[Finding] = []
        self._observe(sample, found)
        return found

    def observe_many(self, samples: Iterable[CloudSample]) -> list[Finding]:
        """Judge samples in order (a second of the whole fleet, typically)."""
        found: list[Finding] = []
        observe = self._observe
        for sample in samples:
            observe(sample, found)
        return found

    def _observe(self, sample: CloudSample, found: list[Finding]) -> None:
        tenant = self._tenants.get(sample.tenant_id)
        if tenant is None:
            tenant = self._tenant(sample.tenant_id)
        else:
            self._tenants.move_to_end(sample.tenant_id)
        device = tenant.devices.get(sample.device_id)
        if device is None:
            device = self._device(tenant, sample.device_id, sample.group_id)
        else:
            self._devices.move_to_end(device)
        at = sample.at

        bucket = int(at / self._bucket_seconds)
        if bucket > device.bucket:
            self._open_bucket(tenant, device, bucket, sample.group_id)
        if sample.connection_attempts and device.gap and not device.reconnected:
            self._grant_backlog(device, at)
        credited = None if device.credit is None else self._charge_backlog(device, sample)

        ruleset = tenant.ruleset
        if device.ruleset is not ruleset:
            device.ruleset = ruleset
            device.windows = [None] * len(ruleset.specs)
        windows = device.windows
        for counter, specs in ruleset.by_counter:
            value = (
                getattr(sample, counter)
                if credited is None
                else credited.get(counter, getattr(sample, counter))
            )
            if not value:
                continue  # a statistic cannot grow by a zero: no rule can start to pass
            for index, slot_seconds, slot_count, spec, compiled in specs:
                window = windows[index]
                if window is None:
                    window = windows[index] = Window(slot_count)
                slot = int(at / slot_seconds)
                if slot == window.head + 1:  # the common case, inlined: the next slot
                    window.head = slot
                    position = slot % slot_count
                    slots = window.slots
                    total = window.total = window.total - slots[position] + value
                    slots[position] = value
                else:
                    position = window.add(slot, value)
                    total = window.total
                for rule in compiled:
                    if (total if rule.on_total else window.slots[position]) >= rule.gate_at:
                        self._rule_passed(device, spec, rule, window, position, at, found)
        if sample.source_addresses:
            self._sources(device, ruleset, sample, found)

        values = device.values
        if credited is None:
            values[0] += sample.messages_in
            values[1] += sample.bytes_in
            values[2] += sample.messages_out
            values[3] += sample.bytes_out
        else:
            values[0] += credited["messages_in"]
            values[1] += credited["bytes_in"]
            values[2] += credited["messages_out"]
            values[3] += credited["bytes_out"]
        values[4] += sample.connection_attempts
        limits = device.limits
        if (
            values[0] > limits[0]
            or values[1] > limits[1]
            or values[2] > limits[2]
            or values[3] > limits[3]
            or values[4] > limits[4]
        ):
            self._judge_bucket(device, at, found)

    def _grant_backlog(self, device: _Device, at: float) -> None:
        """The device reconnected after ``gap`` empty buckets: credit it with what it (and the cloud, for
        it) would have sent meanwhile: its mean (or the blend's, if higher) times the buckets, and ``z``
        deviations of that sum."""
        buckets = min(device.gap, self.settings.max_backlog_buckets)
        device.reconnected = True
        spread = self.settings.z_threshold * math.sqrt(buckets)
        floors = self._floors.sd_floor_squared
        self._expect_again(device)
        means, deviations = self._means, self._deviations
        own = device.stats.mean  # a device busier than its group sends more than the blend expects
        device.credit = [
            max(means[index], own[index]) * buckets
            + spread * max(deviations[index], math.sqrt(floors[index]))
            for index in range(_BACKLOG_METRICS)
        ]
        device.credit_until = at + self.settings.backlog_drain_seconds

    def _charge_backlog(self, device: _Device, sample: CloudSample) -> dict[str, int]:
        """What of the sample is left once its backlog credit paid for what it could."""
        credit = device.credit
        assert credit is not None
        left: dict[str, int] = {}
        for index, name in enumerate(BASELINE_METRICS[:_BACKLOG_METRICS]):
            value = getattr(sample, name)
            paid = min(value, int(credit[index]))
            credit[index] -= paid
            left[name] = value - paid
        if sample.at >= device.credit_until or max(credit) < 1:
            device.credit = None
        return left

    def _rule_passed(
        self,
        device: _Device,
        spec: WindowSpec,
        compiled: CompiledRule,
        window: Window,
        position: int,
        at: float,
        found: list[Finding],
    ) -> None:
        raw = window.statistic(compiled, position)
        if not compiled.passes(raw):
            return
        rule = compiled.rule
        observed = raw * compiled.scale
        candidate = Candidate(
            rule.detector,
            rule.code,
            compiled.excess(raw),
            rule.severity,
            None,
            f"{rule.metric} {rule.statistic} {observed:g} {rule.comparator} {rule.threshold:g} "
            f"over {rule.window_seconds:g} s (rule {rule.name!r})",
            (Evidence(rule.metric, observed, rule.threshold, rule.window_seconds, compiled.describe(spec)),),
        )
        self._emit(device, candidate, at, found)

    def _sources(self, device: _Device, ruleset: RuleSet, sample: CloudSample, found: list[Finding]) -> None:
        """Remember the sample's source addresses; judge new ones, and the distinct-address rules."""
        addresses = device.addresses
        at = sample.at
        # only a device that always used one address: one that moves (a cellular link) has shown it does
        known = len(addresses) == 1 and device.stats.count >= self.settings.min_device_buckets
        ordered = sorted(sample.source_addresses)
        new = [address for address in ordered if address not in addresses]
        for address in ordered:
            addresses[address] = max(addresses.pop(address, at), at)
        while len(addresses) > self.settings.max_source_addresses:
            del addresses[next(iter(addresses))]
        if new and known:
            evidence = tuple(Evidence("source_address", 1, 0, 0, address) for address in new)
            summary = f"connected from {', '.join(new[:4])}, an address it never used before"
            candidate = Candidate(
                "baseline:source_addresses",
                "new_source_address",
                1.0,
                FindingSeverity.LOW,
                None,
                summary,
                evidence,
            )
            self._emit(device, candidate, at, found)
        for compiled in ruleset.distinct:
            rule = compiled.rule
            since = at - rule.window_seconds
            recent = sorted(address for address, seen in addresses.items() if seen > since)
            if compiled.passes(len(recent)):
                shown = ", ".join(recent[: self.settings.max_evidence])
                candidate = Candidate(
                    rule.detector,
                    rule.code,
                    compiled.excess(len(recent)),
                    rule.severity,
                    None,
                    f"{len(recent)} source addresses in {rule.window_seconds:g} s (rule {rule.name!r})",
                    (Evidence(rule.metric, len(recent), rule.threshold, rule.window_seconds, shown),),
                )
                self._emit(device, candidate, at, found)

    def _open_bucket(self, tenant: _Tenant, device: _Device, bucket: int, group_id: str | None) -> None:
        """Learn the device's bucket that ended (and the empty ones since), then open ``bucket``."""
        previous = device.bucket
        values = device.values
        group = tenant.groups.get(device.group_id) if device.group_id is not None else None
        if previous >= 0:
            # the empty buckets before the one that ended are learned only now: if it held a reconnect,
            # they were an outage, not a device doing nothing
            zeros = 0 if device.reconnected else device.gap
            device.stats.learn_zeros(zeros, self._device_weight)
            device.stats.learn(values, self._device_weight, device.limits)
            if group is not None:
                zeros = min(zeros, self.settings.max_backlog_buckets)
                if group.stats.gather(previous, values, device.limits, zeros):
                    self._group_folded(group)
            device.gap = bucket - previous - 1
            for index in range(len(values)):
                values[index] = 0
        device.reconnected = False
        device.bucket = bucket
        if bucket % _IDLE_CHECK_BUCKETS == 0 and device.ruleset is not None:
            self._drop_idle_windows(device, device.ruleset, bucket * self._bucket_seconds)
        if group_id != device.group_id or (group is None and group_id is not None):
            device.group_id = group_id
            group = self._group(tenant, group_id) if group_id is not None else None
        elif group is not None:
            self._groups.move_to_end(group)
        self._expect(device, group)

    @staticmethod
    def _drop_idle_windows(device: _Device, ruleset: RuleSet, now: float) -> None:
        """Forget the windows nothing entered for longer than they are long (they hold only zeros)."""
        windows = device.windows
        for index, window in enumerate(windows):
            if window is not None:
                spec = ruleset.specs[index]
                if (window.head + 1) * spec.slot_seconds + spec.window_seconds < now:
                    windows[index] = None

    def _expect(self, device: _Device, group: _Group | None) -> float:
        """Set the device's limits for its open bucket; the means and deviations go to ``self._means`` and
        ``self._deviations``. Return how much of it is the device's own baseline (the rest its group's; -1:
        nothing is known yet)."""
        settings = self.settings
        prior = group.stats if group is not None and group.learned else None
        judged = expectation(
            device.stats,
            prior,
            settings.min_device_buckets,
            self._floors,
            settings.z_threshold,
            settings.ratio_threshold,
            self._means,
            self._deviations,
            device.limits,
        )
        if not judged:
            return -1.0
        if prior is None:
            return 1.0
        return device.stats.count / (device.stats.count + settings.min_device_buckets)

    def _expect_again(self, device: _Device) -> float:
        """:meth:`_expect` mid-bucket, for what needs the means and deviations (rare)."""
        group = device.tenant.groups.get(device.group_id) if device.group_id is not None else None
        return self._expect(device, group)

    def _group_folded(self, group: _Group) -> None:
        settings = self.settings
        stats = group.stats
        judged = expectation(
            stats,
            None,
            settings.min_group_buckets,
            self._floors,
            settings.z_threshold,
            settings.ratio_threshold,
            [0.0] * len(BASELINE_METRICS),
            [0.0] * len(BASELINE_METRICS),
            stats.limits,
        )
        group.learned = judged and stats.span() >= settings.min_device_buckets

    def _ceiling(self, metric: str) -> FindingSeverity:
        ceiling = self.settings.baseline_max_severity
        if _DEVICE_DRIVEN[BASELINE_METRICS.index(metric)]:
            return ceiling
        return min(ceiling, FindingSeverity.MEDIUM, key=severity_rank)

    def _judge_bucket(self, device: _Device, at: float, found: list[Finding]) -> None:
        """The open bucket passed a limit: one finding per code, named after its worst metric."""
        settings = self.settings
        z, ratio = settings.z_threshold, settings.ratio_threshold
        worst: dict[str, tuple[float, str]] = {}
        evidence: dict[str, list[Evidence]] = {}
        limits = list(device.limits)  # what the values passed; worked out again with the means below
        share = self._expect_again(device)
        learned = f"{device.stats.count:.0f} buckets learned"
        if share < 1:
            learned += f", {1 - share:.0%} group baseline"
        for index, value in enumerate(device.values):
            limit = limits[index]
            if value <= limit:
                continue
            mean, deviation = self._means[index], self._deviations[index]
            level = self._floors.levels[index]
            how_far = excess(value, mean, deviation, level, z, ratio)
            metric, code = BASELINE_METRICS[index], _BASELINE_CODES[index]
            if how_far > worst.get(code, (0.0, ""))[0]:
                worst[code] = (how_far, metric)
            z_score = (value - mean) / deviation
            evidence.setdefault(code, []).append(
                Evidence(
                    metric,
                    value,
                    limit,
                    self._bucket_seconds,
                    f"z={z_score:.1f}, {value / max(mean, level):.1f}x the mean {mean:.3g} ({learned})",
                )
            )
        for code, (how_far, metric) in worst.items():
            items = tuple(evidence[code])
            summary = "; ".join(
                f"{item.metric} {item.observed:g} in {self._bucket_seconds:g} s, "
                f"expected at most {item.expected:.3g}"
                for item in items
            )
            candidate = Candidate(
                f"baseline:{metric}",
                code,
                how_far,
                FindingSeverity.LOW,
                self._ceiling(metric),
                summary,
                items,
            )
            self._emit(device, candidate, at, found)

    # ------------------------------------------------------------------ security baseline reports

    def judge_baseline(
        self, tenant_id: str, device_id: str, group_id: str | None, report: SecurityBaseline, at: float
    ) -> list[Finding]:
        """Judge a device's security baseline report (and learn from it)."""
        _identifier(tenant_id, "a tenant id")
        _identifier(device_id, "a device id")
        if group_id is not None:
            _identifier(group_id, "a group id")
        if not isinstance(report, SecurityBaseline):
            raise TypeError("a report is a SecurityBaseline")
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise TypeError("at is a finite number of seconds since the epoch")
        tenant = self._tenant(tenant_id)
        device = self._device(tenant, device_id, group_id)
        group_reports: GroupReports | None = None
        if group_id is not None:
            group = self._group(tenant, group_id)
            group_reports = group.reports
            if group_reports is None:
                group_reports = group.reports = GroupReports()
        state = device.reports
        if state is None:
            state = device.reports = DeviceReports()
            if group_reports is not None:
                group_reports.reporters += 1
        found: list[Finding] = []
        for candidate in self._reports.judge(state, group_reports, report):
            self._emit(device, candidate, at, found)
        return found

    # ------------------------------------------------------------------ snapshots

    def snapshot_device(self, tenant_id: str, device_id: str) -> bytes | None:
        """What the detector learned of a device, as compact JSON (``None``: nothing)."""
        tenant = self._tenants.get(tenant_id)
        device = tenant.devices.get(device_id) if tenant is not None else None
        if device is None:
            return None
        reports = None
        if device.reports is not None:
            state = device.reports
            reports = _ReportsSnapshot(
                count=state.count,
                learned=state.stats.count,
                mean=tuple(state.stats.mean),
                var=tuple(state.stats.var),
                ports=dict(state.ports),
                destinations=tuple(state.destinations),
            )
        snapshot = _DeviceSnapshot(
            learned=device.stats.count,
            mean=tuple(device.stats.mean),
            var=tuple(device.stats.var),
            addresses=dict(device.addresses),
            reports=reports,
        )
        data = snapshot.model_dump_json(exclude_none=True).encode()
        if len(data) > self.settings.max_snapshot_bytes:  # cannot happen within the bounds; refuse anyway
            raise PayloadTooLarge(
                "a device's learned state outgrew the snapshot bound", code="snapshot_too_large"
            )
        return data

    def restore_device(self, tenant_id: str, device_id: str, data: bytes) -> None:
        """Put back what :meth:`snapshot_device` gave; :class:`InvalidInput` for anything else."""
        _identifier(tenant_id, "a tenant id")
        _identifier(device_id, "a device id")
        if not isinstance(data, bytes):
            raise InvalidInput("a detector snapshot is bytes", code="snapshot_invalid")
        settings = self.settings
        if len(data) > settings.max_snapshot_bytes:
            raise PayloadTooLarge(
                f"a detector snapshot holds at most {settings.max_snapshot_bytes} bytes",
                code="snapshot_too_large",
            )
        try:
            snapshot = _DeviceSnapshot.model_validate_json(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the body"
            raise InvalidInput(
                f"a detector snapshot is malformed at {where}: {first['msg']}", code="snapshot_invalid"
            ) from None
        self._check_snapshot(snapshot)
        tenant = self._tenant(tenant_id)
        device = self._device(tenant, device_id, None)
        device.stats.restore(snapshot.learned, snapshot.mean, snapshot.var)
        device.addresses = dict(
            sorted(snapshot.addresses.items(), key=lambda item: item[1])[-settings.max_source_addresses :]
        )
        device.bucket = -1
        device.limits = [math.inf] * len(BASELINE_METRICS)
        if snapshot.reports is None:
            device.reports = None
            return
        saved = snapshot.reports
        state = device.reports = DeviceReports()
        state.count = saved.count
        state.stats.restore(saved.learned, saved.mean, saved.var)
        state.ports = dict(sorted(saved.ports.items(), key=lambda item: item[1])[-settings.max_known_ports :])
        state.destinations = dict.fromkeys(saved.destinations[-settings.max_known_destinations :])

    @staticmethod
    def _check_snapshot(snapshot: _DeviceSnapshot) -> None:
        def refuse(what: str) -> InvalidInput:
            return InvalidInput(f"a detector snapshot holds {what}", code="snapshot_invalid")

        for address in snapshot.addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise refuse("a source address that is not an IP address") from None
        if snapshot.reports is not None:
            for key in snapshot.reports.ports:
                if not _PORT_KEY.match(key) or int(key.partition("/")[2]) > 65535:
                    raise refuse("a port that is not protocol/number")
            if not all(_is_destination_key(key) for key in snapshot.reports.destinations):
                raise refuse("a destination that is not address:port")
