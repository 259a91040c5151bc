"""A stock Azure IoT Hub device application, packaged for the agent: the application of
``test_agent_azure_sdk_app.py``.

It runs with an interpreter that has the Azure IoT Hub device SDK for Python (``azure-iot-device``), as
the entry point of a signed package whose manifest declares ``DeviceAuthentication`` (the tenant) and
``AllowedConnections`` for the hub. It uses fleetward in one place only, as an Azure Sphere application
calls ``DeviceAuth_GetCertificatePath``: it asks the agent (``appkit``, shipped beside it) for the paths of
the device's certificate and key. Everything else is the SDK as any IoT Hub device uses it: the X.509
client, with the SDK's own ``ProxyOptions`` pointed at the proxy the agent names in ``MQTT_PROXY``, the
hub's host name from its command line (``CmdArgs``), its CA from the package, and the device id from the
certificate's common name (IoT Hub's rule for X.509 devices).

It says what it does as one JSON object a line on its standard output (``{"step": …}``), which the agent
keeps and the test reads, and it never exits by itself (an exit would be a crash to the agent).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appkit import AgentClient, AgentError  # type: ignore[import-not-found]  # beside it in the package
from azure.iot.device import (
    X509,
    IoTHubDeviceClient,
    Message,
    MethodRequest,
    MethodResponse,
    ProxyOptions,
)

#: how long the application waits for the device to be enrolled before it gives up (and crashes)
ENROLLMENT_PATIENCE_SECONDS = 30.0
_print_lock = threading.Lock()


def say(step: str, **fields: Any) -> None:
    with _print_lock:
        print(json.dumps({"step": step, **fields}), flush=True)


def certificate_paths() -> tuple[str, str, str]:
    """DeviceAuth_GetCertificatePath: the device's certificate and key (and the device id they name),
    once the device has them."""
    deadline = time.monotonic() + ENROLLMENT_PATIENCE_SECONDS
    with AgentClient() as agent:
        while True:
            try:
                certificate, key = agent.certificate_paths()
                paths = (certificate, key, agent.device_id())
            except AgentError as error:
                waiting = error.code in ("device_not_enrolled", "device_credentials_unavailable")
                if not waiting or time.monotonic() > deadline:
                    raise
            else:
                return paths
            time.sleep(0.1)


def proxy_options() -> ProxyOptions:
    """The SDK's proxy option, from the proxy the agent gives the application."""
    url = urlsplit(os.environ.get("MQTT_PROXY") or os.environ["HTTPS_PROXY"])
    if url.hostname is None or url.port is None:
        raise SystemExit(f"the proxy {url.geturl()!r} has no host or port")
    return ProxyOptions("HTTP", url.hostname, url.port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hostname", required=True, help="the IoT hub's host name")
    options = parser.parse_args()

    certificate, key, device_id = certificate_paths()
    say("paths", certificate=certificate, key=key, device_id=device_id, proxy=os.environ.get("MQTT_PROXY"))

    ca = Path(__file__).resolve().parent.parent / "certs" / "hub-ca.pem"
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(certificate, key),
        hostname=options.hostname,
        device_id=device_id,
        server_verification_cert=ca.read_text(),
        proxy_options=proxy_options(),
        connection_retry=False,
    )

    def on_method(request: MethodRequest) -> None:
        say("method", name=request.name, payload=request.payload)
        answer = {"answered_by": "azure-iot-device", "method": request.name, "asked": request.payload}
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, answer))

    def on_message(message: Message) -> None:
        say(
            "c2d",
            data=message.data.decode("utf-8"),
            message_id=message.message_id,
            custom_properties=message.custom_properties,
        )

    client.connect()
    say("connected")

    telemetry = Message(json.dumps({"temperature": 21.5}), message_id="sdk-app-1")
    telemetry.content_type = "application/json"
    telemetry.content_encoding = "utf-8"
    telemetry.custom_properties["room"] = "lab 2/east"
    client.send_message(telemetry)
    say("sent")

    say("twin", twin=client.get_twin())

    client.on_method_request_received = on_method
    client.on_message_received = on_message
    say("ready")
    threading.Event().wait()  # until the agent stops the application


if __name__ == "__main__":
    main()
