"""The root of the ``fleetward`` command: its global options and the error handling every command shares.

Kept apart from the commands so that ``fleetward agent …`` on a device loads the agent's commands alone,
not the cloud's (the server, SQLAlchemy, FastAPI): see :mod:`fleetward.cli.entry`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fleetward.cli.output import errors
from fleetward.cli.profile import Profile, default_path
from fleetward.cli.state import State
from fleetward.errors import FleetwardError

HELP = """``fleetward``: run the server; manage tenants, products, device groups, devices and certificates.

Server commands (init, serve, demo, db, openapi) work on a data directory. Every other command is a client
of the API: it calls the URL of your profile (``fleetward login``) with its token, as the tenant you chose.
``fleetward agent`` runs on a device.
"""

app = typer.Typer(
    name="fleetward",
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main_options(
    context: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="FLEETWARD_URL", help="API URL.")] = None,
    token: Annotated[
        str | None, typer.Option(envvar="FLEETWARD_TOKEN", help="API token.", show_default=False)
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(envvar="FLEETWARD_TENANT", help="Tenant id or name to act in.")
    ] = None,
    ca_file: Annotated[
        str | None, typer.Option(envvar="FLEETWARD_CA_FILE", help="CA bundle to trust the API's TLS with.")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(envvar="FLEETWARD_CLI_CONFIG", help="CLI profile file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Secures fleets of connected devices: identity, attestation, 24-hour certificates."""
    path = profile or default_path()
    loaded = Profile.load(path).overridden(url=url, token=token, tenant=tenant, ca_file=ca_file)
    context.obj = State(profile_path=path, profile=loaded, as_json=as_json)


def run() -> None:
    """Run the command line: fleetward's errors become a message and exit status 2."""
    try:
        app()
    except FleetwardError as error:
        errors.print(f"[bold red]error:[/bold red] {error.message} [dim]({error.code})[/dim]")
        sys.exit(2)
