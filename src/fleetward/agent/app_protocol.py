"""The application API's wire format (docs/wire.md, "The agent's application API"). Pure: bytes in, typed out.

An application and the agent exchange **frames**: one JSON object per line (UTF-8, ended by ``\\n``), at most
``max_frame_bytes`` each way. The application sends requests; the agent answers each one, and pushes what
the application subscribed to::

    → {"id": 1, "op": "gpio.read", "args": {"pin": 8}}
    ← {"id": 1, "result": {"value": 1}}
    ← {"id": 2, "error": {"code": "capability_not_declared", "message": "…"}}
    ← {"push": "method", "data": {"call_id": "m1", "name": "blink", "payload": {"times": 3}}}

Every field is validated (pydantic, strict, ``extra="forbid"``): a JSON number is not a string, ``true`` is
not ``1``, and an unknown field is refused. Bytes travel as base64 strings. This module also holds the
pure rules of the API: how an application's twin properties are namespaced (under ``apps`` → its component
id), what a desired patch means to one application, and which telemetry properties an application may set.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

from fleetward.agent import dialect
from fleetward.agent.dialect import CloudMessage, Json, JsonObject, Properties
from fleetward.errors import InvalidInput, PayloadTooLarge
from fleetward.wire.twin import MAX_DEPTH as TWIN_MAX_DEPTH
from fleetward.wire.twin import check_properties

API_VERSION = 1
#: The telemetry property the agent sets to the sending application's component id, and the
#: cloud-to-device property that names the application a message is for.
COMPONENT_PROPERTY = "fleetward-component"
#: Reported and desired properties of applications live under ``{"apps": {"<component id>": {…}}}``.
APPS_KEY = "apps"
#: The longest frame any configuration may allow (appkit reads up to this).
MAX_FRAME_BYTES_CEILING = 1024 * 1024
#: Bytes in one UART write or read, one I2C or SPI transfer.
MAX_TRANSFER_BYTES = 4096
MAX_UART_READ_TIMEOUT_MS = 10_000
MAX_DEFERRAL_REQUEST_SECONDS = 24 * 3600
#: Properties an application may put on one message: the hub's 64, less the outbox's two and the
#: component property.
MAX_APP_PROPERTIES = dialect.MAX_PROPERTIES - 3
#: An application's own object sits at depth 3 of a twin half (``apps`` → component id → it).
APP_TWIN_DEPTH = 3


class ErrorCode(enum.StrEnum):
    """The codes the API itself answers with (services add theirs: ``outbox_full``, ``twin_too_large``, …)."""

    INVALID_REQUEST = "invalid_request"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_OPERATION = "unknown_operation"
    TOO_MANY_REQUESTS = "too_many_requests"
    TOO_MANY_INVALID_FRAMES = "too_many_invalid_frames"
    CAPABILITY_NOT_DECLARED = "capability_not_declared"
    SERVICE_UNAVAILABLE = "service_unavailable"
    DEVICE_NOT_ENROLLED = "device_not_enrolled"
    REQUEST_TIMEOUT = "request_timeout"
    RESPONSE_TOO_LARGE = "response_too_large"
    METHOD_TAKEN = "method_taken"
    TOO_MANY_METHODS = "too_many_methods"
    UNKNOWN_CALL = "unknown_call"
    UART_NOT_OPEN = "uart_not_open"
    DEFERRAL_EXHAUSTED = "deferral_exhausted"
    PEER_REFUSED = "peer_refused"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INTERNAL_ERROR = "internal_error"


class FrameRefused(InvalidInput):
    """A frame that is not a valid request; ``request_id`` is its ``id`` when that much could be read."""

    default_code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, *, code: str | None = None, request_id: int | None = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id


# ---------------------------------------------------------------------- field types


def _from_base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("bytes travel as a base64 string")
    if len(value) > 4 * (MAX_TRANSFER_BYTES // 3 + 1):
        raise ValueError(f"more than {MAX_TRANSFER_BYTES} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


Base64 = Annotated[bytes, BeforeValidator(_from_base64), Field(max_length=MAX_TRANSFER_BYTES)]
PeripheralId = (
    Annotated[int, Field(ge=0, le=65_535)]
    | Annotated[
        str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_$][A-Za-z0-9_$.:-]*$")
    ]
)
MethodName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]
CallId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,32}$")]
Channel = Annotated[int, Field(ge=0, le=255)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Request(_Strict):
    id: int = Field(ge=0, le=2**53 - 1)
    op: str = Field(min_length=1, max_length=64)
    args: dict[str, object] = Field(default_factory=dict)


# ---------------------------------------------------------------------- arguments, one model per operation


class NoArgs(_Strict):
    pass


class TelemetrySend(_Strict):
    body: str
    body_encoding: Literal["utf-8", "base64"] = "utf-8"
    properties: dict[str, str] = Field(default_factory=dict, max_length=MAX_APP_PROPERTIES)

    @model_validator(mode="after")
    def _decodable(self) -> TelemetrySend:
        self.body_bytes()  # raises ValueError when it is not base64
        return self

    def body_bytes(self) -> bytes:
        if self.body_encoding == "utf-8":
            return self.body.encode("utf-8")
        try:
            return base64.b64decode(self.body, validate=True)
        except binascii.Error:
            raise ValueError("body: not base64") from None


class TwinReport(_Strict):
    patch: dict[str, JsonValue]


class MethodsRegister(_Strict):
    name: MethodName


class MethodsRespond(_Strict):
    call_id: CallId
    status: int = Field(ge=0, le=999)
    payload: JsonValue = None


class GpioRead(_Strict):
    pin: PeripheralId


class GpioWrite(_Strict):
    pin: PeripheralId
    value: int = Field(ge=0, le=1)


class UartOpen(_Strict):
    name: PeripheralId
    baud_rate: int = Field(default=115_200, ge=1, le=4_000_000)


class UartWrite(_Strict):
    name: PeripheralId
    data: Base64 = Field(min_length=1)


class UartRead(_Strict):
    name: PeripheralId
    max_bytes: int = Field(default=256, ge=1, le=MAX_TRANSFER_BYTES)
    timeout_ms: int = Field(default=0, ge=0, le=MAX_UART_READ_TIMEOUT_MS)


class UartClose(_Strict):
    name: PeripheralId


class I2cTransfer(_Strict):
    bus: PeripheralId
    address: int = Field(ge=0, le=0x7F)
    write: Base64 = b""
    read_length: int = Field(default=0, ge=0, le=MAX_TRANSFER_BYTES)

    @model_validator(mode="after")
    def _something(self) -> I2cTransfer:
        if not self.write and not self.read_length:
            raise ValueError("a transfer writes bytes, reads bytes, or both")
        return self


class SpiTransfer(_Strict):
    bus: PeripheralId
    chip_select: Channel = 0
    write: Base64 = b""
    read_length: int = Field(default=0, ge=0, le=MAX_TRANSFER_BYTES)

    @model_validator(mode="after")
    def _something(self) -> SpiTransfer:
        if not self.write and not self.read_length:
            raise ValueError("a transfer writes bytes, reads bytes, or both")
        return self


class AdcRead(_Strict):
    controller: PeripheralId
    channel: Channel


class PwmSet(_Strict):
    controller: PeripheralId
    channel: Channel
    period_ns: int = Field(ge=1, le=10**10)
    duty_ns: int = Field(ge=0, le=10**10)
    enabled: bool = True

    @model_validator(mode="after")
    def _duty_within_period(self) -> PwmSet:
        if self.duty_ns > self.period_ns:
            raise ValueError("duty_ns must not be longer than period_ns")
        return self


class UpdateDefer(_Strict):
    seconds: int = Field(ge=1, le=MAX_DEFERRAL_REQUEST_SECONDS)


#: Every operation and the model of its ``args``.
OPERATIONS: Mapping[str, type[_Strict]] = {
    "telemetry.send": TelemetrySend,
    "twin.get": NoArgs,
    "twin.report": TwinReport,
    "twin.subscribe": NoArgs,
    "methods.register": MethodsRegister,
    "methods.respond": MethodsRespond,
    "messages.subscribe": NoArgs,
    "events.subscribe": NoArgs,
    "gpio.read": GpioRead,
    "gpio.write": GpioWrite,
    "uart.open": UartOpen,
    "uart.write": UartWrite,
    "uart.read": UartRead,
    "uart.close": UartClose,
    "i2c.transfer": I2cTransfer,
    "spi.transfer": SpiTransfer,
    "adc.read": AdcRead,
    "pwm.set": PwmSet,
    "storage.quota": NoArgs,
    "update.defer": UpdateDefer,
    "device.certificate_paths": NoArgs,
    "power.reboot": NoArgs,
}


# ---------------------------------------------------------------------- results and pushes


class Empty(_Strict):
    pass


class TelemetrySent(_Strict):
    message_id: str


class AppTwin(_Strict):
    desired: dict[str, JsonValue]
    desired_version: int
    reported: dict[str, JsonValue]
    reported_version: int


class Reported(_Strict):
    version: int


class Registered(_Strict):
    name: str


class Level(_Strict):
    value: int


class Written(_Strict):
    written: int


class Data(_Strict):
    data: str  # base64

    @classmethod
    def of(cls, raw: bytes) -> Data:
        return cls(data=base64.b64encode(raw).decode("ascii"))


class StorageQuota(_Strict):
    used_bytes: int
    allowed_bytes: int


class Deferral(_Strict):
    granted_seconds: int
    remaining_seconds: int
    deferred_until: str  # ISO 8601, UTC


class CertificatePaths(_Strict):
    certificate: str
    key: str
    device_id: str


class Hello(_Strict):
    version: int = API_VERSION
    component_id: str
    max_frame_bytes: int


class MethodPush(_Strict):
    call_id: str
    name: str
    payload: JsonValue


class DesiredPush(_Strict):
    version: int
    complete: bool
    properties: dict[str, JsonValue]


class MessagePush(_Strict):
    message_id: str
    properties: dict[str, str]
    body: str
    body_encoding: Literal["utf-8", "base64"]

    @classmethod
    def of(cls, message: CloudMessage) -> MessagePush:
        try:
            body, encoding = message.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(message.body).decode("ascii"), "base64"
        return cls(
            message_id=message.message_id,
            properties=dict(message.properties),
            body=body,
            body_encoding=cast(Literal["utf-8", "base64"], encoding),
        )


class EventPush(_Strict):
    kind: str
    details: dict[str, str | int | bool]


PushKind = Literal["hello", "method", "desired", "message", "event"]


# ---------------------------------------------------------------------- frames


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:64]!r} appears twice")
        result[key] = value
    return result


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is out of range")
    return value


def describe(error: ValidationError, prefix: str = "") -> str:
    """The first problem of a validation error, naming its field: ``args.pin: Input should be …``."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"[:300] if where else message[:300]


