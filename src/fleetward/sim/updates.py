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
from rich.console import Console
from rich.table import Table
from securesystemslib.signer import CryptoSigner

from fleetward.agent.package import sign_package
from fleetward.agent.runtime import Agent
from fleetward.api.routes_deployments import DeploymentCreate, DeploymentPublic, DeviceUpdatePublic
from fleetward.api.schemas_images import ImageCreate, ImagePublic, RootAccepted, RootProposalCreate
from fleetward.client import FleetwardClient
from fleetward.sim.agents import PANEL_MONITOR
from fleetward.updates.repository import sign_root
from fleetward.wire.updates import ImageKind

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
        it here, the server accepts it. ``root_file`` is what devices are provisioned with. The server
        refuses a first root once the repository has one (``repository_initialized``)."""
        public = [
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
            for key in self.root_keys
        ]
        proposal = self.client.post_bytes(
            self._api("/repository/root-proposal"),
            RootProposalCreate(root_keys=public, threshold=self.threshold, rotation=False),
        )
        signed = sign_root(proposal, [CryptoSigner(key) for key in self.root_keys[: self.threshold]])
        accepted = RootAccepted.model_validate_json(
            self.client.request_json("PUT", self._api("/repository/root"), json.loads(signed))
        )
        root_file.write_bytes(self.client.get_bytes(self._api("/repository/root")))
        return accepted.version

    def publish(self, package: bytes, version: str, kind: ImageKind = ImageKind.APP) -> ImagePublic:
        """Sign ``package`` as its publisher and add it to the image repository."""
        return self.client.post(
            self._api("/images"),
            ImageCreate(
                product_id=self.product_id,
                version=version,
                kind=kind,
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


class UpdateStory:
    """The demo's update chapter: a broken release caught in its first wave, then a good one rolled out."""

    def __init__(
        self,
        console: Console,
        operator: UpdateOperator,
        group_id: str,
        agents: Sequence[tuple[str, Agent]],
        package: Callable[[str, bool], bytes],
    ) -> None:
        self._console = console
        self._operator = operator
        self._group = group_id
        self._agents = agents
        self._package = package
        self._last_line = ""

    async def run(self) -> None:
        console = self._console
        console.rule("updates: TUF-signed images, waves that stop themselves, A/B slots on the devices")
        waves = ["1", "50%", "all"]
        broken = await asyncio.to_thread(self._operator.publish, self._package("2.2.0", True), "2.2.0")
        deployment = await asyncio.to_thread(self._operator.deploy, self._group, [broken], waves=waves)
        console.print(
            f"Published panel-monitor 2.2.0 (signed, in the tenant's TUF repository) and deployed it to the "
            f"Field Test group in waves of {', '.join(waves)}: wave 1 is asked to check now, through the hub."
        )
        aborted = await self._operator.follow(deployment.id, on_change=self._show_progress)
        statuses = {
            name: await asyncio.to_thread(self._operator.device, agent.device_id)
            for name, agent in self._agents
        }
        [(victim, status)] = [(name, s) for name, s in statuses.items() if s.code == "rollout_aborted"]
        console.print(
            f"[green]✔[/green] the rollout aborted itself in wave {aborted.waves_opened}: {aborted.reason}.\n"
            f"  {victim} tried 2.2.0 in its inactive slot; the application did not come up, so the agent "
            f"switched back to 2.1.0 by itself and said why: {status.message.split('was ')[-1]}"
        )
        console.print(f"  Every panel still runs panel-monitor {await self._versions()}.\n")

        good = await asyncio.to_thread(self._operator.publish, self._package("2.2.1", False), "2.2.1")
        rollout = await asyncio.to_thread(self._operator.deploy, self._group, [good], waves=waves)
        console.print("Published panel-monitor 2.2.1, the fixed release, and deployed it in the same waves.")
        completed = await self._operator.follow(rollout.id, on_change=self._show_progress)
        table = Table(title=f"Rollout of 2.2.1: {completed.state}", title_justify="left")
        for column in ("wave", "devices", "installed", "failed or rolled back"):
            table.add_column(column, justify="right")
        for wave in completed.waves:
            table.add_row(
                str(wave.wave + 1), str(wave.size), str(wave.installed), str(wave.failed + wave.rolled_back)
            )
        console.print(table)
        statuses = {
            name: await asyncio.to_thread(self._operator.device, agent.device_id)
            for name, agent in self._agents
        }
        downloaded = sum(status.bytes_downloaded for status in statuses.values())
        saved = sum(status.bytes_saved for status in statuses.values())
        console.print(
            f"[green]✔[/green] every panel runs panel-monitor {await self._versions()}, kept after its "
            f"trial; each fetched a bsdiff delta from 2.1.0: {downloaded:,} bytes in all, {saved:,} fewer "
            "than the full images.\n"
        )

    def _show_progress(self, deployment: DeploymentPublic) -> None:
        waves = "  ".join(
            f"wave {wave.wave + 1}: {wave.installed}/{wave.size} installed"
            + (f", {wave.rolled_back} rolled back" if wave.rolled_back else "")
            + (f", {wave.failed} failed" if wave.failed else "")
            for wave in deployment.waves[: deployment.waves_opened]
        )
        line = f"  [dim]{deployment.state:<11}[/dim] {waves}"
        if line != self._last_line:
            self._console.print(line)
            self._last_line = line

    async def _versions(self) -> str:
        versions: set[str] = set()
        for _name, agent in self._agents:
            status = await agent.status()
            versions.update(app.version for app in status.apps if app.component_id == PANEL_MONITOR)
        return ", ".join(sorted(versions))
