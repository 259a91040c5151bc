"""The agent: memory, idle CPU, telemetry through the application API, draining a store-and-forward backlog.

    .venv/bin/python -m bench.agent [--idle-seconds 30] [--seconds 10] [--backlog 100000]

It runs ``fleetward init`` and ``fleetward serve`` in their own process (as ``bench.hub`` does, the hub's
per-device rate limits lifted), and ``fleetward agent run`` in another: a software root of trust, enrolled
through the real flow, with two small signed applications that idle. One of them, the sender, sends
telemetry through the application API with fleetward's ``appkit`` when the benchmark tells it to (a
``plan.json`` in its storage and ``SIGUSR1``), and otherwise waits in ``sigwait``. Each figure comes with
a baseline measured in the same run:

* memory: the agent's resident set (and each application's) after it settled, against the resident set of
  a fresh ``python -c "import fleetward.agent.runtime"``; what the imports cost, step by step; and, at the
  end, the same runtime started without ``fleetward``'s command line (``--no-lean`` skips that);
* idle CPU: the agent's user plus system time over ``--idle-seconds`` (``/proc/<pid>/stat``), as a share
  of one core;
* telemetry through the application API: the sender's ``telemetry.send`` calls (each returns once the
  message is committed to the agent's outbox) for ``--seconds``, with one connection and with several
  (``--connections``); messages per second acknowledged to the application and stored by the hub, against
  the hub's own ingest rate, measured the ``bench.hub`` way (``MqttClient`` QoS 1 publishers straight to
  the hub: ``--publishers`` devices with ``--window`` in flight each, and one device with the agent link's
  window of 32); the CPU each process spends per message, and what the agent writes to disk per message
  (``write_bytes`` of ``/proc/<pid>/io``);
* a backlog: the hub is stopped (a network cut, as the agent sees it), the sender puts ``--backlog``
  messages into the outbox (``limits.outbox_max_messages`` and ``limits.outbox_max_bytes`` are raised in
  ``agent.toml`` to hold them), the hub is started again, and the benchmark times the agent's reconnection
  and the drain until the hub has stored them all, against the same ingest rates.

The stored counts are read from the hub's SQLite database (read-only). Nothing fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.hub import (
    Fleetward,
    clients_for,
    close_all,
    connect_all,
    enroll_fleet,
    publish_rate,
    raise_file_limit,
)
from fleetward.agent.config import AgentSettings
from fleetward.agent.manifest import Capabilities, Manifest
from fleetward.agent.package import build_package
from fleetward.agent.rot import SoftwareRootOfTrust, device_id_of
from fleetward.agent.status import AgentStatus, read_status
from fleetward.api import schemas
from fleetward.errors import ConfigurationError
from fleetward.sim.agents import Publisher, prepare_agent, script, with_appkit
from fleetward.sim.fleet import SimulatedDevice
from fleetward.transport import trust

SLEEPER = "3c5e7a90-1b2d-4e6f-8a0b-c1d2e3f4a5b6"
SENDER = "8d9e0f1a-2b3c-4d5e-9f60-718293a4b5c6"
VERSION = "1.0.0"
#: the agent link's window (``LinkSettings.inflight_window``), for the one-device baseline
AGENT_WINDOW = 32
MiB = 1024 * 1024
QUIET = ("--log-level", "warning")

SLEEPER_SCRIPT = """
import time

while True:
    time.sleep(3600)
"""

#: Waits for SIGUSR1 without a wake-up, then sends what ``plan.json`` says through the application API and
#: writes ``result.json``. Telemetry is the same JSON body as ``bench.hub``'s.
SENDER_SCRIPT = r"""
import json, os, signal, threading, time

from appkit import AgentClient

