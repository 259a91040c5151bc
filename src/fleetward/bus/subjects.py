"""The subjects fleetward uses on its bus, in one place (a NATS bus puts ``fleetward.`` before each).

=====================================  =================================================================
``device.<tenant>.<device>``           commands for the hub that holds the device's session (requests:
                                       a direct method, a desired patch, the connection state, a
                                       takeover; a publish: cloud-to-device messages are waiting)
``telemetry.<tenant>``                 the tenant's telemetry once it is committed, in batches (one per
                                       tenant per turn of a hub's event loop); live streams follow it
``trust``                              a trust change was recorded: every hub reads the trust feed now
=====================================  =================================================================

Tenant and device ids are safe tokens already (a UUID, 64 hex characters); they are checked all the same,
so that no id can ever widen a subject.
"""

from __future__ import annotations

from fleetward.bus.base import check_token

TRUST = "trust"


def device(tenant_id: str, device_id: str) -> str:
    return f"device.{check_token(tenant_id, 'tenant id')}.{check_token(device_id, 'device id')}"


def device_of(subject: str) -> tuple[str, str]:
    """The tenant and device a ``device.<tenant>.<device>`` subject names."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "device":
        raise ValueError(f"{subject[:200]!r} is not a device subject")
    return check_token(parts[1], "tenant id"), check_token(parts[2], "device id")


def telemetry(tenant_id: str) -> str:
    """The tenant's committed telemetry."""
    return f"telemetry.{check_token(tenant_id, 'tenant id')}"
