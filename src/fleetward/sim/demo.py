"""The main job: fleetward on the embedded default, a solar farm's devices enrolling through the real flow.

Everything goes over HTTPS to a real server on this machine: the operator's calls through the API client,
the devices' attestation through the enrollment client. Nothing is faked but the devices' hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from fleetward.agent.mqtt import MqttClient
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
        hub_port=free_port(),
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
            story = HubStory(operator, tenant_id, settings.hub_port, tls.ca_file, root / "devices")
            asyncio.run(story.run(fleet))
            _verify_with_openssl(operator, tenant_id, fleet, root)
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


def _verify_with_openssl(
    operator: FleetwardClient, tenant_id: str, fleet: list[SimulatedDevice], root: Path
) -> None:
    victim, keeper = fleet[-1], fleet[0]
    crl = x509.load_der_x509_crl(operator.get_bytes(f"/v1/tenants/{tenant_id}/crl"))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    console.print(
        f"The tenant's CRL (number {number}) lists {len(list(crl))} certificate(s): {victim.name}'s."
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


class HubStory:
    """The fleet on the hub: telemetry, a direct method, a desired property, a revocation ending a session."""

    def __init__(
        self, operator: FleetwardClient, tenant_id: str, hub_port: int, ca_file: Path, directory: Path
    ) -> None:
        self._operator = operator
        self._tenant = tenant_id
        self._port = hub_port
        self._ca_file = ca_file
        self._directory = directory
        self.desired_seen: dict[str, str] = {}

    async def run(self, fleet: list[SimulatedDevice]) -> None:
        console.rule("the hub: MQTT over mutual TLS, in the Azure IoT Hub device dialect")
        clients = [
            device.hub_client("127.0.0.1", self._port, self._ca_file, self._directory) for device in fleet
        ]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
                await client.subscribe("$iothub/methods/POST/#", "$iothub/twin/PATCH/properties/desired/#")
            behaviours = [
                asyncio.create_task(self._behave(device, client))
                for device, client in zip(fleet, clients, strict=True)
            ]
            await self._stream_telemetry(fleet, clients)
            await self._call_a_method(fleet[0])
            await self._set_desired(fleet)
            await self._revoke(fleet[-1], clients[-1])
            for behaviour in behaviours:
                behaviour.cancel()

    async def _behave(self, device: SimulatedDevice, client: MqttClient) -> None:
        """What a panel does with what the hub sends it: answer methods, take desired properties."""
        while True:
            message = await client.inbox.get()
            if message.topic.startswith("$iothub/methods/POST/"):
                request_id = message.topic.rpartition("$rid=")[2]
                reading = {"panel": device.name, "power_watts": 310 + hash(device.name) % 40, "ok": True}
                await client.publish(
                    f"$iothub/methods/res/200/?$rid={request_id}", json.dumps(reading).encode()
                )
            elif message.topic.startswith("$iothub/twin/PATCH/properties/desired/"):
                self.desired_seen[device.name] = message.payload.decode()

    async def _stream_telemetry(self, fleet: list[SimulatedDevice], clients: list[MqttClient]) -> None:
        per_device = 20
        started = time.perf_counter()

        async def send(device: SimulatedDevice, client: MqttClient) -> None:
            for number in range(per_device):
                body = json.dumps({"power_watts": 300 + number, "panel_temperature": 31.5}).encode()
                topic = f"devices/{device.device_id}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8"
                await client.publish(topic, body, qos=1)

        await asyncio.gather(*(send(device, client) for device, client in zip(fleet, clients, strict=True)))
        elapsed = time.perf_counter() - started
        params: dict[str, str | int] = {"device_id": fleet[0].device_id, "limit": 1000}
        stored = await asyncio.to_thread(
            self._operator.get_list, f"/v1/tenants/{self._tenant}/telemetry", schemas.TelemetryPublic, params
        )
        total = per_device * len(fleet)
        console.print(
            f"[green]✔[/green] {len(fleet)} panels sent {total} readings with QoS 1 in "
            f"{elapsed * 1000:.0f} ms, each acknowledged only once committed "
            f"({len(stored)} stored for {fleet[0].name})"
        )

    async def _call_a_method(self, device: SimulatedDevice) -> None:
        result = await asyncio.to_thread(
            self._operator.post,
            f"/v1/tenants/{self._tenant}/devices/{device.device_id}/methods/read_power",
            schemas.MethodInvoke(payload={"unit": "W"}, timeout_seconds=10),
            schemas.MethodResultPublic,
        )
        console.print(
            f"[green]✔[/green] direct method read_power on {device.name}: "
            f"status {result.status}, {result.payload}"
        )

    async def _set_desired(self, fleet: list[SimulatedDevice]) -> None:
        pushed = 0
        for device in fleet:
            raw = await asyncio.to_thread(
                self._operator.request_json,
                "PATCH",
                f"/v1/tenants/{self._tenant}/devices/{device.device_id}/twin/desired",
                {"max_temperature": 75},
            )
            pushed += schemas.DesiredPatched.model_validate_json(raw).pushed
        deadline = time.monotonic() + 5
        while len(self.desired_seen) < len(fleet) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        console.print(
            f"[green]✔[/green] desired property max_temperature=75 pushed to {pushed} connected panels; "
            f"{len(self.desired_seen)} received it"
        )

    async def _revoke(self, victim: SimulatedDevice, client: MqttClient) -> None:
        started = time.perf_counter()
        answer = await asyncio.to_thread(
            self._operator.post,
            f"/v1/tenants/{self._tenant}/devices/{victim.device_id}/revoke",
            schemas.Revoke(reason=RevocationReason.KEY_COMPROMISE),
            schemas.RevokedDevice,
        )
        await asyncio.wait_for(client.closed.wait(), 5)
        elapsed = time.perf_counter() - started
        console.print(
            f"[green]✔[/green] revoked {victim.name} ({answer.certificates_revoked} certificate on the CRL): "
            f"the hub ended its live session {elapsed * 1000:.0f} ms after the request\n"
        )


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
