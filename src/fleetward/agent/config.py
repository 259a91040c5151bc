"""The agent's configuration: typed, frozen, read once from ``agent.toml`` and ``FLEETWARD_AGENT_*``.

The agent's state directory holds ``agent.toml`` (written by ``fleetward agent init``, editable by hand) and
one install record per application in ``apps/<component id>.toml`` (written by ``fleetward agent app
install``, and later by the updater). :meth:`AgentSettings.load` reads both once; nothing reads settings
at the point of use. Each key of ``agent.toml`` can be overridden by an environment variable named after
its dotted key, upper-cased, dots as underscores: ``hub.port`` is ``FLEETWARD_AGENT_HUB_PORT``,
``limits.outbox_max_messages`` is ``FLEETWARD_AGENT_LIMITS_OUTBOX_MAX_MESSAGES``; a list of paths is
separated by ``os.pathsep``. Relative paths are relative to the state directory.

Anything wrong (an unknown key, a value of the wrong type or out of bounds, a missing key a root of trust
needs, an unreadable publisher key or install record) stops the agent with a :class:`ConfigurationError`
that names the key and the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

import fleetward
from fleetward.agent.launch import InstallRecord, LaunchConfig
from fleetward.errors import ConfigurationError
from fleetward.wire.evidence import Measurement
from fleetward.wire.identity import SHA256_HEX_PATTERN, check_module_id

CONFIG_NAME = "agent.toml"
ENV_PREFIX = "FLEETWARD_AGENT_"
STATE_DIR_VARIABLE = "FLEETWARD_AGENT_STATE_DIR"
#: An ``agent.toml`` or an install record larger than this is not one.
MAX_CONFIG_BYTES = 64 * 1024
MAX_APPS = 64
MAX_PUBLISHER_KEYS = 16

RootKind = Literal["software", "tpm", "pkcs11"]


# ------------------------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Key:
    """One key of ``agent.toml``: its type, its default (None: optional; ``REQUIRED``), what it means."""

    kind: Literal["str", "int", "float", "bool", "path", "paths", "sha256"]
    default: object
    doc: str
    low: float = 0
    high: float = 2**62


REQUIRED = object()

#: Every key ``agent.toml`` may hold, by dotted name (docs/operations.md lists them from here).
SCHEMA: dict[str, Key] = {
    "authority_url": Key("str", REQUIRED, "the authority's URL (HTTPS), as operators reach fleetward"),
    "ca_file": Key("path", None, "CA bundle for the authority's and the hub's TLS; the system's if unset"),
    "publisher_keys": Key("paths", (), "PEM public keys of the publishers whose packages may run"),
    "images_dir": Key("path", "images", "where packages are unpacked at launch"),
    "peripherals": Key("str", "linux", "linux (the device's own) or simulated (development, the simulator)"),
    "storage_dir": Key("path", "storage", "the applications' own storage (their working directories)"),
    "hub.host": Key("str", REQUIRED, "the hub's host name or address"),
    "hub.port": Key("int", 8883, "the hub's MQTT-over-TLS port", 1, 65535),
    "hub.name": Key("str", None, "the hub name in the MQTT user name; hub.host if unset"),
    "hub.module": Key(
        "str", None, "connect as this module of the device (e.g. fleetward-agent); unset: as the device"
    ),
    "hub.keep_alive_seconds": Key("int", 60, "MQTT keep-alive", 1, 1740),
    "hub.reconnect_first_seconds": Key("float", 1.0, "first reconnect wait (full jitter)", 0.01, 3600),
    "hub.reconnect_max_seconds": Key("float", 120.0, "longest wait between reconnects", 0.01, 86400),
    "hub.quarantine_retry_seconds": Key(
        "float", 60.0, "while quarantined, how often to ask whether the device is released", 0.05, 86400
    ),
    "root_of_trust.kind": Key("str", "software", "software (development only), tpm or pkcs11"),
    "root_of_trust.key_file": Key("path", "identity.key", "software: the key file; tpm: the TSS2 key file"),
    "root_of_trust.tcti": Key("str", None, "tpm: the TCTI, e.g. device:/dev/tpmrm0 or swtpm:port=2321"),
    "root_of_trust.pcr": Key("int", 23, "tpm: the PCR measurements extend (23, or 16 for development)"),
    "root_of_trust.module": Key("path", None, "pkcs11: the PKCS#11 module (.so)"),
    "root_of_trust.token": Key("str", None, "pkcs11: the token label"),
    "root_of_trust.key_label": Key("str", "fleetward-identity", "pkcs11: the identity key's label"),
    "root_of_trust.pin_env": Key("str", "FLEETWARD_PKCS11_PIN", "pkcs11: the variable holding the PIN"),
    "root_of_trust.pin_file": Key("path", None, "pkcs11: a file (0600) holding the PIN, instead"),
    "agent.name": Key("str", "fleetward-agent", "the agent's own measurement: component name"),
    "agent.version": Key("str", fleetward.__version__, "the agent's own measurement: version"),
    "agent.image": Key("path", None, "the agent's image, hashed for its measurement"),
    "agent.sha256": Key("sha256", None, "the agent's measurement SHA-256 (instead of agent.image)"),
    "intervals.telemetry_seconds": Key("float", 60.0, "the agent's own health telemetry; 0: none"),
    "intervals.baseline_seconds": Key("float", 300.0, "security-baseline reports; 0: none", 0, 7 * 86400),
    "intervals.baseline_sample_seconds": Key("float", 30.0, "looks at open connections", 0.05, 86400),
    "intervals.status_seconds": Key("float", 5.0, "status.json and the logs are written", 0.05, 3600),
    "limits.outbox_max_messages": Key("int", 10_000, "messages the outbox holds", 1),
    "limits.outbox_max_bytes": Key("int", 16 * 1024 * 1024, "bytes the outbox holds", 300 * 1024),
    "limits.renewal_backoff_first_seconds": Key("float", 30.0, "first retry after a failed renewal", 0.01),
    "limits.renewal_backoff_cap_seconds": Key("float", 3600.0, "longest wait between renewals", 0.01),
    "limits.renewal_last_chance_seconds": Key("float", 300.0, "the last try starts this long before expiry"),
    "limits.renewal_poll_seconds": Key("float", 60.0, "how often the wall clock is read", 0.01, 3600),
    "limits.forced_renewal_cooldown_seconds": Key(
        "float", 300.0, "at most one renewal forced by a hub refusal per this long", 0.01
    ),
    "limits.http_timeout_seconds": Key("float", 30.0, "each request to the authority", 0.1, 600),
    "limits.reports_per_hour": Key(
        "int", 120, "failure reports queued per hour; more are counted, dropped", 1
    ),
    "limits.app_log_bytes": Key("int", 8 * 1024, "stdout and stderr kept per application", 1, 8 * 1024),
    "limits.shutdown_flush_seconds": Key("float", 5.0, "at shutdown, waiting for the hub to take the outbox"),
    "updates.root_file": Key(
        "path",
        None,
        "the tenant's TUF root.json the device trusts (`fleetward repo root`); unset: no updates",
    ),
    "updates.product_id": Key(
        "str", None, "the product whose images this device installs (required with updates)"
    ),
    "updates.poll_seconds": Key(
        "float", 3600.0, "how often the agent looks for updates by itself", 1, 7 * 86400
    ),
    "updates.trial_seconds": Key(
        "float", 30.0, "an updated application must stay up this long, or it is rolled back", 0.01, 86400
    ),
    "updates.max_image_bytes": Key("int", 64 * 1024 * 1024, "the largest image the agent downloads", 1024),
    "updates.notice_seconds": Key(
        "float", 5.0, "an application hears of its update (update_pending) this long before; 0: none", 0, 3600
    ),
    "sandbox.first_app_uid": Key("int", 200_000, "as root: the first uid given to applications", 1000),
    "sandbox.app_uid_count": Key("int", 1000, "as root: how many uids applications may get", 1),
    "sandbox.network_namespaces": Key("bool", True, "as root: each application in a network namespace"),
    "sandbox.stop_grace_seconds": Key("float", 5.0, "SIGTERM to SIGKILL", 0.01, 600),
    "sandbox.restart_initial_backoff_seconds": Key("float", 1.0, "first restart after a crash", 0.001),
    "sandbox.restart_max_backoff_seconds": Key("float", 300.0, "longest wait before a restart", 0.001),
    "sandbox.crash_loop_crashes": Key("int", 5, "crashes in the window that make a crash loop", 1, 1000),
    "sandbox.crash_loop_window_seconds": Key("float", 600.0, "the crash-loop window", 0.001),
}

SECTIONS = ("hub", "root_of_trust", "agent", "intervals", "limits", "updates", "sandbox")


# ------------------------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class HubSettings:
    host: str
    port: int = 8883
    name: str | None = None
    #: the module the agent's link connects as (``{device}/{module}``); None: the device identity
    module: str | None = None
    keep_alive_seconds: int = 60
    reconnect_first_seconds: float = 1.0
    reconnect_max_seconds: float = 120.0
    #: while quarantined, how often the link asks whether the hub has released the device
    quarantine_retry_seconds: float = 60.0


@dataclass(frozen=True)
class SoftwareRoot:
    """DEVELOPMENT ONLY: the identity key in a file of mode 0600."""

    key_file: Path
    kind: Literal["software"] = "software"


@dataclass(frozen=True)
class TpmRoot:
    tcti: str
    key_file: Path
    pcr: Literal[16, 23] = 23
    kind: Literal["tpm"] = "tpm"


@dataclass(frozen=True)
class Pkcs11Root:
    module: Path
    token: str
    key_label: str
    pin_env: str = "FLEETWARD_PKCS11_PIN"
    pin_file: Path | None = None
    kind: Literal["pkcs11"] = "pkcs11"


RootSettings = SoftwareRoot | TpmRoot | Pkcs11Root


@dataclass(frozen=True)
class Intervals:
    telemetry_seconds: float = 60.0
    baseline_seconds: float = 300.0
    baseline_sample_seconds: float = 30.0
    status_seconds: float = 5.0


@dataclass(frozen=True)
class AgentLimits:
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 16 * 1024 * 1024
    renewal_backoff_first_seconds: float = 30.0
    renewal_backoff_cap_seconds: float = 3600.0
    renewal_last_chance_seconds: float = 300.0
    renewal_poll_seconds: float = 60.0
    forced_renewal_cooldown_seconds: float = 300.0
    http_timeout_seconds: float = 30.0
    reports_per_hour: int = 120
    app_log_bytes: int = 8 * 1024
    shutdown_flush_seconds: float = 5.0


@dataclass(frozen=True)
class UpdateSettings:
    """Where the agent's updates come from; present only when ``updates.root_file`` is set."""

    root_file: Path
    product_id: str
    poll_seconds: float = 3600.0
    trial_seconds: float = 30.0
    max_image_bytes: int = 64 * 1024 * 1024
    notice_seconds: float = 5.0


