"""Threshold rules of the detection core: the records, their JSON, and the windows they read (pure).

A :class:`Rule` reads one series of a device's :class:`~fleetward.monitor.detect.CloudSample` s over a
sliding window and fires when a statistic of it passes a threshold:

- ``metric`` is a counter of the sample (``messages_in``, ``authorization_failures``, …), the same counter per
  second of the window's slots (``messages_in_per_second``), or ``source_addresses``;
- the window is folded into at most :data:`MAX_SLOTS` equal slots (1 s each for windows up to 60 s, so a
  percentile over a minute is over its seconds; a window only summed has at most :data:`MAX_SUM_SLOTS`,
  and is exact to one slot); seconds without a sample count as zero;
- ``statistic`` is ``sum`` (the total), ``rate`` (the total per second of window), ``max`` (the largest
  slot), ``p50``/``p90``/``p99`` (nearest-rank percentile of the slots) or, for ``source_addresses`` only,
  ``distinct`` (how many different peer addresses the window saw).

:class:`Finding` and its :class:`Evidence` are what every detector of the core returns. A finding is
graded: ``excess`` is how many times the threshold the statistic reached (1 at the threshold), its score
``excess / (1 + excess)`` (0.5 at the threshold, towards 1 far past it); a rule's severity is its own at
the threshold and rises by one level at most when the excess is large (:func:`graded`). :class:`RuleSet`
compiles rules into the windows they share; :class:`Window` is one device's slots of one of them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetward.errors import InvalidInput, PayloadTooLarge

MAX_RULES = 64
MAX_RULE_NAME_CHARS = 64
MAX_CODE_CHARS = 64
MAX_WINDOW_SECONDS = 24 * 3600.0
MIN_WINDOW_SECONDS = 1.0
MAX_SLOTS = 60
#: a window only summed (sum, rate) needs fewer slots: its total is exact to one slot of this many
MAX_SUM_SLOTS = 12
MAX_RULES_JSON_BYTES = 64 * 1024


class FindingSeverity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


SEVERITIES: tuple[FindingSeverity, ...] = tuple(FindingSeverity)
#: the excess (times the threshold) at which each severity starts: scores 0.5, 0.6, 0.75 and 0.9
_BAND_EXCESS = (1.0, 1.5, 3.0, 9.0)


def severity_rank(severity: FindingSeverity) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Evidence:
    metric: str  # e.g. "messages_in", "authorization_failures", "blocked_destination", "listening_port"
    observed: float
    expected: float  # the threshold or the baseline's mean/upper bound
    window_seconds: float
    detail: str = (
        ""  # e.g. "sum over 2 s", "z=9.3, 31.0x the mean 0.33 (device, 360 buckets)", "10.0.0.9:4444"
    )


@dataclass(frozen=True)
class Finding:
    tenant_id: str
    device_id: str
    detector: str  # "rule:<name>" or "baseline:<metric>" or "baseline-report:<what>"
    code: str  # stable machine code, e.g. "message_flood", "undeclared_destination", "traffic_spike"
    severity: FindingSeverity
    score: float  # 0..1, how far past normal (0.5 at the threshold); the severity derives from it
    summary: str  # one line an operator reads
    evidence: tuple[Evidence, ...]
    at: float


@dataclass(frozen=True)
class Candidate:
    """A finding before it is graded and checked against the repeat interval: ``excess`` times past its
    threshold, severity ``floor`` at the threshold and at most ``ceiling`` (see :func:`graded`)."""

    detector: str
    code: str
    excess: float
    floor: FindingSeverity
    ceiling: FindingSeverity | None
    summary: str
    evidence: tuple[Evidence, ...]


def graded(
    excess: float, floor: FindingSeverity = FindingSeverity.LOW, ceiling: FindingSeverity | None = None
) -> tuple[float, FindingSeverity]:
    """The score and severity of a finding ``excess`` times past its threshold.

    ``floor`` is the severity at the threshold; the severity rises with the excess, by one level at most
    above ``floor`` unless ``ceiling`` says otherwise. The score always lies in the band of the severity.
    """
    low = severity_rank(floor)
    high = min(low + 1, 3) if ceiling is None else severity_rank(ceiling)
    high = max(high, low)
    effective = max(excess, 1.0) * _BAND_EXCESS[low]
    if not math.isfinite(effective):
        effective = math.inf
    rank = 3
    while rank > 0 and effective < _BAND_EXCESS[rank]:
        rank -= 1
    rank = min(max(rank, low), high)
    if rank < 3:
        effective = min(effective, _BAND_EXCESS[rank + 1] * (1 - 1e-9))
    score = 1.0 if math.isinf(effective) else effective / (1.0 + effective)
    return min(max(score, 0.0), 1.0), SEVERITIES[rank]


# ---------------------------------------------------------------------------------------------- rules

#: the counters of a CloudSample a rule (or a baseline) may read
COUNTERS: tuple[str, ...] = (
    "messages_in",
    "bytes_in",
    "messages_out",
    "bytes_out",
    "authorization_failures",
    "connection_attempts",
    "disconnects",
)
SOURCE_ADDRESSES = "source_addresses"
METRICS: tuple[str, ...] = (*COUNTERS, *(f"{name}_per_second" for name in COUNTERS), SOURCE_ADDRESSES)
Statistic = Literal["sum", "rate", "max", "p50", "p90", "p99", "distinct"]
STATISTICS: tuple[str, ...] = ("sum", "rate", "max", "p50", "p90", "p99", "distinct")
Comparator = Literal[">", ">="]
_PERCENTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:-]*$")
_CODE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} is a finite number, not {value}")
    return float(value)


@dataclass(frozen=True)
class Rule:
    """Fire when ``statistic`` of ``metric`` over the last ``window_seconds`` is ``comparator threshold``."""

    name: str
    metric: str
    statistic: str
    window_seconds: float
    comparator: str
    threshold: float
    severity: FindingSeverity
    code: str

    def __post_init__(self) -> None:
        for what, text, bound, pattern in (
            ("name", self.name, MAX_RULE_NAME_CHARS, _NAME),
            ("code", self.code, MAX_CODE_CHARS, _CODE),
        ):
            if not isinstance(text, str):
                raise TypeError(f"a rule's {what} is a string")
            if not 1 <= len(text) <= bound or not pattern.match(text):
                raise ValueError(f"a rule's {what} is 1 to {bound} characters of {pattern.pattern}")
        if self.metric not in METRICS:
            raise ValueError(f"a rule's metric is one of {', '.join(METRICS)}, not {self.metric[:40]!r}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"a rule's statistic is one of {', '.join(STATISTICS)}")
        if (self.metric == SOURCE_ADDRESSES) != (self.statistic == "distinct"):
            raise ValueError("source_addresses is counted with the statistic distinct, and only it")
        if self.metric.endswith("_per_second") and self.statistic == "sum":
            raise ValueError("a sum of per-second values means nothing: sum the counter instead")
        window = _number(self.window_seconds, "a rule's window_seconds")
        if not MIN_WINDOW_SECONDS <= window <= MAX_WINDOW_SECONDS:
            raise ValueError(
                f"a rule's window is {MIN_WINDOW_SECONDS:g} to {MAX_WINDOW_SECONDS:g} seconds, not {window:g}"
            )
        if _number(self.threshold, "a rule's threshold") < 0:
            raise ValueError("a rule's threshold is at least 0")
        if self.comparator not in (">", ">="):
            raise ValueError("a rule's comparator is > or >=")
        if not isinstance(self.severity, FindingSeverity):
            raise TypeError("a rule's severity is a FindingSeverity")

    @property
    def detector(self) -> str:
        return f"rule:{self.name}"

    def to_json(self) -> str:
        return _RuleModel.model_validate(_rule_fields(self)).model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Rule:
        """A rule from its JSON; :class:`InvalidInput` (code ``rule_invalid``) says what was wrong."""
        if len(text) > MAX_RULES_JSON_BYTES:
            raise PayloadTooLarge(f"a rule holds at most {MAX_RULES_JSON_BYTES} bytes", code="rule_invalid")
        try:
            model = _RuleModel.model_validate_json(text)
        except ValidationError as error:
            raise InvalidInput(_first_error(error, "a rule"), code="rule_invalid") from None
        return _rule_from_model(model)


class _RuleModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=MAX_RULE_NAME_CHARS)
    metric: str = Field(max_length=64)
    statistic: Statistic
    window_seconds: float = Field(allow_inf_nan=False)
    comparator: Comparator
    threshold: float = Field(allow_inf_nan=False)
    severity: FindingSeverity
    code: str = Field(max_length=MAX_CODE_CHARS)


class _RuleListModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[_RuleModel, ...] = Field(max_length=MAX_RULES)


def _rule_fields(rule: Rule) -> dict[str, object]:
    return {
        "name": rule.name,
        "metric": rule.metric,
        "statistic": rule.statistic,
        "window_seconds": rule.window_seconds,
        "comparator": rule.comparator,
        "threshold": rule.threshold,
        "severity": rule.severity,
        "code": rule.code,
    }


def _first_error(error: ValidationError, what: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the body"
    return f"{what} is malformed at {where}: {first['msg']}"


def _rule_from_model(model: _RuleModel) -> Rule:
    try:
        return Rule(
            name=model.name,
            metric=model.metric,
            statistic=model.statistic,
            window_seconds=model.window_seconds,
            comparator=model.comparator,
            threshold=model.threshold,
            severity=model.severity,
            code=model.code,
        )
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"rule {model.name[:64]!r}: {error}", code="rule_invalid") from None


def check_rules(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """``rules`` as a tuple, or :class:`InvalidInput`: too many, not rules, or two with one name."""
    if len(rules) > MAX_RULES:
        raise InvalidInput(f"a tenant has at most {MAX_RULES} rules, not {len(rules)}", code="rules_invalid")
    if not all(isinstance(rule, Rule) for rule in rules):
        raise InvalidInput("rules are Rule records", code="rules_invalid")
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise InvalidInput("two rules have the same name", code="rules_invalid")
    return tuple(rules)


def rules_to_json(rules: Sequence[Rule]) -> str:
    """A tenant's rules as one JSON document, ``{"rules": [...]}`` (what the store keeps)."""
    items = [json.loads(rule.to_json()) for rule in check_rules(rules)]
    return json.dumps({"rules": items}, separators=(",", ":"))


