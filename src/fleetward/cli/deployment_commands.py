"""CLI commands of deployments and rollouts: create, list, show (and watch), abort, revert; a device's
update status."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from pydantic import TypeAdapter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from fleetward.api.routes_deployments import (
    Abort,
    DeploymentCreate,
    DeploymentPublic,
    DeviceUpdatePublic,
    WindowBody,
)
from fleetward.cli.output import console, show_list, show_one
from fleetward.cli.resources import TenantOption, in_tenant
from fleetward.cli.state import fail
from fleetward.client import FleetwardClient
from fleetward.updates.rollout import WaveSpec

deployment_app = typer.Typer(
    name="deployment",
    help="Deployments: images rolled out to a device group in waves that stop themselves.",
    no_args_is_help=True,
)
update_app = typer.Typer(name="update", help="Where devices are with their updates.", no_args_is_help=True)

WATCH_SECONDS = 2.0


def register(app: typer.Typer) -> None:
    app.add_typer(deployment_app)
    app.add_typer(update_app)


def _waves(text: str) -> list[str]:
    """``10%,50%,100%`` or ``5,20,all``, checked here so that a typo fails before the request."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        fail("--waves names at least one wave")
    try:
        return [str(WaveSpec.parse(item)) for item in items]
    except ValueError as error:
        fail(str(error))


def _window(text: str | None) -> WindowBody | None:
    if text is None:
        return None
    start, separator, end = text.partition("-")
    if not separator:
        fail("--window is HH:MM-HH:MM in UTC, e.g. 01:00-04:00")
    try:
        return WindowBody(start=start.strip(), end=end.strip())
    except ValueError:
        fail("--window is HH:MM-HH:MM in UTC, e.g. 01:00-04:00")


