"""CLI commands of the monitor: alerts, device health, playbooks and their runs, notice destinations,
detection rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleetward.api import schemas_monitor as schemas
from fleetward.cli.output import console, show_list, show_one
from fleetward.cli.resources import TenantOption, in_tenant, query
from fleetward.cli.state import fail
from fleetward.monitor.playbook_service import parse_spec
from fleetward.monitor.playbooks import PlaybookSpec

alert_app = typer.Typer(
    name="alert", help="What the detectors found on devices, with its evidence.", no_args_is_help=True
)
health_app = typer.Typer(
    name="health",
    help="Device health: state, risk and reasons; what conditional access does.",
    no_args_is_help=True,
)
playbook_app = typer.Typer(
    name="playbook",
    help="Playbooks: when an alert matches, quarantine, move, revoke or notify — at once or after approval.",
    no_args_is_help=True,
)
run_app = typer.Typer(name="run", help="Runs of playbooks: approve, refuse, undo.", no_args_is_help=True)
destination_app = typer.Typer(
    name="destination",
    help="Where notify actions send alerts: signed webhooks, syslog/CEF.",
    no_args_is_help=True,
)
rules_app = typer.Typer(
    name="detection-rules", help="The tenant's own detection rules.", no_args_is_help=True
)
playbook_app.add_typer(run_app)
playbook_app.add_typer(destination_app)

_ALERT_COLUMNS = ("id", "device_id", "code", "severity", "score", "count", "state", "last_seen_at", "summary")
_RUN_COLUMNS = ("id", "playbook_name", "device_id", "state", "decided_by", "created_at", "detail")


def register(app: typer.Typer) -> None:
    app.add_typer(alert_app)
    app.add_typer(health_app)
    app.add_typer(playbook_app)
    app.add_typer(rules_app)


# ---------------------------------------------------------------------- alerts


@alert_app.command("list")
def alert_list(
    context: typer.Context,
    device: Annotated[str | None, typer.Option(help="Only this device's alerts.")] = None,
    state: Annotated[
        str, typer.Option(help="open, acknowledged, closed, or active (open and acknowledged).")
    ] = "active",
    min_severity: Annotated[str | None, typer.Option(help="low, medium, high or critical.")] = None,
    limit: int = 100,
    tenant: TenantOption = None,
) -> None:
    """Alerts, newest first."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        items = client.get_list(
            f"/v1/tenants/{tenant_id}/alerts",
            schemas.AlertPublic,
            query(device_id=device, state=state, min_severity=min_severity, limit=limit),
        )
    show_list(items, _ALERT_COLUMNS, title="Alerts", as_json=cli_state.as_json)


@alert_app.command("show")
def alert_show(context: typer.Context, alert_id: int, tenant: TenantOption = None) -> None:
    """One alert and its evidence."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.get(f"/v1/tenants/{tenant_id}/alerts/{alert_id}", schemas.AlertPublic)
    show_one(item, title=f"Alert {alert_id}", as_json=cli_state.as_json)


def _set_alert(context: typer.Context, alert_id: int, state: str, tenant: str | None) -> None:
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.patch(
            f"/v1/tenants/{tenant_id}/alerts/{alert_id}",
            schemas.AlertUpdate.model_validate({"state": state}),
            schemas.AlertPublic,
        )
    show_one(item, title=f"Alert {alert_id}", as_json=cli_state.as_json)


@alert_app.command("ack")
def alert_ack(context: typer.Context, alert_id: int, tenant: TenantOption = None) -> None:
    """Acknowledge an alert: someone is on it (it still counts for health)."""
    _set_alert(context, alert_id, "acknowledged", tenant)


@alert_app.command("close")
def alert_close(context: typer.Context, alert_id: int, tenant: TenantOption = None) -> None:
    """Close an alert (final: a new finding opens a new one)."""
    _set_alert(context, alert_id, "closed", tenant)


# ---------------------------------------------------------------------- health


@health_app.command("list")
def health_list(
    context: typer.Context,
    state: Annotated[str | None, typer.Option(help="healthy, at_risk, unhealthy or quarantined.")] = None,
    limit: int = 100,
    tenant: TenantOption = None,
) -> None:
    """Devices' health, riskiest first."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        items = client.get_list(
            f"/v1/tenants/{tenant_id}/health", schemas.HealthPublic, query(state=state, limit=limit)
        )
    show_list(
        items,
        ("device_id", "state", "risk", "restricted", "changed_at"),
        title="Health",
        as_json=cli_state.as_json,
    )