def rules_from_json(text: str | bytes) -> tuple[Rule, ...]:
    """The rules of :func:`rules_to_json`, validated; :class:`InvalidInput` otherwise."""
    if len(text) > MAX_RULES_JSON_BYTES:
        raise PayloadTooLarge(f"rules hold at most {MAX_RULES_JSON_BYTES} bytes", code="rules_invalid")
    try:
        model = _RuleListModel.model_validate_json(text)
    except ValidationError as error:
        raise InvalidInput(_first_error(error, "the rules"), code="rules_invalid") from None
    return check_rules([_rule_from_model(item) for item in model.rules])


#: The shipped rules. The hub lets a device publish 100 messages per second (burst 200) and drops the rest,
#: so a device that sends more than that for seconds is not a device behaving: it floods. Three addresses
#: within a minute is one identity used from several places (a device on a cellular link that reconnects
#: gets a new address now and then, not three in a minute).
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(
        name="authorization failures",
        metric="authorization_failures",
        statistic="sum",
        window_seconds=60,
        comparator=">=",
        threshold=5,
        severity=FindingSeverity.HIGH,
        code="authorization_failures",
    ),
    Rule(
        name="reconnect storm",
        metric="connection_attempts",
        statistic="sum",
        window_seconds=300,
        comparator=">=",
        threshold=10,
        severity=FindingSeverity.MEDIUM,
        code="reconnect_storm",
    ),
    Rule(
        name="many source addresses",
        metric=SOURCE_ADDRESSES,
        statistic="distinct",
        window_seconds=60,
        comparator=">=",
        threshold=3,
        severity=FindingSeverity.MEDIUM,
        code="many_source_addresses",
    ),
    Rule(
        name="message burst",
        metric="messages_in",
        statistic="sum",
        window_seconds=2,
        comparator=">=",
        threshold=150,
        severity=FindingSeverity.HIGH,
        code="message_flood",
    ),
    Rule(
        name="sustained messages",
        metric="messages_in_per_second",
        statistic="rate",
        window_seconds=5,
        comparator=">=",
        threshold=80,
        severity=FindingSeverity.HIGH,
        code="message_flood",
    ),
)


