"""Shared fixtures: a real store (SQLite, and PostgreSQL where it runs), a real server, real devices.

Every test that takes ``services`` runs twice, once per store. PostgreSQL tests skip with a reason where
no server answers, and fail instead when ``FLEETWARD_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from fleetward.api import schemas
from fleetward.authority.keystore import MasterKeyStore
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services, build_services
from fleetward.config import Limits, Settings
from fleetward.server import BackgroundServer, free_port
from fleetward.sim.fleet import SimulatedDevice, image_digest, measurement
from fleetward.store.schema import metadata
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


@pytest.fixture
def services(database_url: str, tmp_path: Path, clock: FakeClock, limits: Limits) -> Iterator[Services]:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        limits=limits,
    )
    built = build_services(settings, clock=clock, keystore=MasterKeyStore(secrets.token_bytes(32)))
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