def decode_request(frame: bytes) -> Request:
    """One frame (without its newline) as a :class:`Request`, or :class:`FrameRefused` saying why."""
    try:
        document = json.loads(
            frame.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
            parse_float=_finite,
        )
    except UnicodeDecodeError:
        raise FrameRefused("the frame is not UTF-8") from None
    except RecursionError:
        raise FrameRefused("the frame is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError, duplicate keys, numbers out of range
        raise FrameRefused(f"the frame is not a JSON object ({str(error)[:120]})") from None
    if not isinstance(document, dict):
        raise FrameRefused("the frame is not a JSON object")
    try:
        return Request.model_validate(document)
    except ValidationError as error:
        raise FrameRefused(describe(error), request_id=_readable_id(document)) from None


def _readable_id(document: Mapping[str, object]) -> int | None:
    value = document.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53:
        return value
    return None


def parse_args(request: Request) -> _Strict:
    """The request's ``args`` as its operation's model; :class:`FrameRefused` for an unknown operation or
    arguments that do not validate."""
    model = OPERATIONS.get(request.op)
    if model is None:
        raise FrameRefused(
            f"unknown operation {request.op[:64]!r}", code=ErrorCode.UNKNOWN_OPERATION, request_id=request.id
        )
    try:
        return model.model_validate(request.args)
    except ValidationError as error:
        raise FrameRefused(describe(error, "args"), request_id=request.id) from None


def _frame(document: Mapping[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


def encode_result(request_id: int, result: BaseModel) -> bytes:
    return _frame({"id": request_id, "result": result.model_dump(mode="json")})


def encode_error(request_id: int | None, code: str, message: str) -> bytes:
    return _frame({"id": request_id, "error": {"code": str(code), "message": message}})


def encode_push(kind: PushKind, data: BaseModel) -> bytes:
    return _frame({"push": kind, "data": data.model_dump(mode="json")})


# ---------------------------------------------------------------------- telemetry


def app_properties(properties: Mapping[str, str], component_id: str) -> Properties:
    """An application's telemetry properties, checked as the hub would, with the component property added.

    Keys starting with ``fleetward`` (any case) are the agent's: an application must not pass its
    telemetry off as one of the agent's reports (``fleetward-report``) or as another application's.
    """
    for key in properties:
        if key.casefold().startswith("fleetward"):
            raise InvalidInput(
                f"the property {key[:64]!r} is reserved for the agent", code="reserved_property"
            )
    pairs = dialect.check_properties(properties, reserved=3)
    return (*pairs, (COMPONENT_PROPERTY, component_id))


# ---------------------------------------------------------------------- twin


def check_app_patch(patch: Mapping[str, object], max_bytes: int) -> JsonObject:
    """An application's reported patch, as the hub will accept it once namespaced: keys of 1 to 128
    characters without ``.``, ``$``, space or control characters, nesting within the twin's ten levels
    counted from the application's own object (depth 3), and at most ``max_bytes`` encoded."""
    size = len(_frame(patch)) - 1
    if size > max_bytes:
        raise PayloadTooLarge(
            f"a reported patch holds at most {max_bytes} bytes, this one {size}", code="twin_too_large"
        )
    check_properties(patch, APP_TWIN_DEPTH, too_deep=_too_deep)
    return cast(JsonObject, dict(patch))


def _too_deep() -> InvalidInput:
    return InvalidInput(
        f"twin properties nest at most {TWIN_MAX_DEPTH - APP_TWIN_DEPTH} levels inside an application's "
        "own object",
        code="twin_too_deep",
    )


def reported_patch(component_id: str, patch: JsonObject) -> JsonObject:
    """The whole-twin patch that merges an application's patch into its own namespace only."""
    return {APPS_KEY: {component_id: cast(Json, patch)}}


def app_namespace(document: Mapping[str, Json], component_id: str) -> JsonObject:
    """An application's part of a twin half: ``document["apps"][component_id]``, or ``{}``."""
    apps = document.get(APPS_KEY)
    mine = apps.get(component_id) if isinstance(apps, dict) else None
    return dict(mine) if isinstance(mine, dict) else {}


def desired_change(
    component_id: str, patch: Mapping[str, Json], document_after: Mapping[str, Json]
) -> tuple[JsonObject, bool] | None:
    """What a desired patch of the whole twin means to one application: ``(its patch, False)`` when the
    patch merges an object into its namespace, ``(its whole namespace, True)`` when the patch replaced or
    removed the namespace (or ``apps``), and ``None`` when the patch does not touch it."""
    if APPS_KEY not in patch:
        return None
    apps = patch[APPS_KEY]
    if not isinstance(apps, dict):
        return app_namespace(document_after, component_id), True
    if component_id not in apps:
        return None
    mine = apps[component_id]
    if isinstance(mine, dict):
        return dict(mine), False
    return app_namespace(document_after, component_id), True


def json_object(value: Mapping[str, Any]) -> dict[str, JsonValue]:
    """A twin object as a pydantic JSON value (they are the same JSON; the two type aliases differ)."""
    return cast(dict[str, JsonValue], dict(value))
