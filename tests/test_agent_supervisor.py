"""The application supervisor, with real processes: confinement, crash reports, backoff, crash loops, stop.

Applications are small Python scripts. The backoff sleep is injected (it records the delays and returns at
once) and the clock is a ``FakeClock``, so a crash loop takes milliseconds. The tests run as root: the
root-mode tests check the per-application user for real, and the non-root mode is tested by telling the
supervisor it is not root (``as_root=False``), not by skipping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetward.agent.sandbox import (
    NOT_YET_ENFORCED,
    ResourceLimits,
    UidRangeIdentities,
    measure_storage,
)
from fleetward.agent.supervisor import (
    AppHandle,
    AppState,
    CrashHistory,
    RestartPolicy,
    Supervisor,
    SupervisorConfig,
)
from fleetward.clock import FakeClock
from fleetward.errors import ConfigurationError, Conflict, NotFound
from fleetward.wire.reports import CrashLoopReport, CrashReport, StorageQuotaReport, normalise_line
from tests.agent_apps import COMPONENT, OTHER_COMPONENT, AppWorld, reachable_directory, running_as_root

requires_root = pytest.mark.skipif(not running_as_root(), reason="the per-application user needs root")
MODES = [pytest.param(True, id="as-root", marks=requires_root), pytest.param(False, id="not-root")]
LIMITS = ResourceLimits(address_space_bytes=256 * 1024 * 1024, open_files=32, processes=16, cpu_seconds=120)
SLEEPER = """
import time
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def world() -> Iterator[AppWorld]:
    with reachable_directory() as base:
        yield AppWorld(base)


class RecordedSleep:
    """The backoff sleep: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def supervisor(
    world: AppWorld,
    *,
    as_root: bool,
    clock: FakeClock | None = None,
    sleep: RecordedSleep | None = None,
    **options: object,
) -> Supervisor:
    chosen = {"stop_grace_seconds": 1.0, "output_drain_seconds": 1.0, "resources": LIMITS, **options}
    config = SupervisorConfig(storage_dir=world.storage_dir, **chosen)  # type: ignore[arg-type]
    return Supervisor(
        config,
        report=world.reporter,
        as_root=as_root,
        clock=clock or FakeClock(),
        sleep=sleep or RecordedSleep(),
    )


async def wait_until(condition: Callable[[], bool], timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true")
        await asyncio.sleep(0.01)


async def started(handle: AppHandle) -> int:
    """Wait until the application itself (not the trampoline) runs and says so; return its pid."""
    await wait_until(lambda: "ready" in handle.output_tail())
    assert handle.pid is not None
    return handle.pid


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    limits = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), line[26:47].strip(), line[47:68].strip()
        limits[name] = (soft, hard)
    return limits


def proc_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00")
    return dict(entry.decode().split("=", 1) for entry in entries if entry)


def children_of(parent: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == parent:
                children.add(int(entry.name))
    return children


def alive(pid: int) -> bool:
    """Running or a zombie: anything but gone (reaped)."""
    try:
        return proc_status(pid)["State"][0] != "X"
    except FileNotFoundError:
        return False


def running_process(pid: int) -> bool:
    """Running: neither gone nor a zombie (an orphan's zombie is init's to reap, not the agent's)."""
    try:
        return proc_status(pid)["State"][0] not in "XZ"
    except FileNotFoundError:
        return False


# --- confinement -------------------------------------------------------------------------------------------


@requires_root
async def test_as_root_an_application_runs_as_its_own_user_confined(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=True, storage_kb=64)
    socket = Path("/run/fleetward/agent.sock")
    async with supervisor(world, as_root=True, agent_socket=socket) as running:
        assert running.enforcement.not_enforced() == NOT_YET_ENFORCED
        pid = await started(await running.start(launched))
        status = proc_status(pid)
        uid = int(status["Uid"].split()[0])
        assert uid >= 200_000
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(uid)] * 4
        assert status["Groups"] == ""
        assert status["NoNewPrivs"] == "1"

        limits = proc_limits(pid)
        assert limits["Max address space"] == (str(256 * 1024 * 1024),) * 2
        assert limits["Max open files"] == ("32", "32")
        assert limits["Max processes"] == ("16", "16")
        assert limits["Max cpu time"] == ("120", "120")
        assert limits["Max file size"] == (str(64 * 1024),) * 2
        assert limits["Max core file size"] == ("0", "0")

        storage = world.storage_dir / COMPONENT
        assert Path(f"/proc/{pid}/cwd").readlink() == storage
        assert storage.stat().st_uid == uid
        assert stat.S_IMODE(storage.stat().st_mode) == 0o700
        assert proc_environment(pid) == {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(storage),
            "LANG": "C.UTF-8",
            "FLEETWARD_COMPONENT_ID": COMPONENT,
            "FLEETWARD_STORAGE_DIR": str(storage),
            "FLEETWARD_AGENT_SOCKET": str(socket),
        }