@dataclass(frozen=True)
class SandboxSettings:
    first_app_uid: int = 200_000
    app_uid_count: int = 1000
    network_namespaces: bool = True
    stop_grace_seconds: float = 5.0
    restart_initial_backoff_seconds: float = 1.0
    restart_max_backoff_seconds: float = 300.0
    crash_loop_crashes: int = 5
    crash_loop_window_seconds: float = 600.0


@dataclass(frozen=True)
class AgentSettings:
    """What an agent runs with. Build it with :meth:`load` (or directly, in tests and simulations)."""

    state_dir: Path
    authority_url: str
    hub: HubSettings
    root_of_trust: RootSettings
    #: the agent's own measurement, the first entry of the measurement log
    measurement: Measurement
    ca_file: Path | None = None
    apps: tuple[InstallRecord, ...] = ()
    publisher_keys: tuple[ec.EllipticCurvePublicKey, ...] = ()
    images_dir: Path | None = None
    storage_dir: Path | None = None
    peripherals: Literal["linux", "simulated"] = "linux"
    intervals: Intervals = field(default_factory=Intervals)
    limits: AgentLimits = field(default_factory=AgentLimits)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    updates: UpdateSettings | None = None

    # --- the state directory's layout

    @property
    def config_file(self) -> Path:
        return self.state_dir / CONFIG_NAME

    @property
    def credential_file(self) -> Path:
        return self.state_dir / "credential.pem"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "agent.lock"

    @property
    def apps_dir(self) -> Path:
        return self.state_dir / "apps"

    @property
    def packages_dir(self) -> Path:
        return self.state_dir / "packages"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def resolved_images_dir(self) -> Path:
        return self.images_dir or self.state_dir / "images"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.state_dir / "storage"

    def launch_config(self) -> LaunchConfig:
        return LaunchConfig(images_dir=self.resolved_images_dir, trusted_publisher_keys=self.publisher_keys)

    @classmethod
    def load(cls, state_dir: Path, environ: Mapping[str, str] | None = None) -> AgentSettings:
        """``agent.toml`` in ``state_dir``, overridden by ``FLEETWARD_AGENT_*``, and the install records."""
        env = os.environ if environ is None else environ
        config_file = state_dir / CONFIG_NAME
        raw = _read_toml(config_file, what="the agent configuration")
        values = _flatten(raw, config_file)
        for name in SCHEMA:
            variable = ENV_PREFIX + name.replace(".", "_").upper()
            if variable in env:
                values[name] = env[variable]
        parsed = {name: _parse(name, values.get(name), state_dir, config_file) for name in SCHEMA}
        return _build(state_dir, parsed, config_file)