def _summary(deployment: DeploymentPublic) -> Table:
    table = Table(title=f"Deployment {deployment.id}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    window = deployment.window
    plan = deployment.plan
    rows = [
        ("state", deployment.state),
        ("group", deployment.group_id),
        ("images", ", ".join(deployment.image_ids)),
        ("previous", deployment.previous_id or "—"),
        ("waves", ", ".join(deployment.plan.waves)),
        (
            "thresholds",
            f"success {plan.success_threshold:.0%}, failures under "
            f"{plan.max_failure_fraction:.0%}, silent after {plan.report_timeout_seconds} s",
        ),
        ("soak", f"{plan.soak_seconds} s after a wave's last install"),
        (
            "crashes",
            f"abort above {plan.crash_rate_factor:g}× the group's rate before, "
            f"from {plan.min_crash_reports} crash report(s)",
        ),
        ("unhealthy", f"abort at {plan.max_unhealthy_fraction:.0%} of the devices reached"),
        ("window", f"{window['start']}-{window['end']} UTC" if window else "any time"),
        ("reason", deployment.reason or "—"),
        ("created", f"{deployment.created_at:%Y-%m-%d %H:%M:%S} by {deployment.created_by}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _describe(wave: int, counts: dict[str, int], opened: bool) -> str:
    if not opened:
        return f"wave {wave + 1} [dim](not open)[/dim]"
    return (
        f"wave {wave + 1}: {counts['downloading']} busy, {counts['failed']} failed, "
        f"{counts['rolled_back']} rolled back, {counts['silent']} silent"
    )


def _progress(progress: Progress, tasks: dict[int, TaskID], deployment: DeploymentPublic) -> None:
    for wave in deployment.waves:
        counts = wave.model_dump()
        description = _describe(wave.wave, counts, wave.opened)
        if wave.wave not in tasks:
            tasks[wave.wave] = progress.add_task(description, total=max(wave.size, 1))
        progress.update(
            tasks[wave.wave], completed=wave.installed, total=max(wave.size, 1), description=description
        )


def _get(client: FleetwardClient, tenant_id: str, deployment_id: str) -> DeploymentPublic:
    return client.get(f"/v1/tenants/{tenant_id}/deployments/{deployment_id}", DeploymentPublic)


@deployment_app.command("create")
def create(
    context: typer.Context,
    group_id: Annotated[str, typer.Argument(help="The device group.")],
    image: Annotated[list[str], typer.Option("--image", help="An image id (repeat: one per component).")],
    waves: Annotated[
        str, typer.Option(help="Cumulative waves: 10%,50%,100% or 5,20,all (the last takes the rest).")
    ] = "all",
    success: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of a wave installed before the next opens.")
    ] = 0.9,
    max_failures: Annotated[
        float,
        typer.Option(min=0, max=1, help="Abort when this fraction of devices reached failed or went silent."),
    ] = 0.2,
    report_timeout: Annotated[
        int, typer.Option(min=1, help="Seconds after which a device that has not reported counts as failed.")
    ] = 1800,
    soak: Annotated[
        int, typer.Option(min=0, help="Seconds a wave must stay healthy after succeeding before the next.")
    ] = 0,
    crash_factor: Annotated[
        float,
        typer.Option(
            "--crash-factor",
            min=1,
            max=1000,
            help="Abort when the devices reached crash this many times more often (per device-hour) than "
            "the group did before the rollout …",
        ),
    ] = 2.0,
    min_crashes: Annotated[
        int,
        typer.Option("--min-crashes", min=1, help="… and reported at least this many crashes."),
    ] = 3,
    max_unhealthy: Annotated[
        float,
        typer.Option(
            "--max-unhealthy",
            min=0,
            max=1,
            help="Abort when this fraction of the devices reached reported a crash loop or a refused launch.",
        ),
    ] = 0.2,
    window: Annotated[
        str | None, typer.Option(help="Daily maintenance window in UTC, HH:MM-HH:MM (e.g. 01:00-04:00).")
    ] = None,
    tenant: TenantOption = None,
) -> None:
    """Roll images out to a device group: the first wave is assigned, and asked to check, at once."""
    body = DeploymentCreate(
        image_ids=image,
        waves=_waves(waves),
        success_threshold=success,
        max_failure_fraction=max_failures,
        report_timeout_seconds=report_timeout,
        crash_rate_factor=crash_factor,
        min_crash_reports=min_crashes,
        max_unhealthy_fraction=max_unhealthy,
        soak_seconds=soak,
        window=_window(window),
    )
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        created = client.post(
            f"/v1/tenants/{tenant_id}/device-groups/{group_id}/deployments", body, DeploymentPublic
        )
    if state.as_json:
        console.print_json(created.model_dump_json())
        return
    first = created.waves[0].size if created.waves else 0
    console.print(
        f"deployment [bold]{created.id}[/bold] rolling out in {len(created.waves)} wave(s); "
        f"{first} device(s) in the first"
    )


@deployment_app.command("list")
def list_deployments(context: typer.Context, group_id: str, tenant: TenantOption = None) -> None:
    """The group's deployments, newest first."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        found = client.get_list(
            f"/v1/tenants/{tenant_id}/device-groups/{group_id}/deployments", DeploymentPublic
        )
    show_list(
        found,
        ["id", "state", "image_ids", "waves_opened", "created_at", "created_by", "reason"],
        title="Deployments",
        as_json=state.as_json,
    )


@deployment_app.command("show")
def show(
    context: typer.Context,
    deployment_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the rollout until it ends.")] = False,
    tenant: TenantOption = None,
) -> None:
    """A deployment with a progress bar per wave (installed of the wave's devices)."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        deployment = _get(client, tenant_id, deployment_id)
        if state.as_json:
            console.print_json(deployment.model_dump_json())
            return
        console.print(_summary(deployment))
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("installed"),
        )
        tasks: dict[int, TaskID] = {}
        with Progress(*columns, console=console, auto_refresh=False) as progress:
            _progress(progress, tasks, deployment)
            progress.refresh()
            while watch and deployment.state == "rolling_out":
                time.sleep(WATCH_SECONDS)
                deployment = _get(client, tenant_id, deployment_id)
                _progress(progress, tasks, deployment)
                progress.refresh()
    if watch:
        console.print(
            f"the rollout is [bold]{deployment.state}[/bold]"
            + (f": {deployment.reason}" if deployment.reason else "")
        )


@deployment_app.command("abort")
def abort(
    context: typer.Context,
    deployment_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept with the deployment).")] = "",
    tenant: TenantOption = None,
) -> None:
    """Stop a rollout: the devices it reached are assigned the previous deployment again."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        aborted = client.post(
            f"/v1/tenants/{tenant_id}/deployments/{deployment_id}/abort",
            Abort(reason=reason),
            DeploymentPublic,
        )
    if state.as_json:
        console.print_json(aborted.model_dump_json())
        return
    console.print(f"deployment {aborted.id} aborted; the devices it reached get the previous deployment")


@deployment_app.command("revert")
def revert(context: typer.Context, group_id: str, tenant: TenantOption = None) -> None:
    """Give the whole group the images of the deployment before its newest one, at once."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        answer = client.request_json(
            "POST", f"/v1/tenants/{tenant_id}/device-groups/{group_id}/deployments/revert", None
        )
    created = TypeAdapter(DeploymentPublic).validate_json(answer)
    if state.as_json:
        console.print_json(created.model_dump_json())
        return
    console.print(f"group reverted: deployment [bold]{created.id}[/bold] of {', '.join(created.image_ids)}")


@update_app.command("status")
def status(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """What the device must run, runs, has pending, and why its last update failed."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        found = client.get(f"/v1/tenants/{tenant_id}/devices/{device_id}/update", DeviceUpdatePublic)
    show_one(found, title=f"Update of {device_id}", as_json=state.as_json)