@requires_root
async def test_as_root_each_application_has_its_own_user_and_keeps_it(world: AppWorld) -> None:
    first = await world.launch_script(SLEEPER, own_user=True)
    second = await world.launch_script(SLEEPER, own_user=True, component_id=OTHER_COMPONENT)
    async with supervisor(world, as_root=True) as running:
        uid_of = {}
        for launched in (first, second):
            pid = await started(await running.start(launched))
            uid_of[launched.component_id] = int(proc_status(pid)["Uid"].split()[0])
        await running.stop(COMPONENT)
        pid = await started(await running.start(first))
        assert int(proc_status(pid)["Uid"].split()[0]) == uid_of[COMPONENT]
    assert len(set(uid_of.values())) == 2


@requires_root
async def test_as_root_an_application_without_mutable_storage_cannot_write_its_directory(
    world: AppWorld,
) -> None:
    body = """
try:
    open("note", "w").close()
    print("wrote", flush=True)
except PermissionError:
    print("denied", flush=True)
print("ready", flush=True)
import time; time.sleep(60)
"""
    launched = await world.launch_script(body, own_user=True)
    async with supervisor(world, as_root=True) as running:
        handle = await running.start(launched)
        await started(handle)
        assert "denied" in handle.output_tail()
        storage = world.storage_dir / COMPONENT
        assert (storage.stat().st_uid, stat.S_IMODE(storage.stat().st_mode)) == (0, 0o555)


async def test_not_as_root_the_limits_still_apply_and_the_gaps_are_stated(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=False, storage_kb=8)
    async with supervisor(world, as_root=False) as running:
        gaps = running.enforcement.not_enforced()
        assert any(gap.startswith("own user") for gap in gaps)
        assert any(gap.startswith("RLIMIT_NPROC") for gap in gaps)
        assert set(NOT_YET_ENFORCED) <= set(gaps)
        pid = await started(await running.start(launched))
        status = proc_status(pid)
        assert status["Uid"].split() == [str(os.geteuid())] * 4
        assert status["NoNewPrivs"] == "1"
        limits = proc_limits(pid)
        assert limits["Max open files"] == ("32", "32")
        assert limits["Max file size"] == (str(8 * 1024),) * 2
        storage = world.storage_dir / COMPONENT
        assert Path(f"/proc/{pid}/cwd").readlink() == storage
        assert (storage.stat().st_uid, stat.S_IMODE(storage.stat().st_mode)) == (os.geteuid(), 0o700)


@pytest.mark.parametrize("as_root", MODES)
async def test_a_file_larger_than_the_quota_cannot_be_written_and_a_full_storage_stops_the_app(
    world: AppWorld, as_root: bool
) -> None:
    body = """
import errno
try:
    with open("big", "wb") as big:
        big.write(b"x" * 20 * 1024)
except OSError as error:
    print(errno.errorcode[error.errno], flush=True)
for index in range(3):
    with open(f"part{index}", "wb") as part:
        part.write(b"x" * 8 * 1024)
print("ready", flush=True)
import time; time.sleep(60)
"""
    launched = await world.launch_script(body, own_user=as_root, storage_kb=16)
    before = children_of(os.getpid())
    async with supervisor(world, as_root=as_root, storage_check_interval_seconds=0.05) as running:
        handle = await running.start(launched)
        await handle.wait_for(AppState.STORAGE_QUOTA_EXCEEDED)
        assert "EFBIG" in handle.output_tail()
        assert children_of(os.getpid()) <= before
    [report] = world.reporter.reports
    assert isinstance(report, StorageQuotaReport)
    assert report.quota_bytes == 16 * 1024
    assert report.used_bytes > 16 * 1024
    assert report.component_id == COMPONENT