# ------------------------------------------------------------------------------------------- reading


def _read_toml(path: Path, *, what: str) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigurationError(
            f"{what} {path} does not exist (run `fleetward agent init`)", code="agent_not_initialised"
        ) from None
    except OSError as error:
        raise ConfigurationError(f"cannot read {what} {path}: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigurationError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigurationError(f"{path} is not valid TOML: {error}") from None


def _flatten(raw: Mapping[str, object], origin: Path) -> dict[str, object]:
    """``{"hub": {"port": 1}}`` → ``{"hub.port": 1}``; an unknown section or key is refused."""
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigurationError(f"{origin}: [{key}] must be a table")
            for inner, item in value.items():
                flat[f"{key}.{inner}"] = item
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(SCHEMA))
    if unknown:
        raise ConfigurationError(
            f"{origin}: unknown key {unknown[0]!r} (known: {', '.join(SCHEMA)})",
            code="agent_config_unknown_key",
        )
    return flat


def _parse(name: str, value: object, state_dir: Path, origin: Path) -> object:
    key = SCHEMA[name]

    def refuse(why: str) -> ConfigurationError:
        variable = ENV_PREFIX + name.replace(".", "_").upper()
        return ConfigurationError(f"{origin}: {name} (or ${variable}) {why}", code="agent_config_invalid")

    if value is None:
        if key.default is REQUIRED:
            raise refuse("is required")
        value = key.default
        if value is None:
            return None
    if key.kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise refuse(f"must be true or false, not {value!r}")
        return value
    if key.kind in ("int", "float"):
        number = _number(value, integer=key.kind == "int")
        if number is None:
            raise refuse(f"must be {'an integer' if key.kind == 'int' else 'a number'}, not {value!r}")
        if not key.low <= number <= key.high:
            raise refuse(f"must be from {key.low:g} to {key.high:g}, not {number}")
        return number
    if key.kind == "paths":
        items = value.split(os.pathsep) if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(item, str) and item for item in items):
            raise refuse("must be a list of paths")
        return tuple(_path(item, state_dir) for item in items)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise refuse("must be a non-empty string")
    if key.kind == "path":
        return _path(value, state_dir)
    if key.kind == "sha256" and not re.fullmatch(SHA256_HEX_PATTERN, value):
        raise refuse("must be 64 lower-case hexadecimal characters")
    return value


