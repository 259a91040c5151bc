"""A device written for Azure IoT Hub moves to fleetward unchanged: the Azure IoT Hub device SDK for Python
(``azure-iot-device``, its X.509 option) connects to the hub with a fleetward certificate and uses every
feature of the dialect.

The SDK pins an older paho-mqtt than this project's tests, so it lives in its own virtual environment,
``.venv-azure-iot`` (``scripts/setup`` makes it), and the device runs there as a subprocess
(``tests/azure_sdk_device.py``) that reports each step as a JSON line. The SDK always dials port 8883; it
reaches the hub's port through an HTTP CONNECT proxy, which is the SDK's own option for devices behind a
proxy, so TLS between the SDK and the hub stays end to end.
"""

from __future__ import annotations

import json
import queue
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from fleetward.api import schemas
from fleetward.sim.fleet import SimulatedDevice
from tests.conftest import REQUIRE_SERVICES, HubSetup, healthy_software

ROOT = Path(__file__).resolve().parents[1]
SDK_PYTHON = ROOT / ".venv-azure-iot" / "bin" / "python"
DEVICE_SCRIPT = Path(__file__).with_name("azure_sdk_device.py")
STEP_SECONDS = 15.0
#: short, so that the device's silence (2.5 keep-alives) makes paho ping and then want the hub's answer: a
#: hub that missed the ping would end the session after 1.5 keep-alives, one that never answered it would
#: see paho hang up after 2
KEEP_ALIVE_SECONDS = 3


