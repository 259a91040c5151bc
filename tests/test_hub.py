"""The hub: a device with its operational certificate talks MQTT in the IoT Hub dialect; trust ends, the
session ends."""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt
import pytest

from fleetward.api import schemas
from fleetward.sim.fleet import SimulatedDevice
from tests.conftest import HubSetup, healthy_software


@pytest.fixture
def device(hub: HubSetup) -> SimulatedDevice:
    return hub.enroll(SimulatedDevice("room-1", healthy_software()))


def test_qos1_telemetry_is_acknowledged_once_stored_with_its_properties(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with hub.mqtt(device) as client:
            for number in range(5):
                await client.publish(
                    f"devices/{device.device_id}/messages/events/%24.ct=application%2Fjson&room=lab-{number}",
                    json.dumps({"temperature": 20 + number}),
                    qos=1,
                )

    asyncio.run(run())
    stored = hub.tenant.client.get_list(
        f"/v1/tenants/{hub.tenant.id}/telemetry", schemas.TelemetryPublic, {"device_id": device.device_id}
    )
    assert [json.loads(item.body or "")["temperature"] for item in stored] == [20, 21, 22, 23, 24]
    assert stored[0].properties == {"$.ct": "application/json", "room": "lab-0"}


def test_revoking_a_device_ends_its_session_within_a_second_and_refuses_it_again(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> float:
        async with hub.mqtt(device) as client:
            await client.subscribe("$iothub/methods/POST/#")
            started = time.monotonic()
            await asyncio.to_thread(
                hub.tenant.client.post,
                f"/v1/tenants/{hub.tenant.id}/devices/{device.device_id}/revoke",
                schemas.Revoke(),
                schemas.RevokedDevice,
            )
            with pytest.raises(aiomqtt.MqttError):
                async for _message in client.messages:
                    pass
            return time.monotonic() - started

    assert asyncio.run(run()) < 1.0

    async def again() -> None:
        async with hub.mqtt(device):
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(again())
