"""The update story: what an operator does to update a fleet, through the operator API, against real agents.

:class:`UpdateOperator` initialises the tenant's image repository with offline root keys (2 of 3 must
sign), publishes images, deploys them to a group in waves and follows the rollout. The demo and
``tests/test_updates_end_to_end.py`` tell the same story with it: a release whose application crashes is
caught in the first wave, the rollout aborts by itself and the devices it reached go back to what they
ran; a good release then goes through every wave.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner

from fleetward.agent.package import sign_package
from fleetward.api.routes_deployments import DeploymentCreate, DeploymentPublic, DeviceUpdatePublic
from fleetward.api.schemas_images import ImageCreate, ImagePublic, RootAccepted, RootProposalCreate
from fleetward.client import FleetwardClient
from fleetward.updates.repository import sign_root

#: deployment states after which a rollout does no more
SETTLED = frozenset({"current", "aborted", "superseded", "reverted"})


@dataclass
class UpdateOperator:
    """An operator of one tenant and product, with the offline root keys and the publisher's key."""

    client: FleetwardClient
    tenant_id: str
    product_id: str
    publisher: ec.EllipticCurvePrivateKey
    root_keys: list[ec.EllipticCurvePrivateKey] = field(
        default_factory=lambda: [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    )
    threshold: int = 2

    def _api(self, path: str) -> str:
        return f"/v1/tenants/{self.tenant_id}{path}"

    def init_repository(self, root_file: Path) -> int:
        """The first root: the server proposes it (with its online keys), ``threshold`` offline keys sign
        it here, the server accepts it. ``root_file`` is what devices are provisioned with."""
        public = [
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
            for key in self.root_keys
        ]
        proposal = self.client.post_bytes(
            self._api("/repository/root-proposal"),
            RootProposalCreate(root_keys=public, threshold=self.threshold),
        )
        signed = sign_root(proposal, [CryptoSigner(key) for key in self.root_keys[: self.threshold]])
        accepted = RootAccepted.model_validate_json(
            self.client.request_json("PUT", self._api("/repository/root"), json.loads(signed))
        )
        root_file.write_bytes(self.client.get_bytes(self._api("/repository/root")))
        return accepted.version

    def publish(self, package: bytes, version: str) -> ImagePublic:
        """Sign ``package`` as its publisher and add it to the image repository."""
        return self.client.post(
            self._api("/images"),
            ImageCreate(
                product_id=self.product_id,
                version=version,
                package_base64=base64.b64encode(package).decode("ascii"),
                signature_base64=base64.b64encode(sign_package(self.publisher, package)).decode("ascii"),
            ),
            ImagePublic,
        )

    def deploy(self, group_id: str, images: Sequence[ImagePublic], **plan: object) -> DeploymentPublic:
        body = DeploymentCreate.model_validate({"image_ids": [image.id for image in images], **plan})
        return self.client.post(self._api(f"/device-groups/{group_id}/deployments"), body, DeploymentPublic)

    def deployment(self, deployment_id: str) -> DeploymentPublic:
        return self.client.get(self._api(f"/deployments/{deployment_id}"), DeploymentPublic)

    def device(self, device_id: str) -> DeviceUpdatePublic:
        return self.client.get(self._api(f"/devices/{device_id}/update"), DeviceUpdatePublic)

    async def follow(
        self,
        deployment_id: str,
        *,
        until: frozenset[str] = SETTLED,
        timeout: float = 60.0,
        on_change: Callable[[DeploymentPublic], None] | None = None,
    ) -> DeploymentPublic:
        """Poll the deployment until its state is in ``until``; ``on_change`` sees each new picture."""
        deadline = time.monotonic() + timeout
        last: tuple[object, ...] | None = None
        while True:
            current = await asyncio.to_thread(self.deployment, deployment_id)
            picture = (current.state, current.waves_opened, tuple(current.waves))
            if picture != last and on_change is not None:
                on_change(current)
            last = picture
            if current.state in until:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"deployment {deployment_id} is still {current.state} after {timeout:g} s: {current}"
                )
            await asyncio.sleep(0.1)