@health_app.command("show")
def health_show(
    context: typer.Context,
    device_id: str,
    refresh: Annotated[bool, typer.Option(help="Judge it again first.")] = False,
    history: Annotated[bool, typer.Option(help="Also show how it changed.")] = False,
    tenant: TenantOption = None,
) -> None:
    """A device's health and every reason for it."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.get(
            f"/v1/tenants/{tenant_id}/devices/{device_id}/health",
            schemas.HealthPublic,
            {"refresh": "true"} if refresh else None,
        )
        changes = (
            client.get_list(
                f"/v1/tenants/{tenant_id}/devices/{device_id}/health/history", schemas.HealthHistoryItem
            )
            if history
            else []
        )
    if cli_state.as_json:
        console.print_json(
            json.dumps(
                {
                    "health": item.model_dump(mode="json"),
                    "history": [c.model_dump(mode="json") for c in changes],
                }
            )
        )
        return
    console.print(
        f"[bold]{device_id}[/bold]: {item.state} (risk {item.risk})"
        + (" — restricted: twin only, remediation certificates" if item.restricted else "")
    )
    for reason in item.reasons:
        console.print(f"  • [{reason.state}] {reason.code}: {reason.detail}")
    if not item.reasons:
        console.print("  nothing wrong known")
    for change in changes:
        console.print(f"  {change.at:%Y-%m-%d %H:%M:%S} → {change.state} (risk {change.risk})")


# ---------------------------------------------------------------------- playbooks


@playbook_app.command("create")
def playbook_create(
    context: typer.Context,
    name: Annotated[str, typer.Argument(help="The playbook's name.")],
    code: Annotated[
        list[str], typer.Option("--code", help="Alert codes that trigger it (repeat; none: any).")
    ] = [],  # noqa: B006
    min_severity: Annotated[str, typer.Option(help="Lowest alert severity that triggers it.")] = "high",
    group: Annotated[list[str], typer.Option("--group", help="Only devices of these groups (repeat).")] = [],  # noqa: B006
    quarantine: Annotated[bool, typer.Option(help="Narrow the device to its twin.")] = False,
    move_to_group: Annotated[
        str | None, typer.Option(help="Move the device to this group (its deployment).")
    ] = None,
    revoke_certificate: Annotated[bool, typer.Option(help="Revoke the certificate it holds.")] = False,
    notify: Annotated[
        list[str], typer.Option("--notify", help="Send the alert to this destination (repeat).")
    ] = [],  # noqa: B006
    approval: Annotated[
        str, typer.Option(help="automatic, or operator (each run waits for approval).")
    ] = "automatic",
    release_on_remediation: Annotated[
        bool,
        typer.Option(help="Release by itself once it attests on its group's deployment and stays quiet."),
    ] = True,
    from_file: Annotated[
        Path | None, typer.Option("--file", help="The playbook as JSON instead of options.")
    ] = None,
    tenant: TenantOption = None,
) -> None:
    """Create a playbook from options (or a JSON file)."""
    if from_file is not None:
        try:
            spec = parse_spec(json.loads(from_file.read_text()))
        except (OSError, ValueError) as error:
            fail(f"cannot read the playbook: {error}")
    else:
        actions: list[dict[str, object]] = [{"kind": "notify", "destination": item} for item in notify]
        if move_to_group:
            actions.append({"kind": "move_to_group", "group_id": move_to_group})
        if quarantine:
            actions.append({"kind": "quarantine"})
        if revoke_certificate:
            actions.append({"kind": "revoke_certificate"})
        if not actions:
            fail(
                "a playbook needs at least one action "
                "(--quarantine, --move-to-group, --revoke-certificate, --notify)"
            )
        spec = parse_spec(
            {
                "name": name,
                "condition": {"codes": code, "min_severity": min_severity, "group_ids": group},
                "actions": actions,
                "approval": approval,
                "release": {"on_remediation": release_on_remediation},
            }
        )
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        created = client.post(f"/v1/tenants/{tenant_id}/playbooks", spec, schemas.PlaybookPublic)
    _show_playbook(created, cli_state.as_json)


def _show_playbook(item: schemas.PlaybookPublic, as_json: bool) -> None:
    if as_json:
        console.print_json(item.model_dump_json())
        return
    spec: PlaybookSpec = item.spec
    condition = spec.condition
    console.print(
        f"[bold]{spec.name}[/bold] ({item.id}) — {spec.approval.value}, "
        + ("enabled" if spec.enabled else "disabled")
    )
    console.print(
        f"  when: {', '.join(condition.codes) or 'any alert'} at {condition.min_severity} or above"
        + (f" in groups {', '.join(condition.group_ids)}" if condition.group_ids else "")
    )
    console.print("  do: " + ", ".join(action.model_dump_json() for action in spec.actions))
    release = spec.release
    console.print(
        "  release: "
        + (
            "when remediated and quiet"
            if release is not None and release.on_remediation
            else "by an operator"
        )
    )


@playbook_app.command("list")
def playbook_list(context: typer.Context, tenant: TenantOption = None) -> None:
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        items = client.get_list(f"/v1/tenants/{tenant_id}/playbooks", schemas.PlaybookPublic)
    if cli_state.as_json:
        console.print_json(json.dumps([item.model_dump(mode="json") for item in items]))
        return
    for item in items:
        _show_playbook(item, False)
    if not items:
        console.print("[dim](none)[/dim]")


@playbook_app.command("show")
def playbook_show(context: typer.Context, playbook: str, tenant: TenantOption = None) -> None:
    """A playbook, by id or name."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.get(f"/v1/tenants/{tenant_id}/playbooks/{playbook}", schemas.PlaybookPublic)
    _show_playbook(item, cli_state.as_json)


