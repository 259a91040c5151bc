"""Measured launch: verify an application package, unpack it read-only, record it, and only then run it.

For each launch, in this order, and stopping at the first failure:

1. the package is a regular file no larger than ``max_package_bytes``; it is copied to a private staging
   directory while its SHA-256 is computed, so what is checked is what is unpacked;
2. its SHA-256 equals the one in the :class:`InstallRecord` (which the updater wrote when it installed
   the package);
3. the :class:`~fleetward.agent.package.PackageVerifier` vouches for it (by default: a detached ECDSA P-256
   signature by a trusted publisher key);
4. it unpacks safely (:func:`~fleetward.agent.package.unpack_package`), its manifest is valid and names
   the component the record names, and its entry point is an executable file of the package;
5. it moves to ``<images_dir>/<component id>/<package sha256>/``, read-only, replacing any earlier unpack;
6. ``Measurement(name=component id, version, sha256=package sha256)`` extends the :class:`MeasurementLog`.

A package that fails any step is not started and not measured: :meth:`Launcher.launch` reports a
:class:`~fleetward.wire.reports.LaunchRefusedReport` with the reason and raises
:class:`~fleetward.errors.LaunchRefused`. Only a :class:`LaunchedApp` (what a successful launch returns)
can be handed to the supervisor.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.manifest import Manifest, ManifestLimits
from fleetward.agent.package import (
    PackageDigest,
    PackageLimits,
    PackageVerifier,
    TrustedKeysVerifier,
    remove_tree,
    unpack_package,
)
from fleetward.agent.reporting import Reporter
from fleetward.clock import Clock, SystemClock
from fleetward.errors import ConfigurationError, FleetwardError, LaunchRefused, PayloadTooLarge
from fleetward.wire.evidence import MAX_MEASUREMENTS, Measurement, measurement_log_digest
from fleetward.wire.identity import SHA256_HEX_PATTERN, load_public_key
from fleetward.wire.reports import COMPONENT_ID_PATTERN, MAX_REASON_CHARS, LaunchRefusedReport
from fleetward.wire.versions import check_version

_CHUNK_BYTES = 64 * 1024


class MeasurementLog(Protocol):
    """The ordered log of launched components. A TPM root of trust also extends a PCR with each entry."""

    def extend(self, measurement: Measurement) -> None:
        """Append ``measurement``; raise rather than return if it could not be recorded."""
        ...

    def entries(self) -> tuple[Measurement, ...]:
        """Every measurement since boot, in launch order: what the evidence carries."""
        ...


class MemoryMeasurementLog:
    """The log in memory: for tests and simulated devices, and for a device whose log lives in a PCR."""

    def __init__(self, entries: tuple[Measurement, ...] = (), *, max_entries: int = MAX_MEASUREMENTS) -> None:
        self._entries = list(entries)
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def extend(self, measurement: Measurement) -> None:
        with self._lock:
            if len(self._entries) >= self._max_entries:
                raise PayloadTooLarge(
                    f"the measurement log already holds {self._max_entries} entries",
                    code="measurement_log_full",
                )
            self._record(measurement)
            self._entries.append(measurement)

    def _record(self, measurement: Measurement) -> None:
        """Make ``measurement`` durable before it joins the log (nothing to do in memory)."""

    def entries(self) -> tuple[Measurement, ...]:
        with self._lock:
            return tuple(self._entries)

    def digest(self) -> bytes:
        """The PCR-style digest of the log (docs/wire.md, measurement log digest)."""
        return measurement_log_digest(self.entries())


class FileMeasurementLog(MemoryMeasurementLog):
    """The log as JSON lines in a file, appended and synced before :meth:`extend` returns.

    A measurement log describes one boot: keep the file on a tmpfs such as ``/run`` so that it starts
    empty after a reboot, as a PCR does.
    """

    def __init__(self, path: Path, *, max_entries: int = MAX_MEASUREMENTS) -> None:
        self._path = path
        loaded: list[Measurement] = []
        if path.exists():
            try:
                lines = path.read_text("utf-8").splitlines()
                loaded = [Measurement.model_validate_json(line) for line in lines if line.strip()]
            except ValueError as error:  # pydantic's ValidationError and UnicodeDecodeError are ValueErrors
                raise ConfigurationError(f"the measurement log {path} is not readable: {error}") from None
        super().__init__(tuple(loaded), max_entries=max_entries)

    def _record(self, measurement: Measurement) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(descriptor, "ab") as handle:
            handle.write(measurement.model_dump_json().encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())


class PcrExtender(Protocol):
    """What a TPM root of trust offers measured launch (``agent.tpm.TpmRootOfTrust.extend``)."""

    def extend(self, measurement: Measurement) -> None: ...


class ExtendingMeasurementLog:
    """Extends a PCR with each measurement first, then keeps it in the ordered log the evidence carries.

    If the two ever disagree (a failure between the steps), the quote no longer matches the log and the
    authority refuses the device: the failure is safe.
    """

    def __init__(self, pcr: PcrExtender, log: MeasurementLog | None = None) -> None:
        self._pcr = pcr
        self._log: MeasurementLog = log if log is not None else MemoryMeasurementLog()

    def extend(self, measurement: Measurement) -> None:
        if len(self._log.entries()) >= MAX_MEASUREMENTS:
            raise PayloadTooLarge(
                f"the measurement log already holds {MAX_MEASUREMENTS} entries", code="measurement_log_full"
            )
        self._pcr.extend(measurement)
        self._log.extend(measurement)

    def entries(self) -> tuple[Measurement, ...]:
        return self._log.entries()


@dataclass(frozen=True)
class InstallRecord:
    """What the updater installed: which component, which version, the package and its expected hash."""

    component_id: str
    version: str
    package_sha256: str
    package_path: Path
    signature_path: Path | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(COMPONENT_ID_PATTERN, self.component_id):
            raise ValueError("a component id is a lower-case GUID")
        check_version(self.version)
        if not re.fullmatch(SHA256_HEX_PATTERN, self.package_sha256):
            raise ValueError("a package SHA-256 is 64 lower-case hexadecimal characters")

    @property
    def signature_file(self) -> Path:
        """Where the detached signature is: ``signature_path``, or the package path with ``.sig`` added."""
        return self.signature_path or self.package_path.with_name(self.package_path.name + ".sig")


@dataclass(frozen=True)
class LaunchConfig:
    """Where images are unpacked, which publishers are trusted, and the bounds on packages."""

    images_dir: Path
    trusted_publisher_keys: tuple[ec.EllipticCurvePublicKey, ...] = ()
    package_limits: PackageLimits = field(default_factory=PackageLimits)
    manifest_limits: ManifestLimits = field(default_factory=ManifestLimits)

    @staticmethod
    def load_keys(pems: tuple[bytes | str, ...]) -> tuple[ec.EllipticCurvePublicKey, ...]:
        """Publisher keys from PEM or DER; a key that is not P-256 stops the agent with a clear error."""
        try:
            return tuple(load_public_key(pem) for pem in pems)
        except ValueError as error:
            raise ConfigurationError(f"a trusted publisher key is refused: {error}") from None


@dataclass(frozen=True)
class LaunchedApp:
    """An application that passed measured launch: verified, unpacked read-only, and measured."""

    record: InstallRecord
    manifest: Manifest
    image_dir: Path
    measurement: Measurement

    @property
    def component_id(self) -> str:
        return self.record.component_id

    @property
    def image_sha256(self) -> str:
        return self.record.package_sha256

    @property
    def entry_path(self) -> Path:
        return self.image_dir.joinpath(*self.manifest.entry_point.split("/"))


class Launcher:
    """Runs measured launch; one launch at a time, so the log's order is the launch order."""

    def __init__(
        self,
        config: LaunchConfig,
        *,
        report: Reporter,
        log: MeasurementLog | None = None,
        verifier: PackageVerifier | None = None,
        clock: Clock | None = None,
    ) -> None:
        if verifier is None:
            if not config.trusted_publisher_keys:
                raise ConfigurationError("measured launch needs at least one trusted publisher key")
            verifier = TrustedKeysVerifier(config.trusted_publisher_keys)
        self.config = config
        self.log: MeasurementLog = log if log is not None else MemoryMeasurementLog()
        self._verifier = verifier
        self._report = report
        self._clock = clock or SystemClock()
        self._lock = asyncio.Lock()

    async def launch(self, record: InstallRecord) -> LaunchedApp:
        """Verify, unpack and measure ``record``'s package, or report why not and raise ``LaunchRefused``."""
        async with self._lock:
            try:
                manifest, image_dir = await asyncio.to_thread(self._verify_and_unpack, record)
            except LaunchRefused as refused:
                await self._refused(record, refused)
                raise
            except OSError as error:
                failed = LaunchRefused(
                    f"the package could not be read or unpacked: {error}", code="launch_io_error"
                )
                await self._refused(record, failed)
                raise failed from error
            measurement = Measurement(
                name=record.component_id, version=record.version, sha256=record.package_sha256
            )
            try:
                await asyncio.to_thread(self.log.extend, measurement)
            except (FleetwardError, OSError) as error:
                await asyncio.to_thread(remove_tree, image_dir)
                unmeasured = LaunchRefused(
                    f"the launch could not be measured: {error}", code="measurement_failed"
                )
                await self._refused(record, unmeasured)
                raise unmeasured from error
            return LaunchedApp(record=record, manifest=manifest, image_dir=image_dir, measurement=measurement)

    async def _refused(self, record: InstallRecord, refusal: LaunchRefused) -> None:
        await self._report(
            LaunchRefusedReport(
                component_id=record.component_id,
                version=record.version,
                image_sha256=record.package_sha256,
                reason=refusal.code,
                message=refusal.message[:MAX_REASON_CHARS],
                occurred_at=self._clock.now(),
            )
        )

    # --- the blocking part, on a worker thread ---------------------------------------------------------

    def _verify_and_unpack(self, record: InstallRecord) -> tuple[Manifest, Path]:
        limits = self.config.package_limits
        images_dir = self.config.images_dir
        images_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(images_dir, 0o755)  # noqa: S103 - whatever the umask, applications' users traverse it
        staging = images_dir / f".staging-{secrets.token_hex(8)}"
        staging.mkdir(mode=0o700)
        try:
            staged = staging / "package.tar"
            digest = _copy_and_hash(record.package_path, staged, limits.max_package_bytes)
            if not hmac.compare_digest(digest.sha256.hex(), record.package_sha256):
                raise LaunchRefused(
                    f"the package's SHA-256 is {digest.sha256.hex()}, "
                    f"not the {record.package_sha256} that was installed",
                    code="package_hash_mismatch",
                )
            self._verifier.verify(digest, _read_signature(record.signature_file, limits.max_signature_bytes))
            with staged.open("rb") as package:
                unpacked = unpack_package(package, staging / "image", limits, self.config.manifest_limits)
            if unpacked.manifest.component_id != record.component_id:
                raise LaunchRefused(
                    f"the manifest names component {unpacked.manifest.component_id}, "
                    f"not the {record.component_id} installed",
                    code="manifest_component_mismatch",
                )
            component_dir = images_dir / record.component_id
            component_dir.mkdir(mode=0o755, exist_ok=True)
            os.chmod(component_dir, 0o755)  # noqa: S103 - as above
            final = component_dir / record.package_sha256
            remove_tree(final)  # never trust an earlier unpack: unpack afresh every launch
            os.chmod(unpacked.root, 0o700)  # moving a directory rewrites its "..": it must be writable
            os.rename(unpacked.root, final)
            os.chmod(final, 0o555)  # noqa: S103 - the application's own user must read its image
            return unpacked.manifest, final
        finally:
            remove_tree(staging)


