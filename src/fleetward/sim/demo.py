"""The main job: fleetward on the embedded default, and a solar farm's panels running the real agent.

Everything goes over HTTPS and MQTT over mutual TLS to a real server on this machine: the operator's calls
through the API client, and each panel is an :class:`~fleetward.agent.runtime.Agent` (in this process, with
a software root of trust) that measures itself and a signed application package, attests, runs the
application, and keeps its hub link (:mod:`fleetward.sim.story`). Nothing is faked but the hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import fleetward
from fleetward.agent.config import agent_code_sha256
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.api import schemas
from fleetward.client import FleetwardClient
from fleetward.compose import build_services
from fleetward.config import Settings
from fleetward.errors import AttestationRefused
from fleetward.server import BackgroundServer, free_port
from fleetward.service_tls import ensure_service_tls
from fleetward.sim.agents import (
    INVERTER_BRIDGE,
    PANEL_MONITOR_VERSION,
    Publisher,
    corrupt_installed_package,
    inverter_bridge_package,
    panel_monitor_package,
    prepare_agent,
    remove_agents,
)
from fleetward.sim.fleet import SimulatedDevice, image_digest, measurement
from fleetward.sim.monitor import RogueStory
from fleetward.sim.story import AgentStory
from fleetward.sim.story import Panel as AgentPanel
from fleetward.sim.updates import UpdateOperator, UpdateStory
from fleetward.transport import trust
from fleetward.wire.evidence import Measurement

console = Console()

AGENT = ("fleetward-agent", "1.4.0")
APP = ("panel-monitor", "2.1.0")
OLD_APP = ("panel-monitor", "1.9.0")
#: what the demo's agents run with: short intervals, so that a baseline and a restart come within seconds
DEMO_AGENT_VALUES: dict[str, object] = {
    "intervals.telemetry_seconds": 0,
    "intervals.baseline_seconds": 1.0,
    "intervals.baseline_sample_seconds": 0.25,
    "intervals.status_seconds": 0.5,
    "sandbox.restart_initial_backoff_seconds": 0.2,
    "sandbox.restart_max_backoff_seconds": 1.0,
    "sandbox.stop_grace_seconds": 1.0,
    "updates.trial_seconds": 1.0,
    "updates.notice_seconds": 0.2,
    "updates.poll_seconds": 2.0,
    "hub.quarantine_retry_seconds": 1.0,
}


def run_demo(*, devices: int = 8, data_dir: Path | None = None, keep_serving: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="fleetward-demo-") as scratch:
        root = data_dir or Path(scratch)
        _run(root, devices, keep_serving)


def _run(root: Path, count: int, keep_serving: bool) -> None:
    console.rule("[bold]fleetward[/bold]: identity, attestation, 24-hour certificates, and the agent")
    tls = ensure_service_tls(root / "tls")
    port = free_port()
    settings = Settings.from_environment(
        data_dir=root,
        port=port,
        hub_port=free_port(),
        tls_certificate=tls.certificate_file,
        tls_private_key=tls.private_key_file,
    )
    settings = replace(settings, database_url=None)  # the demo is always the embedded default
    services = build_services(settings, create_master_key=True)
    _operator, token = services.registry.bootstrap("operator@solar.example", "Solar farm operator")
    console.print(f"Store: SQLite (WAL) at {settings.resolved_database_url.removeprefix('sqlite:///')}")
    # the agents' state directories: applications run as their own users and must reach their images
    farm = Path(tempfile.mkdtemp(prefix="fleetward-demo-agents-"))
    farm.chmod(0o711)
    try:
        with BackgroundServer(services, port=port) as server, _agent_logs(farm / "agents.log"):
            console.print(
                f"API and authority: [bold]{server.url}[/bold] (TLS, service CA {tls.ca_file.name})"
            )
            console.print(f"Agents' state directories and log: {farm}\n")
            with FleetwardClient(server.url, token, ca_file=tls.ca_file) as operator:
                tenant_id = _farm(operator, server.url, settings.hub_port, tls.ca_file, root, farm, count)
                if keep_serving:
                    _serve_on(server.url, token, tenant_id, tls.ca_file)
    finally:
        services.close()
        remove_agents(farm)


def _farm(
    operator: FleetwardClient, url: str, hub_port: int, ca_file: Path, root: Path, farm: Path, count: int
) -> str:
    agent = Measurement(name="fleetward-agent", version=fleetward.__version__, sha256=agent_code_sha256())
    tenant_id, product_id, groups = _set_up_tenant(operator, agent)
    publisher = Publisher.create(farm / "publisher")
    updates = UpdateOperator(operator, tenant_id, product_id, publisher.key)
    root_file = farm / "root.json"
    updates.init_repository(root_file)
    panel_package = panel_monitor_package(tenant_id)
    panel_sha256 = hashlib.sha256(panel_package).hexdigest()
    # published in the tenant's TUF repository (its reference value registered), and installed below
    updates.publish(panel_package, PANEL_MONITOR_VERSION)
    published = publisher.publish(panel_package, farm / "published" / "panel-monitor-2.1.0.tar")
    bridge_package = inverter_bridge_package()
    bridge = publisher.publish(bridge_package, farm / "published" / "inverter-bridge-1.0.0.tar")
    console.print(
        f"Image repository: TUF, root signed by {updates.threshold} of {len(updates.root_keys)} offline "
        f"keys; panel-monitor {PANEL_MONITOR_VERSION} published (the devices trust {root_file.name})\n"
    )
    panels: list[AgentPanel] = []
    for number in range(1, count + 1):
        packages = [(published, panel_sha256, PANEL_MONITOR_VERSION)]
        if number == count:
            packages.append((bridge, hashlib.sha256(bridge_package).hexdigest(), "1.0.0"))
        name = f"panel-{number:03d}"
        agent_settings = prepare_agent(
            farm / name,
            authority_url=url,
            hub_port=hub_port,
            ca_file=ca_file,
            publisher=publisher,
            packages=packages,
            agent_values={
                **DEMO_AGENT_VALUES,
                "agent.sha256": agent.sha256,
                # agents sharing a machine need disjoint uid ranges: an application's user is its own
                "sandbox.first_app_uid": 200_000 + 100 * number,
                "sandbox.app_uid_count": 100,
                "updates.root_file": str(root_file),
                "updates.product_id": product_id,
            },
        )
        if number == count:  # its flash fails: this package no longer is what was installed
            corrupt_installed_package(agent_settings, INVERTER_BRIDGE)
        panels.append(AgentPanel(name, agent_settings))
    extra = {
        "stranger": SimulatedDevice("stranger", _healthy_software()),
        "outdated": SimulatedDevice("outdated", (measurement(*AGENT), measurement(*OLD_APP))),
        "tampered": SimulatedDevice("tampered", (measurement(*AGENT), measurement(*APP, tampered=True))),
    }
    identities = [
        SoftwareRootOfTrust.load_or_create(panel.settings.state_dir / "identity.key") for panel in panels
    ]
    claim = schemas.DeviceClaim(
        devices=[
            SimulatedDevice(panel.name, (), root_of_trust=rot).claim_item()
            for panel, rot in zip(panels, identities, strict=True)
        ],
        group_id=groups["Field Test"],
    )
    claimed = operator.post(f"/v1/tenants/{tenant_id}/devices/claim", claim, schemas.ClaimResponse)
    # the two devices the authority refuses never run an agent: they are on a bench, not in the field
    bench = schemas.DeviceClaim(
        devices=[extra["outdated"].claim_item(), extra["tampered"].claim_item()],
        group_id=groups["Development"],
    )
    on_bench = operator.post(f"/v1/tenants/{tenant_id}/devices/claim", bench, schemas.ClaimResponse)
    console.print(
        f"Claimed [bold]{claimed.claimed}[/bold] panels into the Field Test group (and {on_bench.claimed} "
        "bench devices into Development). Each panel runs the "
        f"agent with panel-monitor {PANEL_MONITOR_VERSION} installed (signed, SHA-256 {panel_sha256[:16]}…); "
        f"{panels[-1].name} also has inverter-bridge 1.0.0, whose package got corrupted on its flash.\n"
    )
    story = AgentStory(console, operator, tenant_id, panels)

    async def live() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await story.start(stack)
            await _show_refusals(url, ca_file, extra)
            await story.renew(panels[0])
            await story.run_hub_story()
            await UpdateStory(
                console,
                updates,
                groups["Field Test"],
                [(panel.name, panel.running) for panel in panels],
                lambda version, broken: panel_monitor_package(tenant_id, version, broken=broken),
            ).run()
            await RogueStory(
                console,
                operator,
                tenant_id,
                product_id,
                updates,
                groups["Field Test"],
                [(panel.name, panel.running) for panel in panels],
                lambda version: panel_monitor_package(tenant_id, version),
            ).run()
            await story.revoke(panels[-1])
            kept, revoked = panels[0], panels[-1]
            certificates = [
                (panel.name, panel.certificate_pem())
                for panel in {kept.name: kept, revoked.name: revoked}.values()
            ]
            await asyncio.to_thread(_verify_with_openssl, operator, tenant_id, certificates, root)
            console.print("Stopping the agents: applications first, then the hub links, then the outboxes.\n")

    asyncio.run(live())
    _show_events(operator, tenant_id)
    return tenant_id


@contextlib.contextmanager
def _agent_logs(path: Path) -> Iterator[None]:
    """The agents log to a file while the demo prints its story."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fleetward.agent")
    previous = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = previous
        handler.close()


