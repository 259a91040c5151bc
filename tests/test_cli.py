"""The ``fleetward`` CLI: a client of the live API (CliRunner), and the server commands on a data directory.

Every run gets a profile file of its own (``FLEETWARD_CLI_CONFIG``) and no ``FLEETWARD_*`` setting of the
machine, so the real home and environment are untouched. Output is parsed only with ``--json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography import x509
from typer.testing import CliRunner, Result

from fleetward.cli.main import app
from fleetward.compose import build_services
from fleetward.config import Settings
from fleetward.server import BackgroundServer, free_port
from fleetward.service_tls import paths
from fleetward.sim.fleet import SimulatedDevice
from fleetward.store.database import Database, head_revision
from tests.conftest import TenantSetup, healthy_software

GROUPS = [
    "tenant",
    "product",
    "device-group",
    "device",
    "certificate",
    "ca-certificate",
    "role",
    "token",
    "reference-value",
    "security-floor",
    "event",
    "operator",
    "db",
]
SECRET = re.compile(r"fwt_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def flat(text: str) -> str:
    """Text with Rich's line wrapping (and the side borders of its error panels) undone."""
    return " ".join(text.replace("│", " ").split())


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    """No FLEETWARD_* variable of the machine, and a profile file in the test's own directory."""
    cleaned: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    cleaned["FLEETWARD_CLI_CONFIG"] = str(tmp_path / "cli.json")
    return cleaned


@dataclass
class Cli:
    """Runs the CLI at ``url`` with ``token``, in ``tenant`` (by name) when one is given."""

    env: dict[str, str | None]
    url: str
    token: str
    tenant: str | None = None

    def run(self, *args: str, as_json: bool = False, token: str | None = None) -> Result:
        options = ["--url", self.url, "--token", token or self.token]
        if self.tenant is not None:
            options += ["--tenant", self.tenant]
        if as_json:
            options.append("--json")
        return CliRunner().invoke(app, [*options, *args], env=self.env)

    def ok(self, *args: str, token: str | None = None) -> str:
        result = self.run(*args, token=token)
        assert result.exit_code == 0, f"{args}: {result.output}{result.exception!r}"
        return result.stdout

    def json(self, *args: str, token: str | None = None) -> Any:
        result = self.run(*args, as_json=True, token=token)
        assert result.exit_code == 0, f"{args}: {result.output}{result.exception!r}"
        return json.loads(result.stdout)


@pytest.fixture
def cli(server: BackgroundServer, admin_token: str, env: dict[str, str | None]) -> Cli:
    return Cli(env, server.url, admin_token)


@pytest.fixture
def farm(cli: Cli, tenant: TenantSetup) -> Cli:
    """The CLI acting in the ``solar-farm`` tenant (by name) of the ``tenant`` fixture."""
    return replace(cli, tenant="solar-farm")


def write_key(directory: Path, device: SimulatedDevice) -> Path:
    path = directory / f"{device.name}.pem"
    path.write_text(device.claim_item().public_key)
    return path


# ------------------------------------------------------------------ help


def all_command_paths() -> list[list[str]]:
    paths_found: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        paths_found.append(path)
        subcommands: dict[str, object] = getattr(command, "commands", {})  # a group has them
        for name, sub in subcommands.items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths_found


@pytest.mark.parametrize("group", ["", *GROUPS])
def test_every_command_group_explains_itself_with_help(group: str, env: dict[str, str | None]) -> None:
    result = CliRunner().invoke(app, [*([group] if group else []), "--help"], env=env)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    assert "Commands" in result.stdout


def test_every_command_has_help(env: dict[str, str | None]) -> None:
    commands = all_command_paths()
    groups = {path[0] for path in commands if len(path) == 1}
    assert set(GROUPS) <= groups
    for path in commands:
        result = CliRunner().invoke(app, [*path, "--help"], env=env)
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.stdout, path


# ------------------------------------------------------------------ tenants and products


