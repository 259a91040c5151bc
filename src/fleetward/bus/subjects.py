"""The subjects fleetward uses on its bus, in one place (a NATS bus puts ``fleetward.`` before each).

=====================================  =================================================================
``device.<tenant>.<device>``           commands for the hub that holds the device's session (requests:
                                       a direct method, a desired patch, the connection state, a
                                       takeover; a publish: cloud-to-device messages are waiting)
``device.<tenant>.<device>.<module>``  the same for a module session of the device; the module id is
                                       written in hexadecimal (a module id may hold ``$``)
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


def device(tenant_id: str, device_id: str, module_id: str | None = None) -> str:
    """The subject of a device's session, or of one of its modules' sessions."""
    subject = f"device.{check_token(tenant_id, 'tenant id')}.{check_token(device_id, 'device id')}"
    if module_id is None:
        return subject
    if not isinstance(module_id, str):
        raise TypeError(f"a module id must be a str, not {type(module_id).__name__}")
    return f"{subject}.{check_token(module_id.encode('utf-8').hex(), 'module id')}"


def device_of(subject: str) -> tuple[str, str]:
    """The tenant and device a ``device.<tenant>.<device>`` subject names."""
    tenant_id, device_id, module_id = session_of(subject)
    if module_id is not None:
        raise ValueError(f"{subject[:200]!r} is a module's subject")
    return tenant_id, device_id


def session_of(subject: str) -> tuple[str, str, str | None]:
    """The tenant, device and module (None: the device itself) a device subject names."""
    parts = subject.split(".")
    if len(parts) not in (3, 4) or parts[0] != "device":
        raise ValueError(f"{subject[:200]!r} is not a device subject")
    module_id: str | None = None
    if len(parts) == 4:
        try:
            module_id = bytes.fromhex(check_token(parts[3], "module id")).decode("utf-8")
        except ValueError:  # UnicodeDecodeError too
            raise ValueError(f"{subject[:200]!r} is not a device subject (no module in hex)") from None
    return check_token(parts[1], "tenant id"), check_token(parts[2], "device id"), module_id


def telemetry(tenant_id: str) -> str:
    """The tenant's committed telemetry."""
    return f"telemetry.{check_token(tenant_id, 'tenant id')}"
