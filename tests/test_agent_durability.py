"""No acknowledged telemetry is lost across ``kill -9`` and network cuts: the real ``fleetward agent run``
process, a real signed application sending through the application API, the real server and hub.

The device is set up as an operator would: ``fleetward agent init`` pointing at the authority and the hub
through :class:`Network` (TCP relays the test cuts: every connection dropped, new ones refused), the device
claimed, ``fleetward agent app install`` of a signed package, the agent's and the package's reference
values registered. The application (:data:`PROBE`) sends telemetry ``{"seq": n}`` as fast as it can, one
request at a time, through appkit's ``telemetry.send``, which returns once the agent has the message on
disk. Around each send it appends to a ledger in its storage, each line fsynced: ``s n`` before the
request, ``a n`` once the agent answered. So ``a n`` means **acknowledged**: the agent said the message is
stored; ``s n`` without ``a n`` is in doubt (the process was killed while the request was out). Sequence
numbers only grow, across restarts too (the ledger is read at start). A file ``crash-now`` dropped into its
storage makes it crash between two sends (the agent then puts a critical crash report into its outbox), and
a file ``stop`` makes it stop sending (``d`` in the ledger) and wait.

What the cloud got is read through the operator API (``GET /v1/tenants/{t}/telemetry?device_id=…``, paged
with ``after_id``) and judged by the contract of docs/architecture.md (store-and-forward): delivery is at
least once, in order, a duplicate carries the same ``$.mid``. Every test checks that each sequence number
has one ``$.mid`` (a duplicate is a resend, never a new message), that the first arrivals come in sending
order, that nothing arrived that was never sent, and counts the duplicates.

The hub's per-device rate limit is raised for these tests: the probe sends several hundred messages a
second, and the default (100 a second) would only make the drain slow, which is not what is tested here.
The kill points are drawn at random; the seed is printed, and ``FLEETWARD_DURABILITY_SEED`` replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.manifest import Capabilities, Manifest
from fleetward.agent.outbox import DROPPED, Outbox, OutboxStats
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.agent.status import AgentStatus, read_status
from fleetward.api import schemas
from fleetward.config import Limits
from fleetward.server import free_port
from fleetward.sim.agents import script, with_appkit
from fleetward.sim.fleet import SimulatedDevice
from tests.agent_apps import reachable_directory
from tests.conftest import HubSetup, agent_cli

T = TypeVar("T")

PROBE_COMPONENT = "c4a7e1d2-5b3f-4e6a-9d8c-0f1e2d3c4b5a"
PROBE_VERSION = "1.0.0"
#: the agent's own measurement, fixed (``agent.sha256``) so that an edit of the source tree while the test
#: runs cannot change what the authority must recognise
AGENT_SHA256 = hashlib.sha256(b"fleetward-agent under the durability test").hexdigest()
#: the link's window of unacknowledged telemetry (``LinkSettings.inflight_window``)
INFLIGHT_WINDOW = 32

PROBE = r"""
import os, sys, time

from appkit import AgentClient, AgentError

