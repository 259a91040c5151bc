"""Enrollments per second: nonce + attestation + issuance, end to end and through the pure core.

    .venv/bin/python -m bench.enroll [--devices 1000] [--seconds 10] [--connections 64] [--tls]

Three figures, each measured in this run on this machine:

* baseline: the bare cost of what any CA must do per certificate, verifying a CSR and signing a
  certificate for it (pyca/cryptography, one thread);
* core: the authority's pure core alone (open the nonce, check the CSR and its binding, verify the
  evidence signature and the measurements, sign the certificate), no store, no HTTP;
* end to end: ``fleetward serve`` in its own process on the embedded default (SQLite, WAL, group
  commit), driven over HTTP by a load generator in this process: each enrollment is two requests,
  a nonce then evidence with a CSR, and ends with a certificate committed to the store.

Each is printed as enrollments per second and as a ratio to the baseline. It never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.loadclient import Connection
from fleetward.agent.enroll import build_csr
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.api import schemas
from fleetward.authority import attestation, ca
from fleetward.authority.keystore import MasterKeyStore
from fleetward.authority.nonces import NonceCodec
from fleetward.authority.service import ReferenceValue
from fleetward.client import FleetwardClient
from fleetward.compose import build_services
from fleetward.config import Limits, Settings
from fleetward.registry.models import ClaimRequest
from fleetward.server import free_port
from fleetward.sim.fleet import image_digest, measurement
from fleetward.store.events import Event, record
from fleetward.store.schema import certificates
from fleetward.transport import trust
from fleetward.wire.evidence import EnrollmentRequest, Evidence, Measurement
from fleetward.wire.identity import public_key_sha256

CERTIFICATE = "/v1/attestation/certificate"
SOFTWARE: tuple[Measurement, ...] = (
    measurement("fleetward-agent", "1.4.0"),
    measurement("panel-monitor", "2.1.0"),
)


class Device:
    """A simulated device with its CSR made in advance: the CSR does not depend on the nonce."""

    def __init__(self) -> None:
        self.rot = SoftwareRootOfTrust.generate()
        self.device_id = public_key_sha256(self.rot.public_key())
        key = ec.generate_private_key(ec.SECP256R1())
        self.csr = build_csr(key, self.device_id)
        self.csr_key_sha256 = public_key_sha256(key.public_key())

    def public_key_pem(self) -> str:
        key = self.rot.public_key()
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def request_json(self, nonce: str) -> bytes:
        evidence = Evidence(
            device_id=self.device_id, nonce=nonce, csr_key_sha256=self.csr_key_sha256, measurements=SOFTWARE
        )
        signature = self.rot.sign(evidence.to_be_signed())
        return json.dumps(
            EnrollmentRequest(evidence=evidence, signature=signature, csr=self.csr).wire_dict()
        ).encode()


def rate(operation: object, seconds: float) -> float:
    """Operations per second of ``operation()`` over about ``seconds``."""
    assert callable(operation)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(50):
            operation()
        count += 50
    return count / elapsed


def baseline_rate(seconds: float) -> float:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "baseline CA")])
    device = Device()
    csr_pem = device.csr.encode()
    now = dt.datetime.now(dt.UTC)

    def verify_and_sign() -> None:
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(issuer_name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(issuer_key, hashes.SHA256())
        )

    return rate(verify_and_sign, seconds)


def core_rate(seconds: float) -> float:
    limits = Limits()
    codec = NonceCodec(secrets.token_bytes(32), dt.timedelta(seconds=limits.nonce_ttl_seconds))
    root_key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    root = ca.build_root_ca(root_key, "tenant", now, dt.timedelta(days=3650))
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = ca.build_issuing_ca(
        root_key, root, issuing_key, "tenant", now, dt.timedelta(days=365), "http://localhost/crl/root"
    )
    issuer = ca.Issuer("issuer", "tenant", issuing_key, issuing, root, "http://localhost/crl")
    policy = attestation.ReferencePolicy(
        references=frozenset((item.name, item.version, item.sha256) for item in SOFTWARE)
    )
    device = Device()
    standing = attestation.DeviceStanding(device.device_id, "tenant", device.rot.public_key(), revoked=False)
    # The device's side (signing the evidence, encoding JSON) is not the authority's cost: done beforehand.
    bodies = [device.request_json(codec.issue(device.device_id, now).text) for _ in range(500)]
    position = 0

    def enroll_once() -> None:
        nonlocal position
        codec.issue(device.device_id, now)
        request = EnrollmentRequest.model_validate_json(bodies[position % len(bodies)])
        position += 1
        prepared = attestation.prepare(request, codec, now, limits)
        attestation.judge(prepared, standing, policy)
        ca.der_to_pem(
            ca.issue_operational_certificate(
                issuer,
                prepared.csr_public_key,
                device.device_id,
                x509.random_serial_number(),
                now,
                dt.timedelta(days=1),
                dt.timedelta(minutes=5),
            ).public_bytes(serialization.Encoding.DER)
        )

    return rate(enroll_once, seconds)


def breakdown(count: int = 1000, batch: int = 50) -> dict[str, float]:
    """Microseconds per enrollment of each step of the authority's work, on one thread, real SQLite.

    It takes the batch apart step by step, so it reaches into the service's private steps on purpose.
    """
    with tempfile.TemporaryDirectory(prefix="fleetward-bench-") as scratch:
        services = build_services(
            Settings(data_dir=Path(scratch)), keystore=MasterKeyStore(secrets.token_bytes(32))
        )
        authority = services.authority
        _operator, token = services.registry.bootstrap("bench@localhost", "bench")
        principal = services.registry.authenticate(token)
        tenant = services.registry.create_tenant(principal, "bench")
        principal = services.registry.authenticate(token)
        authority.add_reference_values(
            principal, tenant.id, [ReferenceValue(item.name, item.version, item.sha256) for item in SOFTWARE]
        )
        devices = [Device() for _ in range(count)]
        services.registry.claim_devices(
            principal,
            tenant.id,
            [ClaimRequest(device.device_id, device.public_key_pem().encode()) for device in devices],
        )
        bodies = [device.request_json(authority.issue_nonce(device.device_id).text) for device in devices]
        spent: dict[str, float] = {}

        def timed(step: str, started: float) -> float:
            now = time.perf_counter()
            spent[step] = spent.get(step, 0.0) + now - started
            return now

        now = services.clock.now()
        mark = time.perf_counter()
        for device in devices:
            authority.issue_nonce(device.device_id)
        mark = timed("issue the nonce", mark)
        parsed = [authority.parse_enrollment(body) for body in bodies]
        mark = timed("parse the JSON request", mark)
        prepared = [
            attestation.prepare(item, authority._codec, now, services.settings.limits) for item in parsed
        ]
        mark = timed("open the nonce, check the CSR and its binding", mark)
        for start in range(0, count, batch):
            chunk = prepared[start : start + batch]
            with services.database.read() as connection:
                standings = authority._standings(connection, {item.device_id for item in chunk})
                policy = authority._policy(connection, tenant.id)
            mark = timed("store: read the devices and the policy", mark)
            for item in chunk:
                attestation.judge(item, standings[item.device_id], policy)
            mark = timed("verify the evidence signature and measurements", mark)
            drafts: list[Any] = [authority._draft(item, standings[item.device_id], now) for item in chunk]
            mark = timed("sign the certificate, build the answer", mark)
            with services.database.write() as connection:
                confirmed = authority._refuse_fallen(
                    connection, authority._refuse_replays(connection, drafts)
                )
                assert confirmed == drafts, "every request of the breakdown is a good one"
                mark = timed("store: redeem nonces, confirm standings", mark)
                connection.execute(certificates.insert(), [draft.row for draft in drafts])
                record(
                    connection,
                    [Event(at=now, kind="attestation", code="certificate_issued", detail="")] * len(chunk),
                )
                mark = timed("store: insert certificates and events", mark)
            mark = timed("store: commit", mark)
            for draft in drafts:
                draft.answer.model_dump_json()
            mark = timed("encode the JSON answer", mark)
        services.close()
    return {step: seconds / count * 1e6 for step, seconds in spent.items()}


def start_server(
    data_dir: Path, port: int, tls: bool, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``fleetward init`` then ``fleetward serve`` in a separate process; returns it, its URL and a token."""
    environment = dict(os.environ, FLEETWARD_CLI_CONFIG=str(data_dir / "cli.json"))
    fleetward = str(Path(sys.executable).parent / "fleetward")
    subprocess.run(
        [fleetward, "init", "--data-dir", str(data_dir), "--port", str(port), "--tls" if tls else "--no-tls"],
        check=True,
        env=environment,
        capture_output=True,
    )
    token = json.loads((data_dir / "cli.json").read_text())["token"]
    process = subprocess.Popen(
        [
            fleetward,
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--workers",
            str(workers),
        ],
        env=environment,
        stdout=subprocess.DEVNULL,
    )
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify = trust(data_dir / "tls" / "service-ca.pem") if tls else False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", verify=verify).status_code == 200:
                return process, url, token
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("fleetward serve did not start")


