"""The agent as a running program: its composition root, and the order things start and stop in.

``async with Agent(settings) as agent: await agent.run_until_signalled()`` runs one device:

1. **lock** the state directory (``agent.lock``: one agent per state directory);
2. **open the root of trust** and the **outbox** (``outbox.db``);
3. **measured boot** (:mod:`fleetward.agent.boot`): the measurement log starts afresh (a TPM's PCR is
   reset), the agent's own measurement first, then each installed application through measured launch; a
   refused one is reported (``launch_refused``) and never started;
4. **the renewer** keeps the operational credential (``credential.pem``) valid: with no valid credential it
   attests at once, then renews at half-life, re-attests after an expiry, and retries with backoff; each
   refusal by the authority is logged, reported in :meth:`Agent.status` and kept until a success;
5. **the hub link** connects with the current credential as soon as there is one, and again after each
   renewal; a connection the hub refuses (a revoked certificate, say) makes the renewer try at once (at
   most once per ``limits.forced_renewal_cooldown_seconds``), so that the authority's reason is known;
6. **the supervisor** runs the launched applications; their crashes, crash loops and quota breaches, and the
   refused launches, go into the outbox as critical messages with the ``fleetward-report`` property;
7. **loops**: a security baseline sampled every ``intervals.baseline_sample_seconds`` and reported every
   ``intervals.baseline_seconds``, the agent's health telemetry every ``intervals.telemetry_seconds``, and
   ``status.json`` with the applications' output logs every ``intervals.status_seconds``.

Leaving the block (or SIGTERM/SIGINT in :meth:`Agent.run_until_signalled`) stops in the reverse order: the
loops, the applications (their last reports land in the outbox), the hub link (after giving the hub up to
``limits.shutdown_flush_seconds`` to take the outbox), the renewer, then the outbox, whose every message is
on disk: nothing the agent acknowledged to a caller is lost, and what the hub has not acknowledged is sent
again on the next start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import httpx

from fleetward.agent.app_api import AppApiServer, AppEndpoint, AppServices
from fleetward.agent.app_cloud import CloudRouter
from fleetward.agent.app_services import (
    AppCredentialCopies,
    DeferralLedger,
    DirectoryUsage,
    SystemEvent,
    SystemEvents,
)
from fleetward.agent.baseline import BaselineCollector
from fleetward.agent.boot import Boot, measured_boot, open_root_of_trust, root_kind
from fleetward.agent.config import AgentSettings, SoftwareRoot, UpdateSettings, load_install_records
from fleetward.agent.credential import CredentialFile
from fleetward.agent.dialect import MethodCall
from fleetward.agent.enroll import EnrollmentClient, OperationalCredential
from fleetward.agent.launch import InstallRecord, LaunchedApp, Launcher
from fleetward.agent.link import HubLink, LinkSettings, MethodResult
from fleetward.agent.outbox import Outbox, OutboxLimits
from fleetward.agent.peripherals import LinuxPeripherals, Peripherals, SimulatedPeripherals
from fleetward.agent.proxy import Resolver
from fleetward.agent.renewal import Refusal, RenewalPolicy, Renewer
from fleetward.agent.rot import AnyRootOfTrust, device_id_of
from fleetward.agent.sandbox import ResourceLimits, UidRangeIdentities
from fleetward.agent.status import (
    AgentStatus,
    AppStatus,
    CertificateStatus,
    LinkState,
    LogKeeper,
    OutboxState,
    RefusalStatus,
    StateLock,
    UpdateStatus,
    write_status,
)
from fleetward.agent.supervisor import AppHandle, AppState, RestartPolicy, Supervisor, SupervisorConfig
from fleetward.agent.update_client import UpdateClient, UpdateClientSettings
from fleetward.agent.updater import CHECK_METHOD, Updater, UpdaterSettings
from fleetward.clock import Clock, SystemClock
from fleetward.errors import ConfigurationError, FleetwardError, NotFound, TransportError
from fleetward.transport import trust
from fleetward.wire.baseline import BASELINE_REPORT, REPORT_PROPERTY
from fleetward.wire.reports import MAX_REASON_CHARS, AgentReport, CapabilityDeniedReport, last_line
from fleetward.wire.updates import device_token

logger = logging.getLogger(__name__)

#: the direct method the agent answers itself (applications cannot register it)
STATUS_METHOD = "fleetward.status"
AGENT_METHODS = frozenset({STATUS_METHOD, CHECK_METHOD})
REQUEST_TIMEOUT_SECONDS = 10.0
#: how long an updated application may take to start before its trial counts as failed
TRIAL_START_SECONDS = 60.0
#: how long a new agent on trial may take to get a certificate for its measurement and reach the hub
AGENT_HEALTH_SECONDS = 300.0
JSON_PROPERTIES = (("$.ct", "application/json"), ("$.ce", "utf-8"))
#: the property that marks the agent's own health telemetry
HEALTH_PROPERTY = ("fleetward-agent", "health")


class CredentialTls:
    """The hub link's TLS identity: the credential file (key, certificate, chain), read at every attempt."""

    def __init__(self, credential_file: Path, ca_file: Path | None) -> None:
        self._credential = credential_file
        self._ca = ca_file

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self._ca) if self._ca else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self._credential))
        return context