# ---------------------------------------------------------------------------------------------- windows

_SUM, _MAX, _PERCENTILE = 0, 1, 2


class CompiledRule:
    """A rule as its window reads it: the threshold in the window's own units (a count in a slot, or in
    the window), and ``gate_at``, the smallest count that passes (counts are whole)."""

    __slots__ = ("gate_at", "kind", "on_total", "quantile", "raw_threshold", "rule", "scale")

    def __init__(self, rule: Rule, spec: WindowSpec) -> None:
        self.rule = rule
        per_second = rule.metric.endswith("_per_second")
        self.quantile = _PERCENTILES.get(rule.statistic, 1.0)
        #: seconds the statistic's count is spread over: from the raw count to the rule's units
        per: float
        if rule.statistic in ("sum", "rate", "distinct"):
            self.kind = _SUM
            per = rule.window_seconds if rule.statistic == "rate" else 1.0
        else:
            self.kind = _MAX if rule.statistic == "max" else _PERCENTILE
            per = spec.slot_seconds if per_second else 1.0
        self.on_total = self.kind == _SUM
        self.scale = 1.0 / per
        self.raw_threshold = rule.threshold * per
        if rule.comparator == ">":
            self.gate_at = float(math.floor(self.raw_threshold + 1e-9) + 1)
        else:
            self.gate_at = float(max(0, math.ceil(self.raw_threshold - 1e-9)))

    def passes(self, raw: float) -> bool:
        return raw >= self.gate_at

    def excess(self, raw: float) -> float:
        if self.raw_threshold <= 0:
            return 1.0 + raw * self.scale
        return raw / self.raw_threshold

    def describe(self, spec: WindowSpec) -> str:
        rule = self.rule
        if rule.statistic == "distinct":
            return f"distinct over {rule.window_seconds:g} s"
        if self.kind == _SUM:
            return f"{rule.statistic} over {rule.window_seconds:g} s"
        return f"{rule.statistic} of {spec.slot_seconds:g} s slots over {rule.window_seconds:g} s"


