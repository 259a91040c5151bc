"""One update rolled out in waves to simulated devices, through the real hub and the real update client.

    .venv/bin/python -m bench.updates [--devices 1000] [--parallel 16] [--waves 1%,10%,50%,100%]

``fleetward init`` and ``fleetward serve`` run in their own process (as ``bench.hub`` starts them), so that
the server's CPU time can be read from ``/proc``. The benchmark's process holds the fleet: each simulated
device is enrolled through the real attestation flow, holds an MQTT connection to the hub with its
operational certificate, subscribes to ``$iothub/methods/POST/#`` and answers
``fleetward.checkForUpdates`` (202, as the agent does) before running the device's real
``UpdateClient`` on a bounded thread pool: ``check`` (a ``tuf.ngclient`` refresh of the image repository,
the director's assignment verified against the trusted root), ``download`` (the bsdiff delta from the
image it holds, verified by TUF's length and hashes) and ``report`` (``installed`` in a
``VersionReport``). No application is launched: these are simulated devices.

The tenant's repository is initialised with an offline root key through the operator API, and two
versions of one application are published (a package of ``--package-kib`` random bytes, the second
with ``--changed-bytes`` bytes changed; the server publishes the bsdiff delta between them). Every device
runs 1.0.0 and has checked for updates once before 1.1.0 is published (``--sample`` devices do that first
check, the others are given a copy of its metadata). Each figure comes with a baseline measured in the
same run:

* rollout: from the operator's ``POST …/deployments`` to the last device's ``installed`` report, the
  waves opening on the success threshold and each wave nudged through the hub ("check now"), against
  the same devices each running ``UpdateClient.check`` with nothing assigned (TUF refresh of the
  metadata as it changed since their last check, and a 204 from the director), on the same pool, from
  the same metadata state (each device's metadata directory is copied before the baseline and put back
  after it);
* server CPU: the server process's user and system time over the rollout, per updated device, against
  the same over the baseline, per device;
* bytes: the full image against the delta, both fetched by ``UpdateClient.download`` on a sample of
  devices, with the time and server CPU per download; and every HTTP body a device received during the
  rollout (metadata, assignment, delta).

Nothing fails on a time: a rollout that does not finish within ``--timeout`` is reported as it stands.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import functools
import json
import os
import random
import shutil
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner

from bench.enroll import cpu_seconds
from bench.hub import Fleetward, close_all, connect_all, raise_file_limit
from fleetward.agent import dialect
from fleetward.agent.manifest import Manifest
from fleetward.agent.mqtt import MqttClient
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.update_client import Downloaded, PlannedImage, UpdateClient, UpdateClientSettings
from fleetward.api import schemas
from fleetward.api import schemas_images as image_schemas
from fleetward.api.routes_deployments import DeploymentCreate, DeploymentPublic
from fleetward.client import FleetwardClient
from fleetward.errors import FleetwardError
from fleetward.sim.fleet import SimulatedDevice, image_digest, measurement
from fleetward.updates.check_now import CHECK_METHOD
from fleetward.updates.repository import sign_root
from fleetward.updates.rollout import plan_waves
from fleetward.wire.updates import InstalledComponent, UpdateResult, UpdateState, VersionReport, device_token

SOFTWARE = (measurement("fleetward-agent", "1.4.0"),)
COMPONENT = "5b7e2c1a-8d4f-4e6a-b0c3-2f9d1e8a7b6c"
OLD, NEW = "1.0.0", "1.1.0"
CHECKING = b'{"checking":true}'


# --------------------------------------------------------------------------- counting what a device receives


@dataclass
class Tally:
    """HTTP body bytes one device received (metadata, assignment, image or delta), as they came."""

    bytes: int = 0


class _Counted(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, tally: Tally) -> None:
        self._stream = stream
        self._tally = tally

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._tally.bytes += len(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class CountingTransport(httpx.BaseTransport):
    """httpx's own transport (its own connection pool: one TLS handshake per device session), counted."""

    def __init__(self, verify: ssl.SSLContext, tally: Tally) -> None:
        self._inner = httpx.HTTPTransport(verify=verify)
        self._tally = tally

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_Counted(response.stream, self._tally),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class Setup:
    """What every simulated device's update client needs, shared read-only across the pool's threads."""

    url: str
    verify: ssl.SSLContext
    product_id: str
    bootstrap_root: bytes
    #: the component the devices run: id → (version, sha256)
    installed: Mapping[str, tuple[str, str]]
    #: the package every device holds in its active slot (the delta's base)
    have: Path