BODY = json.dumps({"power_watts": 312.5, "panel_temperature": 31.5, "status": "ok"})
PROPERTIES = {"$.ct": "application/json", "$.ce": "utf-8"}
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
with open("ready.tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.replace("ready.tmp", "ready")
while True:
    signal.sigwait({signal.SIGUSR1})
    with open("plan.json") as handle:
        plan = json.load(handle)
    lanes, seconds, total = plan["connections"], plan["seconds"], plan["messages"]
    counts = [0] * lanes
    errors = []
    started = time.monotonic()
    stop = started + seconds if seconds else None

    def lane(index):
        quota = total // lanes + (index < total % lanes) if total else None
        try:
            with AgentClient(timeout=120) as agent:
                while (stop is None or time.monotonic() < stop) and (quota is None or counts[index] < quota):
                    agent.send_telemetry(BODY, PROPERTIES)
                    counts[index] += 1
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=lane, args=(index,)) for index in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    result = {"run": plan["run"], "sent": sum(counts), "seconds": elapsed, "errors": errors}
    with open("result.tmp", "w") as handle:
        json.dump(result, handle)
    os.replace("result.tmp", "result.json")
"""

#: Imported one after the other in a fresh interpreter, its resident set read after each.
IMPORT_STEPS = (
    ("the interpreter alone", ""),
    (
        "+ the standard library the agent uses (asyncio, ssl, sqlite3, tarfile, …)",
        "import asyncio, concurrent.futures, json, logging, sqlite3, ssl, tarfile, uuid",
    ),
    ("+ cryptography (X.509, EC)", "import cryptography.x509, cryptography.hazmat.primitives.asymmetric.ec"),
    ("+ pydantic", "import pydantic"),
    ("+ httpx (which imports click, rich and pygments for its command line)", "import httpx"),
    ("+ fleetward.agent.runtime: the agent's own modules", "import fleetward.agent.runtime"),
    (
        "+ fleetward.cli.agent_commands: what `fleetward agent run` adds (typer, the agent's commands)",
        "import fleetward.cli.root, fleetward.cli.agent_commands",
    ),
    (
        "+ fleetward.cli.main: the cloud's commands, which `fleetward agent …` no longer loads",
        "import fleetward.cli.main",
    ),
)

#: What ``fleetward agent run`` does, without importing the rest of the command line.
LEAN_AGENT = """
import asyncio, logging, sys
from pathlib import Path

from fleetward.agent.config import AgentSettings
from fleetward.agent.runtime import Agent

logging.basicConfig(level=logging.WARNING)


async def main():
    async with Agent(AgentSettings.load(Path(sys.argv[1]))) as agent:
        await agent.run_until_signalled()


asyncio.run(main())
"""

_MEASURE_IMPORTS = r"""
import json, re, sys

def rss():
    with open("/proc/self/status") as handle:
        return int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1)) * 1024

sizes = []
for code in json.loads(sys.argv[1]):
    exec(code)
    sizes.append(rss())