def sdk_python() -> Path:
    """The SDK's interpreter; without it the test skips, or fails where services are required (CI)."""
    if not SDK_PYTHON.exists():
        reason = (
            f"the virtual environment of the Azure IoT device SDK, {SDK_PYTHON.parents[1]}, is missing: "
            "run scripts/setup"
        )
        if REQUIRE_SERVICES:
            pytest.fail(reason + " (FLEETWARD_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    return SDK_PYTHON


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that leads every tunnel to ``upstream_port``, whatever was asked."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.targets: list[str] = []
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ConnectProxy:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._closing.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._tunnel, client)

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            client.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            request, _, early = head.partition(b"\r\n\r\n")
            method, target, _version = request.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
            self.targets.append(target)
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            with socket.create_connection(("127.0.0.1", self._upstream_port), timeout=5) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if early:
                    upstream.sendall(early)
                self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for side in peers:
                side.setblocking(False)
                selector.register(side, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _events in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    peers[source].setblocking(True)
                    try:
                        peers[source].sendall(data)
                    except OSError:
                        return
                    finally:
                        peers[source].setblocking(False)


class SdkDevice:
    """The SDK device as a subprocess: its JSON lines read with deadlines, its end always seen to."""

    def __init__(self, command: list[str], stderr_file: Path, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        self._stderr_file = stderr_file
        self._stderr = stderr_file.open("wb")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=ROOT
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.transcript: list[str] = []
        self._unclaimed: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def story(self) -> str:
        self._stderr.flush()
        errors = self._stderr_file.read_text(errors="replace")[-4000:]
        return "device said:\n" + "\n".join(self.transcript) + "\ndevice's stderr:\n" + errors

    def expect(
        self, step: str, where: Callable[[dict[str, Any]], bool] | None = None, timeout: float = STEP_SECONDS
    ) -> dict[str, Any]:
        """The first line of ``step`` for which ``where`` holds, within ``timeout`` seconds. Lines read while
        looking for another step wait for their own turn: the hub does not order a desired patch and a
        cloud-to-device message that both wait for a reconnecting device."""
        for index, said in enumerate(self._unclaimed):
            if said.get("step") == step and (where is None or where(said)):
                return self._unclaimed.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the SDK device did not say {step!r} within {timeout:.0f} s\n{self.story()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait(timeout=5)
                pytest.fail(
                    f"the SDK device ended (exit {self.process.returncode}) before saying {step!r}\n"
                    + self.story()
                )
            self.transcript.append(line)
            try:
                said = json.loads(line)
            except ValueError:
                continue
            if not isinstance(said, dict):
                continue
            if said.get("step") == step and (where is None or where(said)):
                return said
            self._unclaimed.append(said)

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._reader.join(timeout=5)
        self._stderr.close()


@pytest.fixture
def sdk_interpreter() -> Path:
    return sdk_python()


@pytest.fixture
def sdk_device(hub: HubSetup) -> SimulatedDevice:
    return hub.enroll(SimulatedDevice("sdk-panel", healthy_software()))


@pytest.fixture
def running(
    sdk_interpreter: Path, hub: HubSetup, sdk_device: SimulatedDevice, tmp_path: Path
) -> Iterator[SdkDevice]:
    """The SDK device, started with its fleetward certificate and key, pointed at the hub."""
    credential = sdk_device.credential
    assert credential is not None
    certificate, key = tmp_path / "sdk-device.pem", tmp_path / "sdk-device.key"
    certificate.write_text(credential.issued.certificate)
    key.write_bytes(credential.key_pem())
    key.chmod(0o600)
    with ConnectProxy(hub.hub_port) as proxy:
        device = SdkDevice(
            [
                str(sdk_interpreter),
                str(DEVICE_SCRIPT),
                "--host=localhost",
                f"--device-id={sdk_device.device_id}",
                f"--certificate={certificate}",
                f"--key={key}",
                f"--ca={hub.tls.ca_file}",
                f"--proxy-port={proxy.port}",
                f"--keep-alive={KEEP_ALIVE_SECONDS}",
                f"--idle-seconds={KEEP_ALIVE_SECONDS * 2.5}",
            ],
            tmp_path / "sdk-device.stderr",
            proxy,
        )
        try:
            yield device
        finally:
            device.close()


def _eventually(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_interpreter")  # first: skip (or fail) before a hub is set up for nothing
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_azure_iot_device_sdk_uses_every_feature_of_the_hub_with_a_fleetward_certificate(
    hub: HubSetup, sdk_device: SimulatedDevice, running: SdkDevice
) -> None:
    """Telemetry with properties, the twin (get, report, desired patch), a direct method, a C2D message,
    keep-alive pings, and a reconnect that finds its session (and what was queued meanwhile) kept."""
    client, tenant = hub.tenant.client, hub.tenant.id
    device_path = f"/v1/tenants/{tenant}/devices/{sdk_device.device_id}"

    running.expect("connected")
    assert running.proxy.targets == ["localhost:8883"], "the SDK dials port 8883 of the host it was given"
    assert client.get(f"{device_path}/connection", schemas.ConnectionPublic).connected

    running.expect("sent")
    stored = client.get_list(
        f"/v1/tenants/{tenant}/telemetry", schemas.TelemetryPublic, {"device_id": sdk_device.device_id}
    )
    assert [json.loads(item.body or "") for item in stored] == [{"temperature": 21.5}]
    assert stored[0].properties == {
        "$.mid": "sdk-1",
        "$.ct": "application/json",
        "$.ce": "utf-8",
        "alert": "false",
        "room": "lab 2/east",
    }

    twin = running.expect("twin")["twin"]
    assert set(twin) == {"desired", "reported"}
    assert "$version" in twin["desired"]
    assert "$version" in twin["reported"]

    running.expect("reported")
    reported = client.get(f"{device_path}/twin", schemas.TwinPublic).reported
    assert reported["firmware"] == "2.1.0"
    assert reported["uptime"] == 42

    assert running.expect("idle")["connected"]
    assert client.get(f"{device_path}/connection", schemas.ConnectionPublic).connected

    running.expect("ready")
    patched = schemas.DesiredPatched.model_validate_json(
        client.request_json("PATCH", f"{device_path}/twin/desired", {"interval_seconds": 5})
    )
    assert patched.pushed
    desired = running.expect("desired", lambda said: said["patch"].get("$version") == patched.version)
    assert desired["patch"] == {"interval_seconds": 5, "$version": patched.version}

    result = client.post(
        f"{device_path}/methods/reboot",
        schemas.MethodInvoke(payload={"delay_seconds": 1}, timeout_seconds=10),
        schemas.MethodResultPublic,
    )
    assert result.status == 200
    assert result.payload == {"rebooted": True, "asked": {"delay_seconds": 1}, "method": "reboot"}
    assert running.expect("method")["payload"] == {"delay_seconds": 1}

    queued = client.post(
        f"{device_path}/messages",
        schemas.CloudToDeviceCreate(body="hello, device", properties={"kind": "greeting"}),
        schemas.CloudToDevicePublic,
    )
    received = running.expect("c2d")
    assert received["data"] == "hello, device"
    assert received["message_id"] == queued.id
    assert received["custom_properties"] == {"kind": "greeting"}
    _eventually(
        lambda: any(
            message.id == queued.id and message.state == "completed"
            for message in client.get_list(f"{device_path}/messages", schemas.CloudToDevicePublic)
        ),
        "completing the cloud-to-device message",
    )

    # Away and back: the SDK reconnects with clean_session=0 and subscribes to nothing again, so what was
    # queued while it was away, and the direct methods, reach it only if the hub kept its MQTT session.
    running.tell("disconnect")
    running.expect("disconnected")
    _eventually(
        lambda: not client.get(f"{device_path}/connection", schemas.ConnectionPublic).connected,
        "the hub seeing the device go",
    )
    away = schemas.DesiredPatched.model_validate_json(
        client.request_json("PATCH", f"{device_path}/twin/desired", {"interval_seconds": 60})
    )
    assert not away.pushed
    waiting = client.post(
        f"{device_path}/messages",
        schemas.CloudToDeviceCreate(body="while you were away"),
        schemas.CloudToDevicePublic,
    )
    running.tell("connect")
    assert running.expect("reconnected")["connected"]
    assert running.expect("c2d")["message_id"] == waiting.id
    caught_up = running.expect("desired", lambda said: said["patch"].get("$version") == away.version)
    assert caught_up["patch"]["interval_seconds"] == 60
    again = client.post(f"{device_path}/methods/reboot", schemas.MethodInvoke(), schemas.MethodResultPublic)
    assert again.status == 200

    running.tell("quit")
    running.expect("done")
    assert running.process.wait(timeout=STEP_SECONDS) == 0, running.story()
    time.sleep(0.7)  # the hub writes its security events every half second
    assert not hub.hub_events(), [event.model_dump() for event in hub.hub_events()]
