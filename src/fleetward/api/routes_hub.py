"""Operator routes of the hub: connection state, twins, direct methods, cloud-to-device messages,
telemetry (range queries and a live stream), quarantine.

What needs the device's session goes over the bus (``hub/routing.py``) to whichever hub process holds it,
this one or another; the live stream follows the bus too, so it sees the devices of every process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from fleetward.api import schemas
from fleetward.api.deps import PrincipalDep, RegistryDep, as_utc, services
from fleetward.bus import subjects
from fleetward.bus.base import check_token
from fleetward.errors import InvalidInput, ServerError
from fleetward.hub import twin as twin_core
from fleetward.hub.feed import TelemetryFeed
from fleetward.hub.routing import DeviceRouter
from fleetward.hub.store import CloudToDeviceMessage, TelemetryMessage
from fleetward.hub.topics import check_method_name
from fleetward.registry.models import Scope
from fleetward.wire.identity import check_module_id

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["hub"])
HEARTBEAT_SECONDS = 15.0


def _router(request: Request) -> DeviceRouter:
    router: DeviceRouter | None = getattr(request.app.state, "router", None)
    if router is None:
        raise ServerError("the bus is not running on this server", code="hub_off")
    return router


def _feed(request: Request) -> TelemetryFeed:
    feed: TelemetryFeed | None = getattr(request.app.state, "feed", None)
    if feed is None:
        raise ServerError("the bus is not running on this server", code="hub_off")
    return feed


def _body_fields(body: bytes) -> dict[str, str | None]:
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"body": text, "body_base64": base64.b64encode(body).decode("ascii")}


def _telemetry(message: TelemetryMessage) -> schemas.TelemetryPublic:
    return schemas.TelemetryPublic(
        id=message.id or None,
        device_id=message.device_id,
        module_id=message.module_id,
        received_at=message.received_at,
        properties=dict(message.properties),
        **_body_fields(message.body),
    )


def _message(message: CloudToDeviceMessage) -> schemas.CloudToDevicePublic:
    return schemas.CloudToDevicePublic(
        id=message.id,
        device_id=message.device_id,
        state=message.state,
        properties=dict(message.properties),
        created_at=message.created_at,
        expires_at=message.expires_at,
        delivery_count=message.delivery_count,
        completed_at=message.completed_at,
        **_body_fields(message.body),
    )


async def _device_in(
    request: Request, principal: PrincipalDep, tenant_id: str, device_id: str, scope: Scope
) -> None:
    """The device exists in the tenant and the caller may ``scope`` there (404 or 403 otherwise)."""
    principal.require(tenant_id, scope)
    await asyncio.to_thread(services(request).registry.get_device, principal, tenant_id, device_id)


def _module(module_id: str | None) -> str | None:
    """A module id from a path or a query, checked (400 ``module_id_invalid``)."""
    if module_id is None:
        return None
    try:
        return check_module_id(module_id)
    except ValueError as error:
        raise InvalidInput(str(error), code="module_id_invalid") from None


_PATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
    }
}


@router.get("/devices/{device_id}/connection")
async def connection(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep
) -> schemas.ConnectionPublic:
    """Whether the device holds a session with the hub now (with any hub process)."""
    return await _connection(request, tenant_id, device_id, principal, None)


@router.get("/devices/{device_id}/modules/{module_id}/connection")
async def module_connection(
    request: Request, tenant_id: str, device_id: str, module_id: str, principal: PrincipalDep
) -> schemas.ConnectionPublic:
    """Whether the device's module holds a session with the hub now (with any hub process)."""
    return await _connection(request, tenant_id, device_id, principal, _module(module_id))


async def _connection(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep, module_id: str | None
) -> schemas.ConnectionPublic:
    await _device_in(request, principal, tenant_id, device_id, Scope.READ)
    connected = await _router(request).is_connected(tenant_id, device_id, module_id=module_id)
    return schemas.ConnectionPublic(device_id=device_id, module_id=module_id, connected=connected)


@router.get("/devices/{device_id}/twin")
async def get_twin(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep
) -> schemas.TwinPublic:
    """The device twin: desired and reported properties, each with its $version."""
    return await _get_twin(request, tenant_id, device_id, principal, None)