print(json.dumps(sizes))
"""


# ------------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far of one process (all its threads, none of its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def written_bytes(pid: int) -> int:
    """Bytes a process has caused to be written to storage so far (``write_bytes`` of ``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "write_bytes":
            return int(value)
    return 0


@dataclass(frozen=True)
class Memory:
    """A process's resident set from ``/proc/<pid>/status``, in bytes."""

    rss: int
    anonymous: int
    files: int
    peak: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        values: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
        return cls(values["VmRSS"], values["RssAnon"], values["RssFile"], values["VmHWM"])

    def shown(self) -> str:
        return (
            f"{self.rss / MiB:.1f} MiB (anonymous {self.anonymous / MiB:.1f}, "
            f"files {self.files / MiB:.1f}; peak {self.peak / MiB:.1f})"
        )


def import_sizes() -> list[int]:
    """The resident set of a fresh interpreter after each of :data:`IMPORT_STEPS`."""
    codes = json.dumps([code for _name, code in IMPORT_STEPS])
    output = subprocess.run(
        [sys.executable, "-c", _MEASURE_IMPORTS, codes], check=True, capture_output=True, text=True
    ).stdout
    sizes: list[int] = json.loads(output)
    return sizes


def import_baseline() -> int:
    """The resident set of ``python -c "import fleetward.agent.runtime"``."""
    code = json.dumps(["import fleetward.agent.runtime"])
    output = subprocess.run(
        [sys.executable, "-c", _MEASURE_IMPORTS, code], check=True, capture_output=True, text=True
    ).stdout
    (size,) = json.loads(output)
    return int(size)


# ------------------------------------------------------------------------------------------- the hub


class Hub(Fleetward):
    """``bench.hub``'s server, which can also be stopped and started again (same port, same data)."""

    def start(self) -> float:
        """``fleetward serve`` again; the seconds until it answers."""
        started = time.perf_counter()
        environment = dict(os.environ, FLEETWARD_CLI_CONFIG=str(self.directory / "cli.json"))
        environment["FLEETWARD_HUB_PORT"] = str(self.hub_port)
        environment["FLEETWARD_LIMIT_HUB_MESSAGES_PER_SECOND"] = "1000000"
        environment["FLEETWARD_LIMIT_HUB_MESSAGE_BURST"] = "1000000"
        environment["FLEETWARD_LIMIT_HUB_BYTES_PER_SECOND"] = "1000000000"
        command = str(Path(sys.executable).parent / "fleetward")
        self.process = subprocess.Popen(
            [command, "serve", "--data-dir", str(self.directory), "--port", str(self.port), *QUIET],
            env=environment,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", verify=trust(self.ca_file)).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.05)
        raise SystemExit("fleetward serve did not start again")


class Stored:
    """How many telemetry messages of one device the hub has stored (its SQLite database, read-only)."""

    def __init__(self, hub: Hub, tenant_id: str, device_id: str) -> None:
        self._path = hub.directory / "fleetward.db"
        self._key = (tenant_id, device_id)

    def count(self) -> int:
        connection = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=30)
        try:
            (count,) = connection.execute(
                "SELECT COUNT(*) FROM telemetry WHERE tenant_id = ? AND device_id = ?", self._key
            ).fetchone()
        finally:
            connection.close()
        return int(count)

    def count_from(self, component_id: str) -> int:
        """Those an application sent (its component property); reads every row of the device, so once."""
        connection = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=30)
        try:
            (count,) = connection.execute(
                "SELECT COUNT(*) FROM telemetry WHERE tenant_id = ? AND device_id = ? AND properties LIKE ?",
                (*self._key, f"%{component_id}%"),
            ).fetchone()
        finally:
            connection.close()
        return int(count)

    def wait_for(self, target: float, timeout: float, poll: float = 0.1) -> float | None:
        """Wait until at least ``target`` are stored; when that was seen (perf_counter), None if never."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.count() >= target:
                return time.perf_counter()
            time.sleep(poll)
        return None


# ------------------------------------------------------------------------------------------- the agent


class AgentUnderTest:
    """``fleetward agent run`` in its own process, with the sleeper and the sender installed."""

    def __init__(self, directory: Path, hub: Hub, tenant_id: str, outbox_messages: int) -> None:
        self.directory = directory
        self.state = directory / "agent"
        publisher = Publisher.create(directory / "publisher")
        packages = []
        references = []
        for component_id, name, files in (
            (SLEEPER, "sleeper", {"bin/app": script(SLEEPER_SCRIPT)}),
            (SENDER, "sender", with_appkit({"bin/app": script(SENDER_SCRIPT)})),
        ):
            storage = 64 if component_id == SENDER else None
            manifest = Manifest(
                name=name,
                component_id=component_id,
                entry_point="bin/app",
                capabilities=Capabilities(mutable_storage_kb=storage, device_authentication=tenant_id),
            )
            package = build_package(manifest, files)
            path = publisher.publish(package, directory / "packages" / f"{name}.tar")
            sha256 = hashlib.sha256(package).hexdigest()
            packages.append((path, sha256, VERSION))
            references.append(
                schemas.ReferenceValueItem(component=component_id, version=VERSION, sha256=sha256)
            )
        #: the outbox must hold the whole backlog: these two keys of agent.toml are raised for it
        self.outbox_limits = {
            "limits.outbox_max_messages": outbox_messages,
            "limits.outbox_max_bytes": max(16 * MiB, outbox_messages * 512),
        }
        # Applications' users of their own, away from the default range (200000-200999): when an agent stops
        # an application it ends every process of that uid, so another agent on this machine (a test run)
        # using the same uids would end the benchmark's applications.
        sandbox = {"sandbox.first_app_uid": 600_000 + os.getpid() % 10_000 * 16, "sandbox.app_uid_count": 16}
        self.settings: AgentSettings = prepare_agent(
            self.state,
            authority_url=hub.url,
            hub_port=hub.hub_port,
            ca_file=hub.ca_file,
            publisher=publisher,
            packages=packages,
            agent_values={**self.outbox_limits, **sandbox},
        )
        root = SoftwareRootOfTrust.load_or_create(self.state / "identity.key")
        self.device_id = device_id_of(root)
        measurement = self.settings.measurement
        references.append(
            schemas.ReferenceValueItem(
                component=measurement.name, version=measurement.version, sha256=measurement.sha256
            )
        )
        device = SimulatedDevice("agent", (), root_of_trust=root)
        with hub.client() as client:
            client.post(
                f"/v1/tenants/{tenant_id}/devices/claim",
                schemas.DeviceClaim(devices=[device.claim_item()]),
                schemas.ClaimResponse,
            )
            client.post(
                f"/v1/tenants/{tenant_id}/reference-values",
                schemas.ReferenceValuesAdd(values=references),
                schemas.ReferenceValuesAdded,
            )
        self.storage = self.settings.resolved_storage_dir / SENDER
        self.log = directory / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._runs = 0

    def start(self, *, lean: bool = False) -> None:
        """``fleetward agent run``; or, ``lean``, the same runtime without the command line's imports."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith("FLEETWARD_")}
        fleetward = str(Path(sys.executable).parent / "fleetward")
        command = (
            [sys.executable, "-c", LEAN_AGENT, str(self.state)]
            if lean
            else [fleetward, "agent", "run", "--state-dir", str(self.state), *QUIET]
        )
        (self.storage / "ready").unlink(missing_ok=True)  # the sender writes it again when it starts
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=environment, stdout=log, stderr=log)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> AgentStatus:
        status = read_status(self.settings.status_file)
        if status is None:
            raise SystemExit("the agent wrote no status")
        return status

    def wait_ready(self, timeout: float = 90) -> tuple[int, int]:
        """Until enrolled, connected and both applications run; (the sleeper's pid, the sender's pid)."""
        deadline = time.monotonic() + timeout
        ready = self.storage / "ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SystemExit(f"the agent ended: {self.log.read_text()[-2000:]}")
            status = read_status(self.settings.status_file)
            current = status is not None and status.running and status.pid == self.process.pid
            if status is not None and current and status.link.connected and ready.exists():
                states = {app.component_id: app for app in status.apps}
                sleeper = states.get(SLEEPER)
                if sleeper is not None and sleeper.state == "running" and sleeper.pid is not None:
                    return sleeper.pid, int(ready.read_text())
            time.sleep(0.2)
        raise SystemExit(f"the agent was not ready in time: {self.log.read_text()[-2000:]}")

    def send(self, sender_pid: int, *, connections: int, seconds: float = 0, messages: int = 0) -> None:
        """Tell the sender to send (for ``seconds``, or ``messages`` in all) over ``connections``."""
        self._runs += 1
        plan = {"run": self._runs, "connections": connections, "seconds": seconds, "messages": messages}
        temporary = self.storage / "plan.tmp"
        temporary.write_text(json.dumps(plan))
        temporary.chmod(0o644)
        temporary.replace(self.storage / "plan.json")
        os.kill(sender_pid, signal.SIGUSR1)

    def result(self, timeout: float) -> tuple[int, float]:
        """The sender's last run: (messages acknowledged to it, seconds it took)."""
        deadline = time.monotonic() + timeout
        path = self.storage / "result.json"
        while time.monotonic() < deadline:
            try:
                result = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                result = None
            if result is not None and result["run"] == self._runs:
                if result["errors"]:
                    print(f"          the sender's errors: {result['errors'][:3]}")
                return int(result["sent"]), float(result["seconds"])
            time.sleep(0.05)
        raise SystemExit("the sender did not finish in time")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------------------------------------- the figures


