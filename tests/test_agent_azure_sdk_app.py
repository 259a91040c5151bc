"""A stock Azure IoT Hub SDK application runs on the agent unchanged: with ``DeviceAuthentication`` it reads
the paths of the device's certificate and key from the agent (Azure Sphere's
``DeviceAuth_GetCertificatePath``) and connects to the hub as the device, through the agent's proxy.

The application (``tests/azure_sdk_app.py``) is the entry point of a signed package that a real agent
launches, measures and supervises against the real server and hub. It uses fleetward's appkit for the
paths only; the rest is the Azure IoT Hub device SDK for Python (``azure-iot-device``, from
``.venv-azure-iot``: ``scripts/setup`` makes it) with its X.509 client and its ``ProxyOptions`` set from the
``MQTT_PROXY`` the agent gives it.

How the test is set up, and why:

- **Port 8883.** The SDK always dials port 8883, and the agent's proxy connects to the port asked for, so
  the hub of this test listens on port 8883 itself, on a loopback address of its own (a random
  ``127.x.y.z``, like a hub on another machine, so that nothing on ``127.0.0.1:8883`` gets in the way).
  Nothing else in the path is the test's: SDK → the agent's proxy → hub, TLS end to end. The test skips
  when port 8883 cannot be bound there (something listens on every address), and fails instead under
  ``FLEETWARD_REQUIRE_SERVICES=1``.
- **The name.** The application is told the hub is ``hub.example`` (its ``CmdArgs``), which resolves
  nowhere; the agent's proxy resolves it with the :class:`StaticResolver` injected into the agent, to the
  hub's address. That address is loopback, so the manifest names it with port 8883 besides the name, as the
  proxy's screen against DNS rebinding requires. The hub's TLS certificate is made for ``hub.example``.
- **The interpreter.** Applications run as a user of their own when the agent is root. Where the SDK's
  virtual environment points at an interpreter that user cannot execute (on the test machine, under
  ``/root``, mode 0700), its packages (not pip nor setuptools) are copied into a virtual environment of the
  system's Python of the same version, in a directory every user may read, and the package's entry point
  names that. So the agent runs as root, with what it enforces there: the application's own uid, the
  certificate copy owned by it, and a network namespace whose only way out is the proxy. Where the SDK's
  interpreter is reachable, or the tests do not run as root, the entry point names
  ``.venv-azure-iot/bin/python`` itself; as root without a system Python of the SDK's version, the agent
  runs in non-root mode (``as_root=False``), the application as the agent's user.
- **The agent's own hub link.** The hub holds one session per identity (a newer connection takes over, as
  IoT Hub does), and the SDK connects with the device's identity; so the agent's own link connects as the
  module ``fleetward-agent`` of the device (``hub.module``, docs/operations.md), to the same hub: both hold
  their sessions at once, neither takes the other's over, and the agent's own reports still arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from fleetward.agent.config import AgentSettings, HubSettings, Intervals, SandboxSettings, SoftwareRoot
from fleetward.agent.credential import decode_credential
from fleetward.agent.launch import InstallRecord
from fleetward.agent.manifest import Manifest, parse_manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.proxy import StaticResolver
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.agent.runtime import Agent
from fleetward.agent.status import log_paths
from fleetward.agent.supervisor import AppHandle, AppState
from fleetward.api import schemas
from fleetward.authority.keystore import MasterKeyStore
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import build_services
from fleetward.config import Settings
from fleetward.server import BackgroundServer, free_port
from fleetward.service_tls import ensure_service_tls
from fleetward.sim.agents import with_appkit
from fleetward.sim.fleet import SimulatedDevice, measurement
from tests.agent_apps import COMPONENT, app_interpreter, reachable_directory, running_as_root
from tests.conftest import AGENT, REQUIRE_SERVICES, HubSetup, healthy_software, make_tenant
from tests.test_azure_iot_sdk import sdk_python

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

APP_SCRIPT = Path(__file__).with_name("azure_sdk_app.py")
#: the name the application is told; only the agent's resolver knows it
HUB_NAME = "hub.example"
#: the module the agent's own link connects as, beside the application that holds the device identity
AGENT_MODULE = "fleetward-agent"
#: the port the SDK always dials
HUB_PORT = 8883
#: each of the application's steps, from the agent's start (enrollment, the SDK's connect) or a request
STEP_SECONDS = 20.0
SYSTEM_PYTHON = Path("/usr/bin/python3")
#: what the SDK's environment holds that the application does not need
NOT_NEEDED = ("pip", "pip-*", "setuptools", "setuptools-*", "pkg_resources", "_distutils_hack", "*.pth")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


# ------------------------------------------------------------------ the interpreter the application names


@dataclass(frozen=True)
class AppPython:
    """The interpreter of the application's shebang, and whether the agent must run in non-root mode."""

    interpreter: Path
    as_root: bool | None  # None: as the process is