def test_a_tenant_and_a_product_are_created_and_listed(
    server: BackgroundServer, admin_token: str, env: dict[str, str | None]
) -> None:
    """URL, token and tenant come from options or, as here for the first two, from the environment."""
    by_env = {**env, "FLEETWARD_URL": server.url, "FLEETWARD_TOKEN": admin_token}
    created = json.loads(CliRunner().invoke(app, ["--json", "tenant", "create", "farm"], env=by_env).stdout)
    assert created["name"] == "farm"
    listed = json.loads(CliRunner().invoke(app, ["--json", "tenant", "list"], env=by_env).stdout)
    assert [item["id"] for item in listed] == [created["id"]]

    cli = Cli(env, server.url, admin_token, tenant="farm")
    product = cli.json("product", "create", "panel-controller", "--description", "solar panel")
    assert product["product"]["tenant_id"] == created["id"]
    policies = {
        group["name"]: (group["update_policy"], group["os_feed"]) for group in product["device_groups"]
    }
    assert policies == {
        "Development": ("No3rdPartyAppUpdates", "Retail"),
        "Field Test": ("UpdateAll", "Retail"),
        "Production": ("UpdateAll", "Retail"),
        "Production OS Evaluation": ("UpdateAll", "RetailEval"),
        "Field Test OS Evaluation": ("UpdateAll", "RetailEval"),
    }
    assert [item["name"] for item in cli.json("product", "list")] == ["panel-controller"]
    assert "panel-controller" in cli.ok("product", "show", "panel-controller")
    with_env_tenant = {**by_env, "FLEETWARD_TENANT": created["id"]}
    shown = json.loads(CliRunner().invoke(app, ["--json", "tenant", "show"], env=with_env_tenant).stdout)
    assert shown == created
    nowhere = Cli(env, server.url, admin_token, tenant="nowhere").run("product", "list")
    assert nowhere.exit_code == 1
    assert "you can see no tenant 'nowhere'" in flat(nowhere.stderr)


# ------------------------------------------------------------------ devices


