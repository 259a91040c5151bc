"""How one application process is confined: its user, its limits, its environment, its storage.

The supervisor starts every application through a small trampoline: the agent's own Python, isolated
(``-I -S``), running the stdlib-only code in :data:`TRAMPOLINE` in the new process, which

1. sets the resource limits (``RLIMIT_AS``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, ``RLIMIT_CPU`` from the
   configuration, ``RLIMIT_FSIZE`` = the storage quota, ``RLIMIT_CORE`` = 0), soft and hard alike;
2. when the agent is root: enters the application's network namespace (``setns`` on the descriptor the
   agent passed, which it then closes, and checks it is in; see :mod:`fleetward.agent.netns`);
3. sets ``PR_SET_NO_NEW_PRIVS`` with ``prctl`` (through ctypes), so nothing the application executes can
   gain privileges (set-id binaries, file capabilities);
4. when the agent is root: drops every supplementary group and becomes the application's own uid and
   gid, and checks that it cannot become root again;
5. sets ``PR_SET_PDEATHSIG`` to ``SIGKILL`` (the application dies with the agent), restores the default
   ``SIGPIPE`` and ``SIGXFSZ`` dispositions Python had ignored, and
6. executes the entry point with the clean environment.

The trampoline switches the user itself (rather than before it starts) so that it can run the agent's
interpreter, which the application's user may not be able to read. The process starts in a new session
(its own process group), with ``umask 077``, standard input from ``/dev/null`` and no inherited file
descriptors but its standard output and error.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fleetward.bounds import check_positive
from fleetward.errors import ConfigurationError

TRAMPOLINE = r"""
import ctypes, json, os, resource, signal, sys


def fail(message):
    os.write(2, ("fleetward: the application cannot start: " + message + "\n").encode("utf-8", "replace"))
    os._exit(127)