def measure_memory_and_idle(
    agent: AgentUnderTest, pids: tuple[int, int], arguments: argparse.Namespace, how: str
) -> Memory:
    """The agent's resident set after it settled, and its CPU over ``--idle-seconds``; printed."""
    sleeper, sender = pids
    time.sleep(arguments.settle_seconds)
    baseline = import_baseline()
    before = {pid: cpu_seconds(pid) for pid in (agent.pid, sleeper, sender)}
    started = time.perf_counter()
    time.sleep(arguments.idle_seconds)
    elapsed = time.perf_counter() - started
    busy = {pid: (cpu_seconds(pid) - before[pid]) / elapsed * 100 for pid in before}
    memory = Memory.of(agent.pid)
    print(f"memory    agent ({how}; 2 applications, connected, idle): {memory.shown()}")
    print(
        f'          baseline `python -c "import fleetward.agent.runtime"`: {baseline / MiB:.1f} MiB: '
        f"ratio {memory.rss / baseline:.2f} (aim: under 60 MB = {60e6 / MiB:.1f} MiB)"
    )
    for name, pid in (("sleeper", sleeper), ("sender (appkit, waiting)", sender)):
        print(f"          application {name}: {Memory.of(pid).shown()}")
    print(
        f"idle CPU  over {elapsed:.0f} s, % of one core: agent {busy[agent.pid]:.2f} % (aim: under 1 %), "
        f"sleeper {busy[sleeper]:.2f} %, sender {busy[sender]:.2f} %"
    )
    return memory