def _others_may_run(path: Path) -> bool:
    """Whether any user may execute ``path`` (every directory above it traversable by others)."""
    real = path.resolve()
    return all(os.stat(part).st_mode & stat.S_IXOTH for part in (*reversed(real.parents), real))


def _version_of(interpreter: Path) -> str:
    found = subprocess.run(
        [str(interpreter), "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return found.stdout.strip()


def _open_to_all(root: Path) -> None:
    """Directories 0755 and files readable by everyone, below ``root`` (whatever the umask was)."""
    for directory, _names, files in os.walk(root):
        os.chmod(directory, 0o755)  # noqa: S103 - the application's own user reads the SDK's packages
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o444)


def _reachable_copy(sdk: Path, base: Path) -> Path | None:
    """A virtual environment of the system's Python holding the SDK's packages, under ``base``; None when
    the system has no reachable Python of the SDK's version."""
    if not SYSTEM_PYTHON.exists() or not _others_may_run(SYSTEM_PYTHON):
        return None
    version = _version_of(sdk)
    if _version_of(SYSTEM_PYTHON) != version:
        return None
    target = base / "sdk-python"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(target)], check=True, timeout=60)
    packages = f"lib/python{version}/site-packages"
    shutil.copytree(
        sdk.parent.parent / packages,
        target / packages,
        ignore=shutil.ignore_patterns(*NOT_NEEDED),
        dirs_exist_ok=True,
    )
    _open_to_all(target)
    return target / "bin" / "python"


@pytest.fixture
def app_python(base: Path) -> AppPython:
    """The interpreter for the SDK application; without the SDK, a skip (or a failure under
    ``FLEETWARD_REQUIRE_SERVICES=1``) before a hub is set up for nothing."""
    sdk = sdk_python()
    if not running_as_root() or _others_may_run(sdk):
        return AppPython(sdk, None)
    copy = _reachable_copy(sdk, base)
    return AppPython(sdk, False) if copy is None else AppPython(copy, None)


# ------------------------------------------------------------------ a hub on port 8883


@pytest.fixture
def hub_address() -> str:
    """A loopback address of the hub's own, where port 8883 is free (or the test skips)."""
    address = f"127.{secrets.randbelow(254) + 1}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, HUB_PORT))
        except OSError as error:
            reason = (
                f"port {HUB_PORT}, the only one the Azure IoT device SDK dials, cannot be bound at "
                f"{address}: {error.strerror} (does something listen on it on every address?)"
            )
            if REQUIRE_SERVICES:
                pytest.fail(reason + " (FLEETWARD_REQUIRE_SERVICES=1)")
            pytest.skip(reason)
    return address


@pytest.fixture
def sdk_hub(hub_address: str, tmp_path: Path, clock: FakeClock) -> Iterator[HubSetup]:
    """The server and its hub on ``hub_address``, the hub on port 8883, with a certificate for
    ``hub.example``."""
    tls = ensure_service_tls(tmp_path / "tls", (HUB_NAME, hub_address))
    port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'fleetward.db'}",
        host=hub_address,
        port=port,
        public_url=f"https://{hub_address}:{port}",
        hub_port=HUB_PORT,
        tls_certificate=tls.certificate_file,
        tls_private_key=tls.private_key_file,
    )
    services = build_services(settings, clock=clock, keystore=MasterKeyStore(secrets.token_bytes(32)))
    try:
        _operator, token = services.registry.bootstrap("admin@example.com", "Admin")
        with (
            BackgroundServer(services, port=port) as server,
            FleetwardClient(server.url, token, ca_file=tls.ca_file) as client,
        ):
            yield HubSetup(services, server, tls, token, make_tenant(client), tmp_path)
    finally:
        services.close()


# ------------------------------------------------------------------ the device and its agent


