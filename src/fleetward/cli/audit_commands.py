"""CLI commands of audits: run the checks now, list the runs, show one with its findings, and the schedule."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.table import Table

from fleetward.api.routes_audits import (
    AuditCreate,
    AuditFindingPublic,
    AuditRunDetailPublic,
    AuditRunPublic,
    AuditSchedulePublic,
    AuditSchedulePut,
)
from fleetward.cli.output import console, show_list, show_one
from fleetward.cli.resources import TenantOption, in_tenant
from fleetward.cli.state import fail
from fleetward.client import FleetwardClient
from fleetward.monitor.audits import CHECKS

audit_app = typer.Typer(
    name="audit",
    help="Audits: checks of the tenant's configuration (certificates, keys, manifests, MFA, …).",
    no_args_is_help=True,
)

#: findings ``audit show`` fetches at most, a page at a time
MAX_SHOWN_FINDINGS = 10_000
_PAGE = 500
_DURATION = re.compile(r"^([1-9][0-9]{0,8})([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "dim"}

CheckOption = Annotated[
    list[str] | None,
    typer.Option("--check", help=f"A check to run (repeat; default: all): {', '.join(CHECKS)}."),
]


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app)


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``24h``, ``7d`` or plain seconds, as seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        fail(f"{text!r} is not a duration such as 3600, 30m, 24h or 7d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _counts(run: AuditRunPublic) -> str:
    counts = run.counts
    return f"{counts.critical} critical, {counts.high} high, {counts.medium} medium, {counts.low} low"


def _findings_table(findings: list[AuditFindingPublic], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("severity", "check", "subject", "detail"):
        table.add_column(column, overflow="fold")
    for finding in findings:
        style = _SEVERITY_STYLE.get(finding.severity, "")
        table.add_row(
            f"[{style}]{finding.severity}[/{style}]" if style else finding.severity,
            finding.check,
            f"{finding.subject_kind} {finding.subject_id}",
            finding.detail,
        )
    return table


def _all_findings(client: FleetwardClient, tenant_id: str, run_id: str) -> AuditRunDetailPublic:
    """The run with its findings, page after page (at most :data:`MAX_SHOWN_FINDINGS`)."""
    path = f"/v1/tenants/{tenant_id}/audits/{run_id}"
    detail = client.get(path, AuditRunDetailPublic, {"limit": _PAGE})
    findings = list(detail.findings)
    after = detail.next_after_id
    while after is not None and len(findings) < MAX_SHOWN_FINDINGS:
        page = client.get(path, AuditRunDetailPublic, {"limit": _PAGE, "after_id": after})
        findings.extend(page.findings)
        after = page.next_after_id
    return detail.model_copy(update={"findings": findings, "next_after_id": after})


def _show_run(detail: AuditRunDetailPublic) -> None:
    run = detail.run
    console.print(
        f"audit [bold]{run.id}[/bold] ({run.trigger}, {run.state}): {run.findings} findings: {_counts(run)}"
    )
    if detail.findings:
        console.print(_findings_table(detail.findings, "Findings"))
    if detail.next_after_id is not None:
        console.print(
            f"[dim](more than {len(detail.findings)} findings: use --json and the API to page)[/dim]"
        )


@audit_app.command("run")
def run(context: typer.Context, check: CheckOption = None, tenant: TenantOption = None) -> None:
    """Run the checks over the tenant now and show what they found."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        created = client.post(
            f"/v1/tenants/{tenant_id}/audits", AuditCreate(checks=check or None), AuditRunPublic
        )
        detail = _all_findings(client, tenant_id, created.id)
    if state.as_json:
        console.print_json(detail.model_dump_json())
        return
    _show_run(detail)


@audit_app.command("list")
def list_runs(
    context: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many runs, newest first.")] = 50,
    tenant: TenantOption = None,
) -> None:
    """The tenant's audit runs, newest first."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        runs = client.get_list(f"/v1/tenants/{tenant_id}/audits", AuditRunPublic, {"limit": limit})
    if state.as_json:
        show_list(runs, [], title="Audits", as_json=True)
        return
    table = Table(title="Audits", title_justify="left")
    for column in ("id", "trigger", "state", "findings", "started at", "started by"):
        table.add_column(column, overflow="fold")
    for item in runs:
        table.add_row(
            item.id,
            item.trigger,
            item.state,
            f"{item.findings} ({_counts(item)})",
            f"{item.started_at:%Y-%m-%d %H:%M:%S}",
            item.started_by or "schedule",
        )
    console.print(table)
    if not runs:
        console.print("[dim](none)[/dim]")


@audit_app.command("show")
def show(context: typer.Context, run_id: str, tenant: TenantOption = None) -> None:
    """One audit run with its findings, most severe first."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        detail = _all_findings(client, tenant_id, run_id)
    if state.as_json:
        console.print_json(detail.model_dump_json())
        return
    _show_run(detail)


@audit_app.command("schedule")
def schedule(
    context: typer.Context,
    every: Annotated[
        str | None, typer.Option("--every", help="Run the audit this often: 24h, 7d, 3600 (seconds)…")
    ] = None,
    check: CheckOption = None,
    off: Annotated[bool, typer.Option("--off", help="Stop the scheduled audits.")] = False,
    tenant: TenantOption = None,
) -> None:
    """Show the tenant's audit schedule, set it with --every (and --check), or stop it with --off."""
    if off and (every or check):
        fail("--off stops the schedule: it takes neither --every nor --check")
    if check and not every:
        fail("--check sets the schedule's checks: give --every too")
    state, client, tenant_id = in_tenant(context, tenant)
    path = f"/v1/tenants/{tenant_id}/audit-schedule"
    with client:
        if off:
            client.delete(path)
            console.print("scheduled audits stopped")
            return
        if every is not None:
            body = AuditSchedulePut(interval_seconds=parse_duration(every), checks=check or None)
            found = client.put(path, body, AuditSchedulePublic)
        else:
            found = client.get(path, AuditSchedulePublic)
    if not state.as_json and not found.checks:
        found = found.model_copy(update={"checks": ["(all)"]})
    show_one(found, title="Audit schedule", as_json=state.as_json)