def prepare_tenant(url: str, token: str, ca_file: Path | None, devices: list[Device]) -> None:
    with FleetwardClient(url, token, ca_file=ca_file) as client:
        tenant = client.post("/v1/tenants", schemas.TenantCreate(name="bench"), schemas.TenantPublic)
        product = client.post(
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
        for start in range(0, len(devices), 1000):
            claim = schemas.DeviceClaim(
                devices=[
                    schemas.DeviceClaimItem(
                        device_id=device.device_id,
                        public_key=device.rot.public_key()
                        .public_bytes(
                            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                        )
                        .decode(),
                    )
                    for device in devices[start : start + 1000]
                ],
                group_id=product.device_groups[2].id,
            )
            client.post(f"/v1/tenants/{tenant.id}/devices/claim", claim, schemas.ClaimResponse)


async def drive(
    port: int, context: ssl.SSLContext | None, devices: list[Device], connections: int, seconds: float
) -> tuple[int, int, list[float]]:
    """Enroll devices round-robin over ``connections`` keep-alive connections for ``seconds``."""
    issued = refused = 0
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    queue = list(devices)

    async def worker(index: int) -> None:
        nonlocal issued, refused
        connection = await Connection.open("127.0.0.1", port, context)
        position = index
        try:
            while time.perf_counter() < stop:
                device = queue[position % len(queue)]
                position += connections
                started = time.perf_counter()
                status, body = await connection.post(
                    "/v1/attestation/nonce", b'{"device_id":"%s"}' % device.device_id.encode()
                )
                nonce = json.loads(body)["nonce"]
                status, body = await connection.post(
                    "/v1/attestation/certificate", device.request_json(nonce)
                )
                latencies.append(time.perf_counter() - started)
                if status == 200:
                    issued += 1
                else:
                    refused += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker(index) for index in range(connections)))
    return issued, refused, latencies


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far of a process and its children, the workers (Linux)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def end_to_end(
    devices: list[Device], baseline: float, *, tls: bool, workers: int, connections: int, seconds: float
) -> None:
    """Start ``fleetward serve``, drive it for ``seconds``, print throughput, latency and CPU."""
    with tempfile.TemporaryDirectory(prefix="fleetward-bench-") as scratch:
        data_dir = Path(scratch)
        port = free_port()
        process, url, token = start_server(data_dir, port, tls, workers)
        try:
            ca_file = data_dir / "tls" / "service-ca.pem" if tls else None
            prepare_tenant(url, token, ca_file, devices)
            context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
            asyncio.run(drive(port, context, devices, connections, 1.0))  # warm up
            server_cpu = cpu_seconds(process.pid)
            client_cpu = time.process_time()
            issued, refused, latencies = asyncio.run(drive(port, context, devices, connections, seconds))
            server_cpu = cpu_seconds(process.pid) - server_cpu
            client_cpu = time.process_time() - client_cpu
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    rate_per_second = issued / seconds
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    setup = f"{'HTTPS' if tls else 'HTTP'}, SQLite, {workers} worker{'s' if workers > 1 else ''}"
    print(
        f"e2e       {setup}: {rate_per_second:8.0f} /s  "
        f"({rate_per_second / baseline:.2f} of baseline; {issued} issued, {refused} refused, "
        f"{connections} connections, p50 {p50:.1f} ms, p99 {p99:.1f} ms)"
    )
    if issued:
        print(
            f"          server CPU {server_cpu / issued * 1e6:.0f} µs per enrollment "
            f"({server_cpu / seconds:.2f} cores busy); "
            f"load generator CPU {client_cpu / issued * 1e6:.0f} µs per enrollment"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--tls", action="store_true", help="HTTPS, as `fleetward init` sets up by default")
    parser.add_argument(
        "--workers", default="1,2", help="`fleetward serve --workers`, one run per comma-separated value"
    )
    arguments = parser.parse_args()

    print(f"fleetward enrollment benchmark ({os.cpu_count()} cores)")
    base = baseline_rate(3.0)
    print(f"baseline  verify a CSR + sign a certificate: {base:8.0f} /s  (1.00)")
    core = core_rate(3.0)
    print(f"core      nonce + attestation + issuance:    {core:8.0f} /s  ({core / base:.2f} of baseline)")
    print("where the authority's time goes, µs per enrollment on one thread (SQLite, batches of 50):")
    for step, micros in breakdown().items():
        print(f"          {micros:7.1f}  {step}")
    devices = [Device() for _ in range(arguments.devices)]
    for workers in (int(value) for value in arguments.workers.split(",")):
        end_to_end(
            devices,
            base,
            tls=arguments.tls,
            workers=workers,
            connections=arguments.connections,
            seconds=arguments.seconds,
        )


if __name__ == "__main__":
    main()