@dataclass(frozen=True)
class WindowSpec:
    """Slots shared by the rules that read one counter over one window length."""

    counter: str
    window_seconds: float
    slot_count: int
    slot_seconds: float

    @classmethod
    def for_rules(cls, counter: str, window_seconds: float, rules: Sequence[Rule]) -> WindowSpec:
        """Slots of 1 s (at most 60) where a rule takes the max or a percentile of them; else at most 12."""
        bound = MAX_SLOTS if any(rule.statistic not in ("sum", "rate") for rule in rules) else MAX_SUM_SLOTS
        count = max(1, min(bound, math.ceil(window_seconds - 1e-9)))
        return cls(counter, window_seconds, count, window_seconds / count)


#: a window of a rule set: its index, slot length, slot count, spec, and the rules that read it
WindowRules = tuple[int, float, int, "WindowSpec", tuple[CompiledRule, ...]]


class RuleSet:
    """A tenant's rules, compiled: the counters they read, each with its windows and their rules."""

    __slots__ = ("by_counter", "distinct", "rules", "specs")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = check_rules(rules)
        windows: dict[tuple[str, float], list[Rule]] = {}
        for rule in self.rules:
            counter = rule.metric.removesuffix("_per_second")
            windows.setdefault((counter, rule.window_seconds), []).append(rule)
        specs: dict[WindowSpec, list[CompiledRule]] = {}
        distinct: list[CompiledRule] = []
        for (counter, seconds), sharing in windows.items():
            spec = WindowSpec.for_rules(counter, seconds, sharing)
            for rule in sharing:
                compiled = CompiledRule(rule, spec)
                if rule.statistic == "distinct":
                    distinct.append(compiled)
                else:
                    specs.setdefault(spec, []).append(compiled)
        self.specs: tuple[WindowSpec, ...] = tuple(specs)
        by_counter: dict[str, list[WindowRules]] = {}
        for index, spec in enumerate(self.specs):
            by_counter.setdefault(spec.counter, []).append(
                (index, spec.slot_seconds, spec.slot_count, spec, tuple(specs[spec]))
            )
        #: (counter, its windows) for every counter some rule reads
        self.by_counter: tuple[tuple[str, tuple[WindowRules, ...]], ...] = tuple(
            (counter, tuple(windows)) for counter, windows in by_counter.items()
        )
        self.distinct: tuple[CompiledRule, ...] = tuple(distinct)


class Window:
    """One device's slots of one :class:`WindowSpec`: a ring, its newest slot's index, and its total."""

    __slots__ = ("head", "slots", "total")

    def __init__(self, slot_count: int) -> None:
        self.slots = [0] * slot_count
        self.head = -1
        self.total = 0

    def add(self, index: int, value: int) -> int:
        """Add ``value`` in slot ``index`` (an older index counts in the newest slot); return that slot's
        position in the ring."""
        slots = self.slots
        count = len(slots)
        gap = index - self.head
        if gap > 0:
            if gap >= count:
                for position in range(count):
                    slots[position] = 0
                self.total = 0
            else:
                total = self.total
                for step in range(self.head + 1, index + 1):
                    position = step % count
                    total -= slots[position]
                    slots[position] = 0
                self.total = total
            self.head = index
        position = self.head % count
        slots[position] += value
        self.total += value
        return position

    def statistic(self, compiled: CompiledRule, position: int) -> float:
        """The raw statistic (in slot units) of ``compiled`` over the ring."""
        if compiled.kind == _SUM:
            return float(self.total)
        if compiled.kind == _MAX:
            return float(max(self.slots))
        ordered = sorted(self.slots)
        rank = max(1, math.ceil(compiled.quantile * len(ordered) - 1e-9))
        return float(ordered[rank - 1])

    def gate(self, compiled: CompiledRule, position: int) -> bool:
        """Whether the rule may have started to pass with what was just added (the cheap test first): a
        max or a percentile can pass now only if the newest slot, the only one that grew, does."""
        return (self.total if compiled.on_total else self.slots[position]) >= compiled.gate_at
