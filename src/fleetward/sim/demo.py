"""The main job: fleetward on the embedded default, a solar farm's devices enrolling through the real flow.

Everything goes over HTTPS to a real server on this machine: the operator's calls through the API client,
the devices' attestation through the enrollment client. Nothing is faked but the devices' hardware.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
from cryptography import x509
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from fleetward.api import schemas
from fleetward.authority.service import RevocationReason
from fleetward.client import FleetwardClient
from fleetward.compose import build_services
from fleetward.config import Settings
from fleetward.errors import AttestationRefused
from fleetward.server import BackgroundServer, free_port
from fleetward.service_tls import ensure_service_tls
from fleetward.sim.fleet import SimulatedDevice, image_digest, measurement
from fleetward.transport import trust
from fleetward.wire.evidence import Measurement

console = Console()

AGENT = ("fleetward-agent", "1.4.0")
APP = ("panel-monitor", "2.1.0")
OLD_APP = ("panel-monitor", "1.9.0")


def run_demo(*, devices: int = 8, data_dir: Path | None = None, keep_serving: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="fleetward-demo-") as scratch:
        root = data_dir or Path(scratch)
        _run(root, devices, keep_serving)


def _run(root: Path, count: int, keep_serving: bool) -> None:
    console.rule("[bold]fleetward[/bold]: identity, attestation and 24-hour certificates")
    tls = ensure_service_tls(root / "tls")
    port = free_port()
    settings = Settings.from_environment(
        data_dir=root,
        port=port,
        tls_certificate=tls.certificate_file,
        tls_private_key=tls.private_key_file,
    )
    settings = replace(settings, database_url=None)  # the demo is always the embedded default
    services = build_services(settings, create_master_key=True)
    _operator, token = services.registry.bootstrap("operator@solar.example", "Solar farm operator")
    console.print(f"Store: SQLite (WAL) at {settings.resolved_database_url.removeprefix('sqlite:///')}")
    with BackgroundServer(services, port=port) as server:
        console.print(f"API and authority: [bold]{server.url}[/bold] (TLS, service CA {tls.ca_file.name})\n")
        with FleetwardClient(server.url, token, ca_file=tls.ca_file) as operator:
            tenant_id, group_id = _set_up_tenant(operator)
            fleet = [SimulatedDevice(f"panel-{n:03d}", _healthy_software()) for n in range(1, count + 1)]
            extra = {
                "stranger": SimulatedDevice("stranger", _healthy_software()),
                "outdated": SimulatedDevice("outdated", (measurement(*AGENT), measurement(*OLD_APP))),
                "tampered": SimulatedDevice(
                    "tampered", (measurement(*AGENT), measurement(*APP, tampered=True))
                ),
            }
            claim = schemas.DeviceClaim(
                devices=[device.claim_item() for device in [*fleet, extra["outdated"], extra["tampered"]]],
                group_id=group_id,
            )
            claimed = operator.post(f"/v1/tenants/{tenant_id}/devices/claim", claim, schemas.ClaimResponse)
            console.print(f"Claimed [bold]{claimed.claimed}[/bold] devices into the Field Test group.\n")
            asyncio.run(_enroll_fleet(server.url, tls.ca_file, fleet))
            _show_fleet(fleet)
            asyncio.run(_show_refusals(server.url, tls.ca_file, fleet[0], extra))
            _revoke_and_verify(operator, tenant_id, fleet, root)
            _show_events(operator, tenant_id)
            if keep_serving:
                _serve_on(server.url, token, tenant_id, tls.ca_file)
    services.close()


def _healthy_software() -> tuple[Measurement, ...]:
    return (measurement(*AGENT), measurement(*APP))


def _set_up_tenant(operator: FleetwardClient) -> tuple[str, str]:
    tenant = operator.post("/v1/tenants", schemas.TenantCreate(name="solar-farm"), schemas.TenantPublic)
    product = operator.post(
        f"/v1/tenants/{tenant.id}/products",
        schemas.ProductCreate(name="panel-controller", description="Controller on each solar panel"),
        schemas.ProductCreated,
    )
    field_test = next(group for group in product.device_groups if group.name == "Field Test")
    values = [
        schemas.ReferenceValueItem(component=name, version=version, sha256=image_digest(name, version))
        for name, version in (AGENT, APP, OLD_APP)
    ]
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
        "reference values", ", ".join(f"{name} {version}" for name, version in (AGENT, APP, OLD_APP))
    )
    table.add_row("security floor", f"{APP[0]} ≥ 2.0.0")
    table.add_row("CA", "root (P-384) and issuing CA (P-256), keys sealed under the master key")
    console.print(table)
    return tenant.id, field_test.id


async def _enroll_fleet(url: str, ca_file: Path, fleet: list[SimulatedDevice]) -> None:
    started = time.perf_counter()
    async with httpx.AsyncClient(verify=trust(ca_file), timeout=30) as http:
        with Progress(
            TextColumn("devices attesting"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("enroll", total=len(fleet))

            async def one(device: SimulatedDevice) -> None:
                await device.enroll(url, http)
                progress.advance(task)

            await asyncio.gather(*(one(device) for device in fleet))
    elapsed = time.perf_counter() - started
    console.print(
        f"[green]✔[/green] {len(fleet)} devices attested and earned certificates in {elapsed * 1000:.0f} ms "
        "(nonce → evidence signed by the identity key → verified → 24-hour certificate)\n"
    )


def _show_fleet(fleet: list[SimulatedDevice]) -> None:
    table = Table(title="Operational certificates", title_justify="left")
    for column in ("device", "device id", "serial", "valid until", "renew after"):
        table.add_column(column)
    for device in fleet:
        assert device.credential is not None
        issued = device.credential.issued
        table.add_row(
            device.name,
            device.device_id[:16] + "…",
            issued.serial[:16] + "…",
            issued.not_after.strftime("%Y-%m-%d %H:%M"),
            issued.renew_after.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


async def _show_refusals(
    url: str, ca_file: Path, renewing: SimulatedDevice, extra: dict[str, SimulatedDevice]
) -> None:
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
        before = renewing.credential.issued.serial if renewing.credential else ""
        renewed = await renewing.enroll(url, http)
    console.print(table)
    console.print(
        f"Renewal is the same flow: {renewing.name} re-attested and got certificate "
        f"{renewed.issued.serial[:16]}… (was {before[:16]}…)\n"
    )


def _revoke_and_verify(
    operator: FleetwardClient, tenant_id: str, fleet: list[SimulatedDevice], root: Path
) -> None:
    victim, keeper = fleet[-1], fleet[0]
    answer = operator.post(
        f"/v1/tenants/{tenant_id}/devices/{victim.device_id}/revoke",
        schemas.Revoke(reason=RevocationReason.KEY_COMPROMISE),
        schemas.RevokedDevice,
    )
    crl_der = operator.get_bytes(f"/v1/tenants/{tenant_id}/crl")
    crl = x509.load_der_x509_crl(crl_der)
    console.print(
        f"Revoked {victim.name}: {answer.certificates_revoked} certificate(s) on the CRL "
        f"(CRL number {crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number}, "
        f"{len(list(crl))} entr{'y' if len(list(crl)) == 1 else 'ies'})."
    )
    openssl = shutil.which("openssl")
    if openssl is None:
        console.print("[dim]openssl not found: skipping the third-party check[/dim]\n")
        return
    chain = operator.get_bytes(f"/v1/tenants/{tenant_id}/ca/chain")
    folder = root / "verify"
    folder.mkdir(exist_ok=True)
    (folder / "chain.pem").write_bytes(chain)
    crl_pem = crl.public_bytes(
        encoding=__import__("cryptography").hazmat.primitives.serialization.Encoding.PEM
    )
    (folder / "crl.pem").write_bytes(crl_pem)
    for device in (keeper, victim):
        assert device.credential is not None
        leaf = folder / f"{device.name}.pem"
        leaf.write_text(device.credential.issued.certificate)
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
        console.print(f"openssl verify -crl_check {device.name}'s certificate: {verdict}")
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
