"""What every CLI command gets: the profile it calls the API with, and how to print."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import typer

from fleetward.cli.output import errors
from fleetward.cli.profile import Profile
from fleetward.client import FleetwardClient


@dataclass
class State:
    profile_path: Path
    profile: Profile
    as_json: bool

    def client(self) -> FleetwardClient:
        if not self.profile.token:
            fail("no API token: run `fleetward login --url URL --token TOKEN` or set FLEETWARD_TOKEN")
        ca_file = Path(self.profile.ca_file) if self.profile.ca_file else None
        return FleetwardClient(self.profile.url, self.profile.token, ca_file=ca_file)

    def tenant(self, client: FleetwardClient, given: str | None = None) -> str:
        """The tenant id: ``given`` or the profile's, by id or by name."""
        wanted = given or self.profile.tenant
        if not wanted:
            fail("no tenant chosen: pass --tenant, or run `fleetward tenant use NAME`")
        return resolve_tenant(client, wanted)


def fail(message: str, code: int = 1) -> NoReturn:
    errors.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


def resolve_tenant(client: FleetwardClient, wanted: str) -> str:
    """A tenant id from an id or a name among the tenants the caller can see."""
    from fleetward.api.schemas import TenantPublic

    tenants = client.get_list("/v1/tenants", TenantPublic)
    for tenant in tenants:
        if wanted in (tenant.id, tenant.name):
            return tenant.id
    fail(f"you can see no tenant {wanted!r}; `fleetward tenant list` shows those you can")
