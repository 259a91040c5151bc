"""Installing an application: check a package as measured launch will, keep a copy, write its record.

The updater will install the same way; until it exists, ``fleetward agent app install`` does. A package
is checked before anything is written: its SHA-256 against the one its publisher gave, the publisher's
signature against the agent's trusted keys, then a safe unpack into a scratch directory for its manifest.
It is then copied to ``packages/<component id>/<sha256>.tar`` (with its ``.sig``) in the state directory,
and ``apps/<component id>.toml`` records it (a newer install of the same component replaces the record).
Measured launch checks everything again at every start.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from fleetward.agent.config import AgentSettings, render_install_record, write_private_file
from fleetward.agent.launch import InstallRecord
from fleetward.agent.package import PackageDigest, TrustedKeysVerifier, unpack_package
from fleetward.errors import ConfigurationError, LaunchRefused


def install_package(
    settings: AgentSettings, package: Path, sha256: str, version: str, signature: Path | None = None
) -> InstallRecord:
    """Check a package as measured launch will (hash, publisher signature, safe unpack, manifest), copy it
    into the state directory, and write its install record; raise ``LaunchRefused`` saying why not."""
    if not settings.publisher_keys:
        raise ConfigurationError("no trusted publisher key is configured (publisher_keys in agent.toml)")
    signature = signature or package.with_name(package.name + ".sig")
    try:
        data = package.read_bytes()
        signature_bytes = signature.read_bytes() if signature.exists() else None
    except OSError as error:
        raise LaunchRefused(f"cannot read {package}: {error.strerror}", code="package_missing") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.lower():
        raise LaunchRefused(
            f"the package's SHA-256 is {digest}, not the {sha256} given", code="package_hash_mismatch"
        )
    TrustedKeysVerifier(settings.publisher_keys).verify(
        PackageDigest(sha256=bytes.fromhex(digest), length=len(data)), signature_bytes
    )
    with tempfile.TemporaryDirectory(prefix="fleetward-install-") as scratch:
        with package.open("rb") as handle:
            unpacked = unpack_package(handle, Path(scratch) / "image")
        manifest = unpacked.manifest
    directory = settings.packages_dir / manifest.component_id
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = directory / f"{digest}.tar"
    shutil.copyfile(package, target)
    target_signature = target.with_name(target.name + ".sig")
    if signature_bytes is not None:
        target_signature.write_bytes(signature_bytes)
    record = InstallRecord(
        component_id=manifest.component_id,
        version=version,
        package_sha256=digest,
        package_path=target,
        signature_path=target_signature,
    )
    write_private_file(
        settings.apps_dir / f"{manifest.component_id}.toml", render_install_record(record, settings.state_dir)
    )
    return record
