"""CLI commands that reach devices through the hub: twins, direct methods, messages, telemetry, quarantine."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from fleetward.api import schemas
from fleetward.cli.output import console, show_one
from fleetward.cli.resources import TenantOption, device_app, in_tenant, list_in_tenant, query
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


ModuleOption = Annotated[
    str | None,
    typer.Option("--module", help="A module of the device (its module session, e.g. fleetward-agent)."),
]


def _session_path(tenant_id: str, device_id: str, module: str | None) -> str:
    """The API path of the device, or of one of its modules."""
    path = f"/v1/tenants/{tenant_id}/devices/{device_id}"
    return path if module is None else f"{path}/modules/{quote(module, safe='')}"


def _json_argument(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        fail(f"{what} is not JSON: {text[:60]!r}")


@twin_app.command("show")
def twin_show(
    context: typer.Context, device_id: str, tenant: TenantOption = None, module: ModuleOption = None
) -> None:
    """Show a device's twin, or a module's (desired and reported properties, with their versions)."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        twin = client.get(f"{_session_path(tenant_id, device_id, module)}/twin", schemas.TwinPublic)
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
    module: ModuleOption = None,
) -> None:
    """Patch a device's (or module's) desired properties; a connected session receives it at once."""
    body = _json_argument(patch, "the patch")
    if not isinstance(body, dict):
        fail("the patch must be a JSON object")
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        path = f"{_session_path(tenant_id, device_id, module)}/twin/desired"
        raw = client.request_json("PATCH", path, body)
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
    module: ModuleOption = None,
) -> None:
    """Call a direct method on a connected device (or module) and print its status and payload."""
    body = schemas.MethodInvoke(payload=_json_argument(payload, "the payload"), timeout_seconds=timeout)
    state, client, tenant_id = in_tenant(context, tenant)
    with client, console.status(f"waiting for {device_id[:16]}… to answer {name}"):
        result = client.post(
            f"{_session_path(tenant_id, device_id, module)}/methods/{name}", body, schemas.MethodResultPublic
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
    module: Annotated[str | None, typer.Option("--module", help="Only what this module sent.")] = None,
) -> None:
    """List stored telemetry, oldest first."""
    params = query(limit=limit, device_id=device_id, since=since, after_id=after_id, module_id=module)
    list_in_tenant(
        context,
        tenant,
        "/telemetry",
        schemas.TelemetryPublic,
        ["id", "device_id", "module_id", "received_at", "properties", "body"],
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
def device_connection(
    context: typer.Context, device_id: str, tenant: TenantOption = None, module: ModuleOption = None
) -> None:
    """Whether the device (or one of its modules) is connected to the hub now."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        answer = client.get(
            f"{_session_path(tenant_id, device_id, module)}/connection", schemas.ConnectionPublic
        )
    show_one(answer, title="Connection", as_json=state.as_json)
