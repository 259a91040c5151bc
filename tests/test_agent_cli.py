"""``fleetward agent``: its configuration (read once, every mistake named) and its commands, against the real
server: init, enroll, app install, app list, app logs, status (offline and of a running agent).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner, Result

from fleetward.agent.config import (
    SCHEMA,
    AgentSettings,
    Pkcs11Root,
    SoftwareRoot,
    TpmRoot,
    agent_code_sha256,
    render_agent_toml,
    write_private_file,
)
from fleetward.agent.package import sign_package
from fleetward.agent.rot import SoftwareRootOfTrust, device_id_of
from fleetward.agent.runtime import Agent
from fleetward.agent.status import read_status, write_status
from fleetward.agent.supervisor import AppState
from fleetward.api import schemas
from fleetward.cli.entry import command_of
from fleetward.cli.main import app
from fleetward.errors import ConfigurationError
from fleetward.sim.agents import PANEL_MONITOR, panel_monitor_package
from fleetward.sim.fleet import SimulatedDevice
from tests.agent_apps import reachable_directory
from tests.conftest import HubSetup

MINIMAL: dict[str, object] = {"authority_url": "https://fleet.example:8443", "hub.host": "fleet.example"}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


def write_config(state: Path, values: Mapping[str, object]) -> None:
    write_private_file(state / "agent.toml", render_agent_toml(values))


# ---------------------------------------------------------------------------------------- configuration


def test_a_minimal_configuration_has_safe_defaults_and_paths_relative_to_the_state_directory(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, MINIMAL)
    settings = AgentSettings.load(tmp_path, environ={})
    assert settings.hub.port == 8883
    assert settings.root_of_trust == SoftwareRoot(tmp_path / "identity.key")
    assert settings.resolved_images_dir == tmp_path / "images"
    assert settings.measurement.name == "fleetward-agent"
    assert settings.measurement.sha256 == agent_code_sha256()
    assert settings.apps == ()
    assert settings.intervals.baseline_seconds == 300.0


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    write_config(tmp_path, {**MINIMAL, "hub.port": 8884})
    environ = {
        "FLEETWARD_AGENT_HUB_PORT": "9999",
        "FLEETWARD_AGENT_LIMITS_OUTBOX_MAX_MESSAGES": "50",
        "FLEETWARD_AGENT_ROOT_OF_TRUST_KIND": "tpm",
        "FLEETWARD_AGENT_ROOT_OF_TRUST_TCTI": "swtpm:port=2321",
        "FLEETWARD_AGENT_SANDBOX_NETWORK_NAMESPACES": "false",
    }
    settings = AgentSettings.load(tmp_path, environ=environ)
    assert settings.hub.port == 9999
    assert settings.limits.outbox_max_messages == 50
    assert settings.root_of_trust == TpmRoot(tcti="swtpm:port=2321", key_file=tmp_path / "identity.key")
    assert settings.sandbox.network_namespaces is False


def test_a_pkcs11_root_reads_its_pin_from_a_file_or_a_variable_never_from_the_configuration(
    tmp_path: Path,
) -> None:
    write_config(
        tmp_path,
        {
            **MINIMAL,
            "root_of_trust.kind": "pkcs11",
            "root_of_trust.module": "/lib/p11.so",
            "root_of_trust.token": "t",
        },
    )
    root = AgentSettings.load(tmp_path, environ={}).root_of_trust
    assert root == Pkcs11Root(module=Path("/lib/p11.so"), token="t", key_label="fleetward-identity")


@pytest.mark.parametrize(
    ("values", "text", "problem"),
    [
        ({"hub.host": "h"}, None, "authority_url (or $FLEETWARD_AGENT_AUTHORITY_URL) is required"),
        (
            {**MINIMAL, "hub.port": 70000},
            None,
            "hub.port (or $FLEETWARD_AGENT_HUB_PORT) must be from 1 to 65535",
        ),
        ({**MINIMAL, "hub.port": "eighty"}, None, "must be an integer"),
        ({**MINIMAL, "authority_url": "ftp://x"}, None, "must be an https:// URL"),
        ({**MINIMAL, "root_of_trust.kind": "hsm"}, None, "software, tpm or pkcs11"),
        ({**MINIMAL, "root_of_trust.kind": "tpm"}, None, "needs root_of_trust.tcti"),
        ({**MINIMAL, "root_of_trust.kind": "pkcs11"}, None, "needs root_of_trust.module"),
        ({**MINIMAL, "agent.sha256": "XYZ"}, None, "64 lower-case hexadecimal"),
        ({**MINIMAL, "publisher_keys": ["missing.pem"]}, None, "cannot read the publisher key"),
        ({**MINIMAL, "peripherals": "magic"}, None, "linux or simulated"),
        (
            {**MINIMAL, "hub.reconnect_first_seconds": 600.0},
            None,
            "hub.reconnect_first_seconds exceeds hub.reconnect_max_seconds",
        ),
        (None, 'authority_url = "https://x"\n[hub]\nhost = "h"\nbogus = 1\n', "unknown key 'hub.bogus'"),
        (None, 'authority_url = "https://x"\nhub = 3\n', "[hub] must be a table"),
        (None, "authority_url = ", "is not valid TOML"),
        (
            None,
            'authority_url = "https://x"\n[hub]\nhost = "h"\n[sandbox]\nnetwork_namespaces = 2\n',
            "true or false",
        ),
    ],
    ids=[
        "no authority",
        "port out of range",
        "port not a number",
        "not https",
        "unknown root",
        "tpm without tcti",
        "pkcs11 without module",
        "bad agent sha256",
        "publisher key missing",
        "unknown peripherals",
        "reconnect backoff upside down",
        "unknown key",
        "section not a table",
        "not TOML",
        "not a boolean",
    ],
)
def test_a_wrong_configuration_stops_the_agent_naming_the_key(
    tmp_path: Path, values: dict[str, object] | None, text: str | None, problem: str
) -> None:
    if values is not None:
        write_config(tmp_path, values)
    else:
        (tmp_path / "agent.toml").write_text(text or "")
    with pytest.raises(ConfigurationError) as refused:
        AgentSettings.load(tmp_path, environ={})
    assert problem in refused.value.message


def test_every_configuration_key_is_documented_in_operations() -> None:
    documented = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    assert [key for key in SCHEMA if f"| `{key}` |" not in documented] == []


def test_a_missing_configuration_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as refused:
        AgentSettings.load(tmp_path, environ={})
    assert refused.value.code == "agent_not_initialised"


def test_an_install_record_naming_another_component_than_its_file_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path, MINIMAL)
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / f"{PANEL_MONITOR}.toml").write_text(
        'component_id = "2f1c6b0e-7a52-4d9b-9c1e-5b8f0a3d6e21"\nversion = "1.0.0"\n'
        f'package = "p.tar"\nsha256 = "{"a" * 64}"\n'
    )
    with pytest.raises(ConfigurationError, match="names component"):
        AgentSettings.load(tmp_path, environ={})


# ---------------------------------------------------------------------------------------- the commands


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    cleaned: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    cleaned["FLEETWARD_CLI_CONFIG"] = str(tmp_path / "cli.json")
    return cleaned


class AgentCli:
    def __init__(self, env: dict[str, str | None], state: Path) -> None:
        self.env = env
        self.state = state

    def run(self, *args: str, as_json: bool = False) -> Result:
        prefix = ["--json"] if as_json else []
        return CliRunner().invoke(app, [*prefix, "agent", *args], env=self.env)

    def json(self, *args: str) -> object:
        result = self.run(*args, as_json=True)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture
def cli(env: dict[str, str | None], base: Path) -> AgentCli:
    return AgentCli(env, base / "agent")


@pytest.fixture
def publisher(base: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = base / "publisher.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, path


def init(cli: AgentCli, hub: HubSetup, publisher_file: Path, *extra: str) -> dict[str, object]:
    shown = cli.json(*hub.agent_init_args(publisher_file), "--state-dir", str(cli.state), *extra)
    assert isinstance(shown, dict)
    return shown


def publish(key: ec.EllipticCurvePrivateKey, package: bytes, path: Path) -> str:
    path.write_bytes(package)
    path.with_name(path.name + ".sig").write_bytes(sign_package(key, package))
    return hashlib.sha256(package).hexdigest()


def test_init_writes_the_configuration_and_the_identity_key_and_shows_what_to_claim(
    cli: AgentCli, hub: HubSetup, publisher: tuple[ec.EllipticCurvePrivateKey, Path]
) -> None:
    shown = init(cli, hub, publisher[1])
    key_file = cli.state / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((cli.state / "agent.toml").stat().st_mode) == 0o600
    assert shown["device_id"] == device_id_of(SoftwareRootOfTrust.load_or_create(key_file))
    assert str(shown["public_key"]).startswith("-----BEGIN PUBLIC KEY-----")
    assert shown["root_of_trust"] == "software"
    settings = AgentSettings.load(cli.state, environ={})
    assert settings.hub.port == hub.hub_port
    assert settings.ca_file == hub.tls.ca_file.resolve()
    again = cli.run("init", "--state-dir", str(cli.state), "--authority-url", hub.server.url)
    assert again.exit_code == 1
    assert "pass --force" in again.output


def test_init_refuses_a_root_it_cannot_open_and_leaves_no_configuration(cli: AgentCli) -> None:
    result = cli.run(
        "init",
        "--state-dir",
        str(cli.state),
        "--authority-url",
        "https://x.example",
        "--root-of-trust",
        "tpm",
    )
    assert result.exit_code == 2
    assert "needs root_of_trust.tcti" in " ".join(result.output.split())
    assert not (cli.state / "agent.toml").exists()


def test_install_enroll_list_and_status_of_a_stopped_agent(
    cli: AgentCli, hub: HubSetup, publisher: tuple[ec.EllipticCurvePrivateKey, Path], base: Path
) -> None:
    key, publisher_file = publisher
    shown = init(cli, hub, publisher_file)
    device = SimulatedDevice(
        "cli", (), root_of_trust=SoftwareRootOfTrust.load_or_create(cli.state / "identity.key")
    )
    hub.tenant.claim(device)
    settings = AgentSettings.load(cli.state, environ={})
    package = base / "panel-monitor.tar"
    sha256 = publish(key, panel_monitor_package(hub.tenant.id), package)
    hub.tenant.client.post(
        f"/v1/tenants/{hub.tenant.id}/reference-values",
        schemas.ReferenceValuesAdd(
            values=[
                schemas.ReferenceValueItem(
                    component="fleetward-agent",
                    version=settings.measurement.version,
                    sha256=settings.measurement.sha256,
                ),
                schemas.ReferenceValueItem(component=PANEL_MONITOR, version="2.1.0", sha256=sha256),
            ]
        ),
        schemas.ReferenceValuesAdded,
    )

    wrong = cli.run(
        "app",
        "install",
        str(package),
        "--sha256",
        "0" * 64,
        "--version",
        "2.1.0",
        "--state-dir",
        str(cli.state),
    )
    assert wrong.exit_code == 2
    assert "package_hash_mismatch" in wrong.output
    stranger = base / "stranger.tar"
    publish(ec.generate_private_key(ec.SECP256R1()), panel_monitor_package(hub.tenant.id), stranger)
    unsigned = cli.run(
        "app",
        "install",
        str(stranger),
        "--sha256",
        sha256,
        "--version",
        "2.1.0",
        "--state-dir",
        str(cli.state),
    )
    assert unsigned.exit_code == 2
    assert "package_signature_invalid" in unsigned.output
    assert not (cli.state / "apps" / f"{PANEL_MONITOR}.toml").exists()

    installed = cli.json(
        "app",
        "install",
        str(package),
        "--sha256",
        sha256,
        "--version",
        "2.1.0",
        "--state-dir",
        str(cli.state),
    )
    assert installed == {"component_id": PANEL_MONITOR, "version": "2.1.0", "sha256": sha256}
    (record,) = AgentSettings.load(cli.state, environ={}).apps
    assert record.package_path == cli.state / "packages" / PANEL_MONITOR / f"{sha256}.tar"
    assert record.package_path.read_bytes() == package.read_bytes()

    enrolled = cli.run("enroll", "--state-dir", str(cli.state))
    assert enrolled.exit_code == 0, enrolled.output
    assert "with 2 measurement(s)" in " ".join(enrolled.output.split())
    status = cli.json("status", "--state-dir", str(cli.state))
    assert isinstance(status, dict)
    assert status["running"] is False
    assert status["device_id"] == shown["device_id"]
    assert status["certificate"]["tenant_id"] == hub.tenant.id
    assert [app_["component_id"] for app_ in status["apps"]] == [PANEL_MONITOR]
    listed = cli.json("app", "list", "--state-dir", str(cli.state))
    assert isinstance(listed, list)
    assert [(item["component_id"], item["version"], item["state"]) for item in listed] == [
        (PANEL_MONITOR, "2.1.0", "stopped")
    ]
    human = cli.run("status", "--state-dir", str(cli.state))
    assert human.exit_code == 0
    assert "running" in human.output


async def test_status_and_logs_of_a_running_agent_come_from_what_it_writes(
    cli: AgentCli, hub: HubSetup, publisher: tuple[ec.EllipticCurvePrivateKey, Path], base: Path
) -> None:
    key, publisher_file = publisher
    await asyncio.to_thread(init, cli, hub, publisher_file)
    device = SimulatedDevice(
        "cli", (), root_of_trust=SoftwareRootOfTrust.load_or_create(cli.state / "identity.key")
    )
    await asyncio.to_thread(hub.tenant.claim, device)
    package = base / "panel-monitor.tar"
    sha256 = publish(key, panel_monitor_package(hub.tenant.id), package)
    installed = await asyncio.to_thread(
        cli.run,
        "app",
        "install",
        str(package),
        "--sha256",
        sha256,
        "--version",
        "2.1.0",
        "--state-dir",
        str(cli.state),
    )
    assert installed.exit_code == 0, installed.output
    settings = AgentSettings.load(cli.state, environ={})
    async with Agent(settings) as agent:
        await agent.app(PANEL_MONITOR).wait_for(AppState.RUNNING)
        await asyncio.sleep(0.3)
        await agent._write_status()
        status = await asyncio.to_thread(cli.json, "status", "--state-dir", str(cli.state))
        logs = await asyncio.to_thread(
            cli.run, "app", "logs", PANEL_MONITOR, "--stream", "stdout", "--state-dir", str(cli.state)
        )
        busy = await asyncio.to_thread(cli.run, "enroll", "--state-dir", str(cli.state))
    assert isinstance(status, dict)
    assert status["running"] is True
    assert status["pid"] == os.getpid()
    assert status["apps"][0]["state"] == "running"
    assert logs.exit_code == 0
    assert "panel-monitor 2.1.0 started" in logs.output
    assert busy.exit_code == 2
    assert "agent_running" in busy.output
    missing = await asyncio.to_thread(cli.run, "app", "logs", "nothing", "--state-dir", str(cli.state))
    assert missing.exit_code == 1


def test_a_status_file_is_replaced_whole(tmp_path: Path) -> None:
    from fleetward.agent.status import AgentStatus
    from fleetward.clock import SystemClock

    path = tmp_path / "status.json"
    write_status(path, AgentStatus(running=True, updated_at=SystemClock().now(), device_id="d" * 64))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = read_status(path)
    assert found is not None
    assert found.device_id == "d" * 64
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def test_agent_run_runs_until_sigterm_then_stops_in_order(
    cli: AgentCli, hub: HubSetup, publisher: tuple[ec.EllipticCurvePrivateKey, Path]
) -> None:
    """The real command in its own process: it connects, writes its status, and ends cleanly on SIGTERM."""
    init(cli, hub, publisher[1])
    hub.tenant.claim(
        SimulatedDevice(
            "run", (), root_of_trust=SoftwareRootOfTrust.load_or_create(cli.state / "identity.key")
        )
    )
    settings = AgentSettings.load(cli.state, environ={})
    hub.tenant.client.post(
        f"/v1/tenants/{hub.tenant.id}/reference-values",
        schemas.ReferenceValuesAdd(
            values=[
                schemas.ReferenceValueItem(
                    component="fleetward-agent",
                    version=settings.measurement.version,
                    sha256=settings.measurement.sha256,
                )
            ]
        ),
        schemas.ReferenceValuesAdded,
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FLEETWARD_")}
    environment["FLEETWARD_AGENT_INTERVALS_STATUS_SECONDS"] = "0.1"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fleetward.cli.entry import main; main()",
            "agent",
            "run",
            "--state-dir",
            str(cli.state),
        ],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            found = read_status(cli.state / "status.json")
            if found is not None and found.link.connected:
                break
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the agent did not connect"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopping" in err
    assert "Traceback" not in err
    final = read_status(cli.state / "status.json")
    assert final is not None
    assert not final.running
    assert final.certificate is not None


@pytest.mark.parametrize(
    ("arguments", "command"),
    [
        (["agent", "run"], "agent"),
        (["--json", "agent", "status"], "agent"),
        (["--url", "https://x", "--tenant", "t", "agent", "status"], "agent"),
        (["--url", "agent"], None),  # "agent" is the URL here
        (["tenant", "list"], "tenant"),
        ([], None),
    ],
)
def test_the_console_script_finds_the_command_past_the_global_options(
    arguments: list[str], command: str | None
) -> None:
    assert command_of(arguments) == command


def test_the_agent_s_commands_load_without_the_cloud_s() -> None:
    """A device runs `fleetward agent run` for days: none of the server's libraries in its memory."""
    probe = (
        "import sys\n"
        "sys.argv = ['fleetward', 'agent', '--help']\n"
        "from fleetward.cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "Run this machine as a fleetward device" in shown.stdout
    assert shown.stdout.strip().splitlines()[-1] == "[]"