def _number(value: object, *, integer: bool) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            return None
    if integer:
        return value if isinstance(value, int) else None
    return float(value) if isinstance(value, int | float) else None


def _path(text: str, state_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else state_dir / path


def _build(state_dir: Path, values: dict[str, object], origin: Path) -> AgentSettings:
    def get(name: str) -> object:
        return values[name]

    def section(prefix: str) -> dict[str, object]:
        return {
            name.partition(".")[2]: value for name, value in values.items() if name.startswith(prefix + ".")
        }

    url = str(get("authority_url"))
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"{origin}: authority_url must be an https:// URL, not {url!r}")
    keys_files: tuple[Path, ...] = get("publisher_keys")  # type: ignore[assignment]
    if len(keys_files) > MAX_PUBLISHER_KEYS:
        raise ConfigurationError(f"{origin}: at most {MAX_PUBLISHER_KEYS} publisher keys")
    publisher_keys = LaunchConfig.load_keys(tuple(_read_small(path, "publisher key") for path in keys_files))
    measurement = _agent_measurement(section("agent"), origin)
    hub = section("hub")
    if float(hub["reconnect_first_seconds"]) > float(hub["reconnect_max_seconds"]):  # type: ignore[arg-type]
        raise ConfigurationError(f"{origin}: hub.reconnect_first_seconds exceeds hub.reconnect_max_seconds")
    if hub["module"] is not None:
        try:
            check_module_id(str(hub["module"]))
        except ValueError as error:
            raise ConfigurationError(f"{origin}: hub.module: {error}") from None
    peripherals = get("peripherals")
    if peripherals not in ("linux", "simulated"):
        raise ConfigurationError(f"{origin}: peripherals is linux or simulated, not {peripherals!r}")
    return AgentSettings(
        state_dir=state_dir,
        authority_url=url.rstrip("/"),
        ca_file=get("ca_file"),  # type: ignore[arg-type]
        hub=HubSettings(**hub),  # type: ignore[arg-type]
        root_of_trust=_root(section("root_of_trust"), origin),
        measurement=measurement,
        apps=load_install_records(state_dir / "apps"),
        publisher_keys=publisher_keys,
        images_dir=get("images_dir"),  # type: ignore[arg-type]
        storage_dir=get("storage_dir"),  # type: ignore[arg-type]
        peripherals=peripherals,
        intervals=Intervals(**section("intervals")),  # type: ignore[arg-type]
        limits=_limits(section("limits"), origin),
        sandbox=SandboxSettings(**section("sandbox")),  # type: ignore[arg-type]
        updates=_updates(section("updates"), origin),
    )