@dataclass
class Device:
    simulated: SimulatedDevice
    directory: Path
    nudges: list[float] = field(default_factory=list)
    started: bool = False
    done_at: float | None = None
    error: str | None = None
    received: int = 0
    #: seconds the last job spent in each step (check, download, report), queueing in the pool excluded
    steps: dict[str, float] = field(default_factory=dict)
    image: PlannedImage | None = None
    downloaded: Downloaded | None = None

    @property
    def device_id(self) -> str:
        return self.simulated.device_id

    @property
    def metadata_dir(self) -> Path:
        return self.directory / "metadata"

    def token(self) -> str:
        credential = self.simulated.credential
        assert credential is not None
        return device_token(credential.key, credential.issued.serial, int(time.time()))


@contextlib.contextmanager
def update_client(setup: Setup, device: Device) -> Iterator[tuple[UpdateClient, Tally]]:
    """The device's real update client, over a fresh connection pool of its own."""
    tally = Tally()
    settings = UpdateClientSettings(
        base_url=setup.url,
        metadata_dir=device.metadata_dir,
        device_id=device.device_id,
        product_id=setup.product_id,
        timeout_seconds=120,
    )
    with httpx.Client(transport=CountingTransport(setup.verify, tally), timeout=120) as http:
        yield UpdateClient(settings, setup.bootstrap_root, device.token, http=http), tally


def check_only(setup: Setup, device: Device) -> None:
    """The baseline's job: ``UpdateClient.check`` with nothing assigned to the device."""
    with update_client(setup, device) as (client, tally):
        started = time.perf_counter()
        plan = client.check(setup.installed)
        device.steps = {"check": time.perf_counter() - started}
    if plan.deployment_id is not None or plan.images:
        raise RuntimeError(f"{device.device_id} was assigned something during the baseline")
    device.received = tally.bytes


def update(setup: Setup, device: Device) -> None:
    """What the device does when nudged: check, download every planned image, report ``installed``."""
    with update_client(setup, device) as (client, tally):
        mark = time.perf_counter()
        plan = client.check(setup.installed)
        device.steps = {"check": time.perf_counter() - mark}
        mark = time.perf_counter()
        if plan.deployment_id is None or not plan.images:
            raise RuntimeError(f"{device.device_id} was nudged but nothing is assigned to it")
        results: list[UpdateResult] = []
        running = dict(setup.installed)
        for image in plan.images:
            partial = device.directory / f"{image.component_id}.partial"
            downloaded = client.download(image, partial, setup.have)
            partial.unlink()  # a simulated device: nothing is launched, and 1,000 slots would fill the disk
            device.image, device.downloaded = image, downloaded
            running[image.component_id] = (image.version, image.sha256)
            results.append(
                UpdateResult(
                    deployment_id=plan.deployment_id,
                    component_id=image.component_id,
                    version=image.version,
                    sha256=image.sha256,
                    state=UpdateState.INSTALLED,
                    bytes_downloaded=downloaded.bytes_downloaded,
                    bytes_saved=downloaded.bytes_saved,
                    at=dt.datetime.now(dt.UTC),
                )
            )
        device.steps["download"] = time.perf_counter() - mark
        mark = time.perf_counter()
        client.report(
            VersionReport(
                assignment_version=plan.assignment_version,
                components=tuple(
                    InstalledComponent(component_id=component, version=version, sha256=sha256)
                    for component, (version, sha256) in sorted(running.items())
                ),
                results=tuple(results),
                sent_at=dt.datetime.now(dt.UTC),
            )
        )
        device.steps["report"] = time.perf_counter() - mark
    device.received = tally.bytes


def download_only(setup: Setup, device: Device, via_delta: bool) -> Downloaded:
    """The image the device was planned, fetched again: in full, or as the delta from the one it holds."""
    assert device.image is not None
    partial = device.directory / "sample.partial"
    with update_client(setup, device) as (client, _tally):
        downloaded = client.download(device.image, partial, setup.have if via_delta else None)
    partial.unlink()
    return downloaded