@router.get("/devices/{device_id}/modules/{module_id}/twin")
async def get_module_twin(
    request: Request, tenant_id: str, device_id: str, module_id: str, principal: PrincipalDep
) -> schemas.TwinPublic:
    """A module's twin (the module's own desired and reported properties); empty until first written."""
    return await _get_twin(request, tenant_id, device_id, principal, _module(module_id))


async def _get_twin(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep, module_id: str | None
) -> schemas.TwinPublic:
    principal.require(tenant_id, Scope.READ)
    store = services(request).hub_store
    twin = await asyncio.to_thread(functools.partial(store.twin, tenant_id, device_id, module_id=module_id))
    document = twin.document()
    return schemas.TwinPublic(
        device_id=device_id, module_id=module_id, desired=document["desired"], reported=document["reported"]
    )


@router.patch("/devices/{device_id}/twin/desired", openapi_extra=_PATCH_BODY)
async def patch_desired(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep
) -> schemas.DesiredPatched:
    """Merge a JSON patch into the desired properties (null removes a key); a connected device gets it."""
    return await _patch_desired(request, tenant_id, device_id, principal, None)


@router.patch("/devices/{device_id}/modules/{module_id}/twin/desired", openapi_extra=_PATCH_BODY)
async def patch_module_desired(
    request: Request, tenant_id: str, device_id: str, module_id: str, principal: PrincipalDep
) -> schemas.DesiredPatched:
    """Merge a JSON patch into a module's desired properties; a connected module session gets it."""
    return await _patch_desired(request, tenant_id, device_id, principal, _module(module_id))


async def _patch_desired(
    request: Request, tenant_id: str, device_id: str, principal: PrincipalDep, module_id: str | None
) -> schemas.DesiredPatched:
    principal.require(tenant_id, Scope.WRITE)
    built = services(request)
    patch = twin_core.parse_patch(await request.body(), built.settings.limits.twin_max_bytes)
    half = await asyncio.to_thread(
        functools.partial(
            built.hub_store.patch_twin, tenant_id, device_id, patch, desired=True, module_id=module_id
        )
    )
    pushed = await _router(request).desired_changed(
        tenant_id, device_id, half.version, patch, module_id=module_id
    )
    return schemas.DesiredPatched(
        device_id=device_id, module_id=module_id, version=half.version, pushed=pushed
    )


@router.post("/devices/{device_id}/methods/{method_name}")
async def invoke_method(
    request: Request,
    tenant_id: str,
    device_id: str,
    method_name: str,
    body: schemas.MethodInvoke,
    principal: PrincipalDep,
) -> schemas.MethodResultPublic:
    """Call a direct method on a connected device and return its status and payload (504 on timeout)."""
    return await _invoke_method(request, tenant_id, device_id, method_name, body, principal, None)


@router.post("/devices/{device_id}/modules/{module_id}/methods/{method_name}")
async def invoke_module_method(
    request: Request,
    tenant_id: str,
    device_id: str,
    module_id: str,
    method_name: str,
    body: schemas.MethodInvoke,
    principal: PrincipalDep,
) -> schemas.MethodResultPublic:
    """Call a direct method on a connected module of the device (its module session)."""
    return await _invoke_method(
        request, tenant_id, device_id, method_name, body, principal, _module(module_id)
    )


async def _invoke_method(
    request: Request,
    tenant_id: str,
    device_id: str,
    method_name: str,
    body: schemas.MethodInvoke,
    principal: PrincipalDep,
    module_id: str | None,
) -> schemas.MethodResultPublic:
    await _device_in(request, principal, tenant_id, device_id, Scope.WRITE)
    try:
        check_method_name(method_name)
    except ValueError as error:
        raise InvalidInput(str(error), code="bad_method_name") from None
    limits = services(request).settings.limits
    payload = json.dumps(body.payload).encode()
    if len(payload) > limits.method_max_payload_bytes:
        raise InvalidInput(f"a method payload holds at most {limits.method_max_payload_bytes} bytes")
    timeout = min(
        body.timeout_seconds or limits.method_default_timeout_seconds, limits.method_max_timeout_seconds
    )
    result = await _router(request).invoke_method(
        tenant_id, device_id, method_name, payload, timeout, module_id=module_id
    )
    answered: Any
    try:
        answered = json.loads(result.payload) if result.payload else None
    except (ValueError, UnicodeDecodeError):
        answered = result.payload.decode("utf-8", "replace")
    return schemas.MethodResultPublic(status=result.status, payload=answered)


