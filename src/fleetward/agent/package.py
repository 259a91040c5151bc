"""Application packages: a plain tar holding ``manifest.json`` and the code, with a detached signature.

The format::

    package.tar        an uncompressed POSIX tar (ustar or pax): manifest.json at its root, the entry point
                       the manifest names, and any other files, in directories as deep as 16
    package.tar.sig    ECDSA P-256 over SHA-256 of the exact bytes of package.tar, DER-encoded

The tar is uncompressed on purpose: the size of the package bounds the memory and work of reading it, so a
package cannot be a decompression bomb (the transport may compress it). Only regular files and directories
are allowed: a symbolic or hard link, a device, a FIFO or a sparse file refuses the whole package, as does
an absolute path, a ``..`` part, a name outside ``[A-Za-z0-9._+@-]``, a path listed twice, or more members,
bytes or depth than :class:`PackageLimits` allows. Owners, times and set-id bits in the tar are ignored:
files are unpacked read-only (0444, or 0555 when the tar marks them executable), directories 0555.

Who vouches for a package is a small interface, :class:`PackageVerifier`. The default,
:class:`TrustedKeysVerifier`, accepts a signature by any of the publisher keys in the agent's
configuration. The updates part replaces it with a TUF-backed verifier (the package's hash and length as
listed in verified targets metadata) without touching measured launch.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from fleetward.agent.manifest import Manifest, ManifestLimits, parse_manifest
from fleetward.bounds import check_positive
from fleetward.errors import FleetwardError, LaunchRefused
from fleetward.wire.identity import SUPPORTED_CURVE

MANIFEST_NAME = "manifest.json"
_MEMBER_PART = re.compile(r"[A-Za-z0-9._+@-]+")
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class PackageLimits:
    """Bounds on a package. Every one is a configuration value with its unit in its name."""

    max_package_bytes: int = 64 * 1024 * 1024
    max_signature_bytes: int = 256
    max_members: int = 4096
    max_file_bytes: int = 64 * 1024 * 1024
    max_unpacked_bytes: int = 256 * 1024 * 1024
    max_path_chars: int = 255
    max_path_depth: int = 16

    def __post_init__(self) -> None:
        check_positive(self, "package limit")


@dataclass(frozen=True)
class PackageDigest:
    """What a verifier judges: the SHA-256 and the length of the package's exact bytes."""

    sha256: bytes
    length: int

    def __post_init__(self) -> None:
        if len(self.sha256) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")
        if self.length < 0:
            raise ValueError("a length is not negative")


class PackageVerifier(Protocol):
    """Decides whether a publisher the device trusts vouches for a package."""

    def verify(self, digest: PackageDigest, signature: bytes | None) -> None:
        """Return if the package is vouched for; raise :class:`LaunchRefused` saying why not otherwise."""
        ...


class TrustedKeysVerifier:
    """Accepts a detached ECDSA P-256 signature by any of a fixed list of publisher keys."""

    def __init__(self, keys: Sequence[ec.EllipticCurvePublicKey]) -> None:
        if not keys:
            raise ValueError("a verifier needs at least one trusted publisher key")
        for key in keys:
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, SUPPORTED_CURVE):
                raise TypeError("a trusted publisher key is an ECDSA P-256 public key")
        self._keys = tuple(keys)

    def verify(self, digest: PackageDigest, signature: bytes | None) -> None:
        if signature is None:
            raise LaunchRefused("the package has no signature", code="package_unsigned")
        algorithm = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        for key in self._keys:
            try:
                key.verify(signature, digest.sha256, algorithm)
            except InvalidSignature:
                continue
            return
        raise LaunchRefused(
            "no trusted publisher key verifies the package's signature", code="package_signature_invalid"
        )


def sign_package(key: ec.EllipticCurvePrivateKey, package: bytes) -> bytes:
    """The detached signature of a package (publisher side: tooling, tests, the simulator)."""
    return key.sign(package, ec.ECDSA(hashes.SHA256()))


def build_package(
    manifest: Manifest, files: Mapping[str, bytes], *, executables: Sequence[str] = ()
) -> bytes:
    """A package holding ``manifest`` and ``files`` (path → content), deterministic byte for byte.

    The manifest's entry point and the paths in ``executables`` are marked executable.
    """
    members = {MANIFEST_NAME: manifest.to_json(), **files}
    executable = {manifest.entry_point, *executables}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(members):
            try:
                _member_parts(name, PackageLimits())
            except LaunchRefused as error:
                raise ValueError(error.message) from None
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mode = 0o755 if name in executable else 0o644
            info.mtime = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


@dataclass(frozen=True)
class UnpackedPackage:
    """A package's files on disk, read-only, and its parsed manifest."""

    root: Path
    manifest: Manifest
    files: int
    unpacked_bytes: int


def _unsafe(name: str, problem: str) -> LaunchRefused:
    return LaunchRefused(f"package member {name[:120]!r}: {problem}", code="package_unsafe_member")