def _updates(values: dict[str, object], origin: Path) -> UpdateSettings | None:
    if values["root_file"] is None:
        return None
    product = values["product_id"]
    if not isinstance(product, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", product):
        raise ConfigurationError(f"{origin}: updates.product_id must name the device's product")
    return UpdateSettings(**values)  # type: ignore[arg-type]


def _limits(values: dict[str, object], origin: Path) -> AgentLimits:
    limits = AgentLimits(**values)  # type: ignore[arg-type]
    if limits.renewal_backoff_first_seconds > limits.renewal_backoff_cap_seconds:
        raise ConfigurationError(
            f"{origin}: limits.renewal_backoff_first_seconds exceeds limits.renewal_backoff_cap_seconds"
        )
    return limits


def _root(values: dict[str, object], origin: Path) -> RootSettings:
    kind = values["kind"]
    key_file = values["key_file"]
    assert isinstance(key_file, Path)
    if kind == "software":
        return SoftwareRoot(key_file=key_file)
    if kind == "tpm":
        if values["tcti"] is None:
            raise ConfigurationError(f"{origin}: a tpm root of trust needs root_of_trust.tcti")
        if values["pcr"] not in (16, 23):
            raise ConfigurationError(f"{origin}: root_of_trust.pcr is 23 (devices) or 16 (development)")
        return TpmRoot(tcti=str(values["tcti"]), key_file=key_file, pcr=values["pcr"])
    if kind == "pkcs11":
        missing = [name for name in ("module", "token") if values[name] is None]
        if missing:
            raise ConfigurationError(f"{origin}: a pkcs11 root of trust needs root_of_trust.{missing[0]}")
        return Pkcs11Root(
            module=values["module"],  # type: ignore[arg-type]
            token=str(values["token"]),
            key_label=str(values["key_label"]),
            pin_env=str(values["pin_env"]),
            pin_file=values["pin_file"],  # type: ignore[arg-type]
        )
    raise ConfigurationError(f"{origin}: root_of_trust.kind is software, tpm or pkcs11, not {kind!r}")


def _agent_measurement(values: dict[str, object], origin: Path) -> Measurement:
    image, sha256 = values["image"], values["sha256"]
    if image is not None and sha256 is not None:
        raise ConfigurationError(f"{origin}: give agent.image or agent.sha256, not both")
    if isinstance(image, Path):
        digest = hashlib.sha256()
        try:
            with image.open("rb") as handle:
                while chunk := handle.read(1024 * 1024):
                    digest.update(chunk)
        except OSError as error:
            raise ConfigurationError(f"{origin}: cannot read agent.image {image}: {error.strerror}") from None
        sha256 = digest.hexdigest()
    elif sha256 is None:
        sha256 = agent_code_sha256()
    try:
        return Measurement(name=str(values["name"]), version=str(values["version"]), sha256=str(sha256))
    except ValueError as error:
        raise ConfigurationError(f"{origin}: the agent's measurement is not valid: {error}") from None


def agent_code_sha256(package: Path | None = None) -> str:
    """The agent's measurement when no image is configured: SHA-256 over the fleetward package's Python
    files (their paths and contents, in order), so that changed agent code is a changed measurement."""
    root = package or Path(fleetward.__file__).parent
    digest = hashlib.sha256(b"fleetward-agent-code-v1\x00")
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix().encode()
        content = path.read_bytes()
        digest.update(len(relative).to_bytes(4, "big") + relative + len(content).to_bytes(8, "big") + content)
    return digest.hexdigest()


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigurationError(f"cannot read the {what} {path}: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigurationError(f"the {what} {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return data


# ------------------------------------------------------------------------------------- install records

_RECORD_KEYS = {"component_id", "version", "package", "sha256", "signature"}


def load_install_records(directory: Path) -> tuple[InstallRecord, ...]:
    """Every ``<component id>.toml`` in ``directory`` (none if it does not exist), in name order."""
    if not directory.is_dir():
        return ()
    files = sorted(directory.glob("*.toml"))
    if len(files) > MAX_APPS:
        raise ConfigurationError(f"{directory} holds more than {MAX_APPS} install records")
    return tuple(read_install_record(path) for path in files)


def read_install_record(path: Path) -> InstallRecord:
    raw = _read_toml(path, what="the install record")
    unknown = sorted(set(raw) - _RECORD_KEYS)
    missing = sorted(_RECORD_KEYS - {"signature"} - set(raw))
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
        raise ConfigurationError(f"the install record {path}: {problem}", code="install_record_invalid")
    if not all(isinstance(value, str) and value for value in raw.values()):
        raise ConfigurationError(f"the install record {path}: every value is a non-empty string")
    base = path.parent.parent  # the state directory
    signature = raw.get("signature")
    try:
        record = InstallRecord(
            component_id=str(raw["component_id"]),
            version=str(raw["version"]),
            package_sha256=str(raw["sha256"]),
            package_path=_path(str(raw["package"]), base),
            signature_path=_path(str(signature), base) if signature else None,
        )
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"the install record {path}: {error}", code="install_record_invalid"
        ) from None
    if path.stem != record.component_id:
        raise ConfigurationError(f"the install record {path} names component {record.component_id}")
    return record


def render_install_record(record: InstallRecord, base: Path) -> str:
    """The TOML of an install record; paths inside ``base`` (the state directory) are kept relative."""

    def shown(path: Path) -> str:
        return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)

    lines = [
        "# an application the agent launches (written by `fleetward agent app install`)",
        f"component_id = {_quote(record.component_id)}",
        f"version = {_quote(record.version)}",
        f"package = {_quote(shown(record.package_path))}",
        f"sha256 = {_quote(record.package_sha256)}",
    ]
    if record.signature_path is not None:
        lines.append(f"signature = {_quote(shown(record.signature_path))}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- writing


def _quote(text: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped (JSON's escapes are TOML's)."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_quote(str(item)) for item in value) + "]"
    return _quote(str(value))


def render_agent_toml(values: Mapping[str, object]) -> str:
    """An ``agent.toml`` with ``values`` (dotted keys) set and every other key shown, commented out, at its
    default, each with what it means: the file documents itself."""
    unknown = sorted(set(values) - set(SCHEMA))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    lines = ["# fleetward agent configuration (docs/operations.md, Running the agent)", ""]
    current = ""
    for name, key in SCHEMA.items():
        section, _, short = name.rpartition(".")
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        lines.append(f"# {key.doc}")
        if name in values and values[name] is not None:
            lines.append(f"{short} = {_value(values[name])}")
        elif key.default is REQUIRED:
            lines.append(f"# {short} = (required)")
        elif key.default is not None:
            lines.append(f"# {short} = {_value(key.default)}")
        else:
            lines.append(f"# {short} =")
    return "\n".join(lines) + "\n"


def sync_directory(directory: Path) -> None:
    """``fsync`` a directory, so that a rename or a new file in it survives a power cut."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_private_file(path: Path, text: str | bytes, *, mode: int = 0o600) -> None:
    """Write ``path`` whole, atomically (a temporary file, fsync, rename), with ``mode``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
