"""The application supervisor: each application its own confined process, watched, reported and restarted.

``async with Supervisor(config, report=…) as supervisor: await supervisor.start(launched_app)`` runs a
:class:`~fleetward.agent.launch.LaunchedApp` (only measured launch makes one) as its own process, confined
as :mod:`fleetward.agent.sandbox` describes, with its storage directory as working directory and the tail
of its standard output and error kept (the last ``error_tail_bytes`` of each). Each run gets its own
network (:func:`~fleetward.agent.netns.open_app_network`): as root, a namespace with only loopback and,
with ``AllowedConnections``, the agent's allow-listing proxy inside it; the proxy's refusals go to the
injected ``on_blocked`` and names are resolved by the injected ``resolver``. A run whose network cannot be
made does not start (a crash, with the reason).

When an application exits or is killed without the supervisor asking, a
:class:`~fleetward.wire.reports.CrashReport` goes to the reporter, and the application is restarted after
an exponential backoff (:class:`RestartPolicy`, capped). After ``crash_loop_crashes`` crashes within
``crash_loop_window_seconds`` it is left stopped in the ``crash_loop`` state, with a
:class:`~fleetward.wire.reports.CrashLoopReport`. An application whose storage grows past its
``MutableStorage`` quota is stopped for good (``storage_quota_exceeded``).

Leaving the ``async with`` stops every application: ``SIGTERM`` to its process group, ``SIGKILL`` after
``stop_grace_seconds``, then every process of its own user (as root), and waits for each, so no zombie
is left. The backoff sleeps go through an injected ``sleep`` and the times through an injected clock, so
tests run crash loops in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import json
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from sys import executable
from types import TracebackType

from fleetward.agent.launch import LaunchedApp
from fleetward.agent.netns import AppNetwork, open_app_network
from fleetward.agent.proxy import OnAllowed, OnBlocked, ProxyLimits, Resolver
from fleetward.agent.reporting import Reporter
from fleetward.agent.sandbox import (
    TRAMPOLINE,
    AppIdentities,
    AppIdentity,
    Enforcement,
    ResourceLimits,
    StorageUsage,
    UidRangeIdentities,
    kill_user_processes,
    measure_storage,
    prepare_storage,
)
from fleetward.bounds import check_positive
from fleetward.clock import Clock, SystemClock
from fleetward.errors import Conflict, NotFound
from fleetward.wire.reports import MAX_ERROR_TAIL_CHARS, CrashLoopReport, CrashReport, StorageQuotaReport

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts, and when a run of crashes becomes a crash loop."""

    initial_backoff_seconds: float = 1.0
    backoff_factor: float = 2.0
    max_backoff_seconds: float = 300.0
    crash_loop_crashes: int = 5
    crash_loop_window_seconds: float = 600.0
    stable_after_seconds: float = 60.0

    def __post_init__(self) -> None:
        check_positive(self, "restart policy", fractional=lambda name: name != "crash_loop_crashes")
        if self.backoff_factor < 1:
            raise ValueError("the backoff factor must be at least 1")
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError("the longest backoff must not be shorter than the first")


@dataclass(frozen=True)
class RestartDecision:
    delay_seconds: float
    crash_loop: bool
    crashes_in_window: int