@playbook_app.command("enable")
def playbook_enable(
    context: typer.Context,
    playbook: str,
    enabled: Annotated[bool, typer.Option("--on/--off")] = True,
    tenant: TenantOption = None,
) -> None:
    """Turn a playbook on or off."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.patch(
            f"/v1/tenants/{tenant_id}/playbooks/{playbook}",
            schemas.PlaybookEnable(enabled=enabled),
            schemas.PlaybookPublic,
        )
    _show_playbook(item, cli_state.as_json)


@run_app.command("list")
def run_list(
    context: typer.Context,
    device: Annotated[str | None, typer.Option(help="Only this device's runs.")] = None,
    state: Annotated[
        str | None, typer.Option(help="awaiting_approval, done, failed, refused or undone.")
    ] = None,
    limit: int = 100,
    tenant: TenantOption = None,
) -> None:
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        items = client.get_list(
            f"/v1/tenants/{tenant_id}/playbook-runs",
            schemas.PlaybookRunPublic,
            query(device_id=device, state=state, limit=limit),
        )
    show_list(items, _RUN_COLUMNS, title="Playbook runs", as_json=cli_state.as_json)


def _decide(context: typer.Context, run_id: str, decision: str, tenant: str | None) -> None:
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        answer = client.request("POST", f"/v1/tenants/{tenant_id}/playbook-runs/{run_id}/{decision}")
        item = schemas.PlaybookRunPublic.model_validate_json(answer.content)
    show_one(item, title=f"Run {run_id}", as_json=cli_state.as_json)


@run_app.command("approve")
def run_approve(context: typer.Context, run_id: str, tenant: TenantOption = None) -> None:
    """Approve a run awaiting approval: its actions run now."""
    _decide(context, run_id, "approve", tenant)


@run_app.command("refuse")
def run_refuse(context: typer.Context, run_id: str, tenant: TenantOption = None) -> None:
    """Refuse a run awaiting approval: nothing happens to the device."""
    _decide(context, run_id, "refuse", tenant)


@run_app.command("undo")
def run_undo(context: typer.Context, run_id: str, tenant: TenantOption = None) -> None:
    """Undo what a run did: release, move back; its device's open alerts close."""
    _decide(context, run_id, "undo", tenant)


@destination_app.command("add")
def destination_add(
    context: typer.Context,
    name: str,
    kind: Annotated[str, typer.Option(help="webhook or syslog.")],
    target: Annotated[
        str, typer.Option(help="https:// URL of a webhook, or host:port of a syslog collector.")
    ],
    syslog_transport: Annotated[str, typer.Option(help="udp, tcp or tls (syslog).")] = "tls",
    tenant: TenantOption = None,
) -> None:
    """Add a destination; a webhook's signing secret is printed once (keep it for the receiver)."""
    cli_state, client, tenant_id = in_tenant(context, tenant)
    body = schemas.DestinationCreate.model_validate(
        {"name": name, "kind": kind, "target": target, "syslog_transport": syslog_transport}
    )
    with client:
        item = client.post(f"/v1/tenants/{tenant_id}/notice-destinations", body, schemas.DestinationPublic)
    show_one(item, title=f"Destination {name}", as_json=cli_state.as_json)


@destination_app.command("list")
def destination_list(context: typer.Context, tenant: TenantOption = None) -> None:
    cli_state, client, tenant_id = in_tenant(context, tenant)
    with client:
        items = client.get_list(f"/v1/tenants/{tenant_id}/notice-destinations", schemas.DestinationPublic)
    show_list(
        items, ("name", "kind", "target", "created_at"), title="Destinations", as_json=cli_state.as_json
    )


# ---------------------------------------------------------------------- detection rules


@rules_app.command("show")
def rules_show(context: typer.Context, tenant: TenantOption = None) -> None:
    """The tenant's own rules (none: the shipped defaults apply)."""
    _, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.get(f"/v1/tenants/{tenant_id}/detection-rules", schemas.DetectionRules)
    console.print_json(item.model_dump_json())


@rules_app.command("set")
def rules_set(
    context: typer.Context,
    rules_file: Annotated[
        Path, typer.Argument(help='{"rules": [...]} or a JSON list of rules; [] restores the defaults.')
    ],
    tenant: TenantOption = None,
) -> None:
    """Replace the tenant's rules."""
    try:
        rules = json.loads(rules_file.read_text())
    except (OSError, ValueError) as error:
        fail(f"cannot read the rules: {error}")
    if isinstance(rules, dict):  # {"rules": [...]}, as `detection-rules show` prints them
        rules = rules.get("rules", [])
    _, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.put(
            f"/v1/tenants/{tenant_id}/detection-rules",
            schemas.DetectionRules(rules=rules),
            schemas.DetectionRules,
        )
    console.print(f"{len(item.rules)} rule(s) set" if item.rules else "defaults restored")
