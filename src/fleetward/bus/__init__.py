"""The bus: how fleetward's processes reach each other.

:class:`Bus` is a small interface (publish, subscribe, request with a timeout and a distinct "no responders"
outcome) with two implementations: :class:`LocalBus`, in-process, the embedded default, and
``fleetward.bus.natsbus.NatsBus``, on NATS, when several processes or nodes share the hub's work. What
travels on it, and under which subjects, is in :mod:`fleetward.bus.subjects`.
"""

from __future__ import annotations

from fleetward.bus.base import Bus, Message, NoResponders, RequestTimedOut, Subscription
from fleetward.bus.local import LocalBus

__all__ = ["Bus", "LocalBus", "Message", "NoResponders", "RequestTimedOut", "Subscription"]


def bus_for(url: str | None, *, max_outbound: int = 65_536) -> Bus:
    """A :class:`NatsBus` for a ``nats://`` URL; without a URL, a :class:`LocalBus`."""
    if not url:
        return LocalBus()
    from fleetward.bus.natsbus import NatsBus

    return NatsBus(url, max_outbound=max_outbound)
