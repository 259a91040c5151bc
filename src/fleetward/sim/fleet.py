"""A fleet of simulated devices: each has its own software root of trust and measured software."""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

from fleetward.agent.enroll import EnrollmentClient, OperationalCredential
from fleetward.agent.mqtt import MqttClient
from fleetward.agent.rot import SoftwareRootOfTrust, device_id_of
from fleetward.api import schemas
from fleetward.wire.evidence import Measurement


def image_digest(component: str, version: str) -> str:
    """The SHA-256 of a simulated image: deterministic, so the cloud can register it as a reference."""
    return hashlib.sha256(f"simulated image {component} {version}".encode()).hexdigest()


def measurement(component: str, version: str, *, tampered: bool = False) -> Measurement:
    digest = image_digest(component, version + ("+tampered" if tampered else ""))
    return Measurement(name=component, version=version, sha256=digest)


@dataclass
class SimulatedDevice:
    name: str
    software: tuple[Measurement, ...]
    root_of_trust: SoftwareRootOfTrust = field(default_factory=SoftwareRootOfTrust.generate)
    credential: OperationalCredential | None = None

    @property
    def device_id(self) -> str:
        return device_id_of(self.root_of_trust)

    def claim_item(self) -> schemas.DeviceClaimItem:
        pem = self.root_of_trust.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return schemas.DeviceClaimItem(device_id=self.device_id, public_key=pem.decode("ascii"))

    def hub_client(self, host: str, port: int, ca_file: Path, directory: Path) -> MqttClient:
        """An MQTT client for the hub with the current certificate (written to ``directory``, key 0600)."""
        assert self.credential is not None, "enroll first"
        directory.mkdir(parents=True, exist_ok=True)
        certificate, key = directory / f"{self.name}.pem", directory / f"{self.name}.key"
        certificate.write_text(self.credential.issued.certificate)
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(self.credential.key_pem())
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(certificate), str(key))
        return MqttClient(
            host, port, self.device_id, context, username=f"{host}/{self.device_id}/?api-version=2021-04-12"
        )

    async def enroll(self, url: str, http: httpx.AsyncClient) -> OperationalCredential:
        """Attest with the current software and keep the certificate (renewal is the same call)."""
        client = EnrollmentClient(url, self.root_of_trust, http=http)
        key = self.credential.key if self.credential else None
        self.credential = await client.enroll(self.software, key)
        return self.credential
