"""The composition root: builds fleetward's services from its settings, once, and hands them out."""

from __future__ import annotations

from dataclasses import dataclass

from fleetward.authority.keystore import KeyStore, MasterKeyStore, load_master_key
from fleetward.authority.service import AuthorityService
from fleetward.bus import Bus, bus_for
from fleetward.clock import Clock, SystemClock
from fleetward.config import Settings
from fleetward.hub.store import HubStore
from fleetward.monitor.audit_service import AuditService, BusSessionProbe
from fleetward.monitor.health_service import HealthService
from fleetward.monitor.playbook_service import PlaybookService
from fleetward.monitor.reports import ReportStore
from fleetward.registry.service import RegistryService
from fleetward.store.database import Database
from fleetward.store.trust import TrustBell
from fleetward.updates.deployments import DeploymentService
from fleetward.updates.images import ImageService


@dataclass(frozen=True)
class Services:
    settings: Settings
    clock: Clock
    database: Database
    trust_bell: TrustBell
    #: started and closed by the API's lifespan (it needs the server's event loop)
    bus: Bus
    registry: RegistryService
    authority: AuthorityService
    hub_store: HubStore
    reports: ReportStore
    images: ImageService
    deployments: DeploymentService
    keystore: KeyStore
    health: HealthService
    playbooks: PlaybookService
    audits: AuditService

    def close(self) -> None:
        self.authority.close()
        self.database.dispose()


def build_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    keystore: KeyStore | None = None,
    bus: Bus | None = None,
    create_master_key: bool = False,
    migrate: bool = True,
) -> Services:
    """Open the store (migrating it to the newest schema) and wire the services to it.

    The bus is NATS when ``settings.bus_url`` names one, the in-process bus otherwise.
    """
    clock = clock or SystemClock()
    bus = bus or bus_for(settings.bus_url, max_outbound=settings.limits.bus_pending_messages)
    if keystore is None:
        master = load_master_key(
            settings.master_key_file,
            settings.master_key,
            create=create_master_key,
        )
        keystore = MasterKeyStore(master)
    database = Database(settings.resolved_database_url)
    if migrate:
        database.upgrade()
    trust_bell = TrustBell()
    authority = AuthorityService(
        database, keystore, clock, settings.limits, settings.resolved_public_url, trust_bell
    )
    images = ImageService(database, keystore, clock, settings.limits, authority)
    return Services(
        settings=settings,
        clock=clock,
        database=database,
        trust_bell=trust_bell,
        bus=bus,
        registry=RegistryService(database, clock, settings.limits, trust_bell, keystore),
        authority=authority,
        hub_store=HubStore(database, clock, settings.limits),
        reports=ReportStore(database, clock),
        images=images,
        deployments=DeploymentService(database, clock, settings.limits, images),
        keystore=keystore,
        health=HealthService(database, clock, trust_bell),
        playbooks=PlaybookService(database, clock, trust_bell, authority, keystore),
        audits=AuditService(database, clock, settings.limits, BusSessionProbe(bus, settings.limits)),
    )