def _copy_and_hash(source: Path, target: Path, max_bytes: int) -> PackageDigest:
    try:
        descriptor = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LaunchRefused(f"the package {source} does not exist", code="package_missing") from None
    with os.fdopen(descriptor, "rb") as package:
        info = os.fstat(package.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise LaunchRefused(f"the package {source} is not a regular file", code="package_missing")
        if info.st_size > max_bytes:
            raise LaunchRefused(
                f"the package is {info.st_size} bytes, more than the {max_bytes} allowed",
                code="package_too_large",
            )
        digest = hashlib.sha256()
        length = 0
        output = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(output, "wb") as copy:
            while chunk := package.read(_CHUNK_BYTES):
                length += len(chunk)
                if length > max_bytes:  # the file grew while it was read
                    raise LaunchRefused(
                        f"the package is more than {max_bytes} bytes", code="package_too_large"
                    )
                digest.update(chunk)
                copy.write(chunk)
    return PackageDigest(sha256=digest.digest(), length=length)


def _read_signature(path: Path, max_bytes: int) -> bytes | None:
    try:
        with path.open("rb") as handle:
            signature = handle.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(signature) > max_bytes:
        raise LaunchRefused(f"the signature is more than {max_bytes} bytes", code="package_signature_invalid")
    return signature
