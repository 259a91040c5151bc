"""``fleetward agent``: run this machine as a fleetward device.

These commands work on the agent's state directory (``--state-dir``, ``$FLEETWARD_AGENT_STATE_DIR``); they
call no operator API. ``init`` writes ``agent.toml`` and the identity key, ``run`` runs the agent until it
is signalled, ``status`` and ``app logs`` read what the running agent writes (or what a stopped one left).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography.hazmat.primitives import serialization
from rich.table import Table

from fleetward.agent.boot import measured_boot, open_root_of_trust, root_kind
from fleetward.agent.config import (
    CONFIG_NAME,
    STATE_DIR_VARIABLE,
    AgentSettings,
    render_agent_toml,
    write_private_file,
)
from fleetward.agent.credential import CredentialFile
from fleetward.agent.enroll import EnrollmentClient
from fleetward.agent.install import install_package
from fleetward.agent.outbox import Outbox
from fleetward.agent.rot import device_id_of
from fleetward.agent.status import (
    AgentStatus,
    AppStatus,
    CertificateStatus,
    LinkState,
    OutboxState,
    StateLock,
    log_paths,
    read_log,
    read_status,
)
from fleetward.cli.output import console
from fleetward.cli.state import State, fail
from fleetward.clock import SystemClock
from fleetward.errors import ConfigurationError, FleetwardError
from fleetward.wire.reports import AgentReport

agent_app = typer.Typer(
    name="agent",
    help="Run this machine as a fleetward device: identity, measured launch, enrollment, the hub link.",
    no_args_is_help=True,
)
app_app = typer.Typer(
    name="app", help="The applications the agent launches: install, list, logs.", no_args_is_help=True
)
agent_app.add_typer(app_app)
image_app = typer.Typer(
    name="image", help="The agent's own image: build one to publish.", no_args_is_help=True
)
agent_app.add_typer(image_app)

StateDir = Annotated[
    Path,
    typer.Option(envvar=STATE_DIR_VARIABLE, help="The agent's state directory (agent.toml, keys, outbox)."),
]
DEFAULT_STATE_DIR = Path(".fleetward-agent")


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """fleetward's errors as a message and exit status 2, as the rest of the CLI shows them."""
    try:
        yield
    except FleetwardError as error:
        _fail(error)


def _fail(error: FleetwardError) -> NoReturn:
    fail(f"{error.message} ({error.code})", 2)


def _load(state_dir: Path) -> AgentSettings:
    with _errors():
        return AgentSettings.load(state_dir)


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().resolve()) if path is not None else None


# ------------------------------------------------------------------------------------------- init


