"""The monitor: what the hub sees and what the store records, judged, acted on, and told.

It runs beside the hub in each server process (``async with Monitor(...)``). The hub hands it a sample
per active device per second and every security baseline a device reports (``hub/meter.py``'s
``Observer``); it follows the event log for what happens elsewhere (attestations refused and passed,
quarantines, revocations, update reports). Each turn (``monitor_judge_milliseconds``) it

1. judges what came in with the detection core (``detect.py``): rules and statistical baselines;
2. records the findings as alerts and runs the playbooks they trigger, in one transaction
   (``alerts.py``, ``playbook_service.py``), then rings the trust bell so hubs narrow at once;
3. recomputes the health of every device concerned (``health_service.py``);
4. sends the notices the playbooks asked for (``sinks.py``), and releases remediated devices.

Queues are bounded: under a flood of samples the oldest wait, the newest beyond the bound are counted in
``dropped`` and never block the hub. A device's samples from a process that does not hold its session are
judged where its session is; what each process learns is its own (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import sqlalchemy as sa

from fleetward.authority.keystore import KeyStore
from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import FleetwardError, InvalidInput
from fleetward.monitor import alerts as alert_store
from fleetward.monitor.detect import CloudSample, Detector, Evidence, Finding, FindingSeverity
from fleetward.monitor.detect_rules import Rule, rules_from_json
from fleetward.monitor.health_service import HealthService
from fleetward.monitor.playbook_service import Destination, PendingNotice, PlaybookService, webhook_secret
from fleetward.monitor.playbooks import Playbook
from fleetward.monitor.reports import ParsedReport
from fleetward.monitor.sinks import (
    Notice,
    NoticeSink,
    RetryingSink,
    SyslogCefSink,
    WebhookSink,
    flatten_detail,
)
from fleetward.store.database import Database
from fleetward.store.schema import detection_rules, detector_state, devices, events
from fleetward.store.trust import TrustBell
from fleetward.wire.reports import CapabilityDeniedReport

logger = logging.getLogger(__name__)

#: how grave each refused attestation is that says the software or identity is wrong (every code of
#: health.TAMPERING_REFUSALS: the others, a spent nonce say, tell nothing of the device)
TAMPERING_SEVERITY = {
    "measurement_unknown": FindingSeverity.CRITICAL,
    "evidence_signature_invalid": FindingSeverity.CRITICAL,
    "quote_pcr_mismatch": FindingSeverity.CRITICAL,
    "csr_key_mismatch": FindingSeverity.CRITICAL,
    "quote_nonce_mismatch": FindingSeverity.HIGH,
    "measurement_below_floor": FindingSeverity.HIGH,
}
#: events after which a device's health is judged again
_HEALTH_KINDS = ("attestation", "quarantine", "revocation")


@dataclass
class MonitorStats:
    samples: int = 0
    baselines: int = 0
    findings: int = 0
    alerts_opened: int = 0
    runs: int = 0
    dropped: int = 0
    stale_baselines: int = 0
    #: seconds from a sample's interval end to its alert being committed, the last few
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


class Monitor:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        limits: Limits,
        health: HealthService,
        playbooks: PlaybookService,
        keystore: KeyStore,
        trust_bell: TrustBell,
        *,
        detector: Detector | None = None,
        sink_factory: SinkFactory | None = None,
    ) -> None:
        self._db = database
        self._clock = clock
        self._limits = limits
        self._health = health
        self._playbooks = playbooks
        self._keystore = keystore
        self._trust_bell = trust_bell
        self.detector = detector or Detector()
        self._sink_factory = sink_factory or SinkFactory(keystore)
        self._samples: deque[CloudSample] = deque()
        self._reports: deque[tuple[str, str, ParsedReport]] = deque()
        self._wake = asyncio.Event()
        self._group_of: dict[tuple[str, str], str | None] = {}
        self._playbook_cache: dict[str, tuple[float, list[Playbook]]] = {}
        self._event_cursor = 0
        #: devices judged since their learned state was last saved
        self._seen: set[tuple[str, str]] = set()
        self._sinks: dict[str, RetryingSink] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = MonitorStats()

    # ---------------------------------------------------------------- the hub's observer

    def observe_samples(self, samples: Sequence[CloudSample]) -> None:
        room = self._limits.monitor_queue_max - len(self._samples)
        if room < len(samples):
            self.stats.dropped += len(samples) - max(room, 0)
            samples = samples[: max(room, 0)]
        self._samples.extend(samples)
        self._wake.set()

    def observe_report(self, tenant_id: str, device_id: str, report: ParsedReport) -> None:
        if report.baseline is None and not isinstance(report.failure, CapabilityDeniedReport):
            return  # crashes and the like are the failure reports' business, not a security signal
        if len(self._reports) >= self._limits.monitor_queue_max:
            self.stats.dropped += 1
            return
        self._reports.append((tenant_id, device_id, report))
        self._wake.set()

    # ---------------------------------------------------------------- lifetime

    async def __aenter__(self) -> Monitor:
        self._event_cursor = await asyncio.to_thread(self._latest_event)
        for tenant_id, rules in await asyncio.to_thread(self._stored_rules):
            self.detector.set_rules(tenant_id, rules)
        self._tasks = [
            asyncio.create_task(self._judge_loop(), name="monitor-judge"),
            asyncio.create_task(self._sweep_loop(), name="monitor-sweep"),
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await asyncio.to_thread(self.save_learned)
        except FleetwardError as error:
            logger.warning("what the detector learned was not kept: %s", error.message)
        for sink in self._sinks.values():
            await sink.__aexit__(None, None, None)
        await self._sink_factory.aclose()

    async def _judge_loop(self) -> None:
        interval = self._limits.monitor_judge_milliseconds / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.turn()
            except FleetwardError as error:
                logger.warning("the monitor could not judge this turn: %s (%s)", error.message, error.code)

    async def _sweep_loop(self) -> None:
        """Time alone changes health (certificates age, baselines go late); remediated devices come back."""
        last_sweep = last_save = time.monotonic()
        while True:
            await asyncio.sleep(self._limits.monitor_release_seconds)
            try:
                released = await asyncio.to_thread(self._playbooks.release_remediated)
                for run in released:
                    self.released(run.tenant_id, run.device_id)
                if released:
                    await asyncio.to_thread(
                        self._health.recompute, [(r.tenant_id, r.device_id) for r in released]
                    )
                if time.monotonic() - last_save >= self._limits.monitor_learned_save_seconds:
                    last_save = time.monotonic()
                    await asyncio.to_thread(self.save_learned)
                if time.monotonic() - last_sweep >= self._limits.monitor_health_sweep_seconds:
                    last_sweep = time.monotonic()
                    devices_of = await asyncio.to_thread(self._health.devices_to_sweep)
                    await asyncio.to_thread(self._health.recompute, devices_of)
            except FleetwardError as error:
                logger.warning("the monitor's sweep failed: %s (%s)", error.message, error.code)

    # ---------------------------------------------------------------- one turn

    async def turn(self) -> list[alert_store.Raised]:
        """Judge what came in since the last turn, record and act on it. Returns the alerts it touched."""
        samples = list(self._samples)
        self._samples.clear()
        reports = list(self._reports)
        self._reports.clear()
        followed, touched = await asyncio.to_thread(self._follow_events)
        unknown = {(s.tenant_id, s.device_id) for s in samples} | {(t, d) for t, d, _ in reports}
        unknown -= self._group_of.keys()
        if unknown:
            self._group_of.update(await asyncio.to_thread(self._groups, unknown))
            await asyncio.to_thread(self._restore_learned, unknown)
        self._seen.update((s.tenant_id, s.device_id) for s in samples)
        findings: list[Finding] = list(followed)
        if samples:
            self.stats.samples += len(samples)
            grouped = [
                dataclasses.replace(sample, group_id=self._group_of.get((sample.tenant_id, sample.device_id)))
                for sample in samples
            ]
            findings += self.detector.observe_many(grouped)
        releases = await asyncio.to_thread(self._releases, {(t, d) for t, d, _ in reports}) if reports else {}
        for tenant_id, device_id, report in reports:
            self.stats.baselines += 1
            released = releases.get((tenant_id, device_id))
            if released is not None and report.occurred_at <= released:
                self.stats.stale_baselines += 1  # from before its release: the incident dealt with
                continue
            if report.baseline is not None:
                findings += self.detector.judge_baseline(
                    tenant_id,
                    device_id,
                    self._group_of.get((tenant_id, device_id)),
                    report.baseline,
                    report.occurred_at.timestamp(),
                )
            elif isinstance(report.failure, CapabilityDeniedReport):
                findings.append(_violation_finding(tenant_id, device_id, report.failure))
        raised: list[alert_store.Raised] = []
        notices: list[PendingNotice] = []
        if findings:
            self.stats.findings += len(findings)
            tenants = {finding.tenant_id for finding in findings}
            playbooks = {tenant: await self._playbooks_of(tenant) for tenant in tenants}
            raised, notices, ran = await asyncio.to_thread(self._record, findings, playbooks)
            now = self._clock.now().timestamp()
            for finding in findings:
                self.stats.latencies.append(max(0.0, now - finding.at))
            self.stats.alerts_opened += sum(item.opened for item in raised)
            self.stats.runs += ran
            touched |= {(item.alert.tenant_id, item.alert.device_id) for item in raised}
        if touched:
            await asyncio.to_thread(self._health.recompute, touched)
        for notice in notices:
            await self.send(notice)
        return raised

    def _record(
        self, findings: list[Finding], playbooks: dict[str, list[Playbook]]
    ) -> tuple[list[alert_store.Raised], list[PendingNotice], int]:
        """Alerts and playbook runs, one transaction per tenant: a tenant's audit chain is locked once, and
        no transaction holds two tenants' chains (two monitors could otherwise deadlock on them)."""
        raised: list[alert_store.Raised] = []
        notices: list[PendingNotice] = []
        ran = 0
        for tenant_id in sorted({finding.tenant_id for finding in findings}):
            mine = [finding for finding in findings if finding.tenant_id == tenant_id]
            with self._db.write() as connection:
                # the devices' rows locked (in order) first: two processes judging the same device take
                # turns, so an alert is opened and a playbook run once (SQLite's writers take turns anyway)
                connection.execute(
                    sa.select(devices.c.id)
                    .where(
                        devices.c.tenant_id == tenant_id,
                        devices.c.id.in_(sorted({finding.device_id for finding in mine})),
                    )
                    .order_by(devices.c.id)
                    .with_for_update()
                ).all()
                touched = alert_store.raise_findings(connection, mine, self._group_of)
                for item in touched:
                    if not item.worse:
                        continue
                    runs, asked = self._playbooks.trigger(
                        connection, item.alert, playbooks.get(tenant_id, [])
                    )
                    ran += len(runs)
                    notices += asked
            raised += touched
        if ran:  # quarantines and revocations are in the trust feed: hubs read it now
            self._trust_bell.ring()
        return raised, notices, ran

    async def _playbooks_of(self, tenant_id: str) -> list[Playbook]:
        cached = self._playbook_cache.get(tenant_id)
        if cached is not None and time.monotonic() - cached[0] < self._limits.monitor_playbook_cache_seconds:
            return cached[1]
        found = await asyncio.to_thread(self._read_playbooks, tenant_id)  # off the hub's event loop
        self._playbook_cache[tenant_id] = (time.monotonic(), found)
        return found

    def _read_playbooks(self, tenant_id: str) -> list[Playbook]:
        with self._db.read() as connection:
            return PlaybookService.of_tenant(connection, tenant_id)

    def forget_playbooks(self, tenant_id: str) -> None:
        """A playbook of the tenant changed: read them again at the next alert."""
        self._playbook_cache.pop(tenant_id, None)

    # ---------------------------------------------------------------- the event log

    def save_learned(self) -> int:
        """Keep what the baselines learned of the devices judged since the last save (a restart resumes
        from it instead of relearning); returns how many devices."""
        seen, self._seen = self._seen, set()
        now = self._clock.now()
        learned: dict[str, dict[str, bytes]] = {}
        for tenant_id, device_id in sorted(seen):
            snapshot = self.detector.snapshot_device(tenant_id, device_id)
            if snapshot is not None:
                learned.setdefault(tenant_id, {})[device_id] = snapshot
        for tenant_id, states in learned.items():
            device_ids = sorted(states)
            for start in range(0, len(device_ids), 500):
                chunk = device_ids[start : start + 500]
                with self._db.write() as connection:
                    connection.execute(
                        detector_state.delete().where(
                            detector_state.c.tenant_id == tenant_id, detector_state.c.device_id.in_(chunk)
                        )
                    )
                    connection.execute(
                        detector_state.insert(),
                        [
                            {
                                "tenant_id": tenant_id,
                                "device_id": device,
                                "state": states[device],
                                "updated_at": now,
                            }
                            for device in chunk
                        ],
                    )
        return sum(len(states) for states in learned.values())

    def _restore_learned(self, keys: set[tuple[str, str]]) -> None:
        """Put back what was learned of devices seen for the first time since this process started."""
        wanted = sorted(device for _, device in keys)
        with self._db.read() as connection:
            rows = [
                row
                for start in range(0, len(wanted), 500)
                for row in connection.execute(
                    sa.select(detector_state).where(
                        detector_state.c.device_id.in_(wanted[start : start + 500])
                    )
                )
            ]
        for row in rows:
            if (row.tenant_id, row.device_id) not in keys:
                continue  # a device id is global; its state is kept under its own tenant only
            try:
                self.detector.restore_device(row.tenant_id, row.device_id, bytes(row.state))
            except InvalidInput as error:  # PayloadTooLarge too: it starts again from its group's
                logger.warning("the learned state of %s is not usable: %s", row.device_id, error.message)

    def _stored_rules(self) -> list[tuple[str, tuple[Rule, ...]]]:
        """The tenants' own detection rules (a tenant whose stored rules do not parse keeps the defaults)."""
        found: list[tuple[str, tuple[Rule, ...]]] = []
        with self._db.read() as connection:
            rows = connection.execute(sa.select(detection_rules.c.tenant_id, detection_rules.c.rules)).all()
        for row in rows:
            try:
                found.append((row.tenant_id, rules_from_json(row.rules)))
            except InvalidInput as error:
                logger.warning(
                    "the detection rules of tenant %s do not parse: %s", row.tenant_id, error.message
                )
        return found

    def _latest_event(self) -> int:
        with self._db.read() as connection:
            return int(connection.execute(sa.select(sa.func.max(events.c.id))).scalar_one() or 0)

    def _follow_events(self) -> tuple[list[Finding], set[tuple[str, str]]]:
        """Findings from the events recorded since the last look (refused attestations), and the devices
        whose health an event may have changed."""
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(
                    events.c.id,
                    events.c.tenant_id,
                    events.c.device_id,
                    events.c.kind,
                    events.c.code,
                    events.c.at,
                    events.c.detail,
                )
                .where(
                    events.c.id > self._event_cursor,
                    events.c.device_id.is_not(None),
                    events.c.tenant_id.is_not(None),
                )
                .order_by(events.c.id)
                .limit(self._limits.monitor_events_per_turn)
            ).all()
        findings: list[Finding] = []
        touched: set[tuple[str, str]] = set()
        for row in rows:
            if row.kind in _HEALTH_KINDS:
                touched.add((row.tenant_id, row.device_id))
            severity = TAMPERING_SEVERITY.get(row.code) if row.kind == "attestation" else None
            if severity is not None:
                findings.append(
                    Finding(
                        tenant_id=row.tenant_id,
                        device_id=row.device_id,
                        detector="attestation",
                        code="attestation_refused",
                        severity=severity,
                        score=1.0 if severity is FindingSeverity.CRITICAL else 0.8,
                        summary=_attestation_summary(row.code, row.detail),
                        evidence=(Evidence(row.code, 1.0, 0.0, 0.0, row.detail[:200]),),
                        at=row.at.timestamp(),
                    )
                )
        # the cursor moves to the newest event read (events of no device are read again: the index makes
        # that cheap), never to a maximum read apart, which a concurrent commit could pass on PostgreSQL
        if rows:
            self._event_cursor = int(rows[-1].id)
        return findings, touched

    def _groups(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        found: dict[tuple[str, str], str | None] = dict.fromkeys(keys)
        with self._db.read() as connection:
            wanted = sorted(device for _, device in keys)
            for start in range(0, len(wanted), 500):
                for row in connection.execute(
                    sa.select(devices.c.tenant_id, devices.c.id, devices.c.group_id).where(
                        devices.c.id.in_(wanted[start : start + 500])
                    )
                ):
                    if (row.tenant_id, row.id) in found:
                        found[(row.tenant_id, row.id)] = row.group_id
        if len(self._group_of) > self._limits.monitor_queue_max * 4:
            self._group_of.clear()  # bounded: forgetting only costs a lookup
        return found

    def _releases(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], dt.datetime]:
        """When each device was last released (by an operator or a playbook's policy): what it reports of
        before then (its outbox drains once it is released) is the incident already dealt with."""
        found: dict[tuple[str, str], dt.datetime] = {}
        with self._db.read() as connection:
            for tenant_id in {tenant for tenant, _ in keys}:
                rows = connection.execute(
                    sa.select(events.c.device_id, sa.func.max(events.c.at).label("at"))
                    .where(
                        events.c.tenant_id == tenant_id,
                        events.c.device_id.in_(
                            sorted(device for tenant, device in keys if tenant == tenant_id)
                        ),
                        events.c.kind == "quarantine",
                        events.c.code == "released",
                    )
                    .group_by(events.c.device_id)
                )
                found.update({(tenant_id, row.device_id): row.at for row in rows})
        return found

    def released(self, tenant_id: str, device_id: str) -> None:
        """The device was released: what it learned during the incident is not its normal."""
        self._group_of.pop((tenant_id, device_id), None)
        self.detector.forget(tenant_id, device_id)

    # ---------------------------------------------------------------- notices

    async def send(self, pending: PendingNotice) -> None:
        """Queue a notice a playbook run asked for to its destination (delivered with retries)."""
        alert = pending.alert
        try:
            destination = await asyncio.to_thread(
                self._playbooks.destination, alert.tenant_id, pending.destination
            )
            sink = self._sinks.get(destination.id)
            if sink is None:
                sink = RetryingSink(
                    self._sink_factory.sink(destination), max_pending=self._limits.monitor_queue_max
                )
                await sink.__aenter__()
                self._sinks[destination.id] = sink
            notice = Notice(
                tenant_id=alert.tenant_id,
                kind="alert",
                id=f"alert-{alert.id}",
                at=alert.last_seen_at,
                device_id=alert.device_id,
                code=alert.code,
                severity=alert.severity,  # type: ignore[arg-type]
                summary=alert.summary[:500],
                detail=flatten_detail(
                    {
                        "score": round(alert.score, 3),
                        "count": alert.count,
                        "run": pending.run_id,
                        "evidence": alert.evidence[:4],
                    }
                ),
            )
        except (FleetwardError, ValueError, TypeError) as error:
            logger.warning("notice for alert %d not sent: %s", alert.id, error)
            return
        if not sink.offer(notice):
            logger.warning(
                "notice for alert %d dropped: the queue to %s is full", alert.id, pending.destination
            )


