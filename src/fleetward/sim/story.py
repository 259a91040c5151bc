"""The demo's devices as real agents, in this process: enrollment, measured launch, the hub, failures.

:class:`AgentStory` starts one :class:`~fleetward.agent.runtime.Agent` per panel and shows, through the
operator API, what a fleet operator would see: the agents attesting with the agent and its application
measured, telemetry arriving through each agent's outbox, a direct method answered, a desired property
pushed, a crash reported and grouped with its like, a refused launch, a security baseline, and a
revocation that ends a live session (the agent then hears the authority's reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from rich.console import Console
from rich.table import Table

from fleetward.agent.config import AgentSettings
from fleetward.agent.credential import CredentialFile
from fleetward.agent.runtime import Agent
from fleetward.agent.status import AgentStatus
from fleetward.agent.supervisor import AppState
from fleetward.api import schemas
from fleetward.authority.service import RevocationReason
from fleetward.client import FleetwardClient
from fleetward.errors import NotFound
from fleetward.sim.agents import PANEL_MONITOR

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo waited {timeout:g} s for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Panel:
    name: str
    settings: AgentSettings
    agent: Agent | None = None

    @property
    def running(self) -> Agent:
        assert self.agent is not None, "start the agent first"
        return self.agent

    def certificate_pem(self) -> str:
        credential = CredentialFile(self.settings.credential_file).load()
        assert credential is not None
        return credential.issued.certificate


class AgentStory:
    def __init__(
        self, console: Console, operator: FleetwardClient, tenant_id: str, panels: list[Panel]
    ) -> None:
        self._console = console
        self._operator = operator
        self._tenant = tenant_id
        self.panels = panels

    def _api(self, path: str) -> str:
        return f"/v1/tenants/{self._tenant}{path}"

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start every agent; show them attested, measured, launched and connected."""
        started = time.perf_counter()
        for panel in self.panels:
            panel.agent = await stack.enter_async_context(Agent(panel.settings))
        statuses = await asyncio.gather(
            *(
                eventually(functools.partial(_connected, panel.running), f"{panel.name} to connect")
                for panel in self.panels
            )
        )
        elapsed = time.perf_counter() - started
        self._console.print(
            f"[green]✔[/green] {len(self.panels)} agents attested and earned certificates, and connected to "
            f"the hub, in {elapsed * 1000:.0f} ms (measured launch → nonce → evidence signed by the identity "
            "key → verified → 24-hour certificate → MQTT over mutual TLS)"
        )
        table = Table(title="The agents", title_justify="left")
        for column in ("device", "device id", "certificate", "valid until", "measured", "applications"):
            table.add_column(column)
        for panel, status in zip(self.panels, statuses, strict=True):
            assert status.certificate is not None
            table.add_row(
                panel.name,
                (status.device_id or "")[:16] + "…",
                status.certificate.serial[:16] + "…",
                status.certificate.not_after.strftime("%Y-%m-%d %H:%M"),
                ", ".join(_short(entry.name) for entry in panel.running.boot.log.entries()),
                ", ".join(f"{_short(app.component_id)} {app.state}" for app in status.apps),
            )
        self._console.print(table)

    async def renew(self, panel: Panel) -> None:
        before = (await panel.running.status()).certificate
        assert before is not None
        panel.running.renew_now()
        after = await eventually(lambda: _renewed(panel.running, before.serial), "the renewal")
        assert after.certificate is not None
        self._console.print(
            f"Renewal is the same flow: {panel.name}'s agent re-attested and got certificate "
            f"{after.certificate.serial[:16]}… (was {before.serial[:16]}…)\n"
        )

    async def run_hub_story(self) -> None:
        self._console.rule("the agents on the hub: MQTT over mutual TLS, in the Azure IoT Hub device dialect")
        await self._stream_telemetry()
        await self._call_a_method(self.panels[0])
        await self._set_desired()
        await self._crash()
        await self._show_baseline(self.panels[0])

    async def _stream_telemetry(self) -> None:
        per_device = 20
        started = time.perf_counter()

        async def stored(panel: Panel) -> list[schemas.TelemetryPublic] | None:
            params: dict[str, str | int] = {"device_id": panel.running.device_id, "limit": 1000}
            found = await asyncio.to_thread(
                self._operator.get_list, self._api("/telemetry"), schemas.TelemetryPublic, params
            )
            return found if len(found) >= per_device else None

        found = await asyncio.gather(
            *(
                eventually(functools.partial(stored, panel), f"{panel.name}'s readings")
                for panel in self.panels
            )
        )
        elapsed = time.perf_counter() - started
        first = [json.loads(item.body or "{}").get("power_watts") for item in found[0]]
        self._console.print(
            f"[green]✔[/green] {len(self.panels)} panel-monitor apps sent {per_device * len(self.panels)} "
            "readings through their agents (app API → outbox on disk → hub, each acknowledged once "
            f"committed) in {elapsed * 1000:.0f} ms; {self.panels[0].name}'s arrived in order: "
            f"{first[0]} … {first[-1]} W"
        )

    async def _call_a_method(self, panel: Panel) -> None:
        result = await asyncio.to_thread(
            self._operator.post,
            self._api(f"/devices/{panel.running.device_id}/methods/read_power"),
            schemas.MethodInvoke(payload={"unit": "W"}, timeout_seconds=10),
            schemas.MethodResultPublic,
        )
        self._console.print(
            f"[green]✔[/green] direct method read_power on {panel.name}: "
            f"status {result.status}, {result.payload}"
        )

    async def _set_desired(self) -> None:
        pushed = 0
        patch = {"apps": {PANEL_MONITOR: {"max_temperature": 75}}}  # panel-monitor's own namespace
        for panel in self.panels:
            raw = await asyncio.to_thread(
                self._operator.request_json,
                "PATCH",
                self._api(f"/devices/{panel.running.device_id}/twin/desired"),
                patch,
            )
            pushed += schemas.DesiredPatched.model_validate_json(raw).pushed

        async def reported_back(panel: Panel) -> bool:
            twin = await asyncio.to_thread(
                self._operator.get, self._api(f"/devices/{panel.running.device_id}/twin"), schemas.TwinPublic
            )
            apps = twin.reported.get("apps")
            mine = apps.get(PANEL_MONITOR) if isinstance(apps, dict) else None
            return isinstance(mine, dict) and mine.get("max_temperature") == 75

        async def received() -> int | None:
            count = sum(await asyncio.gather(*(reported_back(panel) for panel in self.panels)))
            return count if count == len(self.panels) else None

        count = 0
        with contextlib.suppress(TimeoutError):
            count = await eventually(received, "the desired properties", timeout=10)
        self._console.print(
            f"[green]✔[/green] desired property max_temperature=75 (panel-monitor's namespace of the twin) "
            f"pushed to {pushed} connected agents; {count} received it and reported it back"
        )

    async def _crash(self) -> None:
        crashing = self.panels[:2]
        for panel in crashing:
            storage = panel.settings.resolved_storage_dir / PANEL_MONITOR
            (storage / "crash-now").write_text("")

        async def grouped() -> list[schemas.FailureSignaturePublic] | None:
            rows = await asyncio.to_thread(
                self._operator.get_list, self._api("/failures"), schemas.FailureSignaturePublic
            )
            crashes = [row for row in rows if row.kind == "crash"]
            refused = [row for row in rows if row.kind == "launch_refused"]
            return rows if crashes and crashes[0].count >= len(crashing) and refused else None

        rows = await eventually(grouped, "the crash reports")
        for panel in crashing:
            await panel.running.app(PANEL_MONITOR).wait_for(AppState.RUNNING, timeout_seconds=10)
        self._console.print(
            f"[green]✔[/green] panel-monitor crashed on {', '.join(p.name for p in crashing)}: each agent "
            "reported it (critical, through its outbox) and restarted it; the cloud groups alike failures:"
        )
        table = Table(title="GET /v1/tenants/{t}/failures", title_justify="left")
        for column in ("signature", "kind", "component", "headline", "count", "devices"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row.signature[:12] + "…",
                row.kind,
                _short(row.component_id or ""),
                row.headline,
                str(row.count),
                str(row.devices),
            )
        self._console.print(table)

    async def _show_baseline(self, panel: Panel) -> None:
        path = self._api(f"/devices/{panel.running.device_id}/baseline")

        async def baseline() -> schemas.BaselinePublic | None:
            with contextlib.suppress(NotFound):
                return await asyncio.to_thread(self._operator.get, path, schemas.BaselinePublic)
            return None

        found = (await eventually(baseline, "a security baseline")).baseline
        self._console.print(
            f"[green]✔[/green] security baseline from {panel.name}'s agent: {len(found.listening)} listening "
            f"sockets, {len(found.established)} established connections, {found.traffic.bytes_out} bytes out "
            f"over {found.interval_seconds:.1f} s"
        )

    async def revoke(self, victim: Panel) -> None:
        started = time.perf_counter()
        answer = await asyncio.to_thread(
            self._operator.post,
            self._api(f"/devices/{victim.running.device_id}/revoke"),
            schemas.Revoke(reason=RevocationReason.KEY_COMPROMISE),
            schemas.RevokedDevice,
        )
        await eventually(lambda: _disconnected(victim.running), "the session to end", timeout=5)
        elapsed = time.perf_counter() - started
        self._console.print(
            f"[green]✔[/green] revoked {victim.name} ({answer.certificates_revoked} certificate on the CRL): "
            f"the hub ended its live session {elapsed * 1000:.0f} ms after the request"
        )
        status = await eventually(lambda: _refused(victim.running), "the authority's refusal")
        assert status.last_refusal is not None
        self._console.print(
            f"[green]✔[/green] {victim.name}'s agent was refused by the hub and asked the authority: "
            f"{status.last_refusal.code} ({status.last_refusal.message})\n"
        )


def _short(name: str) -> str:
    names = {PANEL_MONITOR: "panel-monitor"}
    return names.get(name, name if len(name) < 36 else name[:8] + "…")


async def _connected(agent: Agent) -> AgentStatus | None:
    status = await agent.status()
    running = all(app.state != "starting" for app in status.apps)
    return status if status.link.connected and status.certificate and running else None


async def _renewed(agent: Agent, serial: str) -> AgentStatus | None:
    status = await agent.status()
    return status if status.certificate and status.certificate.serial != serial else None


async def _disconnected(agent: Agent) -> bool:
    return not (await agent.status()).link.connected


async def _refused(agent: Agent) -> AgentStatus | None:
    status = await agent.status()
    return status if status.last_refusal is not None else None