def packages(size: int, changed: int) -> tuple[bytes, bytes]:
    """Version 1.0.0 and 1.1.0 of one application: ``size`` random bytes, ``changed`` of them changed."""
    rng = random.Random(15)
    data = bytearray(rng.randbytes(size))
    manifest = Manifest(name="panel-monitor", component_id=COMPONENT, entry_point="bin/app")

    def package(version: str, body: bytes) -> bytes:
        return build_package(manifest, {"bin/app": f"#!/bin/sh\necho {version}\n".encode(), "lib/data": body})

    old = package(OLD, bytes(data))
    for index in range(changed):
        data[(index * 7919 + 1) * size // (changed + 1) % size] ^= 0xFF
    return old, package(NEW, bytes(data))


@dataclass
class Tenant:
    id: str
    product_id: str
    group_id: str


def prepare_tenant(fleetward: Fleetward) -> Tenant:
    with fleetward.client() as client:
        tenant = client.post("/v1/tenants", schemas.TenantCreate(name="bench"), schemas.TenantPublic)
        created = client.post(
            f"/v1/tenants/{tenant.id}/products", schemas.ProductCreate(name="panel"), schemas.ProductCreated
        )
        client.post(
            f"/v1/tenants/{tenant.id}/reference-values",
            schemas.ReferenceValuesAdd(
                values=[
                    schemas.ReferenceValueItem(
                        component=item.name,
                        version=item.version,
                        sha256=image_digest(item.name, item.version),
                    )
                    for item in SOFTWARE
                ]
            ),
            schemas.ReferenceValuesAdded,
        )
    group = next(group for group in created.device_groups if group.name == "Field Test")  # UpdateAll
    return Tenant(tenant.id, created.product.id, group.id)


def enroll_fleet(fleetward: Fleetward, tenant: Tenant, count: int, directory: Path) -> list[Device]:
    devices = [
        Device(SimulatedDevice(f"d{number:05d}", SOFTWARE), directory / f"d{number:05d}")
        for number in range(count)
    ]
    with fleetward.client() as client:
        for start in range(0, count, 1000):
            client.post(
                f"/v1/tenants/{tenant.id}/devices/claim",
                schemas.DeviceClaim(
                    devices=[device.simulated.claim_item() for device in devices[start : start + 1000]],
                    group_id=tenant.group_id,
                ),
                schemas.ClaimResponse,
            )

    async def enroll_all() -> None:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(verify=fleetward_trust(fleetward), timeout=120, limits=limits) as http:
            gate = asyncio.Semaphore(16)

            async def one(device: Device) -> None:
                async with gate:
                    await device.simulated.enroll(fleetward.url, http)

            await asyncio.gather(*(one(device) for device in devices))

    asyncio.run(enroll_all())
    return devices


def fleetward_trust(fleetward: Fleetward) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(fleetward.ca_file))