class CrashHistory:
    """The pure core of restarting: given each crash's time and how long the run lasted, when to restart.

    The delay doubles (``backoff_factor``) with each crash of a run of crashes, from
    ``initial_backoff_seconds`` up to ``max_backoff_seconds``; a run that lasted ``stable_after_seconds``
    or more starts the backoff afresh. ``crash_loop_crashes`` crashes within the last
    ``crash_loop_window_seconds`` make a crash loop, whatever the backoff.
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self._policy = policy
        self._recent: deque[dt.datetime] = deque()
        self._consecutive = 0

    def record(self, *, at: dt.datetime, ran_for_seconds: float) -> RestartDecision:
        policy = self._policy
        self._consecutive = 1 if ran_for_seconds >= policy.stable_after_seconds else self._consecutive + 1
        self._recent.append(at)
        window = dt.timedelta(seconds=policy.crash_loop_window_seconds)
        while self._recent and at - self._recent[0] >= window:
            self._recent.popleft()
        delay = policy.initial_backoff_seconds
        for _ in range(self._consecutive - 1):
            delay *= policy.backoff_factor
            if delay >= policy.max_backoff_seconds:
                break
        return RestartDecision(
            delay_seconds=min(delay, policy.max_backoff_seconds),
            crash_loop=len(self._recent) >= policy.crash_loop_crashes,
            crashes_in_window=len(self._recent),
        )


@dataclass(frozen=True)
class SupervisorConfig:
    """How applications are run. Every bound carries its unit in its name."""

    storage_dir: Path
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_seconds: float = 5.0
    error_tail_bytes: int = 8 * 1024
    output_drain_seconds: float = 2.0
    storage_check_interval_seconds: float = 30.0
    max_storage_entries: int = 10_000
    agent_socket: Path | None = None
    first_app_uid: int = 200_000
    app_uid_count: int = 1000
    interpreter: Path = field(default_factory=lambda: Path(executable))
    proxy: ProxyLimits = field(default_factory=ProxyLimits)
    network_namespaces: bool = True  # as root: each application in a network namespace of its own

    def __post_init__(self) -> None:
        if not 0 < self.error_tail_bytes <= MAX_ERROR_TAIL_CHARS:
            raise ValueError(f"error_tail_bytes must be from 1 to {MAX_ERROR_TAIL_CHARS}")
        for name in ("stop_grace_seconds", "output_drain_seconds", "storage_check_interval_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_storage_entries <= 0:
            raise ValueError("max_storage_entries must be positive")


class AppState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    CRASH_LOOP = "crash_loop"
    STORAGE_QUOTA_EXCEEDED = "storage_quota_exceeded"
    STOPPED = "stopped"


_FINAL = (AppState.CRASH_LOOP, AppState.STORAGE_QUOTA_EXCEEDED, AppState.STOPPED)


class _Tail(asyncio.Protocol):
    """Keeps the last ``limit`` bytes that came through a pipe."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._limit:
            del self._buffer[: len(self._buffer) - self._limit]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def text(self) -> str:
        return bytes(self._buffer).decode("utf-8", "replace")


@dataclass
class _Child:
    process: asyncio.subprocess.Process
    stdout: _Tail
    stderr: _Tail
    transports: list[asyncio.BaseTransport]


class AppHandle:
    """What the supervisor shows of one application: its state, its process, its output."""

    def __init__(self, app: LaunchedApp) -> None:
        self.app = app
        self.state = AppState.STARTING
        self.pid: int | None = None
        self.restart_count = 0
        self._stdout: _Tail | None = None
        self._stderr: _Tail | None = None
        self._changed = asyncio.Condition()

    @property
    def component_id(self) -> str:
        return self.app.component_id

    def output_tail(self) -> str:
        """The end of what the current (or last) run wrote to standard output."""
        return self._stdout.text() if self._stdout else ""

    def error_tail(self) -> str:
        """The end of what the current (or last) run wrote to standard error."""
        return self._stderr.text() if self._stderr else ""

    async def wait_for(self, *states: AppState, timeout_seconds: float = 10.0) -> AppState:
        """Wait until the application is in one of ``states``; ``TimeoutError`` after the timeout."""
        async with asyncio.timeout(timeout_seconds), self._changed:
            await self._changed.wait_for(lambda: self.state in states)
        return self.state

    async def _set(self, state: AppState, pid: int | None = None) -> None:
        async with self._changed:
            self.state, self.pid = state, pid
            self._changed.notify_all()


