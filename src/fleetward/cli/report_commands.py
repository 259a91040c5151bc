"""CLI commands for what devices report about themselves: failures (grouped, downloadable) and baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from fleetward.api import schemas
from fleetward.cli.output import console, show_one
from fleetward.cli.resources import TenantOption, device_app, in_tenant, list_in_tenant, query

report_app = typer.Typer(
    name="report",
    help="What devices reported: crashes, crash loops, refused launches, storage quotas, baselines.",
    no_args_is_help=True,
)
failure_app = typer.Typer(
    name="failure",
    help="Application failures of the fleet, grouped by signature (one problem seen many times).",
    no_args_is_help=True,
)

DeviceFilter = Annotated[str | None, typer.Option(help="Only this device.")]
GroupFilter = Annotated[str | None, typer.Option(help="Only devices of this device group (its id).")]
SinceFilter = Annotated[str | None, typer.Option(help="Received at or after this ISO time.")]
UntilFilter = Annotated[str | None, typer.Option(help="Received before this ISO time.")]


def register(app: typer.Typer) -> None:
    app.add_typer(report_app)
    app.add_typer(failure_app)


@report_app.command("list")
def report_list(
    context: typer.Context,
    kind: Annotated[
        str | None,
        typer.Option(help="crash, crash_loop, launch_refused, storage_quota_exceeded or security-baseline."),
    ] = None,
    device_id: DeviceFilter = None,
    group_id: GroupFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    after_id: Annotated[int | None, typer.Option(help="Page on: the last id you saw.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    tenant: TenantOption = None,
) -> None:
    """List device reports, oldest first."""
    list_in_tenant(
        context,
        tenant,
        "/reports",
        schemas.ReportPublic,
        ["id", "device_id", "kind", "headline", "occurred_at"],
        "Reports",
        query(
            kind=kind,
            device_id=device_id,
            group_id=group_id,
            since=since,
            until=until,
            after_id=after_id,
            limit=limit,
        ),
    )


@failure_app.command("list")
def failure_list(
    context: typer.Context,
    device_id: DeviceFilter = None,
    group_id: GroupFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    tenant: TenantOption = None,
) -> None:
    """Failures grouped by signature, the most frequent first."""
    list_in_tenant(
        context,
        tenant,
        "/failures",
        schemas.FailureSignaturePublic,
        ["kind", "headline", "count", "devices", "last_seen", "signature"],
        "Failures",
        query(device_id=device_id, group_id=group_id, since=since, until=until),
    )


@failure_app.command("download")
def failure_download(
    context: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")],
    format: Annotated[Literal["csv", "json"], typer.Option(help="csv or json.")] = "csv",
    device_id: DeviceFilter = None,
    group_id: GroupFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    tenant: TenantOption = None,
) -> None:
    """Write the grouped failures to a file, as CSV (for a spreadsheet) or JSON."""
    _state, client, tenant_id = in_tenant(context, tenant)
    params = query(device_id=device_id, group_id=group_id, since=since, until=until, format=format)
    with client:
        response = client.request("GET", f"/v1/tenants/{tenant_id}/failures", params=params)
    output.write_bytes(response.content)
    console.print(f"wrote {output} ({len(response.content)} bytes, {format})")


@device_app.command("baseline")
def device_baseline(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """The device's latest security baseline: listening ports, connections, destinations, traffic."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        answer = client.get(f"/v1/tenants/{tenant_id}/devices/{device_id}/baseline", schemas.BaselinePublic)
    if state.as_json:
        console.print_json(answer.model_dump_json())
        return
    baseline = answer.baseline
    show_one(answer, title="Security baseline", as_json=False, hide=("baseline",))
    for item in baseline.listening:
        console.print(f"listening  {item.protocol} {item.address}:{item.port}")
    for connection in baseline.established:
        console.print(
            f"connected  {connection.local_address}:{connection.local_port} → "
            f"{connection.remote_address}:{connection.remote_port}"
        )
    for blocked in baseline.blocked:
        console.print(f"blocked    {blocked.component_id} → {blocked.host}:{blocked.port} ×{blocked.count}")
    traffic = baseline.traffic
    console.print(
        f"traffic    in {traffic.bytes_in} B / {traffic.packets_in} packets, "
        f"out {traffic.bytes_out} B / {traffic.packets_out} packets in {baseline.interval_seconds:g} s"
    )