@dataclass
class Device:
    """One agent's world: its state directory, its identity, its publisher, and the hub it reaches."""

    hub: HubSetup
    state: Path
    clock: FakeClock
    publisher: ec.EllipticCurvePrivateKey

    @property
    def simulated(self) -> SimulatedDevice:
        root = SoftwareRootOfTrust.load_or_create(self.state / "identity.key")
        return SimulatedDevice("panel", healthy_software(), root_of_trust=root)

    @property
    def device_id(self) -> str:
        return self.simulated.device_id

    @property
    def path(self) -> str:
        return f"/v1/tenants/{self.hub.tenant.id}/devices/{self.device_id}"

    def install(self, manifest: Manifest, files: dict[str, bytes]) -> InstallRecord:
        """A signed package, its reference value registered with the authority (measured boot needs it)."""
        package = build_package(manifest, files)
        path = self.state.parent / "packages" / f"{manifest.component_id}.tar"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(package)
        path.with_name(path.name + ".sig").write_bytes(sign_package(self.publisher, package))
        digest = hashlib.sha256(package).hexdigest()
        self.hub.tenant.client.post(
            f"/v1/tenants/{self.hub.tenant.id}/reference-values",
            schemas.ReferenceValuesAdd(
                values=[
                    schemas.ReferenceValueItem(
                        component=manifest.component_id, version="1.0.0", sha256=digest
                    )
                ]
            ),
            schemas.ReferenceValuesAdded,
        )
        return InstallRecord(
            component_id=manifest.component_id, version="1.0.0", package_sha256=digest, package_path=path
        )

    def agent(
        self, app: InstallRecord, hub: HubSettings, *, baseline_seconds: float = 0, **options: Any
    ) -> Agent:
        settings = AgentSettings(
            state_dir=self.state,
            authority_url=self.hub.server.url,
            hub=hub,
            root_of_trust=SoftwareRoot(self.state / "identity.key"),
            measurement=measurement(*AGENT),
            ca_file=self.hub.tls.ca_file,
            apps=(app,),
            publisher_keys=(self.publisher.public_key(),),
            intervals=Intervals(
                telemetry_seconds=0,
                baseline_seconds=baseline_seconds,
                baseline_sample_seconds=0.1,
                status_seconds=0.1,
            ),
            # a crash leaves the application backing off, its error output kept for the failure message
            sandbox=SandboxSettings(restart_initial_backoff_seconds=60, restart_max_backoff_seconds=60),
        )
        return Agent(settings, clock=self.clock, **options)

    # --- the operator API, on a thread (its client is synchronous); get and post below the device's path

    async def get(self, path: str, model: type[M]) -> M:
        return await asyncio.to_thread(self.hub.tenant.client.get, self.path + path, model)

    async def post(self, path: str, body: BaseModel, model: type[M]) -> M:
        return await asyncio.to_thread(self.hub.tenant.client.post, self.path + path, body, model)

    async def listed(self, path: str, model: type[M], **params: str | int) -> list[M]:
        return await asyncio.to_thread(self.hub.tenant.client.get_list, path, model, params)

    async def telemetry(self) -> list[schemas.TelemetryPublic]:
        tenant = self.hub.tenant.id
        return await self.listed(
            f"/v1/tenants/{tenant}/telemetry", schemas.TelemetryPublic, device_id=self.device_id
        )

    async def reports(self, kind: str) -> list[schemas.ReportPublic]:
        path = f"/v1/tenants/{self.hub.tenant.id}/reports"
        return await self.listed(path, schemas.ReportPublic, device_id=self.device_id, kind=kind)


def manifest(component_id: str, capabilities: dict[str, Any], cmd_args: tuple[str, ...] = ()) -> Manifest:
    """A manifest in Azure Sphere's form (``app_manifest.json``), parsed as the agent parses it."""
    document = {
        "SchemaVersion": 1,
        "Name": "azure-sdk-app",
        "ComponentId": component_id,
        "EntryPoint": "bin/app",
        "CmdArgs": list(cmd_args),
        "Capabilities": capabilities,
    }
    return parse_manifest(json.dumps(document).encode())


@pytest.fixture
def device(base: Path, clock: FakeClock) -> Callable[[HubSetup], Device]:
    def make(hub: HubSetup) -> Device:
        state = base / "device"
        device = Device(hub, state, clock, ec.generate_private_key(ec.SECP256R1()))
        hub.tenant.claim(device.simulated)
        return device

    return make


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    async with agent:
        yield agent