def _healthy_software() -> tuple[Measurement, ...]:
    return (measurement(*AGENT), measurement(*APP))


def _set_up_tenant(operator: FleetwardClient, agent: Measurement) -> tuple[str, str, dict[str, str]]:
    tenant = operator.post("/v1/tenants", schemas.TenantCreate(name="solar-farm"), schemas.TenantPublic)
    product = operator.post(
        f"/v1/tenants/{tenant.id}/products",
        schemas.ProductCreate(name="panel-controller", description="Controller on each solar panel"),
        schemas.ProductCreated,
    )
    groups = {group.name: group.id for group in product.device_groups}
    values = [
        schemas.ReferenceValueItem(component=name, version=version, sha256=image_digest(name, version))
        for name, version in (AGENT, APP, OLD_APP)
    ]
    values.append(
        schemas.ReferenceValueItem(component=agent.name, version=agent.version, sha256=agent.sha256)
    )
    operator.post(
        f"/v1/tenants/{tenant.id}/reference-values",
        schemas.ReferenceValuesAdd(values=values),
        schemas.ReferenceValuesAdded,
    )
    operator.put(
        f"/v1/tenants/{tenant.id}/security-floors/{APP[0]}",
        schemas.SecurityFloorSet(minimum_version="2.0.0"),
        schemas.SecurityFloorPublic,
    )
    table = Table(title="Tenant solar-farm", title_justify="left", show_header=False)
    table.add_row("product", f"panel-controller with {len(product.device_groups)} default device groups")
    table.add_row(
        "reference values",
        f"the agent {agent.version} (its code's SHA-256), panel-monitor {PANEL_MONITOR_VERSION} (its signed "
        "package's SHA-256); for the refusals below: "
        + ", ".join(f"{name} {version}" for name, version in (AGENT, APP, OLD_APP)),
    )
    table.add_row("security floor", f"{APP[0]} ≥ 2.0.0")
    table.add_row("CA", "root (P-384) and issuing CA (P-256), keys sealed under the master key")
    console.print(table)
    return tenant.id, product.product.id, groups