def init_repository(client: FleetwardClient, tenant: Tenant) -> bytes:
    """The image repository with one offline root key (threshold 1), as ``fleetward repo init`` does it."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    base = f"/v1/tenants/{tenant.id}/repository"
    proposal = client.post_bytes(
        f"{base}/root-proposal", image_schemas.RootProposalCreate(root_keys=[public.decode()], threshold=1)
    )
    client.request_json("PUT", f"{base}/root", json.loads(sign_root(proposal, [CryptoSigner(key)])))
    return client.get_bytes(f"{base}/root")


def publish(
    client: FleetwardClient, tenant: Tenant, publisher: ec.EllipticCurvePrivateKey, version: str, data: bytes
) -> image_schemas.ImagePublic:
    return client.post(
        f"/v1/tenants/{tenant.id}/images",
        image_schemas.ImageCreate(
            product_id=tenant.product_id,
            version=version,
            package_base64=base64.b64encode(data).decode(),
            signature_base64=base64.b64encode(sign_package(publisher, data)).decode(),
        ),
        image_schemas.ImagePublic,
    )


# --------------------------------------------------------------------------- measuring


@dataclass
class Pass:
    """One pass of jobs over devices: its wall time, the server's CPU, the load generator's CPU."""

    seconds: float
    server_cpu: float
    client_cpu: float
    failures: dict[str, int]


def failure_name(error: BaseException) -> str:
    code = getattr(error, "code", None) if isinstance(error, FleetwardError) else None
    return f"{type(error).__name__}({code})" if code else type(error).__name__


async def run_pass(
    pool: concurrent.futures.ThreadPoolExecutor,
    server_pid: int,
    devices: Sequence[Device],
    job: Callable[[Device], object],
) -> Pass:
    """Every device runs ``job`` on the pool, all queued at once; the pass ends with the last one."""
    loop = asyncio.get_running_loop()
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(loop.run_in_executor(pool, job, device) for device in devices), return_exceptions=True
    )
    seconds = time.perf_counter() - started
    failures: dict[str, int] = {}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            failures[failure_name(outcome)] = failures.get(failure_name(outcome), 0) + 1
    return Pass(seconds, cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu, failures)


async def subscribe_all(clients: Sequence[MqttClient], parallel: int = 256) -> int:
    """Subscribe every client to direct methods; how many the hub refused."""
    gate = asyncio.Semaphore(parallel)

    async def one(client: MqttClient) -> bool:
        async with gate:
            return 0x80 in await client.subscribe(dialect.METHODS)

    return sum(await asyncio.gather(*(one(client) for client in clients)))


@dataclass
class Rollout:
    deployment: DeploymentPublic
    waves: tuple[tuple[str, ...], ...]
    started: float
    finished: float | None
    server_cpu: float
    client_cpu: float
    failures: dict[str, int]
    duplicate_nudges: int
    other_methods: int


class Listener:
    """The simulated devices' side of the hub: answer ``fleetward.checkForUpdates``, then update once."""

    def __init__(
        self, setup: Setup, pool: concurrent.futures.ThreadPoolExecutor, devices: Sequence[Device]
    ) -> None:
        self._setup = setup
        self._pool = pool
        self.devices = devices
        self.finished = 0
        self.all_done = asyncio.Event()
        self.failures: dict[str, int] = {}
        self.duplicates = 0
        self.other_methods = 0

    async def listen(self, device: Device, client: MqttClient) -> None:
        loop = asyncio.get_running_loop()
        while True:
            packet = await client.inbox.get()
            try:
                incoming = dialect.classify_incoming(device.device_id, packet.topic, packet.payload)
            except FleetwardError:
                continue
            if not isinstance(incoming, dialect.MethodCall):
                continue
            if incoming.name != CHECK_METHOD:
                self.other_methods += 1
                await client.publish(dialect.method_response_topic(404, incoming.request_id), b"{}")
                continue
            device.nudges.append(time.perf_counter())
            # as the agent does: answer at once, check after the answer
            await client.publish(dialect.method_response_topic(202, incoming.request_id), CHECKING)
            if device.started:
                self.duplicates += 1
                continue
            device.started = True
            future = loop.run_in_executor(self._pool, update, self._setup, device)
            future.add_done_callback(functools.partial(self._done, device))

    def _done(self, device: Device, future: asyncio.Future[None]) -> None:
        device.done_at = time.perf_counter()
        error = future.exception()
        if error is not None:
            device.error = str(error)
            name = failure_name(error)
            self.failures[name] = self.failures.get(name, 0) + 1
        self.finished += 1
        if self.finished == len(self.devices):
            self.all_done.set()


async def roll_out(
    fleetward: Fleetward,
    tenant: Tenant,
    image_id: str,
    listener: Listener,
    arguments: argparse.Namespace,
) -> Rollout:
    body = DeploymentCreate(
        image_ids=[image_id],
        waves=[item.strip() for item in arguments.waves.split(",")],
        success_threshold=arguments.success,
    )
    client = fleetward.client()
    server_cpu, client_cpu = cpu_seconds(fleetward.process.pid), time.process_time()
    started = time.perf_counter()
    try:
        deployment = await asyncio.to_thread(
            client.post,
            f"/v1/tenants/{tenant.id}/device-groups/{tenant.group_id}/deployments",
            body,
            DeploymentPublic,
        )
        finished: float | None = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.all_done.wait(), arguments.timeout)
            finished = time.perf_counter()
        server_cpu = cpu_seconds(fleetward.process.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        await asyncio.sleep(0.5)  # the last report's judgement is committed before the answer; be generous
        deployment = await asyncio.to_thread(
            client.get, f"/v1/tenants/{tenant.id}/deployments/{deployment.id}", DeploymentPublic
        )
    finally:
        client.close()
    waves = plan_waves([device.device_id for device in listener.devices], body.plan(), seed=deployment.id)
    return Rollout(
        deployment,
        waves,
        started,
        finished,
        server_cpu,
        client_cpu,
        dict(listener.failures),
        listener.duplicates,
        listener.other_methods,
    )


def copy_metadata(devices: Sequence[Device], suffix: str) -> None:
    for device in devices:
        shutil.copytree(device.metadata_dir, device.directory / f"metadata{suffix}")


def restore_metadata(devices: Sequence[Device], suffix: str) -> None:
    for device in devices:
        shutil.rmtree(device.metadata_dir)
        (device.directory / f"metadata{suffix}").rename(device.metadata_dir)


# --------------------------------------------------------------------------- printing


def ms(seconds: float, count: int) -> str:
    return f"{seconds / max(count, 1) * 1000:.1f} ms"


def show_steps(devices: Sequence[Device]) -> str:
    """The mean time of each step of the devices' last job, once a thread of the pool ran it."""
    names = dict.fromkeys(name for device in devices for name in device.steps)
    means = {name: statistics.mean(d.steps[name] for d in devices if name in d.steps) for name in names}
    return ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in means.items())


