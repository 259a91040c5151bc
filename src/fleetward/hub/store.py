"""What the hub keeps: telemetry, twins, cloud-to-device messages, and who may connect. Synchronous: the
hub calls it from its batcher thread or through ``asyncio.to_thread``; every query is scoped by tenant.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import AccessRefused, Conflict, FleetwardError, InvalidInput, NotFound, PayloadTooLarge
from fleetward.hub import twin as twin_core
from fleetward.hub.topics import AccessMode, check_application_properties
from fleetward.hub.twin import JsonObject, Twin, TwinHalf
from fleetward.registry.models import DeviceStatus
from fleetward.store import trust
from fleetward.store.database import Database
from fleetward.store.schema import (
    certificate_authorities,
    certificates,
    cloud_to_device,
    device_health,
    devices,
    module_twins,
    telemetry,
    twins,
)
from fleetward.store.trust import TrustChange

Properties = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TelemetryMessage:
    tenant_id: str
    device_id: str
    received_at: dt.datetime
    properties: Properties
    body: bytes
    id: int = 0
    #: the module that sent it (a module session); None: the device itself
    module_id: str | None = None


@dataclass(frozen=True)
class CloudToDeviceMessage:
    id: str
    tenant_id: str
    device_id: str
    body: bytes
    properties: Properties
    created_at: dt.datetime
    expires_at: dt.datetime
    state: str
    delivery_count: int
    completed_at: dt.datetime | None


class HubStore:
    def __init__(self, database: Database, clock: Clock, limits: Limits) -> None:
        self._db = database
        self._clock = clock
        self._limits = limits

    # ------------------------------------------------------------------ who may connect

    def access_of(self, tenant_id: str, device_id: str, serial: str) -> AccessMode:
        """How a device presenting certificate ``serial`` may use the hub, or why it may not at all.

        Read from the store at every connection: a missing or unreadable answer refuses (fail closed).
        """
        with self._db.read() as connection:
            certificate = connection.execute(
                sa.select(
                    certificates.c.tenant_id, certificates.c.device_id, certificates.c.revoked_at
                ).where(certificates.c.serial == serial)
            ).first()
            device = connection.execute(
                sa.select(devices.c.tenant_id, devices.c.status, device_health.c.restricted)
                .outerjoin(device_health, device_health.c.device_id == devices.c.id)
                .where(devices.c.id == device_id)
            ).first()
        if certificate is None or (certificate.tenant_id, certificate.device_id) != (tenant_id, device_id):
            raise AccessRefused(
                "the certificate was not issued by this authority", code="certificate_unknown"
            )
        if certificate.revoked_at is not None:
            raise AccessRefused("the certificate is revoked", code="certificate_revoked")
        if device is None or device.tenant_id != tenant_id:
            raise AccessRefused("the device is not claimed by this tenant", code="device_unclaimed")
        if device.status == DeviceStatus.REVOKED.value:
            raise AccessRefused("the device is revoked", code="device_revoked")
        # conditional access: a quarantined device, or one whose health restricts it, keeps only its twin
        if device.status == DeviceStatus.QUARANTINED.value or device.restricted:
            return AccessMode.QUARANTINED
        return AccessMode.FULL

    def trust_anchors(self) -> dict[str, tuple[bytes, bytes]]:
        """Per tenant, the DER of its active root and issuing CA: what device certificates chain to."""
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(
                    certificate_authorities.c.tenant_id,
                    certificate_authorities.c.kind,
                    certificate_authorities.c.certificate,
                ).where(certificate_authorities.c.active.is_(True))
            ).all()
        roots = {row.tenant_id: bytes(row.certificate) for row in rows if row.kind == "root"}
        issuing = {row.tenant_id: bytes(row.certificate) for row in rows if row.kind == "issuing"}
        return {tenant: (roots[tenant], issuing[tenant]) for tenant in roots.keys() & issuing.keys()}

    def trust_changes_since(self, seq: int) -> list[TrustChange]:
        with self._db.read() as connection:
            return trust.since(connection, seq)

    def latest_trust_change(self) -> int:
        with self._db.read() as connection:
            return trust.latest(connection)

    # ------------------------------------------------------------------ telemetry

    def append_telemetry(self, batch: Sequence[TelemetryMessage]) -> list[TelemetryMessage | FleetwardError]:
        """Commit a batch of telemetry in one transaction: one statement, one disk flush."""
        columns = ("tenant_id", "device_id", "received_at", "properties", "body", "module_id")
        with self._db.write() as connection:
            rows: list[tuple[object, ...]] = [
                (
                    message.tenant_id,
                    message.device_id,
                    self._db.stored_time(message.received_at),
                    json.dumps(message.properties, separators=(",", ":")),
                    message.body,
                    message.module_id,
                )
                for message in batch
            ]
            self._db.insert_rows(connection, telemetry, columns, rows)
        return list(batch)

    def query_telemetry(
        self,
        tenant_id: str,
        device_id: str | None = None,
        *,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
        module_id: str | None = None,
    ) -> list[TelemetryMessage]:
        """Telemetry of the tenant, oldest first, in a time range and after an id (for paging); with
        ``module_id``, only what that module sent."""
        statement = sa.select(telemetry).where(telemetry.c.tenant_id == tenant_id)
        if device_id is not None:
            statement = statement.where(telemetry.c.device_id == device_id)
        if module_id is not None:
            statement = statement.where(telemetry.c.module_id == module_id)
        if since is not None:
            statement = statement.where(telemetry.c.received_at >= since)
        if until is not None:
            statement = statement.where(telemetry.c.received_at < until)
        if after_id is not None:
            statement = statement.where(telemetry.c.id > after_id)
        limit = max(1, min(limit, self._limits.max_list_items))
        with self._db.read() as connection:
            rows = connection.execute(statement.order_by(telemetry.c.id).limit(limit)).all()
        return [
            TelemetryMessage(
                row.tenant_id,
                row.device_id,
                row.received_at,
                tuple((key, value) for key, value in json.loads(row.properties)),
                bytes(row.body),
                row.id,
                row.module_id,
            )
            for row in rows
        ]

    # ------------------------------------------------------------------ twins

    def twin(self, tenant_id: str, device_id: str, *, module_id: str | None = None) -> Twin:
        """The device's twin, or (with ``module_id``) its module's: empty until first written."""
        with self._db.read() as connection:
            return self._twin(connection, tenant_id, device_id, module_id)

    def _twin(
        self,
        connection: Connection,
        tenant_id: str,
        device_id: str,
        module_id: str | None = None,
        *,
        lock: bool = False,
    ) -> Twin:
        if module_id is None:
            statement = sa.select(twins).where(twins.c.tenant_id == tenant_id, twins.c.device_id == device_id)
        else:
            statement = sa.select(module_twins).where(
                module_twins.c.tenant_id == tenant_id,
                module_twins.c.device_id == device_id,
                module_twins.c.module_id == module_id,
            )
        row = connection.execute(statement.with_for_update() if lock else statement).first()
        if row is None:
            self._device_in(connection, tenant_id, device_id)
            return twin_core.EMPTY_TWIN
        return Twin(
            TwinHalf(json.loads(row.desired), row.desired_version),
            TwinHalf(json.loads(row.reported), row.reported_version),
        )

    @staticmethod
    def _device_in(connection: Connection, tenant_id: str, device_id: str) -> None:
        found = connection.execute(
            sa.select(devices.c.id).where(devices.c.tenant_id == tenant_id, devices.c.id == device_id)
        ).first()
        if found is None:
            raise NotFound("no such device in this tenant", code="device_not_found")

    def patch_twin(
        self,
        tenant_id: str,
        device_id: str,
        patch: JsonObject,
        *,
        desired: bool,
        module_id: str | None = None,
    ) -> TwinHalf:
        """Merge ``patch`` into the desired (operator) or reported (device) half of the device's twin, or
        (with ``module_id``) of its module's; the new half."""
        with self._db.write() as connection:
            current = self._twin(connection, tenant_id, device_id, module_id, lock=True)
            half = current.desired if desired else current.reported
            changed = twin_core.apply(half, patch, self._limits.twin_max_bytes)
            updated = Twin(changed, current.reported) if desired else Twin(current.desired, changed)
            values = {
                "tenant_id": tenant_id,
                "desired": json.dumps(updated.desired.properties),
                "desired_version": updated.desired.version,
                "reported": json.dumps(updated.reported.properties),
                "reported_version": updated.reported.version,
                "updated_at": self._clock.now(),
            }
            if module_id is not None:
                result = connection.execute(
                    module_twins.update()
                    .where(
                        module_twins.c.device_id == device_id,
                        module_twins.c.module_id == module_id,
                        module_twins.c.tenant_id == tenant_id,
                    )
                    .values(**values)
                )
                if result.rowcount == 0:
                    connection.execute(
                        module_twins.insert().values(device_id=device_id, module_id=module_id, **values)
                    )
                return changed
            result = connection.execute(
                twins.update()
                .where(twins.c.device_id == device_id, twins.c.tenant_id == tenant_id)
                .values(**values)
            )
            if result.rowcount == 0:
                connection.execute(twins.insert().values(device_id=device_id, **values))
        return changed

    # ------------------------------------------------------------------ cloud-to-device messages

    def enqueue(
        self,
        tenant_id: str,
        device_id: str,
        body: bytes,
        properties: Properties,
        ttl_seconds: int | None = None,
    ) -> CloudToDeviceMessage:
        """Queue a message for the device; refused when it already has its maximum pending."""
        limits = self._limits
        if len(body) > limits.cloud_to_device_max_bytes:
            raise PayloadTooLarge(
                f"a cloud-to-device message holds at most {limits.cloud_to_device_max_bytes} bytes"
            )
        ttl = ttl_seconds or limits.cloud_to_device_default_ttl_seconds
        if not 0 < ttl <= limits.cloud_to_device_max_ttl_seconds:
            raise InvalidInput(f"a time to live is 1 to {limits.cloud_to_device_max_ttl_seconds} seconds")
        check_application_properties(properties)
        now = self._clock.now()
        message = CloudToDeviceMessage(
            id=_ordered_id(),
            tenant_id=tenant_id,
            device_id=device_id,
            body=body,
            properties=properties,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=ttl),
            state="pending",
            delivery_count=0,
            completed_at=None,
        )
        with self._db.write() as connection:
            self._device_in(connection, tenant_id, device_id)
            self._expire(connection, device_id, now)
            pending = connection.execute(
                sa.select(sa.func.count())
                .select_from(cloud_to_device)
                .where(cloud_to_device.c.device_id == device_id, cloud_to_device.c.state == "pending")
            ).scalar_one()
            if pending >= limits.cloud_to_device_max_pending:
                raise Conflict(
                    f"the device already has {pending} messages pending; the maximum is "
                    f"{limits.cloud_to_device_max_pending}",
                    code="device_queue_full",
                )
            connection.execute(cloud_to_device.insert().values(**_c2d_values(message)))
        return message

    @staticmethod
    def _expire(connection: Connection, device_id: str, now: dt.datetime) -> None:
        connection.execute(
            cloud_to_device.update()
            .where(
                cloud_to_device.c.device_id == device_id,
                cloud_to_device.c.state == "pending",
                cloud_to_device.c.expires_at <= now,
            )
            .values(state="expired")
        )

    def pending_messages(self, tenant_id: str, device_id: str) -> list[CloudToDeviceMessage]:
        """Messages still to deliver to the device, oldest first (expired ones are set aside)."""
        with self._db.write() as connection:
            self._expire(connection, device_id, self._clock.now())
            rows = connection.execute(
                sa.select(cloud_to_device)
                .where(
                    cloud_to_device.c.tenant_id == tenant_id,
                    cloud_to_device.c.device_id == device_id,
                    cloud_to_device.c.state == "pending",
                )
                .order_by(cloud_to_device.c.created_at, cloud_to_device.c.id)
            ).all()
        return [_c2d_message(row) for row in rows]

    def mark_delivered(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            with self._db.write() as connection:
                connection.execute(
                    cloud_to_device.update()
                    .where(cloud_to_device.c.id.in_(list(message_ids)))
                    .values(delivery_count=cloud_to_device.c.delivery_count + 1)
                )

    def complete(self, message_id: str) -> None:
        """The device acknowledged the message."""
        with self._db.write() as connection:
            connection.execute(
                cloud_to_device.update()
                .where(cloud_to_device.c.id == message_id, cloud_to_device.c.state == "pending")
                .values(state="completed", completed_at=self._clock.now())
            )

    def messages(self, tenant_id: str, device_id: str, limit: int = 100) -> list[CloudToDeviceMessage]:
        """The device's messages, newest first, whatever their state."""
        with self._db.read() as connection:
            self._device_in(connection, tenant_id, device_id)
            rows = connection.execute(
                sa.select(cloud_to_device)
                .where(cloud_to_device.c.tenant_id == tenant_id, cloud_to_device.c.device_id == device_id)
                .order_by(cloud_to_device.c.created_at.desc())
                .limit(max(1, min(limit, self._limits.max_list_items)))
            ).all()
        return [_c2d_message(row) for row in rows]


def _ordered_id() -> str:
    """32 hex characters that sort in the order they were made (nanoseconds, then randomness), so that
    messages queued in the same instant are still delivered in the order they were queued."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


def _c2d_values(message: CloudToDeviceMessage) -> dict[str, Any]:
    values = dict(message.__dict__)
    values["properties"] = json.dumps(message.properties)
    return values


def _c2d_message(row: Any) -> CloudToDeviceMessage:
    return CloudToDeviceMessage(
        id=row.id,
        tenant_id=row.tenant_id,
        device_id=row.device_id,
        body=bytes(row.body),
        properties=tuple((key, value) for key, value in json.loads(row.properties)),
        created_at=row.created_at,
        expires_at=row.expires_at,
        state=row.state,
        delivery_count=row.delivery_count,
        completed_at=row.completed_at,
    )