def _member_parts(name: str, limits: PackageLimits) -> tuple[str, ...]:
    if len(name) > limits.max_path_chars:
        raise _unsafe(name, f"the path is longer than {limits.max_path_chars} characters")
    if name.startswith("/"):
        raise _unsafe(name, "an absolute path")
    parts = tuple(name.removeprefix("./").rstrip("/").split("/"))
    if len(parts) > limits.max_path_depth:
        raise _unsafe(name, f"deeper than {limits.max_path_depth} directories")
    for part in parts:
        if part in (".", ".."):
            raise _unsafe(name, "a path with . or .. parts")
        if not _MEMBER_PART.fullmatch(part):
            raise _unsafe(name, "a path part that is empty or not made of A-Z a-z 0-9 . _ + @ -")
    return parts


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    return "not a regular file or a directory"


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    source = archive.extractfile(member)
    if source is None:
        raise _unsafe(member.name, "has no content")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    written = 0
    with os.fdopen(descriptor, "wb") as target:
        while chunk := source.read(_CHUNK_BYTES):
            written += len(chunk)
            if written > member.size:
                raise _unsafe(member.name, "holds more bytes than its header says")
            target.write(chunk)
    if written != member.size:
        raise LaunchRefused(f"package member {member.name[:120]!r} is truncated", code="package_malformed")


def _read_members(package: BinaryIO, root: Path, limits: PackageLimits) -> tuple[dict[Path, bool], int]:
    """Unpack every member under ``root``; return {file: executable} and the bytes written."""
    written_files: dict[Path, bool] = {}
    seen: set[tuple[str, ...]] = set()
    total = 0
    with tarfile.open(fileobj=package, mode="r:") as archive:
        count = 0
        while (member := archive.next()) is not None:
            count += 1
            if count > limits.max_members:
                raise LaunchRefused(
                    f"the package has more than {limits.max_members} members", code="package_too_large"
                )
            if member.isdir() and member.name.removeprefix("./").rstrip("/") in ("", "."):
                continue  # the root directory itself, as `tar -C dir -cf package.tar .` writes it
            parts = _member_parts(member.name, limits)
            if parts in seen:
                raise _unsafe(member.name, "listed twice")
            seen.add(parts)
            path = root.joinpath(*parts)
            try:
                if member.isdir():
                    path.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                if not member.isreg() or member.issparse():
                    raise _unsafe(member.name, _kind(member))
                if member.size > limits.max_file_bytes:
                    raise LaunchRefused(
                        f"package member {member.name[:120]!r} is {member.size} bytes, more than the "
                        f"{limits.max_file_bytes} allowed",
                        code="package_too_large",
                    )
                total += member.size
                if total > limits.max_unpacked_bytes:
                    raise LaunchRefused(
                        f"the package unpacks to more than {limits.max_unpacked_bytes} bytes",
                        code="package_too_large",
                    )
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _write_member(archive, member, path)
            except (FileExistsError, NotADirectoryError):
                raise _unsafe(member.name, "its path clashes with another member") from None
            written_files[path] = bool(member.mode & 0o111)
    return written_files, total


def unpack_package(
    package: BinaryIO,
    root: Path,
    limits: PackageLimits | None = None,
    manifest_limits: ManifestLimits | None = None,
) -> UnpackedPackage:
    """Unpack ``package`` into the new directory ``root`` (which must not exist), read-only, and check it.

    Raises :class:`LaunchRefused` with the reason as its code: ``package_malformed``,
    ``package_unsafe_member``, ``package_too_large``, ``manifest_missing``, ``manifest_invalid``,
    ``manifest_too_large`` or ``entry_point_missing``.
    """
    limits = limits or PackageLimits()
    manifest_limits = manifest_limits or ManifestLimits()
    root.mkdir(mode=0o700)
    try:
        files, total = _read_members(package, root, limits)
    except (tarfile.TarError, EOFError, UnicodeError, ValueError) as error:
        raise LaunchRefused(
            f"the package is not a readable tar ({type(error).__name__})", code="package_malformed"
        ) from None
    manifest_path = root / MANIFEST_NAME
    if manifest_path not in files:
        raise LaunchRefused("the package has no manifest.json at its root", code="manifest_missing")
    if manifest_path.stat().st_size > manifest_limits.max_manifest_bytes:
        raise LaunchRefused(
            f"manifest.json is more than {manifest_limits.max_manifest_bytes} bytes",
            code="manifest_too_large",
        )
    try:
        manifest = parse_manifest(manifest_path.read_bytes(), manifest_limits)
    except FleetwardError as error:
        raise LaunchRefused(error.message, code=error.code) from None
    entry = root.joinpath(*manifest.entry_point.split("/"))
    if not files.get(entry, False):
        raise LaunchRefused(
            f"the entry point {manifest.entry_point!r} is not an executable file of the package",
            code="entry_point_missing",
        )
    _make_read_only(root, files)
    return UnpackedPackage(root=root, manifest=manifest, files=len(files), unpacked_bytes=total)


def _make_read_only(root: Path, files: Mapping[Path, bool]) -> None:
    for path, executable in files.items():
        os.chmod(path, 0o555 if executable else 0o444)
    for directory, _subdirectories, _names in os.walk(root, topdown=False):
        os.chmod(directory, 0o555)  # noqa: S103 - the application's own user must read its image


def remove_tree(path: Path) -> None:
    """Remove a tree that may hold read-only directories (an unpacked image), never following links."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for directory, subdirectories, _names in os.walk(path):
        os.chmod(directory, 0o700)
        subdirectories[:] = [name for name in subdirectories if not os.path.islink(Path(directory, name))]
    for directory, subdirectories, names in os.walk(path, topdown=False):
        for name in names + subdirectories:
            entry = os.path.join(directory, name)
            if os.path.islink(entry) or not stat.S_ISDIR(os.lstat(entry).st_mode):
                os.unlink(entry)
            else:
                os.rmdir(entry)
    os.rmdir(path)