def print_import_sizes() -> None:
    sizes = import_sizes()
    print("where the agent's memory goes: a fresh interpreter's resident set after each import, MiB")
    previous = 0
    for (name, _code), size in zip(IMPORT_STEPS, sizes, strict=True):
        print(f"          {size / MiB:6.1f}  (+{(size - previous) / MiB:5.1f})  {name}")
        previous = size


async def hub_baselines(
    hub: Hub, devices: list[SimulatedDevice], arguments: argparse.Namespace
) -> list[float]:
    """The hub's ingest, the ``bench.hub`` way: all publishers at ``--window``, then one device at 32."""
    rates = []
    for group, window in ((devices, arguments.window), (devices[:1], AGENT_WINDOW)):
        clients = clients_for(group, hub.hub_port, hub.ca_file, hub.directory.parent / f"pub-{window}")
        await connect_all(clients)
        await publish_rate(clients, group, 1.0, window)
        rates.append(await publish_rate(clients, group, arguments.seconds, window))
        await close_all(clients)
    return rates


def measure_throughput(
    agent: AgentUnderTest,
    hub: Hub,
    stored: Stored,
    sender: int,
    baselines: list[float],
    arguments: argparse.Namespace,
) -> None:
    hub_rate, one_device_rate = baselines
    for connections in arguments.connections:
        before = stored.count()
        cpu = {pid: cpu_seconds(pid) for pid in (agent.pid, sender, hub.process.pid)}
        written = written_bytes(agent.pid)
        started = time.perf_counter()
        agent.send(sender, connections=connections, seconds=arguments.seconds)
        time.sleep(max(0.0, started + arguments.seconds - time.perf_counter()))
        in_window = stored.count() - before
        sent, seconds = agent.result(arguments.seconds + 60)
        finished = time.perf_counter()
        caught_up = stored.wait_for(before + sent, timeout=120)
        spent = {pid: cpu_seconds(pid) - cpu[pid] for pid in cpu}
        written = written_bytes(agent.pid) - written
        acknowledged = sent / seconds
        arrived = in_window / arguments.seconds
        lag = f"{caught_up - finished:.1f} s" if caught_up is not None else "not within 120 s"
        print(
            f"app API   telemetry.send, 1 application, {connections} connection(s), {seconds:.0f} s: "
            f"acknowledged to it {acknowledged:7.0f}/s, stored by the hub meanwhile {arrived:7.0f}/s "
            f"(all stored {lag} after the last): ratio to the hub's ingest {acknowledged / hub_rate:.2f} "
            f"(to one device at window 32: {acknowledged / one_device_rate:.2f})"
        )
        print(
            "          CPU per message, µs: "
            f"agent {spent[agent.pid] / sent * 1e6:.0f}, sender {spent[sender] / sent * 1e6:.0f}, "
            f"hub {spent[hub.process.pid] / sent * 1e6:.0f}; the agent's disk writes per message "
            f"(outbox put and delete): {written / sent / 1024:.1f} KiB"
        )


