"""A device written for Azure IoT Hub, unchanged but for where it connects: the device side of
``test_azure_iot_sdk.py``.

It runs only in ``.venv-azure-iot`` (``scripts/setup`` makes it), where the Azure IoT Hub device SDK for
Python is installed with the older paho-mqtt it pins; the main virtual environment has neither. It speaks
one JSON object a line on stdout (``{"step": …}``) so that the test can follow it, takes ``disconnect``
and ``connect`` on its standard input, and ends when that says ``quit`` or closes.

The SDK always dials port 8883, so the test hands it an HTTP CONNECT proxy (the SDK's own ``proxy_options``,
as a device behind a corporate proxy would use) that leads to the hub's port; TLS stays end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from azure.iot.device import (
    X509,
    IoTHubDeviceClient,
    Message,
    MethodRequest,
    MethodResponse,
    ProxyOptions,
)

_print_lock = threading.Lock()


def say(step: str, **fields: Any) -> None:
    """One line for the test to read."""
    with _print_lock:
        print(json.dumps({"step": step, **fields}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True, help="the hub's host name, as its certificate names it")
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--certificate", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--ca", required=True, type=Path, help="the CA the hub's certificate chains to")
    parser.add_argument("--proxy-port", required=True, type=int)
    parser.add_argument("--keep-alive", required=True, type=int, help="seconds")
    parser.add_argument("--idle-seconds", required=True, type=float, help="how long to stay silent")
    options = parser.parse_args()

    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(options.certificate), str(options.key)),
        hostname=options.host,
        device_id=options.device_id,
        server_verification_cert=options.ca.read_text(),
        proxy_options=ProxyOptions("HTTP", "127.0.0.1", options.proxy_port),
        connection_retry=False,
        keep_alive=options.keep_alive,
    )

    def on_desired(patch: dict[str, Any]) -> None:
        say("desired", patch=patch)

    def on_method(request: MethodRequest) -> None:
        say("method", name=request.name, payload=request.payload)
        answer = {"rebooted": True, "asked": request.payload, "method": request.name}
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, answer))
        say("method-answered", request_id=request.request_id)

    def on_message(message: Message) -> None:
        say(
            "c2d",
            data=message.data.decode("utf-8"),
            message_id=message.message_id,
            custom_properties=message.custom_properties,
        )

    try:
        client.connect()
        say("connected")

        telemetry = Message(json.dumps({"temperature": 21.5}), message_id="sdk-1")
        telemetry.content_type = "application/json"
        telemetry.content_encoding = "utf-8"
        telemetry.custom_properties["room"] = "lab 2/east"
        telemetry.custom_properties["alert"] = "false"
        client.send_message(telemetry)
        say("sent")

        twin = client.get_twin()
        say("twin", twin=twin)

        client.patch_twin_reported_properties({"firmware": "2.1.0", "uptime": 42})
        say("reported")

        time.sleep(options.idle_seconds)  # longer than the keep-alive: paho pings, the hub must answer
        say("idle", connected=client.connected)

        client.on_twin_desired_properties_patch_received = on_desired
        client.on_method_request_received = on_method
        client.on_message_received = on_message
        say("ready")

        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command == "disconnect":
                client.disconnect()
                say("disconnected", connected=client.connected)
            elif command == "connect":  # no handler is set again: the SDK counts on its MQTT session
                client.connect()
                say("reconnected", connected=client.connected)
    finally:
        client.shutdown()
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
