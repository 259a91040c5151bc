"""Measured launch: a good package is verified, unpacked read-only and measured; a bad one is refused.

A refused package is not measured, leaves no image behind, and is reported with its reason. Without a
``LaunchedApp`` the supervisor has nothing to start, so a refused package is never started either.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.agent.launch import (
    ExtendingMeasurementLog,
    FileMeasurementLog,
    InstallRecord,
    LaunchConfig,
    Launcher,
    MemoryMeasurementLog,
)
from fleetward.agent.package import (
    PackageDigest,
    PackageLimits,
    TrustedKeysVerifier,
    build_package,
    remove_tree,
    unpack_package,
)
from fleetward.agent.reporting import MemoryReporter
from fleetward.errors import ConfigurationError, LaunchRefused, PayloadTooLarge
from fleetward.wire.evidence import Measurement, measurement_log_digest
from fleetward.wire.reports import LaunchRefusedReport
from tests.agent_apps import COMPONENT, OTHER_COMPONENT, AppWorld, manifest_for, reachable_directory, script

APP = script("print('hello')", own_user=False)


@pytest.fixture
def world() -> Iterator[AppWorld]:
    with reachable_directory() as base:
        yield AppWorld(base)


def good_package(component_id: str = COMPONENT) -> bytes:
    return build_package(manifest_for(component_id), {"bin/app": APP, "lib/data.txt": b"data"})


Member = tuple[tarfile.TarInfo, bytes]


def member(
    name: str, data: bytes = b"", *, mode: int = 0o644, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def raw_package(*members: Member, manifest: bytes | None = None) -> bytes:
    """A tar written by hand, so that it can hold what ``build_package`` would never write."""
    buffer = io.BytesIO()
    base = [
        member("manifest.json", manifest if manifest is not None else manifest_for().to_json()),
        member("bin/app", APP, mode=0o755),
    ]
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.PAX_FORMAT) as archive:
        for info, data in [*base, *members]:
            archive.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


def only_members(*members: Member) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


async def assert_refused(
    world: AppWorld, record: InstallRecord, code: str, launcher: Launcher | None = None
) -> str:
    """The launch raises with ``code``, measures nothing, leaves no image, and reports the reason once."""
    with pytest.raises(LaunchRefused) as refused:
        await (launcher or world.launcher()).launch(record)
    assert refused.value.code == code, refused.value.message
    assert world.log.entries() == ()
    component_dir = world.images_dir / record.component_id
    assert not component_dir.exists() or list(component_dir.iterdir()) == []
    assert [path.name for path in world.images_dir.iterdir() if path.name.startswith(".staging")] == []
    assert world.reporter.reports == [
        LaunchRefusedReport(
            component_id=record.component_id,
            version=record.version,
            image_sha256=record.package_sha256,
            reason=code,
            message=refused.value.message,
            occurred_at=world.reporter.reports[0].occurred_at,
        )
    ]
    return refused.value.message


# --- a good package ----------------------------------------------------------------------------------------


async def test_a_good_package_is_verified_unpacked_read_only_and_measured(world: AppWorld) -> None:
    package = good_package()
    record = world.install(package, version="2.1.0")
    launched = await world.launcher().launch(record)

    measurement = Measurement(name=COMPONENT, version="2.1.0", sha256=hashlib.sha256(package).hexdigest())
    assert launched.measurement == measurement
    assert world.log.entries() == (measurement,)
    assert world.log.digest() == measurement_log_digest([measurement])
    assert world.reporter.reports == []

    assert launched.image_dir == world.images_dir / COMPONENT / record.package_sha256
    assert launched.entry_path.read_bytes() == APP
    assert (launched.image_dir / "lib" / "data.txt").read_bytes() == b"data"
    modes = {
        path.relative_to(launched.image_dir).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in [launched.image_dir, *launched.image_dir.rglob("*")]
    }
    assert modes == {
        ".": 0o555,
        "bin": 0o555,
        "bin/app": 0o555,
        "lib": 0o555,
        "lib/data.txt": 0o444,
        "manifest.json": 0o444,
    }


async def test_launches_are_measured_in_order(world: AppWorld) -> None:
    launcher = world.launcher()
    first = await launcher.launch(world.install(good_package(), name="first"))
    second = await launcher.launch(world.install(good_package(OTHER_COMPONENT), component_id=OTHER_COMPONENT))
    assert world.log.entries() == (first.measurement, second.measurement)


async def test_every_launch_unpacks_afresh_so_a_changed_image_is_restored(world: AppWorld) -> None:
    launcher = world.launcher()
    record = world.install(good_package())
    launched = await launcher.launch(record)
    launched.entry_path.chmod(0o755)
    launched.entry_path.write_bytes(b"#!/bin/sh\necho tampered\n")
    relaunched = await launcher.launch(record)
    assert relaunched.entry_path.read_bytes() == APP


async def test_owners_and_set_id_bits_in_the_tar_are_ignored(world: AppWorld) -> None:
    setuid_app, _ = info_data = member("bin/app", APP, mode=0o6755)
    setuid_app.uid = setuid_app.gid = 1234
    package = only_members(member("manifest.json", manifest_for().to_json()), info_data)
    launched = await world.launcher().launch(world.install(package))
    status = launched.entry_path.stat()
    assert stat.S_IMODE(status.st_mode) == 0o555
    assert status.st_uid == os.geteuid()


async def test_a_tar_with_its_root_directory_listed_unpacks(world: AppWorld) -> None:
    root = member("./", kind=tarfile.DIRTYPE, mode=0o755)
    bin_dir = member("./bin/", kind=tarfile.DIRTYPE, mode=0o755)
    package = only_members(
        root,
        bin_dir,
        member("./manifest.json", manifest_for().to_json()),
        member("./bin/app", APP, mode=0o755),
    )
    launched = await world.launcher().launch(world.install(package))
    assert launched.entry_path.read_bytes() == APP


# --- refused: who vouches for it ---------------------------------------------------------------------------


async def test_a_package_without_signature_is_refused(world: AppWorld) -> None:
    await assert_refused(world, world.install(good_package(), signed=False), "package_unsigned")


async def test_a_package_signed_by_an_untrusted_key_is_refused(world: AppWorld) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    await assert_refused(world, world.install(good_package(), signer=stranger), "package_signature_invalid")


async def test_a_tampered_package_is_refused_for_its_hash(world: AppWorld) -> None:
    package = good_package()
    record = world.install(package)
    tampered = package.replace(b"hello", b"HELLO")
    record.package_path.write_bytes(tampered)
    message = await assert_refused(world, record, "package_hash_mismatch")
    assert hashlib.sha256(tampered).hexdigest() in message


async def test_a_tampered_package_with_a_matching_record_is_refused_for_its_signature(
    world: AppWorld,
) -> None:
    package = good_package()
    record = world.install(package)
    tampered = package.replace(b"hello", b"HELLO")
    record.package_path.write_bytes(tampered)
    forged = InstallRecord(
        component_id=COMPONENT,
        version=record.version,
        package_sha256=hashlib.sha256(tampered).hexdigest(),
        package_path=record.package_path,
    )
    await assert_refused(world, forged, "package_signature_invalid")


async def test_a_record_with_the_wrong_hash_is_refused(world: AppWorld) -> None:
    record = world.install(good_package(), expected_sha256="ab" * 32)
    await assert_refused(world, record, "package_hash_mismatch")


async def test_an_oversized_signature_is_refused(world: AppWorld) -> None:
    record = world.install(good_package())
    record.signature_file.write_bytes(b"\x30" * 1024)
    await assert_refused(world, record, "package_signature_invalid")


async def test_a_missing_package_is_refused(world: AppWorld) -> None:
    record = world.install(good_package())
    record.package_path.unlink()
    await assert_refused(world, record, "package_missing")


async def test_any_trusted_publisher_key_may_vouch(world: AppWorld) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    config = LaunchConfig(
        images_dir=world.images_dir, trusted_publisher_keys=(world.publisher.public_key(), other.public_key())
    )
    launcher = Launcher(config, report=world.reporter, log=world.log)
    await launcher.launch(world.install(good_package(), signer=other))
    assert len(world.log.entries()) == 1


# --- refused: what is inside -------------------------------------------------------------------------------

UNSAFE: list[tuple[str, Callable[[], bytes], str, str]] = [
    (
        "path traversal",
        lambda: raw_package(member("../evil", b"x")),
        "package_unsafe_member",
        ". or .. parts",
    ),
    ("deep traversal", lambda: raw_package(member("bin/../../../evil", b"x")), "package_unsafe_member", ".."),
    ("absolute path", lambda: raw_package(member("/tmp/evil", b"x")), "package_unsafe_member", "absolute"),
    (
        "symlink out",
        lambda: raw_package(member("bin/passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")),
        "package_unsafe_member",
        "symbolic link",
    ),
    (
        "symlink in",
        lambda: raw_package(member("bin/again", kind=tarfile.SYMTYPE, link="app")),
        "package_unsafe_member",
        "symbolic link",
    ),
    (
        "hard link",
        lambda: raw_package(member("bin/hard", kind=tarfile.LNKTYPE, link="bin/app")),
        "package_unsafe_member",
        "hard link",
    ),
    (
        "character device",
        lambda: raw_package(member("dev/null", kind=tarfile.CHRTYPE)),
        "package_unsafe_member",
        "device file",
    ),
    (
        "block device",
        lambda: raw_package(member("dev/sda", kind=tarfile.BLKTYPE)),
        "package_unsafe_member",
        "device file",
    ),
    ("fifo", lambda: raw_package(member("run/pipe", kind=tarfile.FIFOTYPE)), "package_unsafe_member", "FIFO"),
    (
        "listed twice",
        lambda: raw_package(member("bin/app", b"other")),
        "package_unsafe_member",
        "listed twice",
    ),
    ("file under a file", lambda: raw_package(member("bin/app/x", b"x")), "package_unsafe_member", "clashes"),
    (
        "name with a space",
        lambda: raw_package(member("bin/a b", b"x")),
        "package_unsafe_member",
        "not made of",
    ),
    (
        "name with a newline",
        lambda: raw_package(member("bin/a\nb", b"x")),
        "package_unsafe_member",
        "not made of",
    ),
    ("empty path part", lambda: raw_package(member("bin//x", b"x")), "package_unsafe_member", "empty"),
    (
        "too deep",
        lambda: raw_package(member("a/" * 17 + "f", b"x")),
        "package_unsafe_member",
        "deeper than 16",
    ),
    ("not a tar", lambda: b"just some bytes, signed", "package_malformed", "not a readable tar"),
    ("a gzip tar", lambda: gzip.compress(good_package()), "package_malformed", "not a readable tar"),
    ("truncated", lambda: good_package()[:700], "package_malformed", ""),
    (
        "no manifest",
        lambda: only_members(member("bin/app", APP, mode=0o755)),
        "manifest_missing",
        "no manifest.json",
    ),
    (
        "manifest in a directory",
        lambda: only_members(
            member("etc/manifest.json", manifest_for().to_json()), member("bin/app", APP, mode=0o755)
        ),
        "manifest_missing",
        "no manifest.json",
    ),
    (
        "an unknown capability",
        lambda: raw_package(
            manifest=manifest_for()
            .to_json()
            .replace(b'"Capabilities": {}', b'"Capabilities": {"WifiConfig": true}')
        ),
        "manifest_invalid",
        "unknown capability 'WifiConfig'",
    ),
    (
        "manifest not JSON",
        lambda: raw_package(manifest=b"{"),
        "manifest_invalid",
        "not valid JSON",
    ),
    (
        "entry point missing",
        lambda: only_members(member("manifest.json", manifest_for().to_json())),
        "entry_point_missing",
        "'bin/app'",
    ),
    (
        "entry point not executable",
        lambda: only_members(
            member("manifest.json", manifest_for().to_json()), member("bin/app", APP, mode=0o644)
        ),
        "entry_point_missing",
        "not an executable file",
    ),
    (
        "entry point is a directory",
        lambda: only_members(
            member("manifest.json", manifest_for().to_json()),
            member("bin/app", kind=tarfile.DIRTYPE, mode=0o755),
        ),
        "entry_point_missing",
        "not an executable file",
    ),
    (
        "another component",
        lambda: good_package(OTHER_COMPONENT),
        "manifest_component_mismatch",
        OTHER_COMPONENT,
    ),
]


@pytest.mark.parametrize(("case", "make", "code", "expected"), UNSAFE, ids=[row[0] for row in UNSAFE])
async def test_an_unsafe_or_broken_package_is_refused_and_writes_nothing_outside(
    world: AppWorld, case: str, make: Callable[[], bytes], code: str, expected: str
) -> None:
    message = await assert_refused(world, world.install(make()), code)
    assert expected in message
    written = sorted(path.relative_to(world.base).as_posix() for path in world.base.rglob("*"))
    assert [path for path in written if "evil" in path or path.startswith("tmp")] == []


SIZE_LIMITS: list[tuple[str, PackageLimits, Callable[[], bytes]]] = [
    ("package bytes", PackageLimits(max_package_bytes=4096), good_package),
    ("one file", PackageLimits(max_file_bytes=1024), lambda: raw_package(member("big", b"x" * 2048))),
    (
        "all files",
        PackageLimits(max_unpacked_bytes=3000),
        lambda: raw_package(*(member(f"f{i}", b"x" * 1000) for i in range(4))),
    ),
    (
        "members",
        PackageLimits(max_members=5),
        lambda: raw_package(*(member(f"f{i}", b"x") for i in range(5))),
    ),
]


@pytest.mark.parametrize(("case", "limits", "make"), SIZE_LIMITS, ids=[row[0] for row in SIZE_LIMITS])
async def test_an_oversized_package_is_refused(
    world: AppWorld, case: str, limits: PackageLimits, make: Callable[[], bytes]
) -> None:
    await assert_refused(
        world, world.install(make()), "package_too_large", world.launcher(package_limits=limits)
    )


# --- the measurement log -----------------------------------------------------------------------------------


async def test_a_launch_that_cannot_be_measured_is_refused_and_its_image_removed(world: AppWorld) -> None:
    world.log = MemoryMeasurementLog(max_entries=0)
    record = world.install(good_package())
    message = await assert_refused(world, record, "measurement_failed")
    assert "already holds 0 entries" in message


def test_the_file_log_keeps_the_ordered_log_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "run" / "measurements.jsonl"
    first = Measurement(name="fleetward-agent", version="1.4.0", sha256="aa" * 32)
    second = Measurement(name=COMPONENT, version="2.0", sha256="bb" * 32)
    log = FileMeasurementLog(path)
    log.extend(first)
    log.extend(second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened = FileMeasurementLog(path)
    assert reopened.entries() == (first, second)
    assert reopened.digest() == measurement_log_digest([first, second])


def test_the_file_log_is_bounded_and_refuses_a_corrupt_file(tmp_path: Path) -> None:
    log = FileMeasurementLog(tmp_path / "log", max_entries=1)
    log.extend(Measurement(name="a", version="1", sha256="aa" * 32))
    with pytest.raises(PayloadTooLarge):
        log.extend(Measurement(name="b", version="1", sha256="bb" * 32))
    assert len(FileMeasurementLog(tmp_path / "log").entries()) == 1
    (tmp_path / "bad").write_text('{"name": "a"}\n')
    with pytest.raises(ConfigurationError, match="not readable"):
        FileMeasurementLog(tmp_path / "bad")


class RecordingPcr:
    def __init__(self) -> None:
        self.extended: list[Measurement] = []

    def extend(self, measurement: Measurement) -> None:
        self.extended.append(measurement)


async def test_a_tpm_backed_log_extends_the_pcr_before_it_keeps_the_entry(world: AppWorld) -> None:
    pcr = RecordingPcr()
    config = LaunchConfig(images_dir=world.images_dir, trusted_publisher_keys=(world.publisher.public_key(),))
    launcher = Launcher(config, report=world.reporter, log=ExtendingMeasurementLog(pcr))
    launched = await launcher.launch(world.install(good_package()))
    assert pcr.extended == [launched.measurement]
    assert launcher.log.entries() == (launched.measurement,)
    refused = Launcher(config, report=world.reporter, log=ExtendingMeasurementLog(pcr))
    with pytest.raises(LaunchRefused):
        await refused.launch(world.install(good_package(), signed=False))
    assert pcr.extended == [launched.measurement]


# --- configuration -----------------------------------------------------------------------------------------


def test_measured_launch_needs_a_trusted_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least one trusted publisher key"):
        Launcher(LaunchConfig(images_dir=tmp_path), report=MemoryReporter())


def test_trusted_keys_must_be_p256(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        TrustedKeysVerifier([ec.generate_private_key(ec.SECP384R1()).public_key()])
    with pytest.raises(ValueError, match="at least one"):
        TrustedKeysVerifier([])
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigurationError, match="P-256"):
        LaunchConfig.load_keys((rsa_pem,))
    good = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = good.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert LaunchConfig.load_keys((pem,)) == (good,)


def test_a_verifier_judges_only_the_digest_and_the_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    package = good_package()
    digest = PackageDigest(sha256=hashlib.sha256(package).digest(), length=len(package))
    verifier = TrustedKeysVerifier([key.public_key()])
    verifier.verify(digest, key.sign(package, ec.ECDSA(hashes.SHA256())))
    with pytest.raises(LaunchRefused, match="no signature"):
        verifier.verify(digest, None)
    with pytest.raises(ValueError, match="32 bytes"):
        PackageDigest(sha256=b"short", length=1)


def test_an_install_record_validates_its_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GUID"):
        InstallRecord(component_id="blink", version="1", package_sha256="aa" * 32, package_path=tmp_path)
    with pytest.raises(ValueError, match="version"):
        InstallRecord(component_id=COMPONENT, version="v1", package_sha256="aa" * 32, package_path=tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        InstallRecord(component_id=COMPONENT, version="1", package_sha256="AA" * 32, package_path=tmp_path)


# --- properties of the package format ----------------------------------------------------------------------

paths = st.lists(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._+@-]{0,12}", fullmatch=True), min_size=1, max_size=4
).map("/".join)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(paths, st.binary(max_size=300), max_size=6))
def test_property_a_built_package_unpacks_to_exactly_its_files(files: dict[str, bytes]) -> None:
    names = set(files)
    files = {
        name: data for name, data in files.items() if not any(other.startswith(name + "/") for other in names)
    }
    files.pop("manifest.json", None)
    files["bin/app"] = APP
    directory = Path(tempfile.mkdtemp())
    try:
        unpacked = unpack_package(io.BytesIO(build_package(manifest_for(), files)), directory / "image")
        found = {
            path.relative_to(unpacked.root).as_posix(): path.read_bytes()
            for path in unpacked.root.rglob("*")
            if path.is_file()
        }
        assert found == {**files, "manifest.json": manifest_for().to_json()}
        assert unpacked.files == len(found)
    finally:
        remove_tree(directory)


GOOD = good_package()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=0, max_value=len(GOOD)), st.booleans())
def test_property_any_bytes_unpack_or_are_refused_cleanly(noise: bytes, cut: int, damaged: bool) -> None:
    """Random bytes, and a good package cut anywhere and followed by noise, never raise anything else."""
    data = GOOD[:cut] + noise if damaged else noise
    directory = Path(tempfile.mkdtemp())
    try:
        unpack_package(io.BytesIO(data), directory / "image")
        outcome = "unpacked"
    except LaunchRefused as refused:
        outcome = refused.code
    finally:
        remove_tree(directory)
    assert outcome == "unpacked" or outcome.startswith(("package_", "manifest_", "entry_point_"))
