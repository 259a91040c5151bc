"""Sharing the hub link among applications: direct methods, twin namespaces and cloud-to-device messages.

The agent has one :class:`~fleetward.agent.link.HubLink`; each application has its own API connection. The
:class:`CloudRouter` (one per agent) stands between them:

- **direct methods** are routed by name to the application that registered it (``methods.register``):
  first come, first served, a name held by another application is refused (``method_taken``), and names the
  agent keeps for itself (``reserved_methods``) are never handed out. A registration ends with the
  connection that made it (a new connection of the same application takes its names over).
- **reported properties** of an application are merged under ``apps`` → its component id, so no
  application can write another's (or the agent's) reported properties.
- **desired properties**: the router holds the desired document (the whole one after each connect, then
  each patch merged in) and hands each subscribed application only its own namespace, ``apps`` → its
  component id: the whole of it when it subscribes and when the namespace was replaced, and its part of
  each patch otherwise.
- **cloud-to-device messages** go to the application whose component id the message's
  ``fleetward-component`` property names, if it subscribed (``messages.subscribe``); any other message is
  completed and dropped (counted, logged). The link subscribes to messages only once an application did.

:class:`CloudLink` is the part of the link the router uses; :class:`MemoryCloudLink` is its in-memory fake.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from fleetward.agent import dialect
from fleetward.agent.app_protocol import (
    COMPONENT_PROPERTY,
    app_namespace,
    desired_change,
    reported_patch,
)
from fleetward.agent.dialect import CloudMessage, Json, JsonObject, MethodCall
from fleetward.agent.link import (
    DesiredHandler,
    DesiredProperties,
    MessageHandler,
    MethodHandler,
    MethodResult,
    Twin,
)
from fleetward.errors import Conflict
from fleetward.wire.twin import merge as merge_patch

logger = logging.getLogger(__name__)


class CloudLink(Protocol):
    """What the router needs of the hub link; :class:`~fleetward.agent.link.HubLink` is one."""

    def on_method(self, name: str, handler: MethodHandler | None) -> None: ...

    def on_desired(self, handler: DesiredHandler) -> None: ...

    def on_message(self, handler: MessageHandler) -> None: ...

    async def get_twin(self, *, timeout: float | None = None) -> Twin: ...

    async def patch_reported(self, patch: Mapping[str, Json], *, timeout: float | None = None) -> int: ...


class AppEndpointTarget(Protocol):
    """One application's connection, as the router reaches it. ``deliver_*`` never block."""

    async def call_method(self, call: MethodCall) -> MethodResult: ...

    def deliver_desired(self, version: int, properties: JsonObject, complete: bool) -> None: ...

    def deliver_message(self, message: CloudMessage) -> None: ...


@dataclass(frozen=True)
class AppTwinView:
    """An application's namespace of both twin halves, and the halves' versions."""

    desired: JsonObject
    desired_version: int
    reported: JsonObject
    reported_version: int


@dataclass
class RouterStats:
    messages_delivered: int = 0
    messages_dropped: int = 0
    methods_routed: int = 0