def show_failures(failures: Mapping[str, int]) -> str:
    return ", ".join(f"{count} × {name}" for name, count in sorted(failures.items())) or "none"


def print_rollout(
    rollout: Rollout, devices: Sequence[Device], baseline: Pass, table: list[list[str]]
) -> None:
    by_id = {device.device_id: device for device in devices}
    installed = [device for device in devices if device.done_at is not None and device.error is None]
    end = rollout.finished or time.perf_counter()
    seconds = end - rollout.started
    ratio = seconds / baseline.seconds
    state = rollout.deployment.state
    if rollout.deployment.completed_at is not None:
        judged = (rollout.deployment.completed_at - rollout.deployment.created_at).total_seconds()
        state += f" (complete by the plan's thresholds after {judged:.1f} s)"
    complete = "all" if rollout.finished is not None and not rollout.failures else "NOT all"
    print(
        f"rollout   {complete} {len(devices)} devices installed {len(installed)} in {seconds:.1f} s "
        f"({len(installed) / seconds:.0f}/s): {ratio:.2f} × the baseline's time; deployment {state}; "
        f"failures: {show_failures(rollout.failures)}"
    )
    table.append(
        [
            f"roll out one update to {len(devices)} devices "
            f"(waves {', '.join(rollout.deployment.plan.waves)}, "
            f"success {rollout.deployment.plan.success_threshold:.0%}, check now through the hub)",
            f"{seconds:.1f} s",
            f"{baseline.seconds:.1f} s",
            f"{ratio:.2f}",
        ]
    )
    for index, members in enumerate(rollout.waves):
        wave = [by_id[device_id] for device_id in members]
        nudged = [min(device.nudges) for device in wave if device.nudges]
        done = [device.done_at for device in wave if device.done_at is not None]
        progress = rollout.deployment.waves[index] if index < len(rollout.deployment.waves) else None
        durations = sorted(
            device.done_at - min(device.nudges) for device in wave if device.done_at and device.nudges
        )
        median = statistics.median(durations) if durations else float("nan")
        print(
            f"          wave {index + 1}: {len(wave):5d} devices, first nudged at "
            f"{(min(nudged) - rollout.started) if nudged else float('nan'):6.2f} s, last nudged at "
            f"{(max(nudged) - rollout.started) if nudged else float('nan'):6.2f} s, last installed at "
            f"{(max(done) - rollout.started) if done else float('nan'):6.2f} s; nudge → report median "
            f"{median * 1000:.0f} ms; the server counted "
            f"{progress.installed if progress else '?'} installed at its end"
        )
        print(f"                  once a thread runs it: {show_steps([d for d in wave if d.steps])}")
    print(f"          each device's job, once a thread runs it: {show_steps(installed)}")
    if rollout.duplicate_nudges or rollout.other_methods:
        print(
            f"          {rollout.duplicate_nudges} devices nudged twice, "
            f"{rollout.other_methods} other methods"
        )
    per_device = rollout.server_cpu / max(len(installed), 1)
    per_check = max(baseline.server_cpu, 1e-9) / len(devices)
    print(
        f"server    CPU {ms(rollout.server_cpu, len(installed))} per updated device "
        f"({rollout.server_cpu / seconds:.2f} cores busy); "
        f"baseline check {ms(baseline.server_cpu, len(devices))} per device "
        f"({baseline.server_cpu / baseline.seconds:.2f} cores): ratio {per_device / per_check:.2f}; "
        f"load generator CPU {ms(rollout.client_cpu, len(installed))} per updated device, "
        f"{ms(baseline.client_cpu, len(devices))} per baseline check"
    )
    table.append(
        [
            "server CPU per updated device (rollout) / per metadata check (baseline)",
            f"{per_device * 1000:.1f} ms",
            f"{per_check * 1000:.1f} ms",
            f"{per_device / per_check:.2f}",
        ]
    )