async def _show_refusals(url: str, ca_file: Path, extra: dict[str, SimulatedDevice]) -> None:
    table = Table(title="What the authority refused, and why", title_justify="left")
    table.add_column("device")
    table.add_column("code")
    table.add_column("reason")
    async with httpx.AsyncClient(verify=trust(ca_file), timeout=30) as http:
        for name, device in extra.items():
            try:
                await device.enroll(url, http)
                table.add_row(name, "[red]ISSUED[/red]", "this should not happen")
            except AttestationRefused as refused:
                table.add_row(name, refused.code, refused.message)
    console.print(table)


def _verify_with_openssl(
    operator: FleetwardClient, tenant_id: str, certificates: list[tuple[str, str]], root: Path
) -> None:
    """Check the kept device's and the revoked device's certificates as any third party would."""
    keeper, victim = certificates[0], certificates[-1]
    crl = x509.load_der_x509_crl(operator.get_bytes(f"/v1/tenants/{tenant_id}/crl"))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    console.print(f"The tenant's CRL (number {number}) lists {len(list(crl))} certificate(s): {victim[0]}'s.")
    openssl = shutil.which("openssl")
    if openssl is None:
        console.print("[dim]openssl not found: skipping the third-party check[/dim]\n")
        return
    chain = operator.get_bytes(f"/v1/tenants/{tenant_id}/ca/chain")
    folder = root / "verify"
    folder.mkdir(exist_ok=True)
    (folder / "chain.pem").write_bytes(chain)
    crl_pem = crl.public_bytes(encoding=serialization.Encoding.PEM)
    (folder / "crl.pem").write_bytes(crl_pem)
    for name, certificate in dict.fromkeys((keeper, victim)):
        leaf = folder / f"{name}.pem"
        leaf.write_text(certificate)
        result = subprocess.run(  # noqa: S603 - fixed arguments, files we wrote
            [
                openssl,
                "verify",
                "-CAfile",
                str(folder / "chain.pem"),
                "-CRLfile",
                str(folder / "crl.pem"),
                "-crl_check",
                str(leaf),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        output = result.stdout + result.stderr
        reasons = [line.partition("lookup:")[2].strip() for line in output.splitlines() if "lookup:" in line]
        verdict = (
            "[green]OK[/green]" if result.returncode == 0 else f"[red]refused: {', '.join(reasons)}[/red]"
        )
        console.print(f"openssl verify -crl_check {name}'s certificate: {verdict}")
    console.print()


def _show_events(operator: FleetwardClient, tenant_id: str) -> None:
    events = operator.get_list(f"/v1/tenants/{tenant_id}/events", schemas.EventPublic, {"limit": 200})
    counts: dict[tuple[str, str], int] = {}
    for event in events:
        counts[(event.kind, event.code)] = counts.get((event.kind, event.code), 0) + 1
    table = Table(title="Event log of the tenant", title_justify="left")
    table.add_column("kind")
    table.add_column("code")
    table.add_column("count", justify="right")
    for (kind, code), number in sorted(counts.items()):
        table.add_row(kind, code, str(number))
    console.print(table)


def _serve_on(url: str, token: str, tenant_id: str, ca_file: Path) -> None:
    console.print(
        Panel(
            f"fleetward is serving at {url}\n"
            f"FLEETWARD_URL={url} FLEETWARD_CA_FILE={ca_file} FLEETWARD_TENANT={tenant_id} \\\n"
            f"FLEETWARD_TOKEN={token} fleetward device list\n"
            "Ctrl-C stops it.",
            title="keep serving",
        )
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
