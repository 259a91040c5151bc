"""Helpers for the application tests: a directory applications' users can reach, publishers, packages.

The tests run as root. An application's own user then cannot read anything under ``/root``, which is where
this machine's venv interpreter really lives, so applications that run as their own user are written for
the system's ``/usr/bin/python3``; the others run with the venv's interpreter.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.launch import InstallRecord, LaunchConfig, LaunchedApp, Launcher, MemoryMeasurementLog
from fleetward.agent.manifest import Capabilities, Manifest
from fleetward.agent.package import PackageLimits, build_package, remove_tree, sign_package
from fleetward.agent.reporting import MemoryReporter

COMPONENT = "2f1c6b0e-7a52-4d9b-9c1e-5b8f0a3d6e21"
OTHER_COMPONENT = "9a0d3c44-1b2e-4f5a-8c6d-7e8f90a1b2c3"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def running_as_root() -> bool:
    return os.geteuid() == 0


def app_interpreter(*, own_user: bool) -> str:
    """The interpreter an application's shebang names: one its user can execute."""
    if own_user and SYSTEM_PYTHON.exists():
        return str(SYSTEM_PYTHON)
    return sys.executable


@contextmanager
def reachable_directory() -> Iterator[Path]:
    """A fresh directory under /tmp that every user may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fleetward-apps-"))
    path.chmod(0o755)  # the applications' own users must reach their images
    try:
        yield path
    finally:
        remove_tree(path)


def manifest_for(
    component_id: str = COMPONENT,
    *,
    storage_kb: int | None = None,
    cmd_args: tuple[str, ...] = (),
    entry_point: str = "bin/app",
) -> Manifest:
    return Manifest(
        name="test-app",
        component_id=component_id,
        entry_point=entry_point,
        cmd_args=cmd_args,
        capabilities=Capabilities(mutable_storage_kb=storage_kb),
    )


def script(body: str, *, own_user: bool) -> bytes:
    """An application: a Python script with a shebang its user can execute."""
    return f"#!{app_interpreter(own_user=own_user)}\n{body.strip()}\n".encode()


@dataclass
class AppWorld:
    """A trusted publisher, a launcher, a measurement log and a reporter, in a reachable directory."""

    base: Path
    publisher: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    reporter: MemoryReporter = field(default_factory=MemoryReporter)
    log: MemoryMeasurementLog = field(default_factory=MemoryMeasurementLog)

    @property
    def images_dir(self) -> Path:
        return self.base / "images"

    @property
    def storage_dir(self) -> Path:
        return self.base / "storage"

    def launcher(self, *, package_limits: PackageLimits | None = None) -> Launcher:
        config = LaunchConfig(
            images_dir=self.images_dir,
            trusted_publisher_keys=(self.publisher.public_key(),),
            package_limits=package_limits or PackageLimits(),
        )
        return Launcher(config, report=self.reporter, log=self.log)

    def install(
        self,
        package: bytes,
        *,
        component_id: str = COMPONENT,
        version: str = "1.0.0",
        signer: ec.EllipticCurvePrivateKey | None = None,
        signed: bool = True,
        expected_sha256: str | None = None,
        name: str = "app",
    ) -> InstallRecord:
        """Write ``package`` and its signature as the updater would, and return the install record."""
        directory = self.base / "packages"
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.tar"
        path.write_bytes(package)
        signature = path.with_name(path.name + ".sig")
        if signed:
            signature.write_bytes(sign_package(signer or self.publisher, package))
        elif signature.exists():
            signature.unlink()
        return InstallRecord(
            component_id=component_id,
            version=version,
            package_sha256=expected_sha256 or hashlib.sha256(package).hexdigest(),
            package_path=path,
        )

    async def launch_script(
        self,
        body: str,
        *,
        own_user: bool,
        storage_kb: int | None = None,
        component_id: str = COMPONENT,
        cmd_args: tuple[str, ...] = (),
    ) -> LaunchedApp:
        manifest = manifest_for(component_id, storage_kb=storage_kb, cmd_args=cmd_args)
        package = build_package(manifest, {"bin/app": script(body, own_user=own_user)})
        return await self.launcher().launch(
            self.install(package, component_id=component_id, name=component_id)
        )