try:
    spec = json.loads(sys.argv[1])
    for name, value in spec["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    libc = ctypes.CDLL(None, use_errno=True)
    if spec["netns_fd"] is not None:
        libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        if libc.setns(spec["netns_fd"], 0x40000000) != 0:  # CLONE_NEWNET
            fail("setns(CLONE_NEWNET): " + os.strerror(ctypes.get_errno()))
        os.close(spec["netns_fd"])
        if os.readlink("/proc/self/ns/net") != spec["netns"]:
            fail("the network namespace did not change")
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        fail("prctl(PR_SET_NO_NEW_PRIVS): " + os.strerror(ctypes.get_errno()))
    uid, gid = spec["uid"], spec["gid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
            fail("the user did not change")
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            fail("the process could become root again")
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        fail("prctl(PR_SET_PDEATHSIG): " + os.strerror(ctypes.get_errno()))
    if os.getppid() != spec["agent_pid"]:
        fail("the agent is gone")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    argv = [spec["entry"]] + sys.argv[2:]
    os.execve(argv[0], argv, spec["env"])
except OSError as error:
    fail(str(error))
"""

#: What no mode enforces yet, whatever the agent runs as.
NOT_YET_ENFORCED = (
    "device files: the application API grants only the declared Gpio, Uart, I2cMaster, SpiMaster, Adc and "
    "Pwm, but nothing stops an application opening a device file its own user may open",
)

#: What is not enforced when applications share the agent's network namespace (the agent is not root).
NETWORK_NOT_ENFORCED = (
    "network: applications share the agent's network namespace; the proxy in HTTPS_PROXY still refuses "
    "what AllowedConnections does not declare, but only to clients that use it: a direct connection to "
    "any address is not stopped, and an application may listen on any port, not only its declared "
    "server ports"
)


@dataclass(frozen=True)
class ResourceLimits:
    """Kernel limits on each application process, soft and hard alike."""

    address_space_bytes: int = 512 * 1024 * 1024
    open_files: int = 256
    processes: int = 64
    cpu_seconds: int = 24 * 3600

    def __post_init__(self) -> None:
        check_positive(self, "resource limit")

    def rlimits(self, *, file_size_bytes: int) -> list[tuple[str, int]]:
        """The ``resource`` names and values the trampoline sets."""
        return [
            ("RLIMIT_AS", self.address_space_bytes),
            ("RLIMIT_NOFILE", self.open_files),
            ("RLIMIT_NPROC", self.processes),
            ("RLIMIT_CPU", self.cpu_seconds),
            ("RLIMIT_FSIZE", file_size_bytes),
            ("RLIMIT_CORE", 0),
        ]


@dataclass(frozen=True)
class AppIdentity:
    """The user and group an application runs as when the agent is root."""

    uid: int
    gid: int

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError("an application never runs as root (uid and gid must be positive)")


class AppIdentities(Protocol):
    """Hands each application its own user; the same one every time for the same component."""

    def identity_for(self, component_id: str) -> AppIdentity: ...


class UidRangeIdentities:
    """Allocates uids from a configured range, remembered in a table file, skipping any uid or gid that
    an account or group of the system already holds. No account is created: the kernel needs none."""

    def __init__(self, table: Path, *, first_uid: int = 200_000, count: int = 1000) -> None:
        if first_uid < 1000 or count <= 0:
            raise ConfigurationError("the application uid range starts at 1000 or above and is not empty")
        self._table = table
        self._first_uid = first_uid
        self._count = count
        self._lock = threading.Lock()

    def identity_for(self, component_id: str) -> AppIdentity:
        with self._lock:
            table = self._load()
            uid = table.get(component_id)
            if uid is None:
                uid = self._free_uid(set(table.values()))
                table[component_id] = uid
                self._save(table)
            return AppIdentity(uid=uid, gid=uid)

    def _free_uid(self, used: set[int]) -> int:
        for uid in range(self._first_uid, self._first_uid + self._count):
            if uid not in used and not _system_holds(uid):
                return uid
        raise ConfigurationError(
            f"no free uid left in {self._first_uid}..{self._first_uid + self._count - 1}"
        )

    def _load(self) -> dict[str, int]:
        if not self._table.exists():
            return {}
        try:
            loaded = json.loads(self._table.read_text("utf-8"))
        except ValueError as error:
            raise ConfigurationError(f"the uid table {self._table} is not readable: {error}") from None
        if not isinstance(loaded, dict) or not all(
            isinstance(key, str) and isinstance(value, int) and not isinstance(value, bool)
            for key, value in loaded.items()
        ):
            raise ConfigurationError(f"the uid table {self._table} is not a map of component ids to uids")
        outside = [
            uid for uid in loaded.values() if not self._first_uid <= uid < self._first_uid + self._count
        ]
        if outside:
            raise ConfigurationError(f"the uid table {self._table} holds {outside[0]}, outside the range")
        return loaded

    def _save(self, table: Mapping[str, int]) -> None:
        self._table.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self._table.with_name(self._table.name + ".new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(dict(sorted(table.items())), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._table)


def _system_holds(number: int) -> bool:
    try:
        pwd.getpwuid(number)
    except KeyError:
        pass
    else:
        return True
    try:
        grp.getgrgid(number)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class Enforcement:
    """What the supervisor enforces, which depends on whether the agent runs as root."""

    as_root: bool
    agent_uid: int
    network_namespaces: bool = True

    @property
    def isolates_network(self) -> bool:
        """Whether each application runs in a network namespace of its own (root, and not turned off)."""
        return self.as_root and self.network_namespaces

    def not_enforced(self) -> tuple[str, ...]:
        """Plain statements of what is not enforced in this mode (logged when the supervisor starts)."""
        network = () if self.isolates_network else (NETWORK_NOT_ENFORCED,)
        if self.as_root:
            return (*network, *NOT_YET_ENFORCED)
        return (
            f"own user: every application runs as the agent's own user (uid {self.agent_uid}), so they can "
            "signal, trace and read one another and the agent",
            "read-only image: the application's user owns its unpacked image and could make it writable "
            "(measured launch still checked it before it started)",
            "private storage: the storage directories belong to the agent's user, so applications can reach "
            "each other's storage",
            "RLIMIT_NPROC: it counts every process of the agent's user, not the application's alone",
            "leftover processes: only the application's process group is killed when it stops; a process "
            "that left the group survives",
            *network,
            *NOT_YET_ENFORCED,
        )


@dataclass(frozen=True)
class StorageUsage:
    """What an application's storage directory holds: allocated bytes and the files and directories in it."""

    used_bytes: int
    entries: int


def measure_storage(root: Path, *, max_entries: int) -> StorageUsage:
    """Sum the allocated blocks below ``root``, never following a link, and stop counting past
    ``max_entries`` (the directory is over quota then anyway). Directories are opened relative to their
    parent with ``O_NOFOLLOW``, so an application that swaps a directory for a link mid-walk cannot send
    the walk outside its storage."""
    used = entries = 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    pending = [os.open(root, flags)]
    try:
        while pending and entries <= max_entries:
            directory = pending.pop()
            try:
                with os.scandir(directory) as listing:
                    for entry in listing:
                        entries += 1
                        info = entry.stat(follow_symlinks=False)
                        used += info.st_blocks * 512
                        if entries > max_entries:
                            break
                        if entry.is_dir(follow_symlinks=False):
                            try:
                                pending.append(os.open(entry.name, flags, dir_fd=directory))
                            except OSError:
                                continue  # it changed under us: counted already, not descended into
            finally:
                os.close(directory)
    finally:
        for directory in pending:
            os.close(directory)
    return StorageUsage(used_bytes=used, entries=entries)


def prepare_storage(
    path: Path, *, identity: AppIdentity | None, writable: bool, agent_uid: int, agent_gid: int
) -> None:
    """Create the application's storage directory (its working directory) and give it to the right user.

    As root: with ``MutableStorage``, the directory is the application's (mode 0700); without, it is the
    agent's and read-only (0555), so the application has nowhere to write. Not as root: the agent's, 0700.
    """
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o711)  # noqa: S103 - every application user traverses it, none lists it
    path.mkdir(mode=0o700, exist_ok=True)
    if identity is None:
        os.chmod(path, 0o700)
    elif writable:
        os.chown(path, identity.uid, identity.gid, follow_symlinks=False)
        os.chmod(path, 0o700)
    else:
        os.chown(path, agent_uid, agent_gid, follow_symlinks=False)
        os.chmod(path, 0o555)  # noqa: S103 - readable, never writable, by the application


def kill_user_processes(uid: int) -> int:
    """SIGKILL every process whose real uid is ``uid`` (an application's own user); return how many."""
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as status:
                real_uid = next((line.split()[1] for line in status if line.startswith("Uid:")), None)
            if real_uid == str(uid):
                os.kill(int(entry.name), 9)
                killed += 1
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # it ended while we looked
    return killed