def test_devices_are_claimed_one_by_one_or_from_a_csv_or_json_file(farm: Cli, tmp_path: Path) -> None:
    single, *by_csv = [SimulatedDevice(f"panel-{index}", ()) for index in range(3)]
    by_json = [SimulatedDevice(f"json-{index}", ()) for index in range(2)]
    group = next(item for item in farm.json("device-group", "list") if item["name"] == "Field Test")

    claimed = farm.json(
        "device",
        "claim",
        single.device_id,
        "--public-key",
        str(write_key(tmp_path, single)),
        "--group-id",
        group["id"],
    )
    assert [(item["device_id"], item["outcome"]) for item in claimed] == [(single.device_id, "claimed")]

    keys = tmp_path / "keys"
    keys.mkdir()
    with (tmp_path / "devices.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["device_id", "public_key_file"])
        for device in by_csv:
            writer.writerow([device.device_id, f"keys/{write_key(keys, device).name}"])
    from_csv = farm.json("device", "claim", "--from-file", str(tmp_path / "devices.csv"))
    assert [(item["device_id"], item["outcome"]) for item in from_csv] == [
        (device.device_id, "claimed") for device in by_csv
    ]

    (tmp_path / "devices.json").write_text(
        json.dumps([device.claim_item().model_dump() for device in by_json])
    )
    from_json = farm.json("device", "claim", "--from-file", str(tmp_path / "devices.json"))
    assert [item["outcome"] for item in from_json] == ["claimed", "claimed"]
    again = farm.json("device", "claim", "--from-file", str(tmp_path / "devices.json"))
    assert [item["outcome"] for item in again] == ["already_claimed", "already_claimed"]

    listed = farm.json("device", "list")
    assert {item["id"] for item in listed} == {device.device_id for device in (single, *by_csv, *by_json)}
    assert [item["id"] for item in farm.json("device", "list", "--group-id", group["id"])] == [
        single.device_id
    ]


def test_a_refused_claim_exits_1_and_shows_why(farm: Cli, tmp_path: Path) -> None:
    device, impostor = SimulatedDevice("panel", ()), SimulatedDevice("impostor", ())
    result = farm.run(
        "device", "claim", impostor.device_id, "--public-key", str(write_key(tmp_path, device)), as_json=True
    )
    assert result.exit_code == 1
    [item] = json.loads(result.stdout)
    assert (item["outcome"], item["code"]) == ("refused", "invalid_identity")


@pytest.fixture
def offline(env: dict[str, str | None]) -> Cli:
    """The CLI with a URL nothing answers at: for what it must refuse before calling the API."""
    return Cli(env, "http://127.0.0.1:9", f"fwt_{'0' * 16}_{'A' * 43}", tenant="solar-farm")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.json", "{not json", "does not list devices to claim"),
        ("object.json", '{"device_id": "x"}', "does not list devices to claim"),
        ("number.json", "42", "does not list devices to claim"),
        ("columns.csv", "id,key\n1,2\n", "needs the columns device_id and public_key_file"),
        ("missing-key.csv", f"device_id,public_key_file\n{'a' * 64},nowhere.pem\n", "does not list devices"),
    ],
)
def test_a_claim_file_that_cannot_be_read_exits_1_with_a_message(
    offline: Cli, tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    result = offline.run("device", "claim", "--from-file", str(tmp_path / name))
    assert result.exit_code == 1, result.output
    assert message in flat(result.stderr)
    assert name in result.stderr.replace("\n", "")


def test_what_the_cli_can_judge_alone_is_refused_before_any_call(offline: Cli, tmp_path: Path) -> None:
    cases: list[tuple[Cli, list[str], int, str]] = [
        (offline, ["device", "claim"], 1, "give a DEVICE_ID with --public-key"),
        (offline, ["device", "claim", "a" * 64], 1, "give a DEVICE_ID with --public-key"),
        (offline, ["reference-value", "add", "agent", "1.0.0"], 1, "give --sha256 or --image"),
        (replace(offline, tenant=None), ["product", "list"], 1, "no tenant chosen"),
        (offline, ["device", "claim", "--from-file", str(tmp_path / "absent.csv")], 2, "does not exist"),
        (offline, ["reference-value", "add", "a", "1.0.0", "--image", str(tmp_path)], 2, "is a directory"),
    ]
    for cli, args, code, message in cases:
        result = cli.run(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in flat(result.stderr), (args, result.stderr)
    no_token = CliRunner().invoke(app, ["--url", offline.url, "tenant", "list"], env=offline.env)
    assert no_token.exit_code == 1
    assert "no API token" in flat(no_token.stderr)


def test_a_device_is_shown_and_revoked(farm: Cli, tenant: TenantSetup, device: SimulatedDevice) -> None:
    tenant.claim(device)
    shown = farm.json("device", "show", device.device_id)
    assert shown["device"]["id"] == device.device_id
    assert shown["device"]["status"] == "active"
    assert shown["certificates"] == []
    assert device.device_id[:16] in farm.ok("device", "show", device.device_id)

    revoked = farm.json("device", "revoke", device.device_id, "--reason", "key_compromise")
    assert revoked == {"device_id": device.device_id, "certificates_revoked": 0}
    assert [item["id"] for item in farm.json("device", "list", "--status", "revoked")] == [device.device_id]
    events = farm.json("event", "list", "--kind", "revocation")
    assert [item["code"] for item in events] == ["device_revoked"]


# ------------------------------------------------------------------ CA, tokens, roles, reference values


def test_the_ca_chain_downloads_as_two_pem_certificates(farm: Cli, tmp_path: Path) -> None:
    chain, crl = tmp_path / "chain.pem", tmp_path / "crl.der"
    output = farm.ok("ca-certificate", "download", "--output", str(chain), "--crl", str(crl))
    assert "CA chain written" in flat(output)
    issuing, root = x509.load_pem_x509_certificates(chain.read_bytes())
    issuing.verify_directly_issued_by(root)
    assert x509.load_der_x509_crl(crl.read_bytes()).issuer == issuing.subject


def test_a_token_is_created_and_its_secret_printed_once(farm: Cli) -> None:
    output = farm.ok("token", "create", "dashboard", "--scopes", "read", "--tenant", "solar-farm")
    assert "shown once" in output
    [secret] = SECRET.findall(output.replace("\n", ""))
    me = farm.json("me", token=secret)
    assert (me["scopes"], me["email"]) == (["read"], "admin@example.com")
    assert me["token_tenant_id"] == farm.json("tenant", "show")["id"]

    created = farm.json("token", "create", "ci", "--scopes", "read,write")
    assert created["token"]["scopes"] == ["read", "write"]
    assert SECRET.fullmatch(created["secret"])
    listed = farm.json("token", "list")
    assert {"dashboard", "ci", "bootstrap"} == {item["name"] for item in listed}
    assert all("secret" not in item for item in listed)


def test_an_operator_is_created_and_given_a_role(farm: Cli) -> None:
    created = farm.json("operator", "create", "bob@example.com", "--name", "Bob")
    assert created["operator"]["email"] == "bob@example.com"
    assert SECRET.fullmatch(created["token"])
    role = farm.json("role", "add", "bob@example.com", "--role", "Reader")
    assert role["role"] == "Reader"
    roles = {item["email"]: item["role"] for item in farm.json("role", "list")}
    assert roles == {"admin@example.com": "Administrator", "bob@example.com": "Reader"}
    assert [item["name"] for item in farm.json("product", "list", token=created["token"])] == [
        "panel-controller"
    ]


def test_a_reference_value_added_from_an_image_carries_its_sha256(farm: Cli, tmp_path: Path) -> None:
    image = tmp_path / "inverter-fw-3.0.0.img"
    image.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    output = farm.ok("reference-value", "add", "inverter-fw", "3.0.0", "--image", str(image))
    assert digest in output.replace("\n", "")
    listed = farm.json("reference-value", "list", "--component", "inverter-fw")
    assert listed == [{"component": "inverter-fw", "version": "3.0.0", "sha256": digest}]


# ------------------------------------------------------------------ refusals


def test_a_refused_action_exits_non_zero_with_the_reason_on_stderr(
    farm: Cli, tenant: TenantSetup, device: SimulatedDevice
) -> None:
    """The installed ``fleetward`` turns the server's refusal into a one-line message and exit code 2."""
    tenant.claim(device)
    executable = Path(sys.executable).parent / "fleetward"
    assert executable.is_file(), "the fleetward entry point is installed next to the test's Python"
    environment = {name: value for name, value in os.environ.items() if not name.startswith("FLEETWARD_")}
    environment |= {"FLEETWARD_CLI_CONFIG": str(farm.env["FLEETWARD_CLI_CONFIG"]), "COLUMNS": "200"}
    command = ["product", "delete", "panel-controller"]
    finished = subprocess.run(
        [*(str(executable), "--url", farm.url, "--token", farm.token, "--tenant", "solar-farm"), *command],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=60,
    )
    assert finished.returncode == 2
    assert finished.stdout == ""
    assert flat(finished.stderr) == (
        "error: devices are assigned to this product; move them first (product_in_use)"
    ), finished.stderr


# ------------------------------------------------------------------ server commands


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_prepares_a_data_directory_whose_profile_reaches_the_server(
    tmp_path: Path, env: dict[str, str | None]
) -> None:
    data, port = tmp_path / "data", free_port()
    args = ["init", "--data-dir", str(data), "--email", "ops@example.com", "--port", str(port)]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert mode_of(data / "master.key") == 0o600
    database = Database(f"sqlite:///{data / 'fleetward.db'}")
    assert database.current_revision() == head_revision()
    database.dispose()
    tls = paths(data / "tls")
    for path in (tls.ca_file, tls.certificate_file, tls.private_key_file):
        assert path.is_file(), path
    assert mode_of(tls.private_key_file) == 0o600
    profile_path = Path(str(env["FLEETWARD_CLI_CONFIG"]))
    assert mode_of(profile_path) == 0o600
    profile = json.loads(profile_path.read_text())
    assert profile["url"] == f"https://127.0.0.1:{port}"
    assert SECRET.fullmatch(profile["token"])
    assert Path(profile["ca_file"]) == tls.ca_file.resolve()

    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 1
    assert "already initialised" in flat(again.stderr)

    settings = Settings(
        data_dir=data, port=port, tls_certificate=tls.certificate_file, tls_private_key=tls.private_key_file
    )
    services = build_services(settings)
    try:
        with BackgroundServer(services, port=port):
            me = CliRunner().invoke(app, ["--json", "me"], env=env)
    finally:
        services.close()
    assert me.exit_code == 0, me.output
    assert json.loads(me.stdout)["email"] == "ops@example.com"


def test_db_upgrade_brings_the_store_to_the_newest_schema(
    database_url: str, env: dict[str, str | None]
) -> None:
    for _ in range(2):  # and again: a no-op
        result = CliRunner().invoke(app, ["db", "upgrade", "--database-url", database_url], env=env)
        assert result.exit_code == 0, result.output
        assert f"schema at revision {head_revision()}" in result.stdout
    database = Database(database_url)
    try:
        assert database.current_revision() == head_revision()
    finally:
        database.dispose()


def test_openapi_prints_the_document_with_the_attestation_paths(
    tmp_path: Path, env: dict[str, str | None]
) -> None:
    result = CliRunner().invoke(app, ["openapi"], env=env)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["openapi"].startswith("3.")
    assert {"/v1/attestation/nonce", "/v1/attestation/certificate"} <= set(document["paths"])
    assert "/v1/tenants/{tenant_id}/devices/claim" in document["paths"]
    written = CliRunner().invoke(app, ["openapi", "--output", str(tmp_path / "openapi.json")], env=env)
    assert written.exit_code == 0
    assert json.loads((tmp_path / "openapi.json").read_text()) == document


# ------------------------------------------------------------------ the monitor


def test_playbooks_destinations_alerts_health_and_rules_through_the_cli(
    farm: Cli, tenant: TenantSetup
) -> None:
    device = SimulatedDevice("panel-cli", healthy_software())
    tenant.claim(device)
    group = tenant.groups["Development"].id
    added = farm.json(
        "playbook", "destination", "add", "soc", "--kind", "webhook", "--target", "https://soc.example.com/h"
    )
    assert added["kind"] == "webhook"
    assert len(bytes.fromhex(added["secret"])) == 32  # shown once
    assert [item["secret"] for item in farm.json("playbook", "destination", "list")] == [None]
    created = farm.json(
        "playbook",
        "create",
        "phone-home",
        "--code",
        "undeclared_destination",
        "--move-to-group",
        group,
        "--quarantine",
        "--notify",
        "soc",
    )
    assert [action["kind"] for action in created["spec"]["actions"]] == [
        "notify",
        "move_to_group",
        "quarantine",
    ]
    assert "phone-home" in farm.ok("playbook", "list")
    assert farm.json("playbook", "enable", "phone-home", "--off")["spec"]["enabled"] is False
    refused = farm.run("playbook", "create", "nothing")
    assert refused.exit_code != 0
    assert "at least one action" in refused.output
    assert farm.json("alert", "list") == []
    assert farm.json("playbook", "run", "list") == []
    shown = farm.ok("health", "show", device.device_id, "--refresh")
    assert "at_risk" in shown
    assert "never passed attestation" in shown
    rules = [
        {
            "name": "chatty",
            "metric": "messages_in",
            "statistic": "sum",
            "window_seconds": 10,
            "comparator": ">=",
            "threshold": 20,
            "severity": "medium",
            "code": "chatty",
        }
    ]
    path = Path(farm.env["FLEETWARD_CLI_CONFIG"] or ".").parent / "rules.json"
    path.write_text(json.dumps(rules))
    assert "1 rule(s) set" in farm.ok("detection-rules", "set", str(path))
    assert json.loads(farm.ok("detection-rules", "show"))["rules"][0]["name"] == "chatty"