@router.post("/devices/{device_id}/messages", status_code=201)
async def send_message(
    request: Request,
    tenant_id: str,
    device_id: str,
    body: schemas.CloudToDeviceCreate,
    principal: PrincipalDep,
) -> schemas.CloudToDevicePublic:
    """Queue a cloud-to-device message (at most 50 pending per device); delivered at once if connected."""
    principal.require(tenant_id, Scope.WRITE)
    if body.body_base64:
        try:
            content = base64.b64decode(body.body, validate=True)
        except ValueError:
            raise InvalidInput("body is not valid base64") from None
    else:
        content = body.body.encode("utf-8")
    store = services(request).hub_store
    message = await asyncio.to_thread(
        store.enqueue, tenant_id, device_id, content, tuple(body.properties.items()), body.ttl_seconds
    )
    _router(request).cloud_to_device_queued(tenant_id, device_id)
    return _message(message)


@router.get("/devices/{device_id}/messages")
async def list_messages(
    request: Request,
    tenant_id: str,
    device_id: str,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.CloudToDevicePublic]:
    """The device's cloud-to-device messages, newest first: pending, completed or expired."""
    principal.require(tenant_id, Scope.READ)
    messages = await asyncio.to_thread(services(request).hub_store.messages, tenant_id, device_id, limit)
    return [_message(message) for message in messages]


@router.get("/telemetry")
async def query_telemetry(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    device_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    after_id: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    module_id: str | None = None,
) -> list[schemas.TelemetryPublic]:
    """Stored telemetry, oldest first; page with ``after_id`` (the last id you got); ``module_id`` keeps
    what that module sent."""
    principal.require(tenant_id, Scope.READ)
    messages = await asyncio.to_thread(
        services(request).hub_store.query_telemetry,
        tenant_id,
        device_id,
        since=as_utc(since),
        until=as_utc(until),
        after_id=after_id,
        limit=limit,
        module_id=_module(module_id),
    )
    return [_telemetry(message) for message in messages]


@router.get(
    "/telemetry/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
)
async def stream_telemetry(
    request: Request, tenant_id: str, principal: PrincipalDep, device_id: str | None = None
) -> StreamingResponse:
    """Telemetry as it is committed, as server-sent events (``event: telemetry``); comments keep it alive."""
    principal.require(tenant_id, Scope.READ)
    feed = _feed(request)
    try:
        subjects.telemetry(tenant_id)
        if device_id is not None:
            check_token(device_id, "device id")
    except ValueError as error:
        raise InvalidInput(str(error), code="bad_device_id") from None

    async def events() -> AsyncIterator[bytes]:
        follow = feed.follow(tenant_id, device_id)
        try:
            while True:
                try:
                    message, missed = await asyncio.wait_for(anext(follow), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield b": still here\n\n"
                    continue
                data = _telemetry(message).model_dump_json()
                yield f"event: telemetry\ndata: {data}\n\n".encode()
                if missed:
                    yield f"event: missed\ndata: {json.dumps({'missed': missed})}\n\n".encode()
        finally:
            with contextlib.suppress(RuntimeError):
                await follow.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.post("/devices/{device_id}/quarantine")
def quarantine(
    tenant_id: str, device_id: str, body: schemas.Quarantine, principal: PrincipalDep, registry: RegistryDep
) -> schemas.DevicePublic:
    """Narrow a device to its twin: its session ends within a second and returns with the twin only."""
    return schemas.DevicePublic.model_validate(
        registry.quarantine_device(principal, tenant_id, device_id, body.reason)
    )


@router.post("/devices/{device_id}/release")
def release(
    tenant_id: str, device_id: str, principal: PrincipalDep, registry: RegistryDep
) -> schemas.DevicePublic:
    """End a quarantine: the device has its full topics again."""
    return schemas.DevicePublic.model_validate(registry.release_device(principal, tenant_id, device_id))