def _attestation_summary(code: str, detail: str) -> str:
    return f"attestation refused ({code}): {detail.removeprefix('refused: ')}"[:300]


def _violation_finding(tenant_id: str, device_id: str, report: CapabilityDeniedReport) -> Finding:
    """An application reached for what its manifest does not declare; the agent refused and said so at
    once. A network destination is how a compromised application phones home: high."""
    network = report.capability == "AllowedConnections"
    return Finding(
        tenant_id=tenant_id,
        device_id=device_id,
        detector="agent:capability_denied",
        code="undeclared_destination" if network else "capability_denied",
        severity=FindingSeverity.HIGH if network else FindingSeverity.MEDIUM,
        score=0.9 if network else 0.5,
        summary=(
            f"application {report.component_id} tried to reach {report.detail}, undeclared in its manifest"
            if network
            else f"application {report.component_id} used {report.capability} undeclared ({report.detail})"
        )[:300],
        evidence=(
            Evidence(report.capability, 1.0, 0.0, 0.0, f"{report.component_id}: {report.detail}"[:200]),
        ),
        at=report.occurred_at.timestamp(),
    )


class SinkFactory:
    """Builds the sink of a destination: a signed webhook, or syslog/CEF. Tests give their own."""

    def __init__(self, keystore: KeyStore) -> None:
        self._keystore = keystore
        self._made: list[NoticeSink] = []

    def sink(self, destination: Destination) -> NoticeSink:
        made: NoticeSink
        if destination.kind == "webhook":
            made = WebhookSink(
                destination.target, webhook_secret(self._keystore, destination.tenant_id, destination.id)
            )
        else:
            host, _, port = destination.target.rpartition(":")
            made = SyslogCefSink(host, int(port), transport=destination.options.get("transport", "tls"))
        self._made.append(made)
        return made

    async def aclose(self) -> None:
        for sink in self._made:
            close = getattr(sink, "aclose", None)
            if close is not None:
                await close()