def print_bytes(
    devices: Sequence[Device],
    sample: Sequence[Device],
    full: Pass,
    delta: Pass,
    full_bytes: Sequence[int],
    delta_bytes: Sequence[int],
    baseline_bytes: float,
    table: list[list[str]],
) -> None:
    installed = [device for device in devices if device.downloaded is not None]
    via_delta = sum(1 for device in installed if device.downloaded and device.downloaded.via_delta)
    received = statistics.mean(device.received for device in installed) if installed else float("nan")
    image_bytes = statistics.mean(
        [device.downloaded.bytes_downloaded for device in installed if device.downloaded] or [float("nan")]
    )
    print(
        f"bytes     rollout: {via_delta} of {len(installed)} devices took the delta, "
        f"{image_bytes:,.0f} B of image each; every HTTP body a device received: {received:,.0f} B "
        f"(metadata, assignment, delta); the baseline check: {baseline_bytes:,.0f} B"
    )
    if not sample or not full_bytes or not delta_bytes:
        return
    full_each, delta_each = statistics.mean(full_bytes), statistics.mean(delta_bytes)
    n = len(sample)
    print(
        f"          {n} devices download again: full image {full_each:,.0f} B in {full.seconds:.2f} s "
        f"(server CPU {ms(full.server_cpu, n)} each), delta {delta_each:,.0f} B in {delta.seconds:.2f} s "
        f"(server CPU {ms(delta.server_cpu, n)} each, bsdiff applied and verified on the device): "
        f"delta/full bytes {delta_each / full_each:.4f}, time {delta.seconds / full.seconds:.2f}; "
        f"failures: {show_failures({**full.failures, **delta.failures})}"
    )
    table.append(
        [
            "bytes per device: delta / full image",
            f"{delta_each:,.0f} B",
            f"{full_each:,.0f} B",
            f"{delta_each / full_each:.4f}",
        ]
    )
    table.append(
        [
            f"download time, {n} devices: delta / full image",
            f"{delta.seconds:.2f} s",
            f"{full.seconds:.2f} s",
            f"{delta.seconds / full.seconds:.2f}",
        ]
    )


# --------------------------------------------------------------------------- the run


