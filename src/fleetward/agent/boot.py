"""The start of every agent run: open the root of trust, then measure the agent and launch the applications.

:func:`open_root_of_trust` builds the configured root (a software key file, a TPM 2.0 key, a PKCS#11
token); the hardware ones are imported only when configured, so their libraries stay optional.
:func:`measured_boot` starts the measurement log afresh (a TPM's PCR is reset), records the agent's own
measurement first, then runs measured launch on each installed application, in order. A refused
application is reported (``launch_refused``), left out of the log and not started; the others come back as
:class:`~fleetward.agent.launch.LaunchedApp` for the supervisor. The log is what the agent attests with.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fleetward.agent.config import AgentSettings, Pkcs11Root, RootSettings, SoftwareRoot, TpmRoot
from fleetward.agent.launch import (
    ExtendingMeasurementLog,
    InstallRecord,
    LaunchedApp,
    Launcher,
    MeasurementLog,
    MemoryMeasurementLog,
)
from fleetward.agent.reporting import Reporter
from fleetward.agent.rot import AnyRootOfTrust, SoftwareRootOfTrust
from fleetward.clock import Clock
from fleetward.errors import ConfigurationError, LaunchRefused
from fleetward.wire.evidence import Measurement

logger = logging.getLogger(__name__)


@runtime_checkable
class MeasuringRoot(Protocol):
    """A root of trust that holds the measurements itself (a TPM's PCR)."""

    def reset_measurements(self) -> None: ...

    def extend(self, measurement: Measurement) -> None: ...


def open_root_of_trust(settings: RootSettings) -> AnyRootOfTrust:
    """The configured root of trust; its key is created on first use (``fleetward agent init`` does it)."""
    if isinstance(settings, SoftwareRoot):
        return SoftwareRootOfTrust.load_or_create(settings.key_file)
    if isinstance(settings, TpmRoot):
        try:
            from fleetward.agent.tpm import TpmRootOfTrust
        except ImportError as error:
            raise ConfigurationError(
                f"the tpm root of trust needs tpm2-pytss (pip install 'fleetward[tpm]'): {error}"
            ) from None
        return TpmRootOfTrust.load_or_create(settings.tcti, settings.key_file, pcr_index=settings.pcr)
    if isinstance(settings, Pkcs11Root):
        try:
            from fleetward.agent.pkcs11 import Pkcs11RootOfTrust, UserPin
        except ImportError as error:
            raise ConfigurationError(
                f"the pkcs11 root of trust needs python-pkcs11 (pip install 'fleetward[pkcs11]'): {error}"
            ) from None
        pin = (
            UserPin.from_file(settings.pin_file)
            if settings.pin_file
            else UserPin.from_environment(settings.pin_env)
        )
        return Pkcs11RootOfTrust.open_or_create(settings.module, settings.token, settings.key_label, pin)
    raise ConfigurationError(f"unknown root of trust {settings!r}")


def root_kind(root: AnyRootOfTrust) -> str:
    """``software``, ``tpm``, ``pkcs11``, or the class name of an injected root."""
    names = {"SoftwareRootOfTrust": "software", "TpmRootOfTrust": "tpm", "Pkcs11RootOfTrust": "pkcs11"}
    return names.get(type(root).__name__, type(root).__name__)


@dataclass(frozen=True)
class RefusedLaunch:
    record: InstallRecord
    code: str
    message: str


@dataclass(frozen=True)
class Boot:
    """What a measured boot left: the log to attest with, what may run, and what was refused."""

    log: MeasurementLog
    launched: tuple[LaunchedApp, ...]
    refused: tuple[RefusedLaunch, ...]


async def measured_boot(
    settings: AgentSettings, root: AnyRootOfTrust, *, report: Reporter, clock: Clock
) -> Boot:
    """A fresh measurement log: the agent first, then each application that passes measured launch."""
    log: MeasurementLog
    if isinstance(root, MeasuringRoot):
        await asyncio.to_thread(root.reset_measurements)
        log = ExtendingMeasurementLog(root)
    else:
        log = MemoryMeasurementLog()
    await asyncio.to_thread(log.extend, settings.measurement)
    if not settings.apps:
        return Boot(log, (), ())
    launcher = Launcher(settings.launch_config(), report=report, log=log, clock=clock)
    launched: list[LaunchedApp] = []
    refused: list[RefusedLaunch] = []
    for record in settings.apps:
        try:
            app = await launcher.launch(record)
        except LaunchRefused as refusal:
            logger.error(
                "measured launch refused %s %s: %s (%s)",
                record.component_id,
                record.version,
                refusal.message,
                refusal.code,
            )
            refused.append(RefusedLaunch(record, refusal.code, refusal.message))
            continue
        logger.info("launched %s %s, measured %s", record.component_id, record.version, record.package_sha256)
        launched.append(app)
    return Boot(log, tuple(launched), tuple(refused))