async def test_an_application_over_quota_is_not_started_again(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=False, storage_kb=4)
    storage = world.storage_dir / COMPONENT
    storage.mkdir(parents=True)
    (storage / "left-over").write_bytes(b"x" * 64 * 1024)
    async with supervisor(world, as_root=False) as running:
        handle = await running.start(launched)
        await handle.wait_for(AppState.STORAGE_QUOTA_EXCEEDED)
        assert handle.output_tail() == ""
    assert [report.kind for report in world.reporter.reports] == ["storage_quota_exceeded"]


# --- crashes -----------------------------------------------------------------------------------------------

CRASHER = """
import os, signal, sys
runs = len([name for name in os.listdir(".") if name.startswith("run")])
open(f"run{runs}", "w").close()
print(f"worker {os.getpid()}: starting", file=sys.stderr)
print(f"fatal: bad pointer 0x{0x7F3A0000 + runs * 4096:x} in frame {runs}", file=sys.stderr, flush=True)
if runs == 1:
    os.kill(os.getpid(), signal.SIGSEGV)
if runs == 2:
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(3)
"""


@pytest.mark.parametrize("as_root", MODES)
async def test_a_crashing_application_is_reported_restarted_with_growing_delays_then_a_crash_loop(
    world: AppWorld, as_root: bool
) -> None:
    launched = await world.launch_script(CRASHER, own_user=as_root, storage_kb=16)
    clock = FakeClock(dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    policy = RestartPolicy(
        initial_backoff_seconds=1, backoff_factor=2, max_backoff_seconds=3, crash_loop_crashes=4
    )
    sleep = RecordedSleep()
    async with supervisor(world, as_root=as_root, clock=clock, sleep=sleep, restart=policy) as running:
        handle = await running.start(launched)
        await handle.wait_for(AppState.CRASH_LOOP)
        assert sleep.delays == [1.0, 2.0, 3.0]
        assert handle.restart_count == 3
        assert handle.pid is None

    *crashes, loop = world.reporter.reports
    assert all(isinstance(crash, CrashReport) for crash in crashes)
    assert [(c.exit_code, c.signal, c.restart_count) for c in crashes] == [  # type: ignore[union-attr]
        (3, None, 0),
        (None, signal.SIGSEGV, 1),
        (None, signal.SIGKILL, 2),
        (3, None, 3),
    ]
    for runs, crash in enumerate(crashes):
        assert isinstance(crash, CrashReport)
        assert crash.component_id == COMPONENT
        assert crash.image_sha256 == launched.image_sha256
        assert crash.occurred_at == clock.now()
        assert crash.error_tail.startswith("worker ")
        assert crash.error_tail.endswith(
            f"fatal: bad pointer 0x{0x7F3A0000 + runs * 4096:x} in frame {runs}\n"
        )
    assert loop == CrashLoopReport(
        component_id=COMPONENT,
        image_sha256=launched.image_sha256,
        crashes=4,
        window_seconds=policy.crash_loop_window_seconds,
        occurred_at=clock.now(),
    )
    first, segfault, killed, again = crashes
    assert isinstance(first, CrashReport)
    assert isinstance(again, CrashReport)
    assert isinstance(segfault, CrashReport)
    assert isinstance(killed, CrashReport)
    assert first.signature() == again.signature()
    assert len({first.signature(), segfault.signature(), killed.signature()}) == 3
    assert not (world.storage_dir / COMPONENT / "core").exists()


async def test_a_long_error_output_is_cut_to_its_tail(world: AppWorld) -> None:
    body = """
import sys
for index in range(4000):
    print(f"line {index:05d} " + "x" * 40, file=sys.stderr)
print("the very end", file=sys.stderr)
sys.exit(1)
"""
    launched = await world.launch_script(body, own_user=False)
    async with supervisor(world, as_root=False, restart=RestartPolicy(crash_loop_crashes=1)) as running:
        await (await running.start(launched)).wait_for(AppState.CRASH_LOOP)
    crash = world.reporter.reports[0]
    assert isinstance(crash, CrashReport)
    assert crash.exit_code == 1
    assert 8000 < len(crash.error_tail) <= 8 * 1024
    assert crash.error_tail.endswith("line 03999 " + "x" * 40 + "\nthe very end\n")


async def test_an_entry_point_that_cannot_be_executed_is_a_crash_with_the_reason(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=False)
    launched.entry_path.chmod(0o755)
    launched.entry_path.write_text("#!/nonexistent/python\n")
    async with supervisor(world, as_root=False, restart=RestartPolicy(crash_loop_crashes=1)) as running:
        await (await running.start(launched)).wait_for(AppState.CRASH_LOOP)
    crash = world.reporter.reports[0]
    assert isinstance(crash, CrashReport)
    assert crash.exit_code == 127
    assert "the application cannot start" in crash.error_tail


async def test_a_missing_interpreter_is_a_crash_with_the_reason(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=False)
    restart = RestartPolicy(crash_loop_crashes=1)
    async with supervisor(world, as_root=False, restart=restart, interpreter=Path("/nonexistent")) as running:
        await (await running.start(launched)).wait_for(AppState.CRASH_LOOP)
    crash = world.reporter.reports[0]
    assert isinstance(crash, CrashReport)
    assert (crash.exit_code, "could not start" in crash.error_tail) == (127, True)


# --- stopping ----------------------------------------------------------------------------------------------

STUBBORN = """
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "60"])
print(f"child {child.pid}", flush=True)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("as_root", MODES)
async def test_stopping_the_supervisor_kills_what_ignores_sigterm_and_leaves_no_process(
    world: AppWorld, as_root: bool
) -> None:
    launched = await world.launch_script(STUBBORN, own_user=as_root)
    before = children_of(os.getpid())
    async with supervisor(world, as_root=as_root, stop_grace_seconds=0.3) as running:
        handle = await running.start(launched)
        pid = await started(handle)
        grandchild = int(handle.output_tail().split("child ")[1].split()[0])
        assert running_process(grandchild)
        stopping_from = time.monotonic()
    assert time.monotonic() - stopping_from >= 0.3
    assert handle.state is AppState.STOPPED
    assert not alive(pid)
    await wait_until(lambda: not running_process(grandchild), timeout_seconds=5)
    assert children_of(os.getpid()) <= before
    assert world.reporter.reports == []


async def test_an_application_told_to_stop_is_not_a_crash_and_is_not_restarted(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=False)
    sleep = RecordedSleep()
    async with supervisor(world, as_root=False, sleep=sleep) as running:
        handle = await running.start(launched)
        pid = await started(handle)
        await running.stop(COMPONENT)
        assert handle.state is AppState.STOPPED
        assert not alive(pid)
        await asyncio.sleep(0.1)
        assert handle.state is AppState.STOPPED
    assert world.reporter.reports == []
    assert sleep.delays == []


async def test_stopping_during_the_backoff_returns_at_once(world: AppWorld) -> None:
    launched = await world.launch_script("import sys; sys.exit(2)", own_user=False)
    config = SupervisorConfig(storage_dir=world.storage_dir)

    async def forever(seconds: float) -> None:
        await asyncio.Event().wait()

    running = Supervisor(config, report=world.reporter, as_root=False, sleep=forever)
    async with running:
        handle = await running.start(launched)
        await handle.wait_for(AppState.BACKING_OFF)
        stopping_from = time.monotonic()
    assert time.monotonic() - stopping_from < 2
    assert handle.state is AppState.STOPPED
    assert [report.kind for report in world.reporter.reports] == ["crash"]


async def test_the_supervisor_refuses_what_it_cannot_do(world: AppWorld) -> None:
    launched = await world.launch_script(SLEEPER, own_user=False)
    running = supervisor(world, as_root=False)
    with pytest.raises(RuntimeError, match="async with"):
        await running.start(launched)
    async with running:
        await running.start(launched)
        with pytest.raises(Conflict):
            await running.start(launched)
        with pytest.raises(NotFound):
            running.handle(OTHER_COMPONENT)
    with pytest.raises(ValueError, match="error_tail_bytes"):
        SupervisorConfig(storage_dir=world.storage_dir, error_tail_bytes=100_000)


# --- the pure core of restarting ---------------------------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("crashes", "delays", "loops"),
    [
        # (time of crash, how long the run lasted)
        ([(0, 0), (1, 0), (3, 0), (7, 0)], [1, 2, 4, 8], [False, False, False, False]),
        ([(0, 0)] * 6, [1, 2, 4, 8, 10, 10], [False, False, False, False, True, True]),
        ([(0, 0), (100, 90), (101, 0)], [1, 1, 2], [False, False, False]),
        ([(0, 0), (400, 0), (800, 0), (1200, 0), (1600, 0)], [1, 2, 4, 8, 10], [False] * 5),
        ([(0, 0), (1, 0), (2, 0), (3, 0), (599, 0)], [1, 2, 4, 8, 10], [False, False, False, False, True]),
        ([(0, 0), (1, 0), (2, 0), (3, 0), (600, 0)], [1, 2, 4, 8, 10], [False] * 5),
    ],
    ids=[
        "doubling",
        "loop after five",
        "a stable run resets",
        "spread out",
        "inside the window",
        "window edge",
    ],
)
def test_backoff_doubles_is_capped_and_a_crash_loop_needs_n_crashes_in_the_window(
    crashes: list[tuple[float, float]], delays: list[float], loops: list[bool]
) -> None:
    policy = RestartPolicy(max_backoff_seconds=10, crash_loop_crashes=5, crash_loop_window_seconds=600)
    history = CrashHistory(policy)
    decisions = [history.record(at=at(time_), ran_for_seconds=ran) for time_, ran in crashes]
    assert [decision.delay_seconds for decision in decisions] == delays
    assert [decision.crash_loop for decision in decisions] == loops


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 120)), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=8),
)
def test_property_delays_stay_within_bounds_and_loops_match_the_window(
    steps: list[tuple[float, float]], crash_loop_crashes: int
) -> None:
    policy = RestartPolicy(
        initial_backoff_seconds=0.5,
        max_backoff_seconds=30,
        crash_loop_crashes=crash_loop_crashes,
        crash_loop_window_seconds=300,
        stable_after_seconds=60,
    )
    history = CrashHistory(policy)
    now, times, previous = 0.0, [], 0.0
    for gap, ran in steps:
        now += gap
        times.append(now)
        decision = history.record(at=at(now), ran_for_seconds=ran)
        assert 0.5 <= decision.delay_seconds <= 30
        if ran >= 60:
            assert decision.delay_seconds == 0.5
        else:
            assert decision.delay_seconds >= min(previous, 30)
        previous = decision.delay_seconds
        in_window = [moment for moment in times if at(now) - at(moment) < dt.timedelta(seconds=300)]
        assert decision.crash_loop == (len(in_window) >= crash_loop_crashes)


def test_a_restart_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        RestartPolicy(crash_loop_crashes=0)
    with pytest.raises(ValueError, match="at least 1"):
        RestartPolicy(backoff_factor=0.5)
    with pytest.raises(ValueError, match="not be shorter"):
        RestartPolicy(initial_backoff_seconds=10, max_backoff_seconds=5)
    with pytest.raises(TypeError):
        RestartPolicy(crash_loop_crashes=True)


# --- crash reports and their signatures --------------------------------------------------------------------


def crash(
    tail: str, *, exit_code: int | None = None, signal_number: int | None = None, component: str = COMPONENT
) -> CrashReport:
    return CrashReport(
        component_id=component,
        image_sha256="ab" * 32,
        exit_code=exit_code,
        signal=signal_number,
        error_tail=tail,
        occurred_at=T0,
        restart_count=0,
    )


def test_two_alike_crashes_with_different_addresses_share_a_signature() -> None:
    first = crash("starting\nSegmentation fault at 0x7ffd1234abcd (pid 4121, tid 4122)\n\n", signal_number=11)
    second = crash("boot\nSegmentation fault at 0x55e0aa10 (pid 77, tid 78)\n", signal_number=11)
    assert first.signature() == second.signature()
    assert crash("Segmentation fault at 0x1 (pid 1, tid 1)", signal_number=6).signature() != first.signature()
    assert crash("Segmentation fault at 0x1 (pid 1, tid 1)", exit_code=11).signature() != first.signature()
    assert crash("Bus error at 0x1 (pid 1, tid 1)", signal_number=11).signature() != first.signature()
    other_app = crash("Segmentation fault at 0x1 (pid 1, tid 1)", signal_number=11, component=OTHER_COMPONENT)
    assert other_app.signature() != first.signature()


@pytest.mark.parametrize(
    ("line", "normalised"),
    [
        ("fatal: bad pointer 0x7f3a1000 in frame 3", "fatal: bad pointer 0x? in frame <n>"),
        ("session 1b4e28ba-2fa1-11d2-883f-0016d3cca427 lost", "session <hex>-<hex>-<hex>-<hex>-<hex> lost"),
        ("ValueError: could not convert 'abc' at line 12", "ValueError: could not convert 'abc' at line <n>"),
        ("  deadbeef   face  ", "deadbeef face"),
    ],
)
def test_crash_lines_are_normalised_before_they_are_hashed(line: str, normalised: str) -> None:
    assert normalise_line(line) == normalised


def test_a_crash_report_has_an_exit_code_or_a_signal_and_a_bounded_tail() -> None:
    with pytest.raises(ValidationError, match="either an exit code or a signal"):
        crash("x")
    with pytest.raises(ValidationError, match="either an exit code or a signal"):
        crash("x", exit_code=1, signal_number=9)
    with pytest.raises(ValidationError):
        crash("x" * (8 * 1024 + 1), exit_code=1)
    with pytest.raises(ValidationError, match="timezone-aware"):
        CrashReport(
            component_id=COMPONENT,
            image_sha256="ab" * 32,
            exit_code=1,
            occurred_at=dt.datetime(2026, 1, 1),
            restart_count=0,
        )
    assert crash("x", signal_number=9).exit_status == "SIGKILL"
    assert crash("x", exit_code=3).exit_status == "exit 3"


# --- application users and storage -------------------------------------------------------------------------


def test_uids_come_from_the_range_are_remembered_and_skip_the_systems(tmp_path: Path) -> None:
    table = tmp_path / "uids.json"
    identities = UidRangeIdentities(table, first_uid=65_534, count=4)  # 65534 is nobody on this system
    first = identities.identity_for(COMPONENT)
    second = identities.identity_for(OTHER_COMPONENT)
    assert first.uid != 65_534
    assert second.uid != 65_534
    assert first != second
    assert UidRangeIdentities(table, first_uid=65_534, count=4).identity_for(COMPONENT) == first
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    small = UidRangeIdentities(tmp_path / "small.json", first_uid=300_000, count=1)
    small.identity_for(COMPONENT)
    with pytest.raises(ConfigurationError, match="no free uid"):
        small.identity_for(OTHER_COMPONENT)
    (tmp_path / "bad.json").write_text('{"x": "y"}')
    with pytest.raises(ConfigurationError, match="not a map"):
        UidRangeIdentities(tmp_path / "bad.json").identity_for(COMPONENT)
    with pytest.raises(ConfigurationError):
        UidRangeIdentities(table, first_uid=0)


def test_storage_is_measured_without_following_links_and_the_walk_is_bounded(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 1024 * 1024)
    storage = tmp_path / "storage"
    (storage / "a" / "b").mkdir(parents=True)
    (storage / "a" / "b" / "data").write_bytes(b"x" * 10_000)
    (storage / "link").symlink_to(outside)
    (storage / "dirlink").symlink_to(tmp_path)
    usage = measure_storage(storage, max_entries=100)
    assert usage.entries == 5
    assert 10_000 <= usage.used_bytes < 1024 * 1024
    for index in range(50):
        (storage / f"empty{index}").touch()
    assert measure_storage(storage, max_entries=20).entries == 21


def test_resource_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        ResourceLimits(open_files=0)
    with pytest.raises(TypeError):
        ResourceLimits(open_files=1.5)  # type: ignore[arg-type]
    assert ("RLIMIT_CORE", 0) in ResourceLimits().rlimits(file_size_bytes=0)


def test_the_trampoline_runs_with_the_agents_interpreter_by_default(tmp_path: Path) -> None:
    assert SupervisorConfig(storage_dir=tmp_path).interpreter == Path(sys.executable)