async def measure(
    fleetward: Fleetward,
    tenant: Tenant,
    devices: list[Device],
    setup: Setup,
    publish_new: Callable[[], image_schemas.ImagePublic],
    arguments: argparse.Namespace,
    scratch: Path,
) -> None:
    table: list[list[str]] = []
    pid = fleetward.process.pid
    with concurrent.futures.ThreadPoolExecutor(arguments.parallel, thread_name_prefix="device") as pool:
        clients = [
            device.simulated.hub_client("127.0.0.1", fleetward.hub_port, fleetward.ca_file, scratch / "mqtt")
            for device in devices
        ]
        connect_seconds = await connect_all(clients)
        refused = await subscribe_all(clients)
        listener = Listener(setup, pool, devices)
        tasks = [
            asyncio.create_task(listener.listen(device, client))
            for device, client in zip(devices, clients, strict=True)
        ]
        print(
            f"hub       {len(clients)} MQTT connections held, subscribed to direct methods "
            f"({refused} refused), in {connect_seconds:.1f} s"
        )
        try:
            # Every device has checked once before 1.1.0 is published: the first few do it, the others get
            # a copy of their metadata (the same for every device of the tenant; the state file too).
            pioneers = devices[: max(1, arguments.sample)]
            first = await run_pass(pool, pid, pioneers, functools.partial(check_only, setup))
            for device in devices[len(pioneers) :]:
                shutil.copytree(pioneers[0].metadata_dir, device.metadata_dir)
            print(
                f"first     check with fresh metadata (root from the provisioned one, timestamp, snapshot, "
                f"targets; assignment 204), {len(pioneers)} devices: {first.seconds:.1f} s, "
                f"{len(pioneers) / first.seconds:.0f}/s, "
                f"server CPU {ms(first.server_cpu, len(pioneers))} each; "
                f"failures: {show_failures(first.failures)}; the others were given a copy of that metadata"
            )
            image = publish_new()
            copy_metadata(devices, ".before")
            baseline = await run_pass(pool, pid, devices, functools.partial(check_only, setup))
            baseline_bytes = statistics.mean(device.received for device in devices)
            restore_metadata(devices, ".before")
            steps = show_steps(devices)
            print(
                f"baseline  check, nothing assigned (TUF refresh after {NEW} was published: timestamp, "
                f"snapshot; assignment 204): {len(devices)} devices in {baseline.seconds:.1f} s "
                f"({len(devices) / baseline.seconds:.0f}/s, 1.00); "
                f"server CPU {ms(baseline.server_cpu, len(devices))} each; "
                f"failures: {show_failures(baseline.failures)}; once a thread runs it: {steps}"
            )
            rollout = await roll_out(fleetward, tenant, image.id, listener, arguments)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(clients)
        print_rollout(rollout, devices, baseline, table)

        sample = [device for device in devices if device.image is not None][: arguments.sample]
        results: dict[bool, list[int]] = {False: [], True: []}

        def fetch(via_delta: bool, device: Device) -> None:
            results[via_delta].append(download_only(setup, device, via_delta).bytes_downloaded)

        full = await run_pass(pool, pid, sample, functools.partial(fetch, False))
        delta = await run_pass(pool, pid, sample, functools.partial(fetch, True))
        print_bytes(devices, sample, full, delta, results[False], results[True], baseline_bytes, table)

    print()
    print("| what | measured | baseline | ratio |")
    print("|---|---:|---:|---:|")
    for row in table:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=16, help="device threads running update clients")
    parser.add_argument("--waves", default="1%,10%,50%,100%", help="cumulative waves of the deployment")
    parser.add_argument("--success", type=float, default=0.9, help="fraction of a wave before the next opens")
    parser.add_argument("--package-kib", type=int, default=1024, help="size of the application's data")
    parser.add_argument("--changed-bytes", type=int, default=16, help="bytes changed between the versions")
    parser.add_argument(
        "--sample", type=int, default=50, help="devices checking first, and downloading full image and delta"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the rollout may take")
    arguments = parser.parse_args()
    raise_file_limit()
    print(
        f"fleetward update benchmark ({os.cpu_count()} cores, {arguments.devices} devices, "
        f"{arguments.parallel} device threads, load average {os.getloadavg()[0]:.2f})"
    )
    old, new = packages(arguments.package_kib * 1024, arguments.changed_bytes)
    with tempfile.TemporaryDirectory(prefix="fleetward-updates-bench-") as scratch:
        directory = Path(scratch)
        fleetward = Fleetward(directory / "fleetward")
        try:
            tenant = prepare_tenant(fleetward)
            started = time.perf_counter()
            devices = enroll_fleet(fleetward, tenant, arguments.devices, directory / "devices")
            print(f"enrolled  {len(devices)} devices in {time.perf_counter() - started:.1f} s")
            publisher = ec.generate_private_key(ec.SECP256R1())
            with fleetward.client() as client:
                bootstrap = init_repository(client, tenant)
                first = publish(client, tenant, publisher, OLD, old)
            have = directory / "active-slot.tar"
            have.write_bytes(old)
            setup = Setup(
                url=fleetward.url,
                verify=fleetward_trust(fleetward),
                product_id=tenant.product_id,
                bootstrap_root=bootstrap,
                installed={COMPONENT: (OLD, first.sha256)},
                have=have,
            )

            def publish_new() -> image_schemas.ImagePublic:
                started = time.perf_counter()
                with fleetward.client() as client:
                    image = publish(client, tenant, publisher, NEW, new)
                print(
                    f"images    {OLD} and {NEW}: {len(old):,} and {len(new):,} bytes, "
                    f"{arguments.changed_bytes} bytes of data changed; {NEW} published (with its delta) in "
                    f"{time.perf_counter() - started:.1f} s"
                )
                return image

            asyncio.run(measure(fleetward, tenant, devices, setup, publish_new, arguments, directory))
        finally:
            fleetward.stop()


if __name__ == "__main__":
    main()