class Agent:
    """One device's agent; an async context manager (see the module's docstring for the order)."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        clock: Clock | None = None,
        root_of_trust: AnyRootOfTrust | None = None,
        http: httpx.AsyncClient | None = None,
        proc: Path = Path("/proc"),
        as_root: bool | None = None,
        peripherals: Peripherals | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        self._injected_root = root_of_trust
        self._injected_http = http
        self._as_root = as_root
        #: how the applications' proxies resolve host names (the system's resolver when None)
        self._resolver = resolver
        self._collector = BaselineCollector(proc=proc)
        self._peripherals: Peripherals = peripherals or (
            SimulatedPeripherals() if settings.peripherals == "simulated" else LinuxPeripherals()
        )
        self._stack = AsyncExitStack()
        self._root: AnyRootOfTrust | None = None
        self._outbox: Outbox | None = None
        self._boot: Boot | None = None
        self._renewer: Renewer | None = None
        self._link: HubLink | None = None
        self._link_started = False
        self._supervisors: dict[str, Supervisor] = {}
        #: what runs now, by component: the boot's launches, then what updates replaced
        self._apps: dict[str, LaunchedApp] = {}
        self._app_stacks: dict[str, AsyncExitStack] = {}
        self._identities: UidRangeIdentities | None = None
        self._as_root_now = False
        self._deferrals = DeferralLedger(
            clock=self._clock, path=settings.state_dir / "updates" / "deferrals.json"
        )
        self._update_launcher: Launcher | None = None
        #: system events for the applications (their update's notices among them)
        self._events = SystemEvents()
        self.updater: Updater | None = None
        self._router: CloudRouter | None = None
        self._app_services: AppServices | None = None
        self._violations = 0
        self._tasks: list[asyncio.Task[None]] = []
        #: short-lived work started from callbacks (a blocked connection's report)
        self._background: set[asyncio.Task[None]] = set()
        self._logs = LogKeeper(settings.logs_dir)
        self._last_refusal: RefusalStatus | None = None
        self._reports_sent = 0
        self._reports_dropped = 0
        self._report_times: collections.deque[float] = collections.deque()
        self._forced_at: float | None = None
        self._started_at = self._clock.now()
        self._running = False
        self._stopping = asyncio.Event()
        self._status_changed = asyncio.Event()
        self.device_id = ""
        #: the agent stopped to be started again on its new image (``agent run`` exits with 75)
        self.restart_requested = False
        #: the certificate serial the agent started with: an agent on trial waits for a newer one
        self._boot_serial: str | None = None

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> Agent:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def run_until_signalled(
        self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Run until one of ``signals`` arrives (or :meth:`stop`); leaving ``async with`` then shuts down."""
        loop = asyncio.get_running_loop()
        installed = []
        for number in signals:
            loop.add_signal_handler(number, self.stop)
            installed.append(number)
        try:
            await self._stopping.wait()
        finally:
            for number in installed:
                loop.remove_signal_handler(number)
        logger.info("stopping")

    def stop(self) -> None:
        self._stopping.set()

    async def _start(self) -> None:
        settings = self.settings
        self._prepare_directories()
        self._stack.enter_context(StateLock(settings.lock_file))
        root = self._injected_root
        if root is None:
            root = await asyncio.to_thread(open_root_of_trust, settings.root_of_trust)
        self._root = root
        self.device_id = device_id_of(root)
        if root.development_only:
            logger.warning(
                "the root of trust is for development only: whoever reads its key can be the device"
            )
        limits = OutboxLimits(
            max_messages=settings.limits.outbox_max_messages, max_bytes=settings.limits.outbox_max_bytes
        )
        self._outbox = await asyncio.to_thread(Outbox.open, settings.state_dir, limits)
        self._stack.push_async_callback(self._outbox.close)
        self._stack.push_async_callback(self._final_status)
        if settings.updates is not None:
            # before measured boot: a trial a power cut interrupted is rolled back first
            self.updater = self._build_updater(settings.updates)
            if any(recovery.failed for recovery in await asyncio.to_thread(self.updater.recover)):
                settings = self.settings = replace(settings, apps=load_install_records(settings.apps_dir))
        self._boot = await measured_boot(settings, root, report=self._report, clock=self._clock)

        http = self._injected_http
        if http is None:
            http = httpx.AsyncClient(
                verify=trust(settings.ca_file), timeout=settings.limits.http_timeout_seconds
            )
            self._stack.push_async_callback(http.aclose)
        client = EnrollmentClient(settings.authority_url, root, http=http)
        boot = self._boot

        async def enroll() -> OperationalCredential:
            return await client.enroll(boot.log.entries())

        limits_ = settings.limits
        self._renewer = Renewer(
            enroll,
            CredentialFile(settings.credential_file),
            clock=self._clock,
            policy=RenewalPolicy(
                backoff_first_seconds=limits_.renewal_backoff_first_seconds,
                backoff_cap_seconds=limits_.renewal_backoff_cap_seconds,
                last_chance_seconds=limits_.renewal_last_chance_seconds,
            ),
            on_renewed=self._renewed,
            on_refused=self._refused,
            poll_seconds=limits_.renewal_poll_seconds,
        )
        self._link = HubLink(
            LinkSettings(
                device_id=self.device_id,
                host=settings.hub.host,
                port=settings.hub.port,
                hub_name=settings.hub.name,
                module_id=settings.hub.module or None,
                keep_alive_seconds=settings.hub.keep_alive_seconds,
                backoff_initial_seconds=settings.hub.reconnect_first_seconds,
                backoff_max_seconds=settings.hub.reconnect_max_seconds,
                quarantine_retry_seconds=settings.hub.quarantine_retry_seconds,
            ),
            self._outbox,
            CredentialTls(settings.credential_file, settings.ca_file),
        )
        self._stack.push_async_callback(self._renewer.__aexit__, None, None, None)
        started_with = self._renewer.credential
        self._boot_serial = started_with.issued.serial if started_with is not None else None
        await self._renewer.__aenter__()
        self._stack.push_async_callback(self._close_link)
        if self._renewer.credential is not None:
            await self._start_link()

        await self._start_apps(self._boot)

        self._spawn(self._watch_link(), "fleetward-agent-link-watch")
        self._spawn(self._status_loop(), "fleetward-agent-status")
        if self.updater is not None:
            self._link.on_method(CHECK_METHOD, self._check_method)
            self._spawn(self._run_updater(self.updater), "fleetward-agent-updater")
        if settings.intervals.baseline_seconds > 0:
            self._spawn(self._baseline_loop(), "fleetward-agent-baseline")
        if settings.intervals.telemetry_seconds > 0:
            self._spawn(self._health_loop(), "fleetward-agent-health")
        self._stack.push_async_callback(self._stop_tasks)
        self._running = True
        await self._write_status()
        logger.info(
            "agent %s running: %d application(s) launched, %d refused",
            self.device_id,
            len(self._boot.launched),
            len(self._boot.refused),
        )

    def _supervisor_config(self, socket_path: Path) -> SupervisorConfig:
        settings = self.settings
        sandbox = settings.sandbox
        return SupervisorConfig(
            storage_dir=settings.resolved_storage_dir,
            resources=ResourceLimits(),
            restart=RestartPolicy(
                initial_backoff_seconds=sandbox.restart_initial_backoff_seconds,
                max_backoff_seconds=sandbox.restart_max_backoff_seconds,
                crash_loop_crashes=sandbox.crash_loop_crashes,
                crash_loop_window_seconds=sandbox.crash_loop_window_seconds,
            ),
            stop_grace_seconds=sandbox.stop_grace_seconds,
            error_tail_bytes=settings.limits.app_log_bytes,
            first_app_uid=sandbox.first_app_uid,
            app_uid_count=sandbox.app_uid_count,
            agent_socket=socket_path,
            network_namespaces=sandbox.network_namespaces,
        )

    def _prepare_directories(self) -> None:
        settings = self.settings
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        inside = any(
            path.is_relative_to(state)
            for path in (settings.resolved_images_dir, settings.resolved_storage_dir)
        )
        # applications' own users traverse the state directory to reach their image and storage, and list
        # nothing; every file of the agent's own is 0600
        os.chmod(state, 0o711 if inside else 0o700)
        for directory in (settings.logs_dir, settings.apps_dir):
            directory.mkdir(exist_ok=True, mode=0o700)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s failed", name)

        self._tasks.append(asyncio.create_task(run(), name=name))

    async def _stop_tasks(self) -> None:
        self._running = False
        await asyncio.gather(*self._background, return_exceptions=True)  # reports reach the outbox
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _final_status(self) -> None:
        self._running = False
        try:
            await self._write_status()
        except (OSError, FleetwardError) as error:
            logger.warning("the last status could not be written: %s", error)

    # ------------------------------------------------------------------ the credential and the link

    async def _start_link(self) -> None:
        assert self._link is not None
        if not self._link_started:
            self._link_started = True
            await self._link.__aenter__()

    async def _close_link(self) -> None:
        link, outbox = self._link, self._outbox
        if link is None or not self._link_started or outbox is None:
            return
        if link.status.connected and (await outbox.stats()).messages:
            with contextlib.suppress(FleetwardError):
                await link.flush(timeout=self.settings.limits.shutdown_flush_seconds)
        await link.close()

    def _tenant(self) -> str | None:
        """The device's tenant, once it has a certificate (the application API's cloud operations need it)."""
        credential = self._renewer.credential if self._renewer is not None else None
        return credential.issued.tenant_id if credential is not None else None

    async def _renewed(self, credential: OperationalCredential) -> None:
        self._last_refusal = None
        if self._link_started:
            assert self._link is not None
            self._link.reconnect()
        else:
            await self._start_link()
        self._status_changed.set()

    async def _refused(self, refusal: Refusal) -> None:
        self._last_refusal = RefusalStatus(code=refusal.code, message=refusal.message, at=self._clock.now())
        logger.error("the authority refused this device: %s (%s)", refusal.message, refusal.code)
        self._status_changed.set()

    async def _watch_link(self) -> None:
        """A connection the hub refuses (CONNACK "not authorized") sends the renewer to the authority; a
        reconnection makes the updater look for updates at once."""
        assert self._link is not None
        while not self._link_started:
            await asyncio.sleep(0.05)
        failures = self._link.status.failures
        connects = self._link.status.connects
        quarantined = self._link.status.quarantined
        async for link_status in self._link.changes():
            self._status_changed.set()
            if link_status.connects > connects:
                connects = link_status.connects
                if self.updater is not None and connects > 1:
                    # back after a cut: a "check now" sent meanwhile was lost, look at once
                    self.updater.check_now()
            if link_status.quarantined and not quarantined and self.updater is not None:
                # set aside: a remediation release may be waiting (the hub no longer passes "check now")
                self.updater.check_now()
            quarantined = link_status.quarantined
            if link_status.failures == failures:
                continue
            failures = link_status.failures
            if not (link_status.last_error or "").startswith("connect_refused"):
                continue
            now = time.monotonic()
            cooldown = self.settings.limits.forced_renewal_cooldown_seconds
            if self._forced_at is None or now - self._forced_at >= cooldown:
                self._forced_at = now
                logger.warning(
                    "the hub refused the connection (%s): asking the authority", link_status.last_error
                )
                self.renew_now()

    def renew_now(self) -> None:
        """Renew (or re-attest) at once, whatever the schedule."""
        if self._renewer is not None:
            self._renewer.renew_now()

    # ------------------------------------------------------------------ what goes to the cloud

    async def send_telemetry(
        self,
        body: bytes,
        properties: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        critical: bool = False,
    ) -> str:
        """Queue telemetry (returns its message id once it is on disk); the link sends it, in order."""
        if self._outbox is None:
            raise RuntimeError("the agent is not running")
        return await self._outbox.put(body, properties, critical=critical)

    async def _report(self, report: AgentReport) -> None:
        """A failure report: into the outbox as a critical message, at most ``reports_per_hour``."""
        now = time.monotonic()
        while self._report_times and now - self._report_times[0] >= 3600:
            self._report_times.popleft()
        if len(self._report_times) >= self.settings.limits.reports_per_hour:
            self._reports_dropped += 1
            logger.warning(
                "report dropped (more than %d an hour): %s",
                self.settings.limits.reports_per_hour,
                report.kind,
            )
            return
        self._report_times.append(now)
        body = report.model_dump_json().encode()
        try:
            await self.send_telemetry(body, ((REPORT_PROPERTY, report.kind), *JSON_PROPERTIES), critical=True)
        except FleetwardError as error:
            self._reports_dropped += 1
            logger.error("the %s report could not be queued: %s (%s)", report.kind, error.message, error.code)
            return
        self._reports_sent += 1
        logger.info("reported %s of %s", report.kind, getattr(report, "component_id", "?"))
        await self._keep_logs()
        self._status_changed.set()

    async def _baseline_loop(self) -> None:
        intervals = self.settings.intervals
        loop = asyncio.get_running_loop()
        next_report = loop.time() + intervals.baseline_seconds
        while True:
            wait = min(intervals.baseline_sample_seconds, max(0.0, next_report - loop.time()))
            await asyncio.sleep(wait)
            try:
                if loop.time() >= next_report:
                    next_report += intervals.baseline_seconds
                    await self.send_baseline()
                else:
                    await asyncio.to_thread(self._collector.sample)
            except FleetwardError as error:
                logger.warning("the security baseline failed: %s (%s)", error.message, error.code)

    async def send_baseline(self) -> str:
        """Report the security baseline since the last one, now."""
        baseline = await asyncio.to_thread(self._collector.report, self._clock.now())
        properties = ((REPORT_PROPERTY, BASELINE_REPORT), *JSON_PROPERTIES)
        return await self.send_telemetry(baseline.model_dump_json().encode(), properties)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.intervals.telemetry_seconds)
            status = await self.status()
            body = {
                "uptime_seconds": round((self._clock.now() - self._started_at).total_seconds(), 1),
                "apps_running": sum(app.state == "running" for app in status.apps),
                "apps_failed": sum(
                    app.state in ("refused", "crash_loop", "storage_quota_exceeded") for app in status.apps
                ),
                "outbox_messages": status.outbox.messages,
                "outbox_dropped": status.outbox.dropped,
                "certificate_not_after": status.certificate.not_after.isoformat()
                if status.certificate
                else None,
            }
            try:
                await self.send_telemetry(json.dumps(body).encode(), (HEALTH_PROPERTY, *JSON_PROPERTIES))
            except FleetwardError as error:
                logger.warning("the health telemetry could not be queued: %s", error.message)

    # ------------------------------------------------------------------ the applications

    async def _start_apps(self, boot: Boot) -> None:
        """Each launched application: its API server (its own socket), then its supervisor, then the start."""
        settings = self.settings
        sandbox = settings.sandbox
        assert self._outbox is not None
        assert self._link is not None
        assert self._renewer is not None
        self._router = CloudRouter(
            self._link, reserved_methods=AGENT_METHODS, request_timeout_seconds=REQUEST_TIMEOUT_SECONDS
        )
        self._link.on_method(STATUS_METHOD, self._status_method)
        self._identities = UidRangeIdentities(
            settings.resolved_storage_dir / ".uids.json",
            first_uid=sandbox.first_app_uid,
            count=sandbox.app_uid_count,
        )
        self._as_root_now = os.geteuid() == 0 if self._as_root is None else self._as_root
        self._app_services = AppServices(
            on_violation=self._violation,
            tenant_source=self._tenant,
            telemetry=self._outbox,
            cloud=self._router,
            peripherals=self._peripherals,
            storage=DirectoryUsage(settings.resolved_storage_dir),
            certificates=(
                AppCredentialCopies(settings.credential_file, settings.state_dir / "app-credentials")
                if isinstance(settings.root_of_trust, SoftwareRoot)
                else None
            ),
            events=self._events,
            deferrals=self._deferrals,
        )
        sockets = settings.state_dir / "sockets"
        sockets.mkdir(mode=0o711, exist_ok=True)
        os.chmod(sockets, 0o711)  # noqa: S103 - applications reach their own socket (0600) and list nothing
        self._stack.push_async_callback(self._stop_apps)
        for app in boot.launched:
            await self._start_app(app)

    async def _start_app(self, app: LaunchedApp) -> None:
        assert self._app_services is not None
        assert self._identities is not None
        identity = (
            await asyncio.to_thread(self._identities.identity_for, app.component_id)
            if self._as_root_now
            else None
        )
        socket_path = self.settings.state_dir / "sockets" / f"{app.component_id}.sock"
        async with AsyncExitStack() as stack:
            server = AppApiServer(
                AppEndpoint(app.component_id, app.manifest.capabilities, socket_path, identity),
                self._app_services,
            )
            await stack.enter_async_context(server)
            supervisor = Supervisor(
                self._supervisor_config(socket_path),
                report=self._report,
                identities=self._identities,
                as_root=self._as_root_now,
                clock=self._clock,
                resolver=self._resolver,
                on_blocked=self._blocked,
                on_allowed=self._collector.allowed,
            )
            await stack.enter_async_context(supervisor)
            await supervisor.start(app)
            self._app_stacks[app.component_id] = stack.pop_all()
        self._supervisors[app.component_id] = supervisor
        self._apps[app.component_id] = app

    async def _stop_app(self, component_id: str, *, forget: bool = True) -> None:
        """Stop one application and close its API server; ``forget=False`` keeps its handle for the status."""
        stack = self._app_stacks.pop(component_id, None)
        if forget:
            self._supervisors.pop(component_id, None)
            self._apps.pop(component_id, None)
        if stack is not None:
            await stack.aclose()

    async def _stop_apps(self) -> None:
        for component_id in reversed(list(self._app_stacks)):
            await self._stop_app(component_id, forget=False)

    # ------------------------------------------------------------------ updates (the updater's AppControl)

    async def replace(self, record: InstallRecord | None, component_id: str) -> None:
        """Stop ``component_id`` if it runs, then measured-launch ``record`` and start it (``None``: stop)."""
        await self._stop_app(component_id)
        if record is not None:
            launched = await self._launcher().launch(record)
            await self._start_app(launched)
        self._status_changed.set()

    async def trial(self, component_id: str, seconds: float) -> str | None:
        """``None`` if the application, once started, runs for ``seconds`` without a crash; else what
        happened. The trial's time counts from the start (a loaded device may take a while to get there,
        up to :data:`TRIAL_START_SECONDS`)."""
        handle = self.app(component_id)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        give_up = loop.time() + TRIAL_START_SECONDS
        restarts = handle.restart_count
        while True:
            if handle.state in (AppState.CRASH_LOOP, AppState.STOPPED, AppState.STORAGE_QUOTA_EXCEEDED):
                return f"the application is {handle.state.value}: {last_line(handle.error_tail())}"[
                    :MAX_REASON_CHARS
                ]
            if handle.restart_count > restarts or handle.state is AppState.BACKING_OFF:
                return f"the application crashed during its trial: {last_line(handle.error_tail())}"[
                    :MAX_REASON_CHARS
                ]
            now = loop.time()
            if deadline is None:
                if handle.state is AppState.RUNNING:
                    deadline = now + seconds
                elif now >= give_up:
                    return f"the application did not start within {TRIAL_START_SECONDS:g} s"
            elif now >= deadline:
                return None
            await asyncio.sleep(0.05 if deadline is None else min(0.05, max(0.0, deadline - now)))

    def deferred_until(self, component_id: str) -> dt.datetime | None:
        return self._deferrals.deferred_until(component_id)

    def announce(self, event: SystemEvent) -> None:
        self._events.publish(event)

    def deferral_done(self, component_id: str) -> None:
        self._deferrals.reset(component_id)

    def restart_agent(self) -> None:
        """Stop cleanly, to be started again on the agent image now on trial (``agent run`` exits 75)."""
        self.restart_requested = True
        self.stop()

    async def _confirm_agent(self, updater: Updater) -> None:
        """This agent is on trial: healthy once the authority issued it a certificate for its measurement
        (attesting again at once) and the hub link is up; then the slot is kept. If it does not get there
        within :data:`AGENT_HEALTH_SECONDS`, it restarts: the launcher rolls back at its second start."""
        assert self._renewer is not None
        assert self._link is not None
        credential = self._renewer.credential
        if credential is not None and credential.issued.serial == self._boot_serial:
            self._renewer.renew_now()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AGENT_HEALTH_SECONDS
        while True:
            credential = self._renewer.credential
            fresh = credential is not None and credential.issued.serial != self._boot_serial
            if fresh and self._link.status.connected:
                await updater.commit_agent()
                return
            if loop.time() > deadline:
                logger.error(
                    "the new agent is not healthy after %g s (certificate: %s, hub: %s): restarting",
                    AGENT_HEALTH_SECONDS,
                    "new" if fresh else "none for this measurement",
                    "connected" if self._link.status.connected else "not connected",
                )
                self.restart_agent()
                return
            await asyncio.sleep(0.1)

    def _build_updater(self, updates: UpdateSettings) -> Updater:
        settings = self.settings
        try:
            bootstrap = updates.root_file.read_bytes()
        except OSError as error:
            raise ConfigurationError(
                f"cannot read updates.root_file {updates.root_file}: {error.strerror}"
            ) from None
        client = UpdateClient(
            UpdateClientSettings(
                base_url=settings.authority_url,
                metadata_dir=settings.state_dir / "updates" / "metadata",
                device_id=self.device_id,
                product_id=updates.product_id,
                max_image_bytes=updates.max_image_bytes,
                timeout_seconds=settings.limits.http_timeout_seconds,
                ca_file=settings.ca_file,
            ),
            bootstrap,
            self._update_token,
            clock=self._clock,
        )
        self._stack.callback(client.close)
        return Updater(
            UpdaterSettings(
                state_dir=settings.state_dir,
                apps_dir=settings.apps_dir,
                poll_seconds=updates.poll_seconds,
                trial_seconds=updates.trial_seconds,
                agent_sha256=settings.measurement.sha256,
                notice_seconds=updates.notice_seconds,
            ),
            client,
            self,
            clock=self._clock,
            # the certificate attests what runs: a new application version earns a fresh attestation
            on_installed=self.renew_now,
        )

    async def _run_updater(self, updater: Updater) -> None:
        """Updates are asked for with the operational certificate: wait for the first one."""
        while self._renewer is None or self._renewer.credential is None:
            await asyncio.sleep(0.2)
        if updater.agent_trial() is not None:
            await self._confirm_agent(updater)
            if self.restart_requested:
                return
        await updater.run()

    def _update_token(self) -> str:
        """The device token for an update request: the operational key signs the serial and the time."""
        credential = self._renewer.credential if self._renewer is not None else None
        if credential is None:
            raise TransportError("no operational certificate yet: updates wait for enrollment")
        return device_token(credential.key, credential.issued.serial, int(self._clock.now().timestamp()))

    async def _check_method(self, call: MethodCall) -> MethodResult:
        """``fleetward.checkForUpdates``: look for updates now (the check runs after the answer)."""
        assert self.updater is not None
        self.updater.check_now()
        return MethodResult(202, b'{"checking":true}')

    def _launcher(self) -> Launcher:
        if self._update_launcher is None:
            self._update_launcher = Launcher(
                self.settings.launch_config(), report=self._report, log=self.boot.log, clock=self._clock
            )
        return self._update_launcher

    def app(self, component_id: str) -> AppHandle:
        """The supervised application ``component_id`` (``NotFound`` if it was not launched)."""
        try:
            return self._supervisors[component_id].handle(component_id)
        except KeyError:
            raise NotFound(f"no application {component_id} runs", code="app_not_found") from None

    async def _violation(self, component_id: str, capability: str, detail: str | int | None) -> None:
        """An application was refused what its manifest does not declare: a security event for the cloud."""
        self._violations += 1
        logger.warning(
            "application %s asked for %s%s, which its manifest does not declare",
            component_id,
            capability,
            f" ({detail})" if detail is not None else "",
        )
        self._status_changed.set()
        await self._report(
            CapabilityDeniedReport(
                component_id=component_id,
                capability=capability,
                detail="" if detail is None else str(detail)[:MAX_REASON_CHARS],
                occurred_at=self._clock.now(),
            )
        )

    def _blocked(self, component_id: str, host: str, port: int) -> None:
        """The proxy refused an application a connection: counted in the baseline, reported as a violation."""
        self._collector.blocked(component_id, host, port)
        task = asyncio.get_running_loop().create_task(
            self._violation(component_id, "AllowedConnections", f"{host}:{port}")
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _status_method(self, call: MethodCall) -> MethodResult:
        """The agent's own direct method: its status snapshot."""
        status = await self.status()
        return MethodResult(200, status.model_dump_json().encode())

    # ------------------------------------------------------------------ status

    @property
    def boot(self) -> Boot:
        if self._boot is None:
            raise RuntimeError("the agent is not running")
        return self._boot

    async def status(self) -> AgentStatus:
        """A snapshot: identity, certificate, link, outbox, applications, the authority's last refusal."""
        root = self._root
        credential = self._renewer.credential if self._renewer is not None else None
        certificate = None
        if credential is not None and self._renewer is not None:
            certificate = CertificateStatus.of(credential.issued, self._renewer.state.renew_at)
        outbox = OutboxState()
        if self._outbox is not None:
            with contextlib.suppress(FleetwardError):
                stats = await self._outbox.stats()
                outbox = OutboxState(
                    messages=stats.messages,
                    bytes=stats.bytes,
                    in_flight=stats.in_flight,
                    dropped=stats.dropped,
                )
        link = LinkState()
        if self._link is not None:
            current = self._link.status
            link = LinkState(
                started=self._link_started,
                connected=current.connected,
                quarantined=current.quarantined,
                connects=current.connects,
                failures=current.failures,
                sent=current.sent,
                acknowledged=current.acknowledged,
                last_error=current.last_error,
            )
        return AgentStatus(
            running=self._running,
            pid=os.getpid(),
            updated_at=self._clock.now(),
            started_at=self._started_at,
            device_id=self.device_id or None,
            root_of_trust=root_kind(root) if root is not None else None,
            development_only=root.development_only if root is not None else None,
            measurements=len(self._boot.log.entries()) if self._boot is not None else 0,
            certificate=certificate,
            link=link,
            outbox=outbox,
            reports_sent=self._reports_sent,
            reports_dropped=self._reports_dropped,
            violations=self._violations,
            apps=self._app_statuses(),
            last_refusal=self._last_refusal,
            updates=self._update_status(),
            agent_version=self.settings.measurement.version,
            agent_sha256=self.settings.measurement.sha256,
        )

    def _app_statuses(self) -> tuple[AppStatus, ...]:
        if self._boot is None:
            return ()
        statuses = [
            AppStatus(
                component_id=refused.record.component_id,
                version=refused.record.version,
                image_sha256=refused.record.package_sha256,
                state="refused",
                reason=refused.code,
                message=refused.message,
            )
            for refused in self._boot.refused
        ]
        for app in self._current_apps():
            state, pid, restarts = "pending", None, 0
            if app.component_id in self._supervisors:
                try:
                    handle = self.app(app.component_id)
                except NotFound:
                    pass
                else:
                    state, pid, restarts = handle.state.value, handle.pid, handle.restart_count
            statuses.append(
                AppStatus(
                    component_id=app.component_id,
                    version=app.record.version,
                    image_sha256=app.image_sha256,
                    state=state,
                    pid=pid,
                    restart_count=restarts,
                )
            )
        return tuple(sorted(statuses, key=lambda item: item.component_id))

    def _update_status(self) -> UpdateStatus | None:
        updater = self.updater
        if updater is None:
            return None
        return UpdateStatus(
            checks=updater.checks,
            last_error=updater.last_error,
            pending_results=len(updater.pending_results()),
            retry_at=updater.retry_at,
        )

    def _current_apps(self) -> list[LaunchedApp]:
        """What runs now: what the boot launched, as updates have since replaced it."""
        launched = {app.component_id: app for app in self.boot.launched} | self._apps
        return list(launched.values())

    async def _keep_logs(self) -> None:
        if self._boot is None:
            return
        tails = []
        for app in self._current_apps():
            try:
                handle = self.app(app.component_id)
            except NotFound:
                continue
            tails.append((app.component_id, handle.output_tail(), handle.error_tail()))

        def keep() -> None:
            for tail in tails:
                self._logs.keep(*tail)

        await asyncio.to_thread(keep)

    async def _write_status(self) -> None:
        status = await self.status()
        await self._keep_logs()
        await asyncio.to_thread(write_status, self.settings.status_file, status)

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), self.settings.intervals.status_seconds)
            self._status_changed.clear()
            try:
                await self._write_status()
            except (OSError, FleetwardError) as error:
                logger.warning("the status could not be written: %s", error)