ledger = os.open("ledger.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def record(line):
    os.write(ledger, (line + "\n").encode())
    os.fsync(ledger)


sent = 0
with open("ledger.log") as lines:
    for line in lines:
        if line.startswith("s ") and line.endswith("\n"):
            sent = max(sent, int(line[2:]))
record("r %d" % os.getpid())
agent = AgentClient(timeout=30).connect()
while not os.path.exists("stop"):
    if os.path.exists("crash-now"):
        os.unlink("crash-now")
        token = "%d-%d" % (os.getpid(), sent)
        record("c " + token)
        sys.stderr.write("deliberate crash " + token + "\n")
        sys.stderr.flush()
        os._exit(70)
    sent += 1
    record("s %d" % sent)
    while True:
        try:
            agent.send_telemetry({"seq": sent})
            break
        except AgentError as error:
            if error.code != "device_not_enrolled":
                raise
            time.sleep(0.05)
    record("a %d" % sent)
record("d")
while True:
    time.sleep(1)
"""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def limits() -> Limits:
    return Limits(
        hub_messages_per_second=50_000, hub_message_burst=100_000, hub_bytes_per_second=256 * 1024 * 1024
    )


# ---------------------------------------------------------------------------------------- the network


class Network:
    """TCP relays to the authority and the hub, on a thread of their own (the test blocks on processes and
    on the operator API meanwhile). :meth:`cut` drops every connection at once, without a word to either
    side, and refuses new ones until :meth:`restore`."""

    def __init__(self, targets: Sequence[int]) -> None:
        self._targets = list(targets)
        self.ports = [free_port() for _ in self._targets]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="durability-network", daemon=True)
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._up = False

    def __enter__(self) -> Network:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._cut(finally_=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def _call(self, work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=30)

    async def _listen(self) -> None:
        self._up = True
        for port, target in zip(self.ports, self._targets, strict=True):
            server = await asyncio.start_server(
                functools.partial(self._accept, target=target), "127.0.0.1", port
            )
            self._servers.append(server)

    async def _cut(self, *, finally_: bool = False) -> None:
        self._up = False
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if finally_:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int) -> None:
        task = asyncio.get_running_loop().create_task(self._relay(reader, writer, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int) -> None:
        self._writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            return
        if not self._up:  # cut while this connection was being made
            for end in (writer, upstream_writer):
                end.transport.abort()
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


# ---------------------------------------------------------------------------------------- the device


@dataclass(frozen=True)
class Ledger:
    """The probe's ledger: what it sent, what the agent acknowledged, its starts, crashes and end."""

    sent: tuple[int, ...]
    acknowledged: frozenset[int]
    starts: int
    crashes: tuple[str, ...]
    done: bool
    #: acknowledgements since the probe's last start
    acknowledged_since_start: int

    @classmethod
    def parse(cls, text: str) -> Ledger:
        sent: list[int] = []
        acknowledged: set[int] = set()
        crashes: list[str] = []
        starts = since = 0
        done = False
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # never written whole (a line is one write, so this does not happen after a kill)
            kind, _, value = line.strip().partition(" ")
            if kind == "s":
                sent.append(int(value))
            elif kind == "a":
                acknowledged.add(int(value))
                since += 1
            elif kind == "r":
                starts += 1
                since = 0
            elif kind == "c":
                crashes.append(value)
            elif kind == "d":
                done = True
        return cls(tuple(sent), frozenset(acknowledged), starts, tuple(crashes), done, since)

    @property
    def in_doubt(self) -> frozenset[int]:
        """Sent but not acknowledged: the request was out when the agent (and the probe) were killed."""
        return frozenset(self.sent) - self.acknowledged


@dataclass(frozen=True)
class Delivery:
    """What the hub stored for the device, judged against the at-least-once contract."""

    rows: int
    #: sequence numbers in the order of their first arrival
    first_arrivals: tuple[int, ...]
    duplicates: int
    #: the highest ``fleetward.dropped`` any message carried (the outbox's drop count when it was put)
    dropped_reported: int
    #: per dropped total, the sequence number of the message that carried it
    drop_marks: tuple[tuple[int, int], ...]

    @property
    def arrived(self) -> frozenset[int]:
        return frozenset(self.first_arrivals)

    @classmethod
    def of(cls, rows: Sequence[schemas.TelemetryPublic]) -> Delivery:
        mids: dict[int, str] = {}
        order: list[int] = []
        marks: list[tuple[int, int]] = []
        for row in rows:
            assert row.properties.get("fleetward-component") == PROBE_COMPONENT, row
            seq = json.loads(row.body or "")["seq"]
            mid = row.properties["$.mid"]
            if seq not in mids:
                mids[seq] = mid
                order.append(seq)
            assert mids[seq] == mid, f"seq {seq} arrived as two messages, {mids[seq]} and {mid}: not a resend"
            if DROPPED in row.properties:
                marks.append((int(row.properties[DROPPED]), seq))
        assert len(set(mids.values())) == len(mids), "two sequence numbers share a $.mid"
        return cls(
            rows=len(rows),
            first_arrivals=tuple(order),
            duplicates=len(rows) - len(order),
            dropped_reported=max((total for total, _seq in marks), default=0),
            drop_marks=tuple(sorted(set(marks))),
        )


def eventually(check: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


@dataclass
class Probe:
    """One device running ``fleetward agent run`` in its own process, as often as the test starts it."""

    hub: HubSetup
    network: Network
    base: Path
    environment: dict[str, str]
    runs: list[tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    kills: int = 0
    _started: float = field(default_factory=time.monotonic)

    @property
    def state(self) -> Path:
        return self.base / "agent"

    @property
    def storage(self) -> Path:
        return self.state / "storage" / PROBE_COMPONENT

    @property
    def device_id(self) -> str:
        return SimulatedDevice("probe", (), root_of_trust=self._root()).device_id

    def _root(self) -> SoftwareRootOfTrust:
        return SoftwareRootOfTrust.load_or_create(self.state / "identity.key")

    def note(self, event: str) -> None:
        self.timeline.append(f"{time.monotonic() - self._started:6.2f}s {event}")

    # --- set up as an operator would

    def set_up(self) -> None:
        publisher = ec.generate_private_key(ec.SECP256R1())
        publisher_file = self.base / "publisher.pem"
        publisher_file.write_bytes(
            publisher.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        authority_port, hub_port = self.network.ports
        agent_cli(
            self.state,
            *self.hub.agent_init_args(
                publisher_file, authority_url=f"https://127.0.0.1:{authority_port}", hub_port=hub_port
            ),
        )
        self.hub.tenant.claim(SimulatedDevice("probe", (), root_of_trust=self._root()))
        manifest = Manifest(
            name="durability-probe",
            component_id=PROBE_COMPONENT,
            entry_point="bin/probe",
            capabilities=Capabilities(mutable_storage_kb=16 * 1024, device_authentication=self.hub.tenant.id),
        )
        package = build_package(manifest, with_appkit({"bin/probe": script(PROBE)}))
        package_file = self.base / "probe.tar"
        package_file.write_bytes(package)
        package_file.with_name("probe.tar.sig").write_bytes(sign_package(publisher, package))
        digest = hashlib.sha256(package).hexdigest()
        agent_cli(
            self.state, "app", "install", str(package_file), "--sha256", digest, "--version", PROBE_VERSION
        )
        self.hub.tenant.client.post(
            f"/v1/tenants/{self.hub.tenant.id}/reference-values",
            schemas.ReferenceValuesAdd(
                values=[
                    schemas.ReferenceValueItem(
                        component="fleetward-agent", version="0.0.0", sha256=AGENT_SHA256
                    ),
                    schemas.ReferenceValueItem(
                        component=PROBE_COMPONENT, version=PROBE_VERSION, sha256=digest
                    ),
                ]
            ),
            schemas.ReferenceValuesAdded,
        )

    # --- the agent's process

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.runs[-1][0]

    def start(self) -> None:
        log_path = self.base / f"agent-run-{len(self.runs) + 1}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-c", "from fleetward.cli.entry import main; main()", "agent", "run"],
            env=self.environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.runs.append((process, log_path, log))
        self.note(f"agent run {len(self.runs)} started (pid {process.pid})")

    def kill(self, why: str) -> None:
        """``kill -9`` the agent; its application dies with it (``PR_SET_PDEATHSIG``)."""
        process = self.process
        assert process.poll() is None, self.logs()
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.kills += 1
        status = self.status()
        self.note(
            f"kill -9 #{self.kills} ({why}); its last status: "
            + (f"outbox {status.outbox.messages}, connected {status.link.connected}" if status else "none")
        )
        eventually(lambda: not self.probe_processes(), timeout=5, what="the probe dying with its agent")

    def wait_connected(self) -> None:
        """Wait for the agent to be connected to the hub again (after the network came back)."""
        connects = status.link.connects if (status := self.status()) else 0

        def connected() -> bool:
            status = self.status()
            return status is not None and status.link.connected and status.link.connects > connects

        eventually(connected, timeout=30, what="the hub connection back")
        self.note("the agent is connected again")

    def stop(self) -> int:
        process = self.process
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        self.note(f"agent run {len(self.runs)} stopped by SIGTERM: exit {code}")
        return code

    def close(self) -> None:
        for process, _path, log in self.runs:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()

    def probe_processes(self) -> list[int]:
        """Processes running this device's probe (its image's path is on their command line)."""
        image = str(self.state / "images" / PROBE_COMPONENT).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if image in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
        return found

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for _p, path, _l in self.runs
        )

    # --- what the device's own files say

    def status(self) -> AgentStatus | None:
        return read_status(self.state / "status.json")

    def ledger(self) -> Ledger:
        try:
            return Ledger.parse((self.storage / "ledger.log").read_text())
        except FileNotFoundError:
            return Ledger.parse("")

    def sending(self, starts: int, at_least: int = 50) -> Ledger | None:
        """The ledger, once the probe's ``starts``-th run had ``at_least`` messages acknowledged."""
        ledger = self.ledger()
        return ledger if ledger.starts >= starts and ledger.acknowledged_since_start >= at_least else None

    def wait_sending(self, *, timeout: float = 20) -> Ledger:
        """Wait for the probe started by the agent's current run to send (it is started once per run, and
        again after each crash)."""
        starts = self.ledger().starts + 1
        try:
            ledger = eventually(lambda: self.sending(starts), timeout=timeout, what="the probe sending")
        except AssertionError:
            raise AssertionError(self.logs()) from None
        self.note(f"probe start {ledger.starts} sending ({len(ledger.acknowledged)} acknowledged so far)")
        return ledger

    def restart(self) -> Ledger:
        self.start()
        return self.wait_sending()

    def outbox(self) -> OutboxStats:
        """The outbox of the stopped agent, as the next start would find it."""

        async def stats() -> OutboxStats:
            async with Outbox.open(self.state) as outbox:
                return await outbox.stats()

        return asyncio.run(stats())

    def finish(self) -> Ledger:
        """Stop the probe (its last request answered), let the outbox drain, stop the agent with SIGTERM."""
        (self.storage / "stop").touch()

        def done() -> Ledger | None:
            ledger = self.ledger()
            return ledger if ledger.done else None

        ledger = eventually(done, timeout=10, what="the probe done")

        def drained() -> AgentStatus | None:
            status = self.status()
            return status if status and status.link.connected and status.outbox.messages == 0 else None

        try:
            eventually(drained, timeout=30, what="the outbox drained")
        except AssertionError:
            raise AssertionError(f"{self.status()}\n{self.logs()}") from None
        self.note("drained")
        assert self.stop() == 0, self.logs()
        return ledger

    # --- what the cloud got, through the operator API

    def telemetry(self) -> list[schemas.TelemetryPublic]:
        rows: list[schemas.TelemetryPublic] = []
        params: dict[str, str | int] = {"device_id": self.device_id, "limit": 1000}
        while True:
            page = self.hub.tenant.client.get_list(
                f"/v1/tenants/{self.hub.tenant.id}/telemetry", schemas.TelemetryPublic, params
            )
            rows += page
            if len(page) < 1000:
                return rows
            params["after_id"] = page[-1].id or 0

    def crash_reports(self) -> list[schemas.ReportPublic]:
        params: dict[str, str | int] = {"device_id": self.device_id, "kind": "crash", "limit": 1000}
        return self.hub.tenant.client.get_list(
            f"/v1/tenants/{self.hub.tenant.id}/reports", schemas.ReportPublic, params
        )


@pytest.fixture
def seed() -> int:
    chosen = int(os.environ.get("FLEETWARD_DURABILITY_SEED") or secrets.randbits(32))
    print(f"FLEETWARD_DURABILITY_SEED={chosen}")
    return chosen


@contextlib.contextmanager
def probe_device(hub: HubSetup, **settings: str) -> Iterator[Probe]:
    """A device set up and its first agent run sending; everything stopped at the end."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("FLEETWARD_")}
    # disjoint from other agents' applications on this machine: an agent ends every process of an
    # application's uid when it stops it
    first_uid = 300_000 + (os.getpid() % 5000) * 100
    environment |= {
        "FLEETWARD_AGENT_AGENT_SHA256": AGENT_SHA256,
        "FLEETWARD_AGENT_AGENT_VERSION": "0.0.0",
        "FLEETWARD_AGENT_INTERVALS_TELEMETRY_SECONDS": "0",
        "FLEETWARD_AGENT_INTERVALS_BASELINE_SECONDS": "0",
        "FLEETWARD_AGENT_INTERVALS_STATUS_SECONDS": "0.1",
        "FLEETWARD_AGENT_SANDBOX_FIRST_APP_UID": str(first_uid),
        "FLEETWARD_AGENT_SANDBOX_APP_UID_COUNT": "10",
        "FLEETWARD_AGENT_SANDBOX_RESTART_INITIAL_BACKOFF_SECONDS": "0.05",
        "FLEETWARD_AGENT_SANDBOX_RESTART_MAX_BACKOFF_SECONDS": "0.1",
        "FLEETWARD_AGENT_SANDBOX_CRASH_LOOP_CRASHES": "100",
        "FLEETWARD_AGENT_SANDBOX_STOP_GRACE_SECONDS": "2",
        **{f"FLEETWARD_AGENT_{name.upper()}": value for name, value in settings.items()},
    }
    with reachable_directory() as base, Network([hub.server.port, hub.hub_port]) as network:
        environment["FLEETWARD_AGENT_STATE_DIR"] = str(base / "agent")
        probe = Probe(hub, network, base, environment)
        try:
            probe.set_up()
            probe.start()
            probe.wait_sending(timeout=30)
            yield probe
        finally:
            probe.close()
            print(*probe.timeline, sep="\n")


def check_delivery(probe: Probe, ledger: Ledger, delivery: Delivery) -> None:
    """The at-least-once contract, whatever was dropped: sending order, nothing invented."""
    assert list(delivery.first_arrivals) == sorted(delivery.first_arrivals), "first arrivals out of order"
    invented = delivery.arrived - set(ledger.sent)
    assert not invented, f"arrived but never sent: {sorted(invented)[:20]}"
    status = probe.outbox()
    assert status.messages == 0, status


def summary(ledger: Ledger, delivery: Delivery, drops: int) -> str:
    return (
        f"sent {len(ledger.sent)}, acknowledged {len(ledger.acknowledged)}, in doubt {len(ledger.in_doubt)} "
        f"({len(ledger.in_doubt & delivery.arrived)} of them arrived), stored rows {delivery.rows}, distinct "
        f"{len(delivery.first_arrivals)}, duplicates {delivery.duplicates}, dropped {drops}"
    )


# ---------------------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_no_acknowledged_telemetry_is_lost_across_kill_9_and_a_network_cut(hub: HubSetup, seed: int) -> None:
    """Three ``kill -9``s, each at a random point of its phase: one while connected and sending, one
    during a cut of four seconds (the probe still sending into the outbox), and one just after the link
    came back, while the backlog drains (messages in flight, PUBACKs lost). The outbox is large enough that
    nothing is dropped; then every acknowledged sequence number arrives, at least once, in order."""
    rng = random.Random(seed)  # noqa: S311 - kill points, not secrets
    roomy = {"limits_outbox_max_messages": "100000", "limits_outbox_max_bytes": str(64 * 1024 * 1024)}
    with probe_device(hub, **roomy) as probe:
        time.sleep(rng.uniform(0.3, 1.5))
        probe.kill("connected")
        probe.restart()
        time.sleep(rng.uniform(0.3, 1.0))

        probe.network.cut()
        probe.note("network cut")
        cut_at = time.monotonic()
        time.sleep(rng.uniform(0.3, 1.5))
        probe.kill("during the cut")
        probe.restart()
        time.sleep(max(0.5, 4.0 - (time.monotonic() - cut_at)))
        cut_status = probe.status()
        assert cut_status is not None
        assert not cut_status.link.connected
        assert cut_status.outbox.messages > 0
        probe.network.restore()
        probe.note(f"network restored; {cut_status.outbox.messages} messages were waiting")

        probe.wait_connected()
        time.sleep(rng.uniform(0.0, 0.3))
        probe.kill("reconnected, draining the backlog")
        probe.restart()
        time.sleep(rng.uniform(0.3, 1.0))
        ledger = probe.finish()
        delivery = Delivery.of(probe.telemetry())
        dropped = probe.outbox().dropped

    print(summary(ledger, delivery, dropped))
    assert probe.kills == 3
    assert ledger.starts == 4
    check_delivery(probe, ledger, delivery)
    assert dropped == 0
    assert delivery.dropped_reported == 0
    lost = ledger.acknowledged - delivery.arrived
    assert not lost, f"acknowledged, never arrived: {len(lost)}, e.g. {sorted(lost)[:20]}"


@pytest.mark.slow
def test_an_agent_killed_while_its_outbox_is_full_loses_only_what_the_drop_policy_counted(
    hub: HubSetup, seed: int
) -> None:
    """The outbox holds 200 messages; during a cut of a few seconds the probe sends far more. The policy
    (docs/architecture.md, "Bounds and the full policy") drops the oldest unsent non-critical messages to
    make room, counts each in the outbox file, and puts the total so far on the message whose put caused
    drops (``fleetward.dropped``); critical messages are never dropped.

    What "acknowledged" means here: the agent answered ``telemetry.send``, so the message was on disk. With
    a dropped-oldest policy that is **not** a promise of delivery: a message acknowledged into the outbox may
    later be dropped by the policy when the outbox is full (the documented trade-off: telemetry wants the
    newest readings). The promise is that every such loss is counted. So the test checks that every
    acknowledged message arrived or is one of the counted drops, never more:

    - ``lost`` (acknowledged, never arrived) is at most the drop count the agent reports (the outbox's
      counter after the last run, which is also the highest ``fleetward.dropped`` the cloud saw);
    - the drop count exceeds ``lost`` only by messages whose fate the agent could not know: those in
      doubt (put, but the probe was killed before it got the answer) and those the hub had already stored
      when their PUBACK was lost with the connection (a cut or a kill while connected, at most
      ``inflight_window`` each), which became unsent again and so could be dropped;
    - the drops are the oldest: every lost message is older than the newest ~165 that were in the outbox
      when the last drop happened;
    - the two crash reports (critical), put into the full outbox during the cut, one of them across the
      ``kill -9``, both arrive.

    The agent is killed twice, at random points of their phases: once during the cut with its outbox
    full, once just after the link came back, while the outbox drains.
    """
    rng = random.Random(seed)  # noqa: S311 - kill points, not secrets
    max_messages = 200
    with probe_device(hub, limits_outbox_max_messages=str(max_messages)) as probe:
        time.sleep(rng.uniform(0.3, 1.0))
        probe.network.cut()
        probe.note("network cut")

        def full() -> AgentStatus | None:
            status = probe.status()
            return (
                status
                if status and status.outbox.messages == max_messages and status.outbox.dropped
                else None
            )

        eventually(full, timeout=10, what="the outbox full and dropping")
        probe.note("the outbox is full")
        (probe.storage / "crash-now").touch()  # a critical report, into the full outbox
        probe.wait_sending()
        time.sleep(rng.uniform(0.2, 1.0))
        before_kill = full()
        assert before_kill is not None, probe.status()
        probe.kill(f"full, {before_kill.outbox.dropped} dropped so far, during the cut")
        probe.restart()
        assert full() is not None, probe.status()
        (probe.storage / "crash-now").touch()
        probe.wait_sending()
        time.sleep(rng.uniform(0.2, 1.0))
        probe.network.restore()
        probe.note("network restored")

        probe.wait_connected()
        time.sleep(rng.uniform(0.0, 0.3))
        probe.kill("reconnected, draining")
        probe.restart()
        time.sleep(rng.uniform(0.3, 1.0))
        ledger = probe.finish()
        delivery = Delivery.of(probe.telemetry())
        reports = probe.crash_reports()
        dropped = probe.outbox().dropped

    print(summary(ledger, delivery, dropped))
    assert probe.kills == 2
    assert ledger.starts == 5  # three agent runs, two crashes
    check_delivery(probe, ledger, delivery)
    assert dropped > 0
    assert delivery.dropped_reported == dropped, "the cloud was told another drop count than the outbox kept"
    lost = ledger.acknowledged - delivery.arrived
    assert len(lost) <= dropped, f"{len(lost)} acknowledged messages lost, only {dropped} drops counted"
    unknowable = len(ledger.in_doubt - delivery.arrived) + INFLIGHT_WINDOW * (1 + probe.kills)
    assert dropped - len(lost) <= unknowable, f"{dropped} drops counted, {len(lost)} messages lost"
    last_total, last_marked = delivery.drop_marks[-1]
    assert last_total == dropped
    # after the last drop the outbox held max_messages: the message that carried the total, at most the two
    # crash reports and a window in flight, and the newest unsent ones, which all arrive
    kept = max_messages - 1 - len(ledger.crashes) - INFLIGHT_WINDOW
    assert max(lost, default=0) <= last_marked - kept, (sorted(lost)[-3:], last_marked)
    tokens = [report.report["error_tail"].split("deliberate crash ")[-1].strip() for report in reports]
    assert len(ledger.crashes) == 2
    assert set(tokens) == set(ledger.crashes), (tokens, ledger.crashes)
    print(
        f"lost {len(lost)}, drops counted {dropped}, crash reports {len(reports)} for {len(ledger.crashes)} "
        f"crashes; the newest lost is {last_marked - max(lost, default=0)} before the last drop"
    )
