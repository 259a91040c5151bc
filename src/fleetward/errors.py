"""The one exception tree of fleetward.

Every error fleetward raises on purpose is a :class:`FleetwardError` and carries a stable, machine-readable
``code`` next to its human message. The API turns the class into an HTTP status and the code into the
``error.code`` field of the response body; the CLI prints the message.

::

    FleetwardError
    ├── InvalidInput                 the caller sent malformed data (HTTP 400/422)
    │   └── PayloadTooLarge          ... or more of it than the limit allows (HTTP 413)
    ├── SecurityRefusal              the peer sent data that is unsafe to accept: never retried, always
    │   │                            recorded as a security event (HTTP 403)
    │   ├── AttestationRefused       evidence, nonce or CSR failed verification
    │   ├── ProtocolViolation        a device broke the MQTT protocol (the hub closes the connection)
    │   ├── AccessRefused            a device reached for what it may not (a topic, a session)
    │   ├── LaunchRefused            an application package failed verification: not started, not measured
    │   └── UpdateRefused            update metadata, an assignment or an image failed verification: the
    │                                device stays on what it runs
    ├── AccessDenied
    │   ├── Unauthenticated          no credentials, or credentials that are not valid (HTTP 401)
    │   └── PermissionDenied         valid credentials without the right role or scope (HTTP 403)
    │       └── CapabilityNotDeclared    an application used a capability its manifest does not declare
    ├── NotFound                     no such thing in the caller's tenant (HTTP 404)
    ├── Conflict                     the request contradicts the current state (HTTP 409)
    ├── ConfigurationError           fleetward was started with settings it cannot run with
    └── TransportError               the network or the server failed: safe to retry later
        ├── ServerError              the server answered with an error that is not the caller's fault
        └── DeviceTimeout            a device did not answer in time (HTTP 504)

Some parts subclass these for errors only they raise; each lives next to its raiser:

    InvalidInput        ← agent.app_protocol.FrameRefused (a malformed frame on the application API),
                          monitor.sinks.WebhookRefused (a webhook receiver refused a notice: not retried)
    Conflict            ← agent.peripherals.PeripheralBusy (a peripheral another connection holds)
    TransportError      ← bus.base.NoResponders, bus.base.RequestTimedOut (nobody holds the device; no
                          answer in time), agent.outbox.OutboxFull (nothing may be dropped to make room),
                          agent.peripherals.PeripheralFailed (the device file failed)
    FleetwardError      ← agent.outbox.OutboxCorrupt (the outbox file is damaged: never retried, never
                          deleted), hub.routing.SessionTaken (a newer connection of the device took over)

Third-party exceptions (SQLAlchemy, httpx, cryptography) are translated at the boundary of the module that
uses the library; none of them escapes into the rest of fleetward.
"""

from __future__ import annotations


class FleetwardError(Exception):
    """Root of every error fleetward raises on purpose."""

    default_code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def __str__(self) -> str:
        return self.message


class InvalidInput(FleetwardError):
    """The caller sent malformed data."""

    default_code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    """The caller sent more data than the configured limit."""

    default_code = "payload_too_large"


class SecurityRefusal(FleetwardError):
    """The peer sent data that is unsafe to accept. Never retried; always recorded as a security event."""

    default_code = "security_refusal"


class AttestationRefused(SecurityRefusal):
    """Attestation evidence, its nonce or its CSR failed verification; no certificate is issued."""

    default_code = "attestation_refused"


class ProtocolViolation(SecurityRefusal):
    """A device sent bytes that are not MQTT, or MQTT it may not send; the hub closes the connection."""

    default_code = "protocol_violation"


class AccessRefused(SecurityRefusal):
    """A device reached for a topic, a session or an identity that is not its own."""

    default_code = "access_refused"


class LaunchRefused(SecurityRefusal):
    """An application package failed verification (signature, hash, archive or manifest).

    The application is not started and not measured. The ``code`` says which check failed, for example
    ``package_hash_mismatch`` or ``package_signature_invalid`` (docs/architecture.md lists them).
    """

    default_code = "launch_refused"


class UpdateRefused(SecurityRefusal):
    """TUF metadata, a director assignment or an image failed verification; nothing was installed."""

    default_code = "update_refused"


class AccessDenied(FleetwardError):
    """The caller may not do what it asked."""

    default_code = "access_denied"


class Unauthenticated(AccessDenied):
    """No credentials, or credentials that are not valid."""

    default_code = "unauthenticated"


class PermissionDenied(AccessDenied):
    """Valid credentials that do not carry the right role or scope."""

    default_code = "permission_denied"


class CapabilityNotDeclared(PermissionDenied):
    """An application asked for a capability, or a part of one, that its manifest does not declare.

    ``capability`` is the manifest name of the capability (``Gpio``, ``AllowedConnections``, …) and
    ``detail`` what exactly was asked for (a pin, a host and port), or ``None`` for the capability itself.
    """

    default_code = "capability_not_declared"

    def __init__(self, message: str, *, capability: str, detail: str | int | None = None) -> None:
        super().__init__(message)
        self.capability = capability
        self.detail = detail


class NotFound(FleetwardError):
    """No such thing in the caller's tenant."""

    default_code = "not_found"


class Conflict(FleetwardError):
    """The request contradicts the current state."""

    default_code = "conflict"


class ConfigurationError(FleetwardError):
    """fleetward was started with settings it cannot run with."""

    default_code = "configuration_error"


class TransportError(FleetwardError):
    """The network or the server failed; the request may be retried later."""

    default_code = "transport_error"


class ServerError(TransportError):
    """The server answered with an error that is not the caller's fault."""

    default_code = "server_error"


class DeviceTimeout(TransportError):
    """A device did not answer in time (a direct method, for instance)."""

    default_code = "device_timeout"