class Supervisor:
    """Runs launched applications as confined processes; an async context manager that stops them all."""

    def __init__(
        self,
        config: SupervisorConfig,
        *,
        report: Reporter,
        identities: AppIdentities | None = None,
        as_root: bool | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        resolver: Resolver | None = None,
        on_blocked: OnBlocked | None = None,
        on_allowed: OnAllowed | None = None,
    ) -> None:
        self.config = config
        self.enforcement = Enforcement(
            as_root=os.geteuid() == 0 if as_root is None else as_root,
            agent_uid=os.geteuid(),
            network_namespaces=config.network_namespaces,
        )
        self._resolver = resolver
        self._on_blocked = on_blocked
        self._on_allowed = on_allowed
        self._identities = identities or UidRangeIdentities(
            config.storage_dir / ".uids.json", first_uid=config.first_app_uid, count=config.app_uid_count
        )
        self._report = report
        self._clock = clock or SystemClock()
        self._sleep: Sleep = sleep or asyncio.sleep
        self._handles: dict[str, AppHandle] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._open = False

    async def __aenter__(self) -> Supervisor:
        self._open = True
        for statement in self.enforcement.not_enforced():
            logger.warning("application sandbox: not enforced: %s", statement)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def handle(self, component_id: str) -> AppHandle:
        try:
            return self._handles[component_id]
        except KeyError:
            raise NotFound(f"no application {component_id} is supervised", code="app_not_found") from None

    async def start(self, app: LaunchedApp) -> AppHandle:
        """Supervise ``app`` until :meth:`stop`, a crash loop or the end of the ``async with``."""
        if not self._open:
            raise RuntimeError("enter the supervisor with `async with` before starting applications")
        self._refuse_if_running(app.component_id)
        identity = None
        if self.enforcement.as_root:
            identity = await asyncio.to_thread(self._identities.identity_for, app.component_id)
            self._refuse_if_running(app.component_id)  # a concurrent start may have won meanwhile
        handle = AppHandle(app)
        self._handles[app.component_id] = handle
        self._stops[app.component_id] = stop = asyncio.Event()
        task = asyncio.create_task(
            self._supervise(handle, identity, stop), name=f"supervise {app.component_id}"
        )
        task.add_done_callback(_log_failure)
        self._tasks[app.component_id] = task
        return handle

    def _refuse_if_running(self, component_id: str) -> None:
        if component_id in self._tasks and not self._tasks[component_id].done():
            raise Conflict(f"application {component_id} is already supervised", code="app_running")

    async def stop(self, component_id: str) -> None:
        """Stop one application (``SIGTERM``, then ``SIGKILL`` after the grace period) and wait for it."""
        self.handle(component_id)
        self._stops[component_id].set()
        await self._tasks[component_id]

    async def close(self) -> None:
        """Stop every application and wait for each."""
        self._open = False
        for stop in self._stops.values():
            stop.set()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)  # failures: _log_failure

    # --- one application -------------------------------------------------------------------------------

    def _storage_path(self, app: LaunchedApp) -> Path:
        return self.config.storage_dir / app.component_id

    def _quota_applies(self, app: LaunchedApp) -> bool:
        # as root, an application without MutableStorage has a read-only directory: nothing to count
        declared = app.manifest.capabilities.mutable_storage_kb is not None
        return declared or not self.enforcement.as_root

    def _over_quota(self, app: LaunchedApp, usage: StorageUsage) -> bool:
        quota = app.manifest.capabilities.mutable_storage_bytes
        return usage.used_bytes > quota or usage.entries > self.config.max_storage_entries

    async def _supervise(self, handle: AppHandle, identity: AppIdentity | None, stop: asyncio.Event) -> None:
        app = handle.app
        history = CrashHistory(self.config.restart)
        storage = self._storage_path(app)
        try:
            while not stop.is_set():
                await handle._set(AppState.STARTING)
                await asyncio.to_thread(
                    prepare_storage,
                    storage,
                    identity=identity,
                    writable=app.manifest.capabilities.mutable_storage_kb is not None,
                    agent_uid=os.geteuid(),
                    agent_gid=os.getegid(),
                )
                if self._quota_applies(app):
                    usage = await asyncio.to_thread(
                        measure_storage, storage, max_entries=self.config.max_storage_entries
                    )
                    if self._over_quota(app, usage):
                        await self._quota_exceeded(handle, usage)
                        return
                started_at = self._clock.now()
                returncode, over_quota = await self._run_once(handle, identity, stop)
                if stop.is_set():
                    return
                if over_quota is not None:
                    await self._quota_exceeded(handle, over_quota)
                    return
                now = self._clock.now()
                await self._report(self._crash_report(handle, returncode, now))
                decision = history.record(at=now, ran_for_seconds=(now - started_at).total_seconds())
                if decision.crash_loop:
                    await handle._set(AppState.CRASH_LOOP)
                    await self._report(
                        CrashLoopReport(
                            component_id=app.component_id,
                            image_sha256=app.image_sha256,
                            crashes=decision.crashes_in_window,
                            window_seconds=self.config.restart.crash_loop_window_seconds,
                            occurred_at=now,
                        )
                    )
                    return
                await handle._set(AppState.BACKING_OFF)
                if await self._sleep_unless_stopped(decision.delay_seconds, stop):
                    return
                handle.restart_count += 1
        finally:
            if handle.state not in _FINAL:
                await handle._set(AppState.STOPPED)

    def _crash_report(self, handle: AppHandle, returncode: int, at: dt.datetime) -> CrashReport:
        return CrashReport(
            component_id=handle.app.component_id,
            image_sha256=handle.app.image_sha256,
            exit_code=returncode if returncode >= 0 else None,
            signal=-returncode if returncode < 0 else None,
            error_tail=handle.error_tail()[-MAX_ERROR_TAIL_CHARS:],
            occurred_at=at,
            restart_count=handle.restart_count,
        )

    async def _quota_exceeded(self, handle: AppHandle, usage: StorageUsage) -> None:
        await handle._set(AppState.STORAGE_QUOTA_EXCEEDED)
        await self._report(
            StorageQuotaReport(
                component_id=handle.app.component_id,
                image_sha256=handle.app.image_sha256,
                used_bytes=usage.used_bytes,
                quota_bytes=handle.app.manifest.capabilities.mutable_storage_bytes,
                entries=usage.entries,
                occurred_at=self._clock.now(),
            )
        )

    async def _sleep_unless_stopped(self, seconds: float, stop: asyncio.Event) -> bool:
        """Sleep ``seconds`` through the injected sleep; return True if told to stop meanwhile."""
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, stopping):
                task.cancel()
            await asyncio.gather(sleeping, stopping, return_exceptions=True)
        return stop.is_set()

    async def _run_once(
        self, handle: AppHandle, identity: AppIdentity | None, stop: asyncio.Event
    ) -> tuple[int, StorageUsage | None]:
        """Run the application once; return its return code, and the usage if it went over quota."""
        app = handle.app
        network: AppNetwork | None = None
        try:
            network = await open_app_network(
                app.component_id,
                app.manifest.capabilities,
                isolate=self.enforcement.isolates_network,
                limits=self.config.proxy,
                resolver=self._resolver,
                on_blocked=self._on_blocked,
                on_allowed=self._on_allowed,
            )
            child = await self._spawn(handle, identity, network)
        except OSError as error:  # no namespace or port, no interpreter, or the system is out of processes
            if network is not None:
                await network.close()
            handle._stderr = _Tail(self.config.error_tail_bytes)
            handle._stderr.data_received(f"fleetward: the application could not start: {error}\n".encode())
            return 127, None
        except BaseException:
            if network is not None:
                await network.close()
            raise
        await handle._set(AppState.RUNNING, child.process.pid)
        exited = asyncio.ensure_future(child.process.wait())
        stopping = asyncio.ensure_future(stop.wait())
        watching = asyncio.ensure_future(self._watch_storage(handle.app))
        over_quota: StorageUsage | None = None
        try:
            await asyncio.wait({exited, stopping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done() and not watching.cancelled():
                over_quota = watching.result()
            if not exited.done():
                await self._terminate(child.process, exited)
        finally:
            for task in (stopping, watching):
                task.cancel()
            await asyncio.gather(stopping, watching, return_exceptions=True)
            if not exited.done():  # cancelled from outside: never leave the child behind
                await self._terminate(child.process, exited)
            try:
                await self._clean_up(child, identity)
            finally:
                await network.close()
        return exited.result(), over_quota

    async def _watch_storage(self, app: LaunchedApp) -> StorageUsage | None:
        """Poll the storage (real time, every ``storage_check_interval_seconds``); return once over quota."""
        if not self._quota_applies(app):
            await asyncio.Event().wait()  # nothing to watch: wait to be cancelled
        storage = self._storage_path(app)
        while True:
            await asyncio.sleep(self.config.storage_check_interval_seconds)
            try:
                usage = await asyncio.to_thread(
                    measure_storage, storage, max_entries=self.config.max_storage_entries
                )
            except OSError as error:
                logger.warning("the storage of %s could not be measured: %s", app.component_id, error)
                continue
            if self._over_quota(app, usage):
                return usage

    async def _terminate(self, process: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        _signal_group(process.pid, signal.SIGTERM)
        await asyncio.wait({exited}, timeout=self.config.stop_grace_seconds)
        if not exited.done():
            _signal_group(process.pid, signal.SIGKILL)
            await asyncio.wait({exited})

    async def _clean_up(self, child: _Child, identity: AppIdentity | None) -> None:
        """After the process ended: kill what it left, collect the rest of its output, close the pipes."""
        _signal_group(child.process.pid, signal.SIGKILL)
        if identity is not None:
            await asyncio.to_thread(kill_user_processes, identity.uid)
        drained = [asyncio.ensure_future(tail.closed.wait()) for tail in (child.stdout, child.stderr)]
        await asyncio.wait(drained, timeout=self.config.output_drain_seconds)
        for task in drained:
            task.cancel()
        await asyncio.gather(*drained, return_exceptions=True)
        for transport in child.transports:
            transport.close()

    async def _spawn(self, handle: AppHandle, identity: AppIdentity | None, network: AppNetwork) -> _Child:
        app = handle.app
        storage = self._storage_path(app)
        environment = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(storage),
            "LANG": "C.UTF-8",
            "FLEETWARD_COMPONENT_ID": app.component_id,
            "FLEETWARD_STORAGE_DIR": str(storage),
            **network.environment(),
        }
        if self.config.agent_socket is not None:
            environment["FLEETWARD_AGENT_SOCKET"] = str(self.config.agent_socket)
        namespace = network.namespace
        spec = {
            "entry": str(app.entry_path),
            "env": environment,
            "rlimits": self.config.resources.rlimits(
                file_size_bytes=app.manifest.capabilities.mutable_storage_bytes
            ),
            "uid": identity.uid if identity else None,
            "gid": identity.gid if identity else None,
            "agent_pid": os.getpid(),
            "netns_fd": namespace.descriptor if namespace else None,
            "netns": namespace.name if namespace else None,
        }
        loop = asyncio.get_running_loop()
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        try:
            process = await asyncio.create_subprocess_exec(
                str(self.config.interpreter),
                "-I",
                "-S",
                "-c",
                TRAMPOLINE,
                json.dumps(spec),
                *app.manifest.cmd_args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                cwd=storage,
                env={},
                start_new_session=True,
                umask=0o077,
                pass_fds=(namespace.descriptor,) if namespace else (),
            )
        except BaseException:
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        stdout, stderr = _Tail(self.config.error_tail_bytes), _Tail(self.config.error_tail_bytes)
        transports: list[asyncio.BaseTransport] = []
        try:
            for descriptor, tail in ((out_read, stdout), (err_read, stderr)):
                pipe = os.fdopen(descriptor, "rb", 0)
                transport, _ = await loop.connect_read_pipe(_returning(tail), pipe)
                transports.append(transport)
        except BaseException:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            raise
        handle._stdout, handle._stderr = stdout, stderr
        return _Child(process=process, stdout=stdout, stderr=stderr, transports=transports)


def _log_failure(task: asyncio.Task[None]) -> None:
    """Say at once when supervising an application failed (the storage could not be prepared, …)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())


def _returning(tail: _Tail) -> Callable[[], _Tail]:
    return lambda: tail


def _signal_group(pid: int, number: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, number)
