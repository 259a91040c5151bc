"""``fleetward``: run the server, and manage tenants, products, device groups, devices and certificates.

Server commands (init, serve, demo, db, openapi) work on a data directory. Every other command is a client
of the API: it calls the URL of your profile (``fleetward login``) with its token, as the tenant you chose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from fleetward.cli import (
    agent_commands,
    audit_commands,
    audit_log_commands,
    deployment_commands,
    hub_commands,
    monitor_commands,
    report_commands,
    resources,
    update_commands,
)
from fleetward.cli.output import console
from fleetward.cli.profile import Profile
from fleetward.cli.root import app, run

__all__ = ["app", "main"]
from fleetward.cli.state import State, fail
from fleetward.client import FleetwardClient
from fleetward.config import Settings
from fleetward.errors import FleetwardError


@app.command()
def login(
    context: typer.Context,
    url: Annotated[str, typer.Option(help="API URL, e.g. https://fleetward.example.com:8443.")],
    token: Annotated[str, typer.Option(help="API token (fwt_…).", prompt=True, hide_input=True)],
    tenant: Annotated[str | None, typer.Option(help="Default tenant id or name.")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA bundle for the API's TLS certificate.")] = None,
) -> None:
    """Save the URL, token and default tenant the other commands use (file mode 0600)."""
    state: State = context.obj
    profile = Profile(url=url, token=token, tenant=tenant, ca_file=ca_file)
    with FleetwardClient(url, token, ca_file=Path(ca_file) if ca_file else None) as client:
        me = resources.me(client)
    profile.save(state.profile_path)
    console.print(f"Logged in as [bold]{me.email}[/bold]; profile saved to {state.profile_path}")


def _settings(
    data_dir: Path, host: str | None, port: int | None, database_url: str | None, public_url: str | None
) -> Settings:
    return Settings.from_environment(
        data_dir=data_dir, host=host, port=port, database_url=database_url, public_url=public_url
    )


DataDir = Annotated[
    Path, typer.Option(envvar="FLEETWARD_DATA_DIR", help="Data directory: database, master key, TLS.")
]
Host = Annotated[str | None, typer.Option(help="Address to listen on.", show_default="127.0.0.1")]
Port = Annotated[int | None, typer.Option(help="Port to listen on.", show_default="8443")]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(envvar="FLEETWARD_DATABASE_URL", help="postgresql://… to use PostgreSQL instead of SQLite."),
]
PublicUrl = Annotated[
    str | None, typer.Option(envvar="FLEETWARD_PUBLIC_URL", help="URL devices and operators reach us at.")
]


@app.command()
def init(
    context: typer.Context,
    data_dir: DataDir = Path(".fleetward"),
    email: Annotated[str, typer.Option(help="The first operator's email.")] = "admin@localhost",
    name: Annotated[str, typer.Option(help="The first operator's name.")] = "Administrator",
    host: Host = None,
    port: Port = None,
    database_url: DatabaseUrl = None,
    public_url: PublicUrl = None,
    tls: Annotated[bool, typer.Option(help="Serve HTTPS with a generated service certificate.")] = True,
) -> None:
    """Prepare a data directory: master key, database, TLS certificate, first operator and CLI profile."""
    from fleetward.compose import build_services
    from fleetward.service_tls import ensure_service_tls

    state: State = context.obj
    settings = _settings(data_dir, host, port, database_url, public_url)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # the database and the master key live here
    services = build_services(settings, create_master_key=True)
    try:
        operator, token = services.registry.bootstrap(email, name)
    except FleetwardError as error:
        services.close()
        fail(f"{error} (the data directory is already initialised)")
    services.close()
    ca_file = None
    scheme = "http"
    if tls:
        names = [settings.host, "localhost"]
        if settings.public_url:
            names.insert(0, urlsplit(settings.public_url).hostname or settings.host)
        files = ensure_service_tls(data_dir / "tls", tuple(dict.fromkeys(names)))
        ca_file = str(files.ca_file.resolve())
        scheme = "https"
    url = settings.public_url or f"{scheme}://{settings.host}:{settings.port}"
    Profile(url=url, token=token, ca_file=ca_file).save(state.profile_path)
    console.print(f"Initialised [bold]{data_dir}[/bold]; first operator [bold]{operator.email}[/bold].")
    console.print(f"CLI profile with its token saved to {state.profile_path} (mode 0600).")
    console.print("Next: [bold]fleetward serve[/bold], then [bold]fleetward tenant create NAME[/bold].")


@app.command()
def serve(
    data_dir: DataDir = Path(".fleetward"),
    host: Host = None,
    port: Port = None,
    database_url: DatabaseUrl = None,
    public_url: PublicUrl = None,
    tls_certificate: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_private_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Processes serving the same port and store (one per core).")
    ] = 1,
    bus_url: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETWARD_BUS_URL",
            help="NATS (nats://host:4222) to share the hub's devices between processes and nodes.",
            show_default="none: one process",
        ),
    ] = None,
) -> None:
    """Run the API (authority, registry) and the hub until interrupted. TLS from the data directory if any."""
    from dataclasses import replace

    from fleetward.compose import build_services
    from fleetward.server import serve as run_server
    from fleetward.service_tls import paths

    settings = Settings.from_environment(
        data_dir=data_dir,
        host=host,
        port=port,
        database_url=database_url,
        public_url=public_url,
        tls_certificate=tls_certificate,
        tls_private_key=tls_private_key,
        bus_url=bus_url,
    )
    generated = paths(data_dir / "tls")
    if settings.tls_certificate is None and generated.certificate_file.exists():
        settings = replace(
            settings, tls_certificate=generated.certificate_file, tls_private_key=generated.private_key_file
        )
    try:
        services = build_services(settings)
    except FleetwardError as error:
        fail(str(error))
    bus = ""
    if settings.bus_url:
        from fleetward.bus.natsbus import redact

        bus = f", bus {redact(settings.bus_url)}"
    console.print(
        f"fleetward serving at [bold]{settings.resolved_public_url}[/bold] ({services.database.dialect}{bus})"
    )
    try:
        run_server(services, log_level=log_level, workers=workers)
    finally:
        services.close()


@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=1, max=1000, help="How many simulated devices.")] = 8,
    data_dir: Annotated[
        Path | None, typer.Option(help="Keep the demo's data here (default: a temporary directory).")
    ] = None,
    keep_serving: Annotated[bool, typer.Option(help="Leave the server running afterwards.")] = False,
) -> None:
    """The main job: start fleetward on the embedded default and enroll simulated devices through it."""
    from fleetward.sim.demo import run_demo

    try:
        run_demo(devices=devices, data_dir=data_dir, keep_serving=keep_serving)
    except FleetwardError as error:
        fail(str(error))


db_app = typer.Typer(help="The store: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = Path(".fleetward"), database_url: DatabaseUrl = None) -> None:
    """Migrate the database to the newest schema."""
    from fleetward.store.database import Database

    settings = _settings(data_dir, None, None, database_url, None)
    database = Database(settings.resolved_database_url)
    try:
        database.upgrade()
        console.print(f"schema at revision {database.current_revision()}")
    except FleetwardError as error:
        fail(str(error))
    finally:
        database.dispose()


@app.command()
def openapi(
    output: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """Print the OpenAPI document of the API."""
    from fleetward.api.openapi import openapi_document

    text = json.dumps(openapi_document(), indent=2, sort_keys=True)
    if output is None:
        sys.stdout.write(text + "\n")
    else:
        output.write_text(text + "\n")


resources.register(app)
hub_commands.register(app)
report_commands.register(app)
agent_commands.register(app)
update_commands.register(app)
deployment_commands.register(app)
audit_log_commands.register(app)
audit_commands.register(app)
monitor_commands.register(app)


def main() -> None:
    """Entry point with every command (``fleetward.cli.entry`` picks the agent's alone when it can)."""
    run()