class CloudRouter:
    """Routes the one hub link to many applications (see the module docstring)."""

    def __init__(
        self,
        link: CloudLink,
        *,
        reserved_methods: frozenset[str] = frozenset(),
        max_methods_per_app: int = 16,
        request_timeout_seconds: float | None = None,
    ) -> None:
        if max_methods_per_app <= 0:
            raise ValueError("max_methods_per_app must be positive")
        self._link = link
        self._reserved = reserved_methods
        self._max_methods = max_methods_per_app
        self._timeout = request_timeout_seconds
        self._methods: dict[str, tuple[str, AppEndpointTarget]] = {}
        self._desired_targets: dict[str, AppEndpointTarget] = {}
        self._message_targets: dict[str, AppEndpointTarget] = {}
        self._messages_routed = False
        self._desired: JsonObject | None = None
        self._desired_version = 0
        self.stats = RouterStats()
        link.on_desired(self._on_desired)

    # --- methods

    def register_method(self, name: str, component_id: str, target: AppEndpointTarget) -> None:
        """Route method ``name`` to ``target``; :class:`Conflict` if another application holds it."""
        dialect.check_method_name(name)
        if name in self._reserved:
            raise Conflict(f"the method {name!r} is the agent's own", code="method_taken")
        holder = self._methods.get(name)
        if holder is not None and holder[0] != component_id:
            raise Conflict(f"another application registered the method {name!r}", code="method_taken")
        if holder is None:
            held = sum(1 for owner, _ in self._methods.values() if owner == component_id)
            if held >= self._max_methods:
                raise Conflict(
                    f"an application registers at most {self._max_methods} methods", code="too_many_methods"
                )
        self._methods[name] = (component_id, target)
        self._link.on_method(name, self._method_handler(name))

    def _method_handler(self, name: str) -> MethodHandler:
        async def handle(call: MethodCall) -> MethodResult:
            holder = self._methods.get(name)
            if holder is None:
                return MethodResult.of_json(404, {"message": f"no handler for method {name!r}"})
            self.stats.methods_routed += 1
            return await holder[1].call_method(call)

        return handle

    def methods_of(self, component_id: str) -> tuple[str, ...]:
        return tuple(sorted(name for name, (owner, _) in self._methods.items() if owner == component_id))

    # --- twin

    async def twin(self, component_id: str) -> AppTwinView:
        twin = await self._link.get_twin(timeout=self._timeout)
        return AppTwinView(
            desired=app_namespace(twin.desired, component_id),
            desired_version=twin.desired_version,
            reported=app_namespace(twin.reported, component_id),
            reported_version=twin.reported_version,
        )

    async def report(self, component_id: str, patch: JsonObject) -> int:
        """Merge ``patch`` (already checked) into the application's reported namespace; the new version."""
        return await self._link.patch_reported(reported_patch(component_id, patch), timeout=self._timeout)

    def subscribe_desired(self, component_id: str, target: AppEndpointTarget) -> None:
        """Hand ``target`` its desired namespace now (when known) and after every change of it."""
        self._desired_targets[component_id] = target
        if self._desired is not None:
            target.deliver_desired(self._desired_version, app_namespace(self._desired, component_id), True)

    async def _on_desired(self, desired: DesiredProperties) -> None:
        if desired.complete:
            self._desired = dict(desired.properties)
        else:  # the link hands the whole document first; a patch before it is merged into nothing
            self._desired = merge_patch(self._desired or {}, desired.properties)
        self._desired_version = desired.version
        for component_id, target in list(self._desired_targets.items()):
            if desired.complete:
                target.deliver_desired(desired.version, app_namespace(self._desired, component_id), True)
                continue
            change = desired_change(component_id, desired.properties, self._desired)
            if change is not None:
                target.deliver_desired(desired.version, *change)

    # --- messages

    def subscribe_messages(self, component_id: str, target: AppEndpointTarget) -> None:
        self._message_targets[component_id] = target
        if not self._messages_routed:
            self._messages_routed = True
            self._link.on_message(self._on_message)

    async def _on_message(self, message: CloudMessage) -> None:
        component_id = message.property(COMPONENT_PROPERTY)
        target = self._message_targets.get(component_id) if component_id else None
        if target is None:
            self.stats.messages_dropped += 1
            logger.warning(
                "cloud-to-device message %s dropped: %s",
                message.message_id,
                f"no application {component_id[:64]!r} subscribed to messages"
                if component_id
                else f"it has no {COMPONENT_PROPERTY} property naming an application",
            )
            return
        self.stats.messages_delivered += 1
        target.deliver_message(message)

    # --- the end of a connection

    def release(self, target: AppEndpointTarget) -> None:
        """Forget every registration of ``target`` (its connection ended)."""
        for name in [name for name, (_, holder) in self._methods.items() if holder is target]:
            del self._methods[name]
            self._link.on_method(name, None)
        for targets in (self._desired_targets, self._message_targets):
            for component_id in [key for key, holder in targets.items() if holder is target]:
                del targets[component_id]


class MemoryCloudLink:
    """An in-memory :class:`CloudLink`: a twin, and the hub's side of methods, desired patches and messages,
    driven by the test (:meth:`connected`, :meth:`set_desired`, :meth:`call_method`, :meth:`send_message`)."""

    def __init__(self) -> None:
        self.desired: JsonObject = {}
        self.desired_version = 1
        self.reported: JsonObject = {}
        self.reported_version = 1
        self.reported_patches: list[JsonObject] = []
        self.methods: dict[str, MethodHandler] = {}
        self._desired_handler: DesiredHandler | None = None
        self._message_handler: MessageHandler | None = None
        self._message_ids = 0

    def on_method(self, name: str, handler: MethodHandler | None) -> None:
        dialect.check_method_name(name)
        if handler is None:
            self.methods.pop(name, None)
        else:
            self.methods[name] = handler

    def on_desired(self, handler: DesiredHandler) -> None:
        self._desired_handler = handler

    def on_message(self, handler: MessageHandler) -> None:
        self._message_handler = handler

    @property
    def subscribed_to_messages(self) -> bool:
        return self._message_handler is not None

    async def get_twin(self, *, timeout: float | None = None) -> Twin:
        return Twin(dict(self.desired), self.desired_version, dict(self.reported), self.reported_version)

    async def patch_reported(self, patch: Mapping[str, Json], *, timeout: float | None = None) -> int:
        self.reported_patches.append(dict(patch))
        self.reported = merge_patch(self.reported, patch)
        self.reported_version += 1
        return self.reported_version

    async def connected(self) -> None:
        """As after a connection: the whole desired document goes to the handler."""
        if self._desired_handler is not None:
            await self._desired_handler(DesiredProperties(self.desired_version, dict(self.desired), True))

    async def set_desired(self, patch: JsonObject) -> None:
        """An operator's desired patch: merged, versioned, and handed to the handler."""
        self.desired = merge_patch(self.desired, patch)
        self.desired_version += 1
        if self._desired_handler is not None:
            await self._desired_handler(DesiredProperties(self.desired_version, dict(patch), False))

    async def call_method(self, name: str, payload: bytes = b"null") -> MethodResult:
        """The hub calling a direct method: 404 when nobody handles it, as :class:`HubLink` answers."""
        handler = self.methods.get(name)
        if handler is None:
            return MethodResult.of_json(404, {"message": f"no handler for method {name!r}"})
        self._message_ids += 1
        return await handler(MethodCall(name, f"{self._message_ids:x}", payload))

    async def send_message(self, body: bytes, properties: Mapping[str, str]) -> bool:
        """A cloud-to-device message; False when the link would not have subscribed to messages yet."""
        if self._message_handler is None:
            return False
        self._message_ids += 1
        message_id = f"msg-{self._message_ids}"
        pairs = ((dialect.MESSAGE_ID, message_id), *properties.items())
        await self._message_handler(CloudMessage(message_id, pairs, body))
        return True