async def eventually(check: Callable[[], Awaitable[T | None]], *, what: str, timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def step(handle: AppHandle, name: str, timeout: float = STEP_SECONDS) -> dict[str, Any]:
    """The application's line ``{"step": name, …}`` in its standard output, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        for line in handle.output_tail().splitlines():
            with contextlib.suppress(ValueError):
                said = json.loads(line)
                if isinstance(said, dict) and said.get("step") == name:
                    return said
        alive = handle.state in (AppState.STARTING, AppState.RUNNING) and not handle.restart_count
        if not alive or time.monotonic() > deadline:
            pytest.fail(
                f"the application did not say {name!r} (state {handle.state.value})\n"
                f"its output:\n{handle.output_tail()}\nits errors:\n{handle.error_tail()[-4000:]}"
            )
        await asyncio.sleep(0.05)


def _uid_of(pid: int | None) -> int:
    assert pid is not None
    return os.stat(f"/proc/{pid}").st_uid


# ------------------------------------------------------------------ the tests


@pytest.mark.slow
async def test_a_stock_azure_iot_sdk_application_reaches_the_hub_as_the_device_with_the_certificate_paths(
    app_python: AppPython, sdk_hub: HubSetup, hub_address: str, device: Callable[[HubSetup], Device]
) -> None:
    """Through the agent's proxy and resolver the SDK connects with the device's certificate; its
    telemetry arrives with its properties, it reads the twin, answers a direct method and receives a
    cloud-to-device message. Meanwhile the agent's own link holds the module session ``fleetward-agent``
    of the same device on the same hub: neither session takes the other's over, and the agent's baseline
    reports arrive."""
    panel = device(sdk_hub)
    tenant = sdk_hub.tenant.id
    patched = schemas.DesiredPatched.model_validate_json(
        sdk_hub.tenant.client.request_json("PATCH", f"{panel.path}/twin/desired", {"interval_seconds": 5})
    )
    app_manifest = manifest(
        COMPONENT,
        {
            "AllowedConnections": [f"{HUB_NAME}:{HUB_PORT}", f"{hub_address}:{HUB_PORT}"],
            "DeviceAuthentication": tenant,
        },
        cmd_args=("--hostname", HUB_NAME),
    )
    entry_point = f"#!{app_python.interpreter}\n".encode() + APP_SCRIPT.read_bytes()
    files = with_appkit({"bin/app": entry_point, "certs/hub-ca.pem": sdk_hub.tls.ca_file.read_bytes()})
    record = panel.install(app_manifest, files)
    # the agent's own link: the same hub, as a module of the device (see the docstring)
    own_link = HubSettings(host=hub_address, port=HUB_PORT, name=HUB_NAME, module=AGENT_MODULE)
    resolver = StaticResolver({HUB_NAME: [hub_address]})
    agent_under_test = panel.agent(
        record, own_link, baseline_seconds=0.5, resolver=resolver, as_root=app_python.as_root
    )

    async with running(agent_under_test) as agent:
        handle = agent.app(COMPONENT)
        paths = await step(handle, "paths")
        credentials = panel.state / "app-credentials" / COMPONENT
        assert (paths["certificate"], paths["key"]) == (
            str(credentials / "certificate.pem"),
            str(credentials / "key.pem"),
        )
        assert paths["device_id"] == panel.device_id
        owner = _uid_of(handle.pid)
        if app_python.as_root is None and running_as_root():
            assert owner != 0, "the application runs as a user of its own"
            assert paths["proxy"] == "http://127.0.0.1:3128", "inside its own network namespace"
        for name in ("certificate.pem", "key.pem"):
            info = os.stat(credentials / name)
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o400, owner)
        credential = decode_credential((panel.state / "credential.pem").read_bytes())
        assert (credentials / "certificate.pem").read_text().startswith(credential.issued.certificate.strip())

        await step(handle, "connected")
        connection = await panel.get("/connection", schemas.ConnectionPublic)
        assert connection.connected

        async def link_up() -> bool:
            return (await agent.status()).link.connected

        await eventually(link_up, what="the agent's own link up, as a module")
        module = await panel.get(f"/modules/{AGENT_MODULE}/connection", schemas.ConnectionPublic)
        assert (module.connected, module.module_id) == (True, AGENT_MODULE)

        await step(handle, "sent")
        stored = await panel.telemetry()
        assert [json.loads(item.body or "") for item in stored] == [{"temperature": 21.5}]
        assert stored[0].module_id is None  # the application's, as the device
        assert stored[0].properties == {
            "$.mid": "sdk-app-1",
            "$.ct": "application/json",
            "$.ce": "utf-8",
            "room": "lab 2/east",
        }

        twin = (await step(handle, "twin"))["twin"]
        assert twin["desired"]["interval_seconds"] == 5
        assert twin["desired"]["$version"] == patched.version

        await step(handle, "ready")
        result = await panel.post(
            "/methods/calibrate",
            schemas.MethodInvoke(payload={"offset": 0.5}, timeout_seconds=10),
            schemas.MethodResultPublic,
        )
        assert result.status == 200
        assert result.payload == {
            "answered_by": "azure-iot-device",
            "method": "calibrate",
            "asked": {"offset": 0.5},
        }

        queued = await panel.post(
            "/messages",
            schemas.CloudToDeviceCreate(body="hello, application", properties={"kind": "greeting"}),
            schemas.CloudToDevicePublic,
        )
        received = await step(handle, "c2d")
        assert (received["data"], received["message_id"]) == ("hello, application", queued.id)
        assert received["custom_properties"] == {"kind": "greeting"}

        async def completed() -> bool:
            messages = await panel.listed(f"{panel.path}/messages", schemas.CloudToDevicePublic)
            return any(message.id == queued.id and message.state == "completed" for message in messages)

        await eventually(completed, what="the cloud-to-device message completed")

        async def baselines() -> list[schemas.ReportPublic]:
            return await panel.reports("security-baseline")

        await eventually(baselines, what="the agent's own baseline report, through its module session")
        assert (await panel.get("/connection", schemas.ConnectionPublic)).connected
        status = await agent.status()
    assert (status.link.connected, status.link.connects) == (True, 1)
    assert status.violations == 0
    assert status.apps[0].restart_count == 0
    await asyncio.sleep(0.7)  # the hub writes its security events every half second
    assert not sdk_hub.hub_events(), [event.model_dump() for event in sdk_hub.hub_events()]


REFUSED_APP = """
import json, time
from appkit import AgentClient, AgentError

with AgentClient() as agent:
    try:
        certificate, key = agent.certificate_paths()
    except AgentError as error:
        print(json.dumps({"step": "refused", "code": error.code, "message": error.message}), flush=True)
    else:
        print(json.dumps({"step": "granted", "certificate": certificate, "key": key}), flush=True)
while True:
    time.sleep(0.2)
"""


async def test_an_application_without_device_authentication_is_refused_the_certificate_paths(
    hub: HubSetup, device: Callable[[HubSetup], Device]
) -> None:
    """Declaring a connection to the hub is not the device's identity: the request is refused with
    ``capability_not_declared``, nothing is copied, and the agent reports the violation to the cloud."""
    panel = device(hub)
    app_manifest = manifest(COMPONENT, {"AllowedConnections": [f"{HUB_NAME}:{HUB_PORT}"]})
    script = f"#!{app_interpreter(own_user=True)}\n{REFUSED_APP.strip()}\n".encode()
    record = panel.install(app_manifest, with_appkit({"bin/app": script}))
    settings = HubSettings(host="127.0.0.1", port=hub.hub_port)

    async def reports() -> list[schemas.ReportPublic]:
        return await panel.reports("capability_denied")

    async with running(panel.agent(record, settings)) as agent:
        refused = await step(agent.app(COMPONENT), "refused")
        denied = await eventually(reports, what="the violation in the cloud")
        status = await agent.status()
    assert refused["code"] == "capability_not_declared"
    assert "device.certificate_paths" in refused["message"]
    assert "DeviceAuthentication" in refused["message"]
    assert status.violations == 1
    assert denied[0].component_id == COMPONENT
    assert denied[0].report["capability"] == "DeviceAuthentication"
    assert denied[0].headline.startswith("DeviceAuthentication not declared")
    assert not (panel.state / "app-credentials" / COMPONENT).exists()
    stdout, _stderr = log_paths(panel.state / "logs", COMPONENT)
    assert '"capability_not_declared"' in stdout.read_text()
