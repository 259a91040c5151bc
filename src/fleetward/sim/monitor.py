"""The demo's monitor chapter: a panel turns rogue, is set aside within seconds, remediated, released.

The operator has prepared for incidents: a Quarantine group whose deployment is the fixed panel-monitor,
and a playbook that moves a device there and quarantines it when one of its applications reaches for a
destination its manifest does not declare. An attacker then flips the flaw of one panel's panel-monitor
(a file in its storage): it starts phoning home. Nothing else is told: the agent's proxy refuses and
reports, the monitor raises an alert with the evidence, the playbook acts, the hub narrows the session, the
director hands the device the fix, the device attests on it, and the release policy lets it back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from rich.console import Console

from fleetward.agent.runtime import Agent
from fleetward.api import schemas
from fleetward.api import schemas_monitor as monitor_schemas
from fleetward.client import FleetwardClient
from fleetward.monitor.playbooks import Condition, MoveToGroup, PlaybookSpec, Quarantine
from fleetward.sim.agents import FIXED_VERSION, PANEL_MONITOR
from fleetward.sim.updates import UpdateOperator

TIMEOUT_SECONDS = 90.0


class RogueStory:
    def __init__(
        self,
        console: Console,
        client: FleetwardClient,
        tenant_id: str,
        product_id: str,
        updates: UpdateOperator,
        field_test: str,
        agents: Sequence[tuple[str, Agent]],
        package: Callable[[str], bytes],
    ) -> None:
        self._console = console
        self._client = client
        self._tenant = tenant_id
        self._product = product_id
        self._updates = updates
        self._field_test = field_test
        self._agents = agents
        self._package = package

    def _api(self, path: str) -> str:
        return f"/v1/tenants/{self._tenant}{path}"

    def _device(self, device_id: str) -> schemas.DevicePublic:
        return self._client.get(self._api(f"/devices/{device_id}"), schemas.DevicePublic)

    async def _until(self, check: Callable[[], bool], what: str) -> float:
        """Seconds until ``check`` (run on a thread) holds."""
        started = time.monotonic()
        while not await asyncio.to_thread(check):
            if time.monotonic() - started > TIMEOUT_SECONDS:
                raise TimeoutError(f"{what} did not happen within {TIMEOUT_SECONDS:g} s")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    async def run(self) -> None:
        console, client, updates = self._console, self._client, self._updates
        console.rule("monitor: a panel turns rogue, is set aside in seconds, remediated, and released")
        quarantine = client.post(
            self._api("/device-groups"),
            schemas.DeviceGroupCreate(product=self._product, name="Quarantine"),
            schemas.DeviceGroupPublic,
        )
        fixed = await asyncio.to_thread(updates.publish, self._package(FIXED_VERSION), FIXED_VERSION)
        prepared = await asyncio.to_thread(updates.deploy, quarantine.id, [fixed])
        await updates.follow(prepared.id)
        client.post(
            self._api("/playbooks"),
            PlaybookSpec(
                name="phone-home",
                condition=Condition(codes=("undeclared_destination",), min_severity="high"),
                actions=(MoveToGroup(group_id=quarantine.id), Quarantine()),
            ),
            monitor_schemas.PlaybookPublic,
        )
        console.print(
            f"Prepared: a Quarantine group running panel-monitor {FIXED_VERSION} (the flaw fixed), and the "
            "playbook [bold]phone-home[/bold]: an application reaching an undeclared destination → move its "
            "device to Quarantine and narrow it to its twin; release it once it attests on the fix."
        )
        name, rogue = self._agents[1]
        (rogue.settings.state_dir / "storage" / PANEL_MONITOR / "phone-home").write_text("")
        console.print(f"An attacker flips the flaw on [bold]{name}[/bold]: its panel-monitor phones home.")
        seconds = await self._until(
            lambda: self._device(rogue.device_id).status == "quarantined", "the quarantine"
        )
        # the one the playbook acted on (a device may have low ones too: an address it had not used)
        [alert] = [
            found
            for found in client.get_list(
                self._api("/alerts"), monitor_schemas.AlertPublic, {"device_id": rogue.device_id}
            )
            if found.code == "undeclared_destination"
        ]
        console.print(
            f"[green]✔[/green] quarantined [bold]{seconds:.1f} s[/bold] after it began, by the playbook: "
            f"alert {alert.code} ({alert.severity}) — {alert.summary}"
        )
        health = client.get(
            self._api(f"/devices/{rogue.device_id}/health"), monitor_schemas.HealthPublic, {"refresh": "true"}
        )
        console.print(
            f"  health: {health.state} (risk {health.risk}); "
            + "; ".join(reason.detail for reason in health.reasons[:2])
        )
        started = time.monotonic()
        while not (await rogue.status()).link.quarantined:
            if time.monotonic() - started > TIMEOUT_SECONDS:
                raise TimeoutError("the hub did not narrow the rogue session")
            await asyncio.sleep(0.1)
        console.print(
            f"  the hub ended its session; it came back with its twin only (telemetry waits in its outbox), "
            f"and the director assigned it the Quarantine group's panel-monitor {FIXED_VERSION}."
        )
        rollout = await asyncio.to_thread(updates.deploy, self._field_test, [fixed], waves=["50%", "all"])
        console.print(
            f"The operator rolls {FIXED_VERSION} out to the rest of the Field Test group meanwhile."
        )
        settled = await updates.follow(rollout.id)
        if settled.state != "current":  # a device going back would be given the flawed release again
            raise RuntimeError(
                f"the rollout of {FIXED_VERSION} to Field Test ended {settled.state}: {settled.reason}"
            )
        try:
            seconds = await self._until(
                lambda: (
                    (device := self._device(rogue.device_id)).status == "active"
                    and device.group_id == self._field_test
                ),
                "the release",
            )
        except TimeoutError as waited:  # say what the release policy was waiting for
            update = await asyncio.to_thread(updates.device, rogue.device_id)
            loud = client.get_list(
                self._api("/alerts"),
                monitor_schemas.AlertPublic,
                {"device_id": rogue.device_id, "min_severity": "high", "state": "active"},
            )
            attested = self._device(rogue.device_id).last_attested_at
            raise TimeoutError(
                f"{waited}: last attested {attested}; its update {update.state} ({update.code or '-'}, "
                "running "
                f"{[item.version for item in update.running]}); high alerts {[(a.id, a.code) for a in loud]}"
            ) from None
        runs = client.get_list(
            self._api("/playbook-runs"), monitor_schemas.PlaybookRunPublic, {"device_id": rogue.device_id}
        )
        console.print(
            f"[green]✔[/green] {name} installed {FIXED_VERSION}, attested on it, and was released by policy "
            f"({runs[0].state} by {runs[0].undone_by}): back in Field Test with its full topics."
        )
        quarantined = [
            other
            for other, agent in self._agents
            if agent is not rogue and self._device(agent.device_id).status != "active"
        ]
        console.print(
            "  No other panel was touched."
            if not quarantined
            else f"  Also set aside: {', '.join(quarantined)}"
        )
        verified = client.get(self._api("/audit-log/verify"), schemas.AuditVerificationPublic)
        console.print(
            f"  The tenant's audit log holds every step, hash-chained: {verified.entries_checked} entries, "
            + ("verified." if verified.ok else f"[red]NOT VERIFIED[/red]: {verified.detail}")
            + "\n"
        )
