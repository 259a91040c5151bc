"""CLI commands that reach devices through the hub: twins, direct methods, messages, telemetry, quarantine."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer

from fleetward.api import schemas
from fleetward.cli.output import console, show_one
from fleetward.cli.resources import TenantOption, device_app, in_tenant, list_in_tenant
from fleetward.cli.state import fail
from fleetward.transport import check, network_error

twin_app = typer.Typer(
    name="twin", help="Device twins: desired and reported properties.", no_args_is_help=True
)
method_app = typer.Typer(
    name="method", help="Direct methods: call a function on a connected device.", no_args_is_help=True
)
message_app = typer.Typer(
    name="message", help="Cloud-to-device messages: queued, delivered, completed.", no_args_is_help=True
)
telemetry_app = typer.Typer(
    name="telemetry", help="Telemetry devices sent: stored, and live.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    for sub in (twin_app, method_app, message_app, telemetry_app):
        app.add_typer(sub)


def _json_argument(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        fail(f"{what} is not JSON: {text[:60]!r}")


@twin_app.command("show")
def twin_show(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """Show a device's twin (desired and reported properties, with their versions)."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        twin = client.get(f"/v1/tenants/{tenant_id}/devices/{device_id}/twin", schemas.TwinPublic)
    if state.as_json:
        console.print_json(twin.model_dump_json())
        return
    console.print_json(json.dumps({"desired": twin.desired, "reported": twin.reported}))


@twin_app.command("set-desired")
def twin_set_desired(
    context: typer.Context,
    device_id: str,
    patch: Annotated[
        str,
        typer.Argument(
            help="A JSON object merged into the desired properties, e.g. '{\"alarm\": 30}'; null removes."
        ),
    ],
    tenant: TenantOption = None,
) -> None:
    """Patch a device's desired properties; a connected device receives the patch at once."""
    body = _json_argument(patch, "the patch")
    if not isinstance(body, dict):
        fail("the patch must be a JSON object")
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        raw = client.request_json("PATCH", f"/v1/tenants/{tenant_id}/devices/{device_id}/twin/desired", body)
    answer = schemas.DesiredPatched.model_validate_json(raw)
    show_one(answer, title="Desired properties", as_json=state.as_json)


@method_app.command("invoke")
def method_invoke(
    context: typer.Context,
    device_id: str,
    name: str,
    payload: Annotated[str, typer.Option(help="JSON payload of the method.")] = "null",
    timeout: Annotated[int, typer.Option(min=1, max=300, help="Seconds to wait for the device.")] = 30,
    tenant: TenantOption = None,
) -> None:
    """Call a direct method on a connected device and print its status and payload."""
    body = schemas.MethodInvoke(payload=_json_argument(payload, "the payload"), timeout_seconds=timeout)
    state, client, tenant_id = in_tenant(context, tenant)
    with client, console.status(f"waiting for {device_id[:16]}… to answer {name}"):
        result = client.post(
            f"/v1/tenants/{tenant_id}/devices/{device_id}/methods/{name}", body, schemas.MethodResultPublic
        )
    if state.as_json:
        console.print_json(result.model_dump_json())
        return
    console.print(f"status {result.status}")
    console.print_json(json.dumps(result.payload))
    if result.status >= 400:
        raise typer.Exit(1)


@message_app.command("send")
def message_send(
    context: typer.Context,
    device_id: str,
    body: str,
    property: Annotated[
        list[str] | None, typer.Option("--property", "-p", help="key=value, repeatable.")
    ] = None,
    ttl: Annotated[int | None, typer.Option(min=1, help="Seconds before it expires undelivered.")] = None,
    tenant: TenantOption = None,
) -> None:
    """Queue a cloud-to-device message (at most 50 pending per device)."""
    properties: dict[str, str] = {}
    for item in property or []:
        key, separator, value = item.partition("=")
        if not separator:
            fail(f"a property is key=value, not {item!r}")
        properties[key] = value
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        message = client.post(
            f"/v1/tenants/{tenant_id}/devices/{device_id}/messages",
            schemas.CloudToDeviceCreate(body=body, properties=properties, ttl_seconds=ttl),
            schemas.CloudToDevicePublic,
        )
    show_one(message, title="Message", as_json=state.as_json, hide=("body_base64",))


@message_app.command("list")
def message_list(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """List a device's cloud-to-device messages, newest first."""
    list_in_tenant(
        context,
        tenant,
        f"/devices/{device_id}/messages",
        schemas.CloudToDevicePublic,
        ["id", "state", "body", "delivery_count", "created_at", "expires_at"],
        "Messages",
    )


@telemetry_app.command("list")
def telemetry_list(
    context: typer.Context,
    device_id: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, e.g. 2026-11-23T10:00:00Z.")] = None,
    after_id: Annotated[int | None, typer.Option(help="Page on: the last id you saw.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    tenant: TenantOption = None,
) -> None:
    """List stored telemetry, oldest first."""
    params: dict[str, str | int] = {"limit": limit}
    for key, value in (("device_id", device_id), ("since", since), ("after_id", after_id)):
        if value is not None:
            params[key] = value
    list_in_tenant(
        context,
        tenant,
        "/telemetry",
        schemas.TelemetryPublic,
        ["id", "device_id", "received_at", "properties", "body"],
        "Telemetry",
        params,
    )


@telemetry_app.command("stream")
def telemetry_stream(
    context: typer.Context,
    device_id: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    tenant: TenantOption = None,
) -> None:
    """Print telemetry as devices send it, until Ctrl-C."""
    state, client, tenant_id = in_tenant(context, tenant)
    params = {"device_id": device_id} if device_id else {}
    url = f"{client.url}/v1/tenants/{tenant_id}/telemetry/stream"
    with client:
        try:
            with client.stream("GET", url, params) as response:
                check(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    item = schemas.TelemetryPublic.model_validate_json(line[6:])
                    if state.as_json:
                        console.print_json(item.model_dump_json())
                    else:
                        console.print(f"{item.received_at:%H:%M:%S} {item.device_id[:12]}… {item.body}")
        except httpx.HTTPError as error:
            raise network_error(error, url) from None
        except KeyboardInterrupt:
            return


@device_app.command("quarantine")
def device_quarantine(
    context: typer.Context,
    device_id: str,
    reason: Annotated[str, typer.Option(help="Why, for the event log.")] = "",
    tenant: TenantOption = None,
) -> None:
    """Narrow a device to its twin: its session ends within a second and comes back with the twin only."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        device = client.post(
            f"/v1/tenants/{tenant_id}/devices/{device_id}/quarantine",
            schemas.Quarantine(reason=reason),
            schemas.DevicePublic,
        )
    show_one(device, title="Device", as_json=state.as_json, hide=("public_key_pem",))


@device_app.command("release")
def device_release(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """End a device's quarantine."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        raw = client.request_json("POST", f"/v1/tenants/{tenant_id}/devices/{device_id}/release", None)
    show_one(
        schemas.DevicePublic.model_validate_json(raw),
        title="Device",
        as_json=state.as_json,
        hide=("public_key_pem",),
    )


@device_app.command("connection")
def device_connection(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """Whether the device is connected to the hub now."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        answer = client.get(
            f"/v1/tenants/{tenant_id}/devices/{device_id}/connection", schemas.ConnectionPublic
        )
    show_one(answer, title="Connection", as_json=state.as_json)
