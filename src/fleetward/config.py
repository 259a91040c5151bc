"""Typed, frozen configuration. Read once by the composition root, handed to the services that need it.

Every input from a device or an operator has a bound here, with its unit in the name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from fleetward.errors import ConfigurationError


@dataclass(frozen=True)
class Limits:
    """Bounds on what fleetward accepts. Each is configurable as ``FLEETWARD_LIMIT_<NAME>``."""

    max_request_bytes: int = 64 * 1024
    max_bulk_request_bytes: int = 1024 * 1024
    max_csr_bytes: int = 4 * 1024
    max_public_key_bytes: int = 1024
    max_measurements: int = 64
    max_bulk_claim: int = 1000
    max_name_chars: int = 128
    max_description_chars: int = 1024
    max_list_items: int = 1000
    nonce_ttl_seconds: int = 120
    certificate_validity_seconds: int = 24 * 3600
    certificate_backdate_seconds: int = 300
    #: the certificate of a quarantined or unhealthy device: enough to update and attest again, no more
    remediation_certificate_seconds: int = 3600
    crl_validity_seconds: int = 7 * 24 * 3600
    root_ca_validity_days: int = 20 * 365
    issuing_ca_validity_days: int = 5 * 365
    token_max_validity_days: int = 365
    #: wrong MFA codes an operator may enter within the window before further codes are refused unseen
    mfa_max_failures: int = 5
    mfa_failure_window_seconds: int = 900
    enrollment_batch_max: int = 256
    enrollment_queue_max: int = 4096
    #: refused enrollments recorded as events, per claimed device, and in all for unclaimed devices
    refusal_events_per_device_per_minute: int = 10
    unattributed_refusal_events_per_minute: int = 120
    # the hub
    mqtt_max_packet_bytes: int = 256 * 1024 + 2048
    hub_max_connections: int = 20_000
    hub_connect_timeout_seconds: int = 10
    hub_packet_timeout_seconds: int = 30
    hub_max_keep_alive_seconds: int = 1740
    hub_inflight_inbound: int = 64
    hub_inflight_outbound: int = 16
    hub_messages_per_second: int = 100
    hub_message_burst: int = 200
    hub_bytes_per_second: int = 1024 * 1024
    hub_security_events_per_minute: int = 10
    hub_trust_poll_milliseconds: int = 500
    #: how often the hub tells the monitor what each device did
    monitor_sample_milliseconds: int = 1000
    #: the monitor: how often it judges, how much waits, how often it looks again at health and releases
    monitor_judge_milliseconds: int = 250
    monitor_queue_max: int = 100_000
    monitor_events_per_turn: int = 2000
    monitor_release_seconds: int = 2
    monitor_health_sweep_seconds: int = 300
    monitor_playbook_cache_seconds: int = 10
    #: how often what the baselines learned is kept in the store (and at shutdown)
    monitor_learned_save_seconds: int = 300
    telemetry_batch_max: int = 2048
    telemetry_queue_max: int = 16_384
    telemetry_stream_buffer: int = 1000
    twin_max_bytes: int = 32 * 1024
    method_max_payload_bytes: int = 128 * 1024
    method_default_timeout_seconds: int = 30
    method_max_timeout_seconds: int = 300
    cloud_to_device_max_pending: int = 50
    cloud_to_device_max_bytes: int = 64 * 1024
    cloud_to_device_default_ttl_seconds: int = 3600
    cloud_to_device_max_ttl_seconds: int = 48 * 3600
    # the bus (between processes: NATS)
    #: messages a bus subscription (a hub's device commands, a live stream) holds for its reader, and
    #: publishes a process queues for NATS
    bus_pending_messages: int = 10_000
    #: how long a request on the bus (connection state, desired patch, takeover) waits for its answer; a
    #: direct method waits this much longer than its own timeout
    bus_request_timeout_milliseconds: int = 2000
    # updates
    #: the largest image (a signed application or agent package) the repository accepts
    max_image_bytes: int = 64 * 1024 * 1024
    #: a new image is published with a bsdiff delta from each of this many earlier versions
    image_delta_bases: int = 3
    #: how far a device's update token's time may be from the server's, either way
    device_token_max_age_seconds: int = 300
    # deployments and the director (updates/deployments.py)
    #: how long a signed assignment is valid (a device re-asks well before; a frozen one stops updating)
    assignment_ttl_seconds: int = 24 * 3600
    #: how often each server process judges the rollouts in progress
    rollout_tick_milliseconds: int = 2000
    #: a device's report judges its rollout again at most this often per rollout and process (a judge
    #: reads every device the rollout reached); reports in between are judged together at the end of it
    rollout_judge_interval_milliseconds: int = 250
    #: how far back the crash rate before a rollout is measured
    rollout_crash_baseline_seconds: int = 7 * 24 * 3600
    #: "check now" when a wave opens: devices asked at once, and how long each may take to answer
    check_now_concurrency: int = 32
    check_now_timeout_seconds: int = 5
    #: a device of a rollout not heard from since its assignment is asked to check now again this often
    check_now_retry_seconds: int = 30

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"limit {item.name} must be an int, not {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"limit {item.name} must be positive, got {value}")
        if self.certificate_validity_seconds < 600:
            raise ValueError("certificate_validity_seconds must be at least 600")


def _default_data_dir() -> Path:
    return Path(".fleetward")


@dataclass(frozen=True)
class Settings:
    """What a fleetward server runs with."""

    data_dir: Path = field(default_factory=_default_data_dir)
    database_url: str | None = None
    #: where devices and operators reach this server; derived from host, port and TLS when unset
    public_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8443
    #: the hub's MQTT-over-TLS port; 0 turns the hub off
    hub_port: int = 8883
    #: the bus between processes and nodes (``nats://host:4222``); none: the in-process bus, one process
    bus_url: str | None = field(default=None, repr=False)
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    #: base64 master key shared by several nodes; otherwise the key file in ``data_dir`` is used.
    master_key: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, or the embedded SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fleetward.db').resolve()}"

    @property
    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_certificate else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def master_key_file(self) -> Path:
        return self.data_dir / "master.key"

    def to_environment(self) -> dict[str, str]:
        """The ``FLEETWARD_*`` variables that :meth:`from_environment` turns back into these settings."""
        values = {
            "FLEETWARD_DATA_DIR": str(self.data_dir),
            "FLEETWARD_HOST": self.host,
            "FLEETWARD_PORT": str(self.port),
            "FLEETWARD_HUB_PORT": str(self.hub_port),
        }
        optional = {
            "FLEETWARD_DATABASE_URL": self.database_url,
            "FLEETWARD_PUBLIC_URL": self.public_url,
            "FLEETWARD_MASTER_KEY": self.master_key,
            "FLEETWARD_BUS_URL": self.bus_url,
            "FLEETWARD_TLS_CERTIFICATE": str(self.tls_certificate) if self.tls_certificate else None,
            "FLEETWARD_TLS_PRIVATE_KEY": str(self.tls_private_key) if self.tls_private_key else None,
        }
        values.update({key: value for key, value in optional.items() if value is not None})
        for item in fields(Limits):
            values[f"FLEETWARD_LIMIT_{item.name.upper()}"] = str(getattr(self.limits, item.name))
        return values

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``FLEETWARD_*`` variables; keyword overrides (from the CLI) win."""
        env = os.environ if environ is None else environ
        limit_values: dict[str, int] = {}
        for item in fields(Limits):
            raw = env.get(f"FLEETWARD_LIMIT_{item.name.upper()}")
            if raw is not None:
                try:
                    limit_values[item.name] = int(raw)
                except ValueError:
                    raise ConfigurationError(
                        f"FLEETWARD_LIMIT_{item.name.upper()} must be an integer, got {raw!r}"
                    ) from None
        try:
            limits = Limits(**limit_values)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(str(error)) from None
        settings = cls(limits=limits)
        from_env: dict[str, object] = {}
        if "FLEETWARD_DATA_DIR" in env:
            from_env["data_dir"] = Path(env["FLEETWARD_DATA_DIR"])
        if "FLEETWARD_DATABASE_URL" in env:
            from_env["database_url"] = env["FLEETWARD_DATABASE_URL"]
        if "FLEETWARD_PUBLIC_URL" in env:
            from_env["public_url"] = env["FLEETWARD_PUBLIC_URL"]
        if "FLEETWARD_MASTER_KEY" in env:
            from_env["master_key"] = env["FLEETWARD_MASTER_KEY"]
        if "FLEETWARD_BUS_URL" in env:
            from_env["bus_url"] = env["FLEETWARD_BUS_URL"].strip() or None  # empty: the in-process bus
        for name in ("tls_certificate", "tls_private_key"):
            if f"FLEETWARD_{name.upper()}" in env:
                from_env[name] = Path(env[f"FLEETWARD_{name.upper()}"])
        if "FLEETWARD_HOST" in env:
            from_env["host"] = env["FLEETWARD_HOST"]
        if "FLEETWARD_HUB_PORT" in env:
            try:
                from_env["hub_port"] = int(env["FLEETWARD_HUB_PORT"])
            except ValueError:
                raise ConfigurationError("FLEETWARD_HUB_PORT must be an integer") from None
        if "FLEETWARD_PORT" in env:
            try:
                from_env["port"] = int(env["FLEETWARD_PORT"])
            except ValueError:
                raise ConfigurationError("FLEETWARD_PORT must be an integer") from None
        from_env.update({key: value for key, value in overrides.items() if value is not None})
        if from_env.get("bus_url") == "":
            from_env["bus_url"] = None
        return replace(settings, **from_env)  # type: ignore[arg-type]
