"""Shared fixtures: a real store (SQLite, and PostgreSQL where it runs), a real server, real devices.

Every test that takes ``services`` runs twice, once per store. PostgreSQL tests skip with a reason where
no server answers, and fail instead when ``FLEETWARD_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fleetward.api import schemas
from fleetward.authority.keystore import MasterKeyStore
from fleetward.cli.main import app as cli_app
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services, build_services
from fleetward.config import Limits, Settings
from fleetward.server import BackgroundServer, free_port
from fleetward.service_tls import ServiceTls, ensure_service_tls
from fleetward.sim.fleet import SimulatedDevice, image_digest, measurement
from fleetward.store.schema import metadata
from fleetward.transport import trust
from fleetward.wire.evidence import Measurement

POSTGRES_ADMIN_URL = os.environ.get(
    "FLEETWARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_SERVICES = os.environ.get("FLEETWARD_REQUIRE_SERVICES") == "1"

AGENT = ("fleetward-agent", "1.4.0")
APP = ("panel-monitor", "2.1.0")


def healthy_software() -> tuple[Measurement, ...]:
    return (measurement(*AGENT), measurement(*APP))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"fleetward_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        admin.dispose()
        reason = f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {type(error.orig).__name__}"
        if REQUIRE_SERVICES:
            pytest.fail(reason + " (FLEETWARD_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _empty_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        inspector = sa.inspect(connection)
        if inspector.has_table("tenants"):
            names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
            connection.execute(sa.text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleetward.db'}"
    url: str = request.getfixturevalue("postgres_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def clock() -> FakeClock:
    """Starts at the real time (so that openssl accepts what is issued) and moves only when told to."""
    return FakeClock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def limits() -> Limits:
    return Limits()


def make_services(
    database_url: str, data_dir: Path, clock: FakeClock, limits: Limits, *, tls: ServiceTls | None = None
) -> Services:
    """Services on ``database_url``; with ``tls``, the API speaks HTTPS and the hub listens (mutual TLS)."""
    port = free_port()
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        port=port,
        public_url=f"{'https' if tls else 'http'}://127.0.0.1:{port}",
        limits=limits,
        hub_port=free_port() if tls else 0,
        tls_certificate=tls.certificate_file if tls else None,
        tls_private_key=tls.private_key_file if tls else None,
    )
    return build_services(settings, clock=clock, keystore=MasterKeyStore(secrets.token_bytes(32)))


@pytest.fixture
def services(database_url: str, tmp_path: Path, clock: FakeClock, limits: Limits) -> Iterator[Services]:
    """Services without TLS and without the hub (the API over plain HTTP on loopback)."""
    built = make_services(database_url, tmp_path, clock, limits)
    yield built
    built.close()


@pytest.fixture
def server(services: Services) -> Iterator[BackgroundServer]:
    with BackgroundServer(services, port=services.settings.port) as running:
        yield running


@pytest.fixture
def admin_token(services: Services) -> str:
    _operator, token = services.registry.bootstrap("admin@example.com", "Admin")
    return token


@pytest.fixture
def admin(server: BackgroundServer, admin_token: str) -> Iterator[FleetwardClient]:
    with FleetwardClient(server.url, admin_token) as client:
        yield client


@dataclass
class TenantSetup:
    """A tenant with one product, its default groups, reference values for the healthy software."""

    id: str
    product: schemas.ProductPublic
    groups: dict[str, schemas.DeviceGroupPublic]
    client: FleetwardClient

    def claim(self, *devices: SimulatedDevice, group: str = "Field Test") -> schemas.ClaimResponse:
        return self.client.post(
            f"/v1/tenants/{self.id}/devices/claim",
            schemas.DeviceClaim(
                devices=[device.claim_item() for device in devices], group_id=self.groups[group].id
            ),
            schemas.ClaimResponse,
        )

    def events(self, **params: str | int) -> list[schemas.EventPublic]:
        return self.client.get_list(f"/v1/tenants/{self.id}/events", schemas.EventPublic, dict(params))

    def certificates(self, device_id: str | None = None) -> list[schemas.CertificatePublic]:
        params: dict[str, str | int] = {"device_id": device_id} if device_id else {}
        return self.client.get_list(f"/v1/tenants/{self.id}/certificates", schemas.CertificatePublic, params)


def make_tenant(client: FleetwardClient, name: str = "solar-farm") -> TenantSetup:
    tenant = client.post("/v1/tenants", schemas.TenantCreate(name=name), schemas.TenantPublic)
    created = client.post(
        f"/v1/tenants/{tenant.id}/products",
        schemas.ProductCreate(name="panel-controller"),
        schemas.ProductCreated,
    )
    client.post(
        f"/v1/tenants/{tenant.id}/reference-values",
        schemas.ReferenceValuesAdd(
            values=[
                schemas.ReferenceValueItem(
                    component=name_, version=version, sha256=image_digest(name_, version)
                )
                for name_, version in (AGENT, APP)
            ]
        ),
        schemas.ReferenceValuesAdded,
    )
    return TenantSetup(
        id=tenant.id,
        product=created.product,
        groups={group.name: group for group in created.device_groups},
        client=client,
    )


@pytest.fixture
def tenant(admin: FleetwardClient) -> TenantSetup:
    return make_tenant(admin)


@pytest.fixture
def device() -> SimulatedDevice:
    return SimulatedDevice("panel-001", healthy_software())


# ------------------------------------------------------------------ the hub: TLS, a server, enrolled devices


@pytest.fixture
def service_tls(tmp_path: Path) -> ServiceTls:
    return ensure_service_tls(tmp_path / "tls")


@pytest.fixture
def hub_services(
    database_url: str, tmp_path: Path, clock: FakeClock, limits: Limits, service_tls: ServiceTls
) -> Iterator[Services]:
    """Services with TLS: the API over HTTPS, and the hub listening for devices."""
    built = make_services(database_url, tmp_path, clock, limits, tls=service_tls)
    yield built
    built.close()


@dataclass
class HubSetup:
    """A running server with its hub, a tenant, and the means to enroll devices and connect them."""

    services: Services
    server: BackgroundServer
    tls: ServiceTls
    token: str
    tenant: TenantSetup
    directory: Path

    @property
    def hub_port(self) -> int:
        return self.services.settings.hub_port

    def enroll(self, device: SimulatedDevice, *, claim: bool = True) -> SimulatedDevice:
        """Claim (into the Field Test group) and enroll ``device``; its certificate and key go to files."""
        if claim:
            self.tenant.claim(device)

        async def run() -> None:
            async with httpx.AsyncClient(verify=trust(self.tls.ca_file), timeout=30) as http:
                await device.enroll(self.server.url, http)

        asyncio.run(run())
        return device

    def device_tls(self, device: SimulatedDevice) -> ssl.SSLContext:
        """What the device connects to the hub with: trusts the service CA, presents its certificate."""
        assert device.credential is not None
        certificate = self.directory / f"{device.device_id[:16]}.pem"
        key = self.directory / f"{device.device_id[:16]}.key"
        certificate.write_text(device.credential.issued.certificate)
        key.write_bytes(device.credential.key_pem())
        key.chmod(0o600)
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        context.load_cert_chain(str(certificate), str(key))
        return context

    def mqtt(self, device: SimulatedDevice, **options: Any) -> aiomqtt.Client:
        """An MQTT client (paho, through aiomqtt) for ``device``, in the IoT Hub dialect."""
        return aiomqtt.Client(
            "127.0.0.1",
            self.hub_port,
            identifier=options.pop("identifier", device.device_id),
            username=options.pop("username", f"127.0.0.1/{device.device_id}/?api-version=2021-04-12"),
            tls_context=options.pop("tls_context", None) or self.device_tls(device),
            protocol=aiomqtt.ProtocolVersion.V311,
            timeout=options.pop("timeout", 10),
            **options,
        )

    def hub_events(self, **params: str | int) -> list[schemas.EventPublic]:
        return [event for event in self.tenant.events(limit=1000, **params) if event.kind == "hub"]

    def agent_init_args(
        self, publisher_file: Path, *, authority_url: str | None = None, hub_port: int | None = None
    ) -> list[str]:
        """``fleetward agent init`` with what points an agent at this server and hub (or at the given
        addresses: a proxy in front of them, say)."""
        return [
            "init",
            "--authority-url",
            authority_url or self.server.url,
            "--hub-host",
            "127.0.0.1",
            "--hub-port",
            str(hub_port or self.hub_port),
            "--ca-file",
            str(self.tls.ca_file),
            "--publisher-key",
            str(publisher_file),
        ]


def agent_cli(state: Path, *args: str) -> None:
    """``fleetward agent <args> --state-dir <state>`` in this process, as an operator runs it, without the
    test run's own ``FLEETWARD_*`` variables."""
    environment: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    result = CliRunner().invoke(cli_app, ["agent", *args, "--state-dir", str(state)], env=environment)
    assert result.exit_code == 0, result.output


@pytest.fixture
def hub(hub_services: Services, tmp_path: Path, service_tls: ServiceTls) -> Iterator[HubSetup]:
    _operator, token = hub_services.registry.bootstrap("admin@example.com", "Admin")
    with (
        BackgroundServer(hub_services, port=hub_services.settings.port) as server,
        FleetwardClient(server.url, token, ca_file=service_tls.ca_file) as client,
    ):
        yield HubSetup(hub_services, server, service_tls, token, make_tenant(client), tmp_path)