@agent_app.command()
def init(
    context: typer.Context,
    authority_url: Annotated[str, typer.Option(help="The authority's URL, e.g. https://fleet.example:8443.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    hub_host: Annotated[str | None, typer.Option(help="The hub's host; the authority's by default.")] = None,
    hub_port: Annotated[int, typer.Option(min=1, max=65535, help="The hub's port.")] = 8883,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle for the authority's and hub's TLS.")] = None,
    root_of_trust: Annotated[
        str, typer.Option(help="software (development only), tpm or pkcs11.")
    ] = "software",
    key_file: Annotated[Path | None, typer.Option(help="software or tpm: the identity key file.")] = None,
    tcti: Annotated[str | None, typer.Option(help="tpm: the TCTI, e.g. device:/dev/tpmrm0.")] = None,
    pcr: Annotated[int, typer.Option(help="tpm: the PCR measurements extend (23, or 16).")] = 23,
    pkcs11_module: Annotated[Path | None, typer.Option(help="pkcs11: the module (.so).")] = None,
    token: Annotated[str | None, typer.Option(help="pkcs11: the token label.")] = None,
    key_label: Annotated[str, typer.Option(help="pkcs11: the identity key's label.")] = "fleetward-identity",
    pin_file: Annotated[Path | None, typer.Option(help="pkcs11: a file (0600) with the user PIN.")] = None,
    publisher_key: Annotated[
        list[Path] | None, typer.Option(help="A trusted publisher's public key (PEM); repeat for several.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing agent.toml.")] = False,
) -> None:
    """Write agent.toml, create the identity key, and print the device id and public key to claim it with."""
    from urllib.parse import urlsplit

    state: State = context.obj
    config_file = state_dir / CONFIG_NAME
    if config_file.exists() and not force:
        fail(f"{config_file} exists; pass --force to overwrite it")
    values: dict[str, object] = {
        "authority_url": authority_url,
        "hub.host": hub_host or urlsplit(authority_url).hostname or "",
        "hub.port": hub_port,
        "ca_file": _absolute(ca_file),
        "publisher_keys": [_absolute(path) for path in publisher_key or []],
        "root_of_trust.kind": root_of_trust,
        "root_of_trust.key_file": _absolute(key_file),
    }
    if root_of_trust == "tpm":
        values.update({"root_of_trust.tcti": tcti, "root_of_trust.pcr": pcr})
    elif root_of_trust == "pkcs11":
        values.update(
            {
                "root_of_trust.module": _absolute(pkcs11_module),
                "root_of_trust.token": token,
                "root_of_trust.key_label": key_label,
                "root_of_trust.pin_file": _absolute(pin_file),
            }
        )
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = config_file.read_bytes() if config_file.exists() else None
    write_private_file(config_file, render_agent_toml(values))
    try:
        settings = AgentSettings.load(state_dir)
        root = open_root_of_trust(settings.root_of_trust)
    except FleetwardError as error:
        if previous is None:
            config_file.unlink()
        else:
            write_private_file(config_file, previous)
        _fail(error)
    pem = root.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_file = state_dir / "identity.pub.pem"
    public_file.write_bytes(pem)
    device_id = device_id_of(root)
    measurement = settings.measurement
    if state.as_json:
        console.print_json(
            json.dumps(
                {
                    "device_id": device_id,
                    "public_key": pem.decode("ascii"),
                    "root_of_trust": root_kind(root),
                    "config": str(config_file),
                    "measurement": measurement.model_dump(),
                }
            )
        )
        return
    console.print(f"Wrote [bold]{config_file}[/bold]; root of trust: {root_kind(root)}.")
    if root.development_only:
        console.print(
            "[yellow]development only: whoever reads the identity key file can be this device[/yellow]"
        )
    console.print(f"device id: [bold]{device_id}[/bold]")
    console.print(pem.decode("ascii").rstrip())
    console.print(
        f"The agent measures itself as {measurement.name} {measurement.version} {measurement.sha256}.\n"
        "Next, as an operator:\n"
        f"  fleetward device claim {device_id} --public-key {public_file}\n"
        f"  fleetward reference-value add {measurement.name} {measurement.version} "
        f"--sha256 {measurement.sha256}\n"
        f"then: fleetward agent run --state-dir {state_dir}"
    )


# ------------------------------------------------------------------------------------------- enroll


class _PrintingReporter:
    async def __call__(self, report: AgentReport) -> None:
        console.print(f"[red]refused[/red]: {report.model_dump_json()}")


@agent_app.command()
def enroll(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Attest once now (measuring the agent and the installed applications) and store the credential."""
    settings = _load(state_dir)

    async def run() -> None:
        import httpx

        from fleetward.transport import trust

        root = await asyncio.to_thread(open_root_of_trust, settings.root_of_trust)
        boot = await measured_boot(settings, root, report=_PrintingReporter(), clock=SystemClock())
        async with httpx.AsyncClient(
            verify=trust(settings.ca_file), timeout=settings.limits.http_timeout_seconds
        ) as http:
            client = EnrollmentClient(settings.authority_url, root, http=http)
            credential = await client.enroll(boot.log.entries())
        await asyncio.to_thread(CredentialFile(settings.credential_file).save, credential)
        issued = credential.issued
        console.print(
            f"Enrolled [bold]{issued.device_id}[/bold] with {len(boot.log.entries())} measurement(s): "
            f"certificate {issued.serial}, valid until {issued.not_after:%Y-%m-%d %H:%M:%S} UTC, "
            f"saved to {settings.credential_file}"
        )

    with _errors(), StateLock(settings.lock_file):
        asyncio.run(run())


# ------------------------------------------------------------------------------------------- run


@agent_app.command()
def run(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the agent until SIGTERM or Ctrl-C: enroll and renew, launch and supervise, keep the hub link."""
    from fleetward.agent.runtime import Agent
    from fleetward.agent.self_update import RESTART_EXIT_CODE

    settings = _load(state_dir)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    restart = False

    async def main() -> None:
        nonlocal restart
        async with Agent(settings) as agent:
            console.print(f"agent {agent.device_id} running; status in {settings.status_file}")
            await agent.run_until_signalled()
        restart = agent.restart_requested

    with _errors():
        asyncio.run(main())
    if restart:  # an agent image is on trial: the launcher (and its service manager) starts it
        console.print(f"agent stopped to restart on its new image (exit status {RESTART_EXIT_CODE})")
        raise typer.Exit(RESTART_EXIT_CODE)


@agent_app.command()
def launch(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Start the agent (what the service manager runs, Restart=always): the agent image it installed, once
    measured launch accepts it, else the installed agent; a new image on trial gets one start to commit."""
    from fleetward.agent.self_update import launch as launch_agent

    settings = _load(state_dir)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _errors():
        launch_agent(settings, log_level=log_level)


@image_app.command("build")
def image_build(
    out: Annotated[Path, typer.Option(help="Where to write the agent image (an uncompressed tar).")],
) -> None:
    """Build an agent image of this fleetward, to publish with `fleetward image add FILE --kind agent`."""
    from fleetward.agent.self_update import AGENT_COMPONENT_ID, build_agent_image

    data = build_agent_image()
    out.write_bytes(data)
    console.print(
        f"Wrote {out} ({len(data)} bytes), component {AGENT_COMPONENT_ID}; publish it with\n"
        f"  fleetward image add {out} --kind agent --product PRODUCT --version VERSION --publisher-key KEY"
    )


# ------------------------------------------------------------------------------------------- status


def offline_status(settings: AgentSettings) -> AgentStatus:
    """What the state directory says when the agent does not run (its last status file fills the rest)."""
    last = read_status(settings.status_file)
    credential = None
    with contextlib.suppress(ConfigurationError):
        credential = CredentialFile(settings.credential_file).load()
    certificate = None
    if credential is not None:
        certificate = CertificateStatus.of(credential.issued, credential.issued.renew_after)
    outbox = OutboxState()
    if (settings.state_dir / "outbox.db").exists():

        async def stats() -> OutboxState:
            box = await asyncio.to_thread(Outbox.open, settings.state_dir)
            async with box:
                found = await box.stats()
            return OutboxState(messages=found.messages, bytes=found.bytes, dropped=found.dropped)

        with contextlib.suppress(FleetwardError):
            outbox = asyncio.run(stats())
    known = {app.component_id: app for app in last.apps} if last else {}
    apps = tuple(
        AppStatus(
            component_id=record.component_id,
            version=record.version,
            image_sha256=record.package_sha256,
            state="stopped",
        )
        if record.component_id not in known or known[record.component_id].version != record.version
        else known[record.component_id].model_copy(update={"pid": None})
        for record in settings.apps
    )
    return AgentStatus(
        running=False,
        updated_at=last.updated_at if last else SystemClock().now(),
        started_at=last.started_at if last else None,
        device_id=credential.issued.device_id if credential else (last.device_id if last else None),
        root_of_trust=settings.root_of_trust.kind,
        development_only=last.development_only if last else None,
        measurements=last.measurements if last else 0,
        certificate=certificate,
        link=last.link.model_copy(update={"connected": False}) if last else LinkState(),
        outbox=outbox,
        reports_sent=last.reports_sent if last else 0,
        reports_dropped=last.reports_dropped if last else 0,
        apps=apps,
        last_refusal=last.last_refusal if last else None,
    )


def current_status(settings: AgentSettings) -> AgentStatus:
    """The running agent's status file, or the state directory's account of a stopped agent."""
    if StateLock.held(settings.lock_file):
        status = read_status(settings.status_file)
        if status is not None:
            return status
    return offline_status(settings)


@agent_app.command()
def status(context: typer.Context, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Show the agent's status: identity, certificate, hub link, outbox, applications, last refusal."""
    state: State = context.obj
    settings = _load(state_dir)
    with _errors():
        found = current_status(settings)
    if state.as_json:
        console.print_json(found.model_dump_json())
        return
    table = Table(title=f"Agent in {state_dir}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("running", f"yes (pid {found.pid})" if found.running else "no")
    table.add_row("device id", found.device_id or "—")
    table.add_row("root of trust", found.root_of_trust or "—")
    if found.certificate is not None:
        certificate = found.certificate
        table.add_row("certificate", certificate.serial)
        table.add_row("valid until", f"{certificate.not_after:%Y-%m-%d %H:%M:%S} UTC")
        if certificate.renew_at is not None:
            table.add_row("renews at", f"{certificate.renew_at:%Y-%m-%d %H:%M:%S} UTC")
    else:
        table.add_row("certificate", "none yet")
    link = found.link
    state_text = "connected" if link.connected else "not connected"
    if link.quarantined:
        state_text += " (quarantined)"
    table.add_row("hub link", f"{state_text}; {link.connects} connects, {link.failures} failures")
    if link.last_error:
        table.add_row("last link error", link.last_error)
    table.add_row("outbox", f"{found.outbox.messages} messages, {found.outbox.dropped} dropped")
    table.add_row("reports", f"{found.reports_sent} sent, {found.reports_dropped} dropped")
    if found.last_refusal is not None:
        refusal = found.last_refusal
        table.add_row("last refusal", f"{refusal.code}: {refusal.message} ({refusal.at:%Y-%m-%d %H:%M:%S})")
    if found.updates is not None:
        updates = found.updates
        text = f"{updates.checks} checks, {updates.pending_results} result(s) for the director"
        if updates.retry_at is not None:
            text += f"; looks again at {updates.retry_at:%Y-%m-%d %H:%M:%S} UTC"
        table.add_row("updates", text)
        if updates.last_error:
            table.add_row("last update error", updates.last_error)
    table.add_row("updated", f"{found.updated_at:%Y-%m-%d %H:%M:%S} UTC")
    console.print(table)
    _show_apps(found.apps)


def _show_apps(apps: tuple[AppStatus, ...]) -> None:
    table = Table(title="Applications", title_justify="left")
    for column in ("component id", "version", "state", "pid", "restarts", "reason"):
        table.add_column(column, overflow="fold")
    for app in apps:
        table.add_row(
            app.component_id,
            app.version,
            app.state,
            str(app.pid or "—"),
            str(app.restart_count),
            app.reason or "",
        )
    console.print(table)
    if not apps:
        console.print("[dim](none installed)[/dim]")


# ------------------------------------------------------------------------------------------- apps


@app_app.command("install")
def app_install(
    context: typer.Context,
    package: Annotated[Path, typer.Argument(help="The package (an uncompressed tar with manifest.json).")],
    sha256: Annotated[str, typer.Option(help="The SHA-256 the package must have (from its publisher).")],
    version: Annotated[str, typer.Option(help="The version being installed, e.g. 2.1.0.")],
    signature: Annotated[
        Path | None, typer.Option(help="The detached signature; PACKAGE.sig by default.")
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Verify a signed package and add its install record: the agent launches it at its next start."""
    state: State = context.obj
    settings = _load(state_dir)
    with _errors():
        record = install_package(settings, package, sha256, version, signature)
    if state.as_json:
        console.print_json(
            json.dumps({"component_id": record.component_id, "version": record.version, "sha256": sha256})
        )
        return
    console.print(
        f"Installed [bold]{record.component_id}[/bold] {record.version} ({record.package_sha256}); "
        "measured and started at the agent's next start. The authority must know it as a reference value:\n"
        f"  fleetward reference-value add {record.component_id} {record.version} "
        f"--sha256 {record.package_sha256}"
    )


@app_app.command("list")
def app_list(context: typer.Context, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """List the installed applications and their states."""
    state: State = context.obj
    settings = _load(state_dir)
    with _errors():
        found = current_status(settings)
    if state.as_json:
        console.print_json(json.dumps([app.model_dump(mode="json") for app in found.apps]))
        return
    _show_apps(found.apps)


@app_app.command("logs")
def app_logs(
    component_id: Annotated[str, typer.Argument(help="The application's component id.")],
    stream: Annotated[str, typer.Option(help="stdout, stderr or both.")] = "both",
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Print the end of what an application wrote (the supervisor keeps the last bytes of each stream)."""
    settings = _load(state_dir)
    if stream not in ("stdout", "stderr", "both"):
        fail("--stream is stdout, stderr or both")
    stdout, stderr = log_paths(settings.logs_dir, component_id)
    if not stdout.exists() and not stderr.exists():
        fail(f"no output kept for {component_id}")
    for name, path in (("stdout", stdout), ("stderr", stderr)):
        if stream in (name, "both"):
            if stream == "both":
                console.rule(name)
            console.out(read_log(path), end="", highlight=False)