def measure_backlog(
    agent: AgentUnderTest,
    hub: Hub,
    stored: Stored,
    sender: int,
    baselines: list[float],
    arguments: argparse.Namespace,
) -> None:
    hub_rate, one_device_rate = baselines
    hub.stop()  # the cut: the agent's connection ends, and every attempt is refused
    before, before_sender = stored.count(), stored.count_from(SENDER)
    written = written_bytes(agent.pid)
    agent.send(sender, connections=arguments.fill_connections, messages=arguments.backlog)
    sent, seconds = agent.result(timeout=3600)
    fill_written = written_bytes(agent.pid) - written
    depth = None
    deadline = time.monotonic() + 3 * agent.settings.intervals.status_seconds
    while time.monotonic() < deadline:  # status.json is written every intervals.status_seconds
        status = agent.status()
        if status.outbox.messages >= sent:
            depth = status.outbox
            break
        time.sleep(0.2)
    shown = (
        f"{depth.messages} messages, {depth.bytes / MiB:.1f} MiB "
        f"({depth.bytes / depth.messages:.0f} bytes each)"
        if depth
        else "not seen"
    )
    print(
        f"backlog   hub stopped; {sent} messages put through the application API "
        f"({arguments.fill_connections} connections) in {seconds:.1f} s ({sent / seconds:.0f}/s); "
        f"outbox (status.json): {shown}; the agent wrote {fill_written / sent / 1024:.1f} KiB per message"
    )
    restart = hub.start()
    opened = time.perf_counter()
    first = None
    while first is None:
        if stored.count() > before:
            first = time.perf_counter()
            cpu = {pid: cpu_seconds(pid) for pid in (agent.pid, hub.process.pid)}
            written = written_bytes(agent.pid)
            break
        if time.perf_counter() - opened > 300:
            raise SystemExit("the agent did not reconnect within 300 s")
        time.sleep(0.05)
    done = stored.wait_for(before + sent, timeout=3600, poll=0.2)
    if done is None:
        raise SystemExit("the backlog was not drained within an hour")
    drain = done - first
    spent = {pid: cpu_seconds(pid) - cpu[pid] for pid in cpu}
    drain_written = written_bytes(agent.pid) - written
    rate = sent / drain
    print(
        f"          hub started again in {restart:.1f} s; the agent reconnected {first - opened:.1f} s later "
        f"(its backoff); the {sent} were stored {drain:.1f} s after the first: {rate:.0f}/s "
        f"({done - opened:.1f} s from the hub's return to the last)"
    )
    print(
        f"          ratio to the hub's ingest {rate / hub_rate:.2f} "
        f"(to one device at window 32: {rate / one_device_rate:.2f}); CPU while draining: "
        f"agent {spent[agent.pid] / sent * 1e6:.0f} µs per message "
        f"({spent[agent.pid] / drain:.0%} of a core), "
        f"hub {spent[hub.process.pid] / sent * 1e6:.0f} µs ({spent[hub.process.pid] / drain:.0%}); "
        f"the agent wrote {drain_written / sent / 1024:.1f} KiB per message (deletes)"
    )
    deadline = time.monotonic() + 3 * agent.settings.intervals.status_seconds
    status = agent.status()
    while status.outbox.messages and time.monotonic() < deadline:
        time.sleep(0.2)
        status = agent.status()
    from_sender = stored.count_from(SENDER) - before_sender
    print(
        f"          outbox after: {status.outbox.messages} messages, {status.outbox.dropped} dropped; "
        f"the hub stored {from_sender} of the sender's ({from_sender - sent} more than it sent: duplicates) "
        f"and {stored.count() - before - from_sender} of the agent's own; "
        f"agent {Memory.of(agent.pid).shown()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=30.0,
        help="idle CPU is measured this long (the baseline samples every 30 s)",
    )
    parser.add_argument("--settle-seconds", type=float, default=10.0, help="before memory and idle CPU")
    parser.add_argument("--seconds", type=float, default=10.0, help="each throughput run")
    parser.add_argument(
        "--connections",
        type=lambda text: [int(value) for value in text.split(",")],
        default=[1, 4],
        help="the sender's connections to the API (at most 4), one run per comma-separated value",
    )
    parser.add_argument(
        "--backlog", type=int, default=100_000, help="messages queued during the cut; 0: none"
    )
    parser.add_argument(
        "--fill-connections", type=int, default=4, help="the sender's connections while it fills the backlog"
    )
    parser.add_argument(
        "--no-lean",
        dest="lean",
        action="store_false",
        help="skip the last run: the agent's runtime started without `fleetward`'s command line",
    )
    parser.add_argument("--publishers", type=int, default=100, help="devices of the hub's ingest baseline")
    parser.add_argument("--window", type=int, default=8, help="QoS 1 messages in flight per publisher")
    arguments = parser.parse_args()
    if not all(1 <= value <= 4 for value in [*arguments.connections, arguments.fill_connections]):
        parser.error("an application has 1 to 4 connections to the agent")
    raise_file_limit()
    print(f"fleetward agent benchmark ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f})")
    with tempfile.TemporaryDirectory(prefix="fleetward-agent-bench-") as scratch:
        directory = Path(scratch)
        directory.chmod(0o755)  # the applications' own users reach their images and storage below
        hub = Hub(directory / "fleetward")
        agent: AgentUnderTest | None = None
        try:
            tenant_id, devices = enroll_fleet(hub, arguments.publishers)
            agent = AgentUnderTest(directory, hub, tenant_id, outbox_messages=arguments.backlog + 10_000)
            print(
                "outbox limits in agent.toml: "
                + ", ".join(f"{key} = {value:,}" for key, value in agent.outbox_limits.items())
            )
            agent.start()
            pids = agent.wait_ready()
            measure_memory_and_idle(agent, pids, arguments, "`fleetward agent run`")
            print_import_sizes()
            baselines = asyncio.run(hub_baselines(hub, devices, arguments))
            print(
                f"baseline  the hub's ingest, QoS 1 over TLS: {len(devices)} devices × {arguments.window} "
                f"in flight {baselines[0]:7.0f}/s; "
                f"one device × {AGENT_WINDOW} in flight {baselines[1]:7.0f}/s"
            )
            stored = Stored(hub, tenant_id, agent.device_id)
            measure_throughput(agent, hub, stored, pids[1], baselines, arguments)
            if arguments.backlog:
                measure_backlog(agent, hub, stored, pids[1], baselines, arguments)
            if arguments.lean:
                agent.stop()
                agent.start(lean=True)
                pids = agent.wait_ready()
                measure_memory_and_idle(agent, pids, arguments, "the same runtime without the CLI's imports")
        except BaseException:
            if agent is not None and agent.log.exists():
                print(f"the agent's log ends with:\n{agent.log.read_text()[-3000:]}", file=sys.stderr)
                with contextlib.suppress(SystemExit, ConfigurationError):
                    print(f"its applications: {agent.status().apps}", file=sys.stderr)
            raise
        finally:
            if agent is not None:
                agent.stop()
            hub.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
