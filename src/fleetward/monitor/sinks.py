"""Where the monitor's alerts and playbook actions go out: signed webhooks, and syslog carrying CEF to a SIEM.

A :class:`Notice` is what goes out (an alert or an action, flat and bounded). A :class:`NoticeSink` sends
one; it raises :class:`~fleetward.errors.TransportError` when trying again later may help, and an
:class:`~fleetward.errors.InvalidInput` when it will not. The pure part formats: :func:`notice_body` (the
webhook's JSON), :func:`format_cef` and :func:`format_syslog`. The shells send:

- :class:`WebhookSink` POSTs the body over HTTPS (plain HTTP only to loopback), follows no redirect, and
  signs each request. The body, format ``fleetward-notice-v1``, compact JSON in UTF-8::

      {"at": "2026-03-01T12:00:00.000Z", "code": "undeclared_destination", "detail": {"port": 443},
       "device_id": "d-1", "format": "fleetward-notice-v1", "id": "a-1", "kind": "alert",
       "severity": "high", "summary": "...", "tenant_id": "t-1"}

  with the headers ``X-Fleetward-Notice-Id`` (the notice id: a receiver de-duplicates on it, for a retry
  sends it again), ``X-Fleetward-Timestamp`` (Unix seconds when this attempt was signed) and
  ``X-Fleetward-Signature: sha256=<hex HMAC-SHA256 of timestamp + "." + body under the shared secret>``.
  Receivers check both with :func:`verify_signature`, refusing stale timestamps (replays).
- :class:`SyslogCefSink` sends RFC 5424 messages over UDP (one datagram each, RFC 5426), TCP (RFC 6587
  octet counting) or TLS (RFC 5425, the same framing), whose MSG is one CEF:0 event (see
  :func:`format_cef` for the fields). TCP syslog has no acknowledgement: a message written just before the
  collector died can be lost; UDP is fire and forget.
- :class:`RetryingSink` is a bounded queue in front of another sink with a task of its own: in order,
  retrying retryable failures with backoff, and counting what it could not take (``dropped``), what failed
  (``failed``) and what was still queued at close (``abandoned``), so that nothing goes missing unseen.
- :class:`RecordingSink` is the in-memory fake for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import ssl
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Literal, Protocol, get_args

import httpx

from fleetward import __version__
from fleetward.clock import Clock, SystemClock
from fleetward.errors import FleetwardError, InvalidInput, PayloadTooLarge, ServerError, TransportError

logger = logging.getLogger(__name__)

NoticeKind = Literal["alert", "action"]
NoticeSeverity = Literal["low", "medium", "high", "critical"]
Scalar = str | int | float | bool | None

NOTICE_FORMAT = "fleetward-notice-v1"
MAX_ID_CHARS = 128
MAX_CODE_CHARS = 64
MAX_SUMMARY_CHARS = 512  # CEF's Name holds 512 characters
MAX_DETAIL_ITEMS = 32
MAX_DETAIL_KEY_CHARS = 64
MAX_DETAIL_VALUE_CHARS = 1024
MAX_CEF_EVIDENCE_CHARS = 4000  # CEF's custom strings (cs1…cs6) hold 4000 characters
MIN_SYSLOG_BYTES = 480  # what RFC 5426 says every receiver takes
_MAX_URL_CHARS = 2048
_MIN_SECRET_BYTES = 16
_MAX_INT = 2**63

#: CEF's 0-10 severity, and syslog's (RFC 5424: 2 critical, 3 error, 4 warning, 5 notice)
CEF_SEVERITY: Mapping[str, int] = MappingProxyType({"low": 3, "medium": 5, "high": 8, "critical": 10})
SYSLOG_SEVERITY: Mapping[str, int] = MappingProxyType({"low": 5, "medium": 4, "high": 3, "critical": 2})

_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_CODE = re.compile(r"[A-Za-z0-9_.:-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _text(name: str, value: object, *, max_chars: int, pattern: re.Pattern[str] | None) -> None:
    if not isinstance(value, str):
        raise TypeError(f"a notice's {name} is a str, not {type(value).__name__}")
    if not 0 < len(value) <= max_chars:
        raise ValueError(f"a notice's {name} holds 1 to {max_chars} characters, not {len(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValueError(f"a notice's {name} holds characters it may not: {value[:40]!r}")


@dataclass(frozen=True)
class Notice:
    """An alert raised or a playbook action run, as it goes out. Checked when built; ``detail`` is flat
    (:func:`flatten_detail` makes it so) and copied into a read-only mapping."""

    tenant_id: str
    kind: NoticeKind
    #: the alert's or the run's id: stable across retries, receivers de-duplicate on it
    id: str
    at: dt.datetime
    device_id: str | None
    code: str
    severity: NoticeSeverity
    summary: str
    detail: Mapping[str, Scalar]

    def __post_init__(self) -> None:
        _text("tenant_id", self.tenant_id, max_chars=MAX_ID_CHARS, pattern=_ID)
        _text("id", self.id, max_chars=MAX_ID_CHARS, pattern=_ID)
        if self.device_id is not None:
            _text("device_id", self.device_id, max_chars=MAX_ID_CHARS, pattern=_ID)
        _text("code", self.code, max_chars=MAX_CODE_CHARS, pattern=_CODE)
        _text("summary", self.summary, max_chars=MAX_SUMMARY_CHARS, pattern=None)
        if self.kind not in get_args(NoticeKind):
            raise ValueError(f"a notice's kind is one of {get_args(NoticeKind)}, not {self.kind!r}")
        if self.severity not in get_args(NoticeSeverity):
            raise ValueError(
                f"a notice's severity is one of {get_args(NoticeSeverity)}, not {self.severity!r}"
            )
        if not isinstance(self.at, dt.datetime):
            raise TypeError(f"a notice's at is a datetime, not {type(self.at).__name__}")
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("a notice's at is timezone-aware")
        if not isinstance(self.detail, Mapping):
            raise TypeError(f"a notice's detail is a mapping, not {type(self.detail).__name__}")
        if len(self.detail) > MAX_DETAIL_ITEMS:
            raise ValueError(f"a notice's detail holds at most {MAX_DETAIL_ITEMS} items")
        for key, value in self.detail.items():
            _text("detail key", key, max_chars=MAX_DETAIL_KEY_CHARS, pattern=_CODE)
            _check_scalar(key, value)
        object.__setattr__(self, "detail", MappingProxyType(dict(self.detail)))


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _check_scalar(key: str, value: object) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if len(value) > MAX_DETAIL_VALUE_CHARS:
            raise ValueError(f"the detail {key} holds at most {MAX_DETAIL_VALUE_CHARS} characters")
    elif isinstance(value, int):
        if not -_MAX_INT <= value < _MAX_INT:
            raise ValueError(f"the detail {key} is a 64-bit integer")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the detail {key} is a finite number")
    else:
        raise TypeError(f"the detail {key} is a str, int, float, bool or None, not {type(value).__name__}")


def flatten_detail(evidence: Mapping[str, object], *, max_items: int = MAX_DETAIL_ITEMS) -> dict[str, Scalar]:
    """``evidence`` as a notice's detail: nested mappings and sequences as dotted keys (``dst.port``,
    ``hits.0``), keys cut to the key pattern, long strings cut, other values as their ``str``. Past
    ``max_items`` the rest is left out and ``_omitted`` says how many leaves were."""
    leaves: list[tuple[str, object]] = []

    def walk(prefix: str, value: object, depth: int) -> None:
        if isinstance(value, Mapping) and depth < 8:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner, depth + 1)
        elif isinstance(value, list | tuple) and depth < 8:
            for index, inner in enumerate(value):
                walk(f"{prefix}.{index}" if prefix else str(index), inner, depth + 1)
        else:
            leaves.append((prefix or "value", value))

    walk("", evidence, 0)
    flat: dict[str, Scalar] = {}
    keep = leaves if len(leaves) <= max_items else leaves[: max_items - 1]
    for raw_key, value in keep:
        key = re.sub(r"[^A-Za-z0-9_.:-]", "_", raw_key)[:MAX_DETAIL_KEY_CHARS]
        try:
            _check_scalar(key, value)
            flat[key] = value  # type: ignore[assignment]  # a Scalar: checked just now
        except (TypeError, ValueError):
            flat[key] = _clip(str(value), MAX_DETAIL_VALUE_CHARS)
    if len(keep) < len(leaves):
        flat["_omitted"] = len(leaves) - len(keep)
    return flat


class NoticeSink(Protocol):
    """Sends one notice; raises ``TransportError`` (try again later) or ``InvalidInput`` (never again)."""

    async def send(self, notice: Notice) -> None: ...


# --- the pure part: formats --------------------------------------------------------------------------------


def _utc_millis(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def notice_body(notice: Notice) -> bytes:
    """The webhook body: ``fleetward-notice-v1`` as compact JSON with sorted keys, UTF-8."""
    document = {
        "format": NOTICE_FORMAT,
        "tenant_id": notice.tenant_id,
        "kind": notice.kind,
        "id": notice.id,
        "at": _utc_millis(notice.at),
        "device_id": notice.device_id,
        "code": notice.code,
        "severity": notice.severity,
        "summary": notice.summary,
        "detail": dict(notice.detail),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cef_header_escape(value: str) -> str:
    """A CEF header field: ``\\`` and ``|`` escaped; line breaks and other control characters as spaces
    (a header field may hold none)."""
    return _CONTROL.sub(" ", value.replace("\\", "\\\\").replace("|", "\\|"))


def cef_value_escape(value: str) -> str:
    """A CEF extension value: ``\\`` and ``=`` escaped, line breaks as ``\\n`` and ``\\r``, other control
    characters as spaces."""
    escaped = value.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r").replace("\n", "\\n")
    return _CONTROL.sub(" ", escaped)


class _Escape(Protocol):
    def __call__(self, value: str, /) -> str: ...


def _fit(text: str, escape: _Escape, budget: int) -> str:
    """The longest start of ``text`` that, escaped and marked cut (``…``), takes at most ``budget`` bytes."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if len(escape(text[:middle] + "…").encode()) <= budget:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…" if len(escape("…").encode()) <= budget else ""


def _cut_bytes(text: str, budget: int) -> str:
    """``text`` cut to ``budget`` UTF-8 bytes, on a character boundary, without a dangling escape."""
    cut = text.encode()[: max(budget, 0)].decode("utf-8", "ignore")
    trailing = len(cut) - len(cut.rstrip("\\"))
    return cut[:-1] if trailing % 2 else cut


def format_cef(notice: Notice, *, version: str = __version__, max_bytes: int | None = None) -> str:
    """``notice`` as one CEF:0 event, at most ``max_bytes`` UTF-8 bytes when given.

    ``CEF:0|fleetward|fleetward|<version>|<code>|<summary>|<severity>|<extension>`` where the severity is
    :data:`CEF_SEVERITY` of the notice's and the extension holds, in this order: ``rt`` (the notice's time,
    milliseconds since the epoch), ``externalId`` (the notice id), ``cat`` (``alert`` or ``action``),
    ``deviceExternalId`` (the device, when there is one), ``act`` (the action's code, for actions),
    ``cs1Label=tenant cs1=<tenant id>`` and last ``cs2Label=evidence cs2=<the detail as compact JSON>``.
    What does not fit is cut from the evidence first, then from the summary, each marked with ``…``.
    """
    millis = (notice.at - _EPOCH) // dt.timedelta(milliseconds=1)
    fixed: list[tuple[str, str]] = [("rt", str(millis)), ("externalId", notice.id), ("cat", notice.kind)]
    if notice.device_id is not None:
        fixed.append(("deviceExternalId", notice.device_id))
    if notice.kind == "action":
        fixed.append(("act", notice.code))
    fixed += [("cs1Label", "tenant"), ("cs1", notice.tenant_id), ("cs2Label", "evidence")]
    evidence = json.dumps(dict(notice.detail), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    evidence = _clip(evidence, MAX_CEF_EVIDENCE_CHARS)
    prefix = "|".join(
        ("CEF:0", "fleetward", "fleetward", cef_header_escape(version[:63]), cef_header_escape(notice.code))
    )
    extension = " ".join(f"{key}={cef_value_escape(value)}" for key, value in fixed)

    def render(name: str, evidence: str) -> str:
        header = f"{prefix}|{cef_header_escape(name)}|{CEF_SEVERITY[notice.severity]}|"
        return f"{header}{extension} cs2={cef_value_escape(evidence)}"

    text = render(notice.summary, evidence)
    if max_bytes is None or len(text.encode()) <= max_bytes:
        return text
    room = max_bytes - len(render(notice.summary, "").encode())
    if room > 0:
        return render(notice.summary, _fit(evidence, cef_value_escape, room))
    room = max_bytes - len(render("", "").encode())
    if room > 0:
        return render(_fit(notice.summary, cef_header_escape, room), "")
    return _cut_bytes(render("", ""), max_bytes)


def _printable(value: str, max_chars: int) -> str:
    kept = "".join(char if "!" <= char <= "~" else "_" for char in value)[:max_chars]
    return kept or "-"


def check_app_name(app_name: str) -> str:
    if not isinstance(app_name, str):
        raise TypeError("a syslog app name is a str")
    if not re.fullmatch(r"[\x21-\x7e]{1,48}", app_name):
        raise ValueError("a syslog app name is 1 to 48 printable ASCII characters without spaces")
    return app_name


def _check_facility(facility: int) -> int:
    if not isinstance(facility, int) or isinstance(facility, bool):
        raise TypeError("a syslog facility is an int")
    if not 0 <= facility <= 23:
        raise ValueError(f"a syslog facility is 0 to 23, not {facility}")
    return facility


def format_syslog(
    notice: Notice,
    *,
    hostname: str,
    app_name: str = "fleetward",
    facility: int = 16,
    version: str = __version__,
    max_bytes: int | None = None,
) -> bytes:
    """``notice`` as one RFC 5424 syslog message (unframed), at most ``max_bytes`` bytes when given.

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID - MSG``: PRI from ``facility`` (16, local0, unless told)
    and :data:`SYSLOG_SEVERITY`; TIMESTAMP the notice's time in UTC to the millisecond; MSGID the kind
    (``alert`` or ``action``); no structured data; MSG the CEF event of :func:`format_cef`, after a UTF-8
    byte order mark when it is not plain ASCII (RFC 5424 6.4). ``hostname`` is cut to printable ASCII.
    """
    check_app_name(app_name)
    _check_facility(facility)
    if max_bytes is not None and max_bytes < MIN_SYSLOG_BYTES:
        raise ValueError(f"a syslog message may hold at least {MIN_SYSLOG_BYTES} bytes, not {max_bytes}")
    priority = facility * 8 + SYSLOG_SEVERITY[notice.severity]
    header = (
        f"<{priority}>1 {_utc_millis(notice.at)} {_printable(hostname, 255)} {app_name} - {notice.kind} - "
    ).encode("ascii")
    budget = None if max_bytes is None else max_bytes - len(header) - 3
    cef = format_cef(notice, version=version, max_bytes=budget)
    bom = b"" if cef.isascii() else b"\xef\xbb\xbf"
    return header + bom + cef.encode()


# --- webhooks ----------------------------------------------------------------------------------------------


class WebhookRefused(InvalidInput):
    """The webhook's receiver refused the request as it stands (a 3xx or 4xx other than 408 and 429).

    An ``InvalidInput``, not a ``TransportError``: the same request gets the same answer, so it is never
    retried (a retry would also hold up every notice queued behind it). Not a ``SecurityRefusal``: that is
    for unsafe data fleetward *received*; here a peer refused what fleetward sent. Not a
    ``ConfigurationError``: fleetward runs; one sink's URL or secret is wrong, which ``code`` tells
    (``webhook_redirected``, ``webhook_unauthorized``, ``webhook_not_found``, ``webhook_too_large``,
    ``webhook_refused``) and ``status`` shows.
    """

    default_code = "webhook_refused"

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


_REFUSAL_CODES: Mapping[int, str] = MappingProxyType(
    {
        401: "webhook_unauthorized",
        403: "webhook_unauthorized",
        404: "webhook_not_found",
        410: "webhook_not_found",
    }
    | {413: "webhook_too_large"}
)
_RETRYABLE_STATUSES = frozenset({408, 425, 429})


def signature_header(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 under ``secret`` of ``timestamp + "." + body``."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes, timestamp: str, body: bytes, header: str, now: dt.datetime, tolerance_seconds: float = 300
) -> bool:
    """Whether ``header`` (``X-Fleetward-Signature``) signs ``body`` at ``timestamp``
    (``X-Fleetward-Timestamp``) under ``secret``, and that timestamp is within ``tolerance_seconds`` of
    ``now`` either way (older is a replay). Malformed headers are ``False``, never an exception."""
    if now.tzinfo is None:
        raise ValueError("verify_signature needs a timezone-aware now")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp) or not re.fullmatch(r"sha256=[0-9a-f]{64}", header):
        return False
    if abs(now.timestamp() - int(timestamp)) > tolerance_seconds:
        return False
    return hmac.compare_digest(signature_header(secret, timestamp, body), header)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookSink:
    """POSTs each notice to ``url`` as signed JSON (see the module's docstring); 2xx is delivered.

    5xx, 408, 425, 429, a timeout (``timeout_seconds`` for the whole exchange) and a network or TLS failure
    raise ``TransportError`` (``ServerError`` for 5xx); other answers raise :class:`WebhookRefused`; a body
    over ``max_body_bytes`` raises ``PayloadTooLarge``. At most ``max_response_bytes`` of an answer are read.
    Messages name the receiver's scheme, host and port only: a URL's path often holds a token, and the
    secret appears nowhere. Proxies and CAs come from the arguments, not the environment; ``ssl_context``
    (trusted CAs) applies when no ``transport`` is given.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        timeout_seconds: float = 10.0,
        max_body_bytes: int = 64 * 1024,
        max_response_bytes: int = 4096,
        transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(secret, bytes):
            raise TypeError("a webhook secret is bytes")
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"a webhook secret holds at least {_MIN_SECRET_BYTES} bytes")
        _positive("timeout_seconds", timeout_seconds, fraction=True)
        _positive("max_body_bytes", max_body_bytes)
        _positive("max_response_bytes", max_response_bytes)
        if transport is not None and ssl_context is not None:
            raise ValueError("give a webhook sink a transport or an ssl_context, not both")
        self._url, self._where = _webhook_url(url)
        self._secret = secret
        self._timeout = timeout_seconds
        self._max_body_bytes = max_body_bytes
        self._max_response_bytes = max_response_bytes
        self._clock = clock or SystemClock()
        self._client = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(verify=ssl_context or True, retries=0),
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": f"fleetward/{__version__}", "Accept-Encoding": "identity"},
        )

    def __repr__(self) -> str:
        return f"WebhookSink({self._where})"

    async def send(self, notice: Notice) -> None:
        body = notice_body(notice)
        if len(body) > self._max_body_bytes:
            raise PayloadTooLarge(
                f"notice {notice.id} takes {len(body)} bytes; the webhook sink sends at most "
                f"{self._max_body_bytes}",
                code="notice_too_large",
            )
        timestamp = str(int(self._clock.now().timestamp()))
        headers = {
            "Content-Type": "application/json",
            "X-Fleetward-Notice-Id": notice.id,
            "X-Fleetward-Timestamp": timestamp,
            "X-Fleetward-Signature": signature_header(self._secret, timestamp, body),
        }
        # Third-party errors stop here, without their cause chained: httpx's may name the full URL.
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client.stream("POST", self._url, content=body, headers=headers) as response,
            ):
                status = response.status_code
                await self._read_bounded(response)
        except (TimeoutError, httpx.TimeoutException):
            raise TransportError(
                f"webhook {self._where} did not answer within {self._timeout} s", code="webhook_timeout"
            ) from None
        except httpx.HTTPError as error:
            raise TransportError(
                f"could not reach webhook {self._where}: {type(error).__name__}", code="unreachable"
            ) from None
        self._judge(status)

    async def _read_bounded(self, response: httpx.Response) -> None:
        """Read at most ``max_response_bytes`` of the answer (so that the connection may be kept) and no
        more: leaving the stream unread closes the connection instead."""
        received = 0
        chunks = response.aiter_raw()
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received >= self._max_response_bytes:
                    return
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # an async generator

    def _judge(self, status: int) -> None:
        if 200 <= status < 300:
            return
        if status in _RETRYABLE_STATUSES:
            raise TransportError(f"webhook {self._where} answered {status}: busy", code="webhook_busy")
        if 300 <= status < 500:
            code = "webhook_redirected" if status < 400 else _REFUSAL_CODES.get(status, "webhook_refused")
            raise WebhookRefused(f"webhook {self._where} answered {status}", status=status, code=code)
        raise ServerError(f"webhook {self._where} answered {status}", code="webhook_server_error")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> WebhookSink:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _webhook_url(url: str) -> tuple[str, str]:
    """``url`` checked, and what messages may say of it: scheme, host and port."""
    if not isinstance(url, str):
        raise TypeError("a webhook URL is a str")
    if len(url) > _MAX_URL_CHARS:
        raise InvalidInput(f"a webhook URL holds at most {_MAX_URL_CHARS} characters", code="webhook_url")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidInput("the webhook URL is not a URL", code="webhook_url") from None
    host = parsed.host
    if parsed.scheme not in ("https", "http") or not host:
        raise InvalidInput("a webhook URL is https://host/…", code="webhook_url")
    shown_host = f"[{host}]" if ":" in host else host
    where = f"{parsed.scheme}://{shown_host}" + (f":{parsed.port}" if parsed.port else "")
    if parsed.userinfo:
        raise InvalidInput(
            f"the webhook URL for {where} holds credentials; the signature authenticates", code="webhook_url"
        )
    if parsed.scheme == "http" and not _is_loopback(host):
        raise InvalidInput(
            f"the webhook {where} needs https (plain http only to loopback)", code="webhook_url"
        )
    return url, where


def _positive(name: str, value: object, *, fraction: bool = False) -> None:
    kinds = (int, float) if fraction else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'a number' if fraction else 'an int'}, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


# --- syslog ------------------------------------------------------------------------------------------------

SyslogTransport = Literal["udp", "tcp", "tls"]


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.failed = False

    def error_received(self, exc: Exception) -> None:
        self.failed = True  # an ICMP refusal of an earlier datagram: open a new endpoint next time

    def connection_lost(self, exc: Exception | None) -> None:
        self.failed = True


class SyslogCefSink:
    """Sends each notice as an RFC 5424 message carrying CEF (:func:`format_syslog`) to ``host:port``.

    ``udp``: one datagram of at most ``max_datagram_bytes`` (cut to fit). ``tcp``/``tls``: an octet-counted
    frame (RFC 6587) of at most ``max_message_bytes`` on one kept connection; ``tls`` verifies the
    collector with ``ssl_context`` (the system's CAs unless given). A connection the collector closed, or
    one that fails, is opened again once within the same send; failing again raises ``TransportError``.
    Every connect and write waits at most ``timeout_seconds``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        transport: SyslogTransport = "tls",
        ssl_context: ssl.SSLContext | None = None,
        app_name: str = "fleetward",
        facility: int = 16,
        hostname: str | None = None,
        timeout_seconds: float = 10.0,
        max_message_bytes: int = 8192,
        max_datagram_bytes: int = 2048,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError("a syslog host is a non-empty str")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"a syslog port is 1 to 65535, not {port!r}")
        if transport not in get_args(SyslogTransport):
            raise ValueError(f"a syslog transport is one of {get_args(SyslogTransport)}, not {transport!r}")
        if ssl_context is not None and transport != "tls":
            raise ValueError("an ssl_context is for the tls transport only")
        _positive("timeout_seconds", timeout_seconds, fraction=True)
        for name, bound in (
            ("max_message_bytes", max_message_bytes),
            ("max_datagram_bytes", max_datagram_bytes),
        ):
            _positive(name, bound)
            if bound < MIN_SYSLOG_BYTES:
                raise ValueError(f"{name} is at least {MIN_SYSLOG_BYTES}, not {bound}")
        self._host, self._port, self._transport = host, port, transport
        self._ssl = (ssl_context or ssl.create_default_context()) if transport == "tls" else None
        self._app_name = check_app_name(app_name)
        self._facility = _check_facility(facility)
        self._hostname = hostname if hostname is not None else socket.gethostname()
        self._timeout = timeout_seconds
        self._max_bytes = max_datagram_bytes if transport == "udp" else max_message_bytes
        self._lock = asyncio.Lock()
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._datagrams: tuple[asyncio.DatagramTransport, _Datagrams] | None = None

    def __repr__(self) -> str:
        return f"SyslogCefSink({self._transport}://{self._host}:{self._port})"

    def format(self, notice: Notice) -> bytes:
        """The message this sink sends for ``notice``, unframed."""
        return format_syslog(
            notice,
            hostname=self._hostname,
            app_name=self._app_name,
            facility=self._facility,
            max_bytes=self._max_bytes,
        )

    async def send(self, notice: Notice) -> None:
        message = self.format(notice)
        async with self._lock:
            if self._transport == "udp":
                await self._send_datagram(message)
            else:
                await self._send_frame(str(len(message)).encode() + b" " + message)

    async def _send_datagram(self, message: bytes) -> None:
        for attempt in (1, 2):
            try:
                if self._datagrams is None or self._datagrams[1].failed:
                    await self._drop()
                    async with asyncio.timeout(self._timeout):
                        self._datagrams = await asyncio.get_running_loop().create_datagram_endpoint(
                            _Datagrams, remote_addr=(self._host, self._port)
                        )
                self._datagrams[0].sendto(message)
                return
            except (OSError, TimeoutError) as error:
                await self._drop()
                if attempt == 2:
                    raise self._failure(error) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_frame(self, frame: bytes) -> None:
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._timeout):
                    if self._stream is not None:
                        await asyncio.sleep(0)  # let the loop take in a close the collector sent meanwhile
                    if self._stream is None or not self._alive(*self._stream):
                        await self._drop()
                        self._stream = await asyncio.open_connection(
                            self._host,
                            self._port,
                            ssl=self._ssl,
                            server_hostname=self._host if self._ssl else None,
                        )
                    writer = self._stream[1]
                    writer.write(frame)
                    await writer.drain()
                return
            except (OSError, TimeoutError) as error:  # ssl.SSLError is an OSError
                await self._drop()
                if attempt == 2:
                    raise self._failure(error) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Whether the collector still has the connection as far as this side knows (it never sends, so an
        end of stream means it closed its side)."""
        return not (writer.is_closing() or reader.at_eof() or reader.exception() is not None)

    def _failure(self, error: BaseException) -> TransportError:
        what = "did not answer in time" if isinstance(error, TimeoutError) else type(error).__name__
        return TransportError(
            f"could not send to syslog {self._transport}://{self._host}:{self._port}: {what}",
            code="unreachable",
        )

    async def _drop(self) -> None:
        if self._datagrams is not None:
            self._datagrams[0].close()
            self._datagrams = None
        if self._stream is not None:
            writer = self._stream[1]
            self._stream = None
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await writer.wait_closed()

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()

    async def __aenter__(self) -> SyslogCefSink:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# --- delivery in the background ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryFailure:
    """A notice a :class:`RetryingSink` gave up on, and why."""

    notice_id: str
    code: str
    message: str
    attempts: int


class RetryingSink:
    """A bounded queue in front of ``inner``, delivered in order by a task of its own (``async with``).

    :meth:`offer` queues a notice, or returns ``False`` and counts it in ``dropped`` when ``max_pending``
    are waiting (the caller records that). Each notice gets up to ``attempts`` sends: after a
    ``TransportError`` the next waits ``backoff_seconds``, doubled each time up to ``max_backoff_seconds``;
    any other ``FleetwardError`` is final. Either way a notice given up on counts in ``failed`` and
    appears in :attr:`recent_failures`, and the next one waits behind a retried one (order is kept). On
    leaving the block, what is queued gets ``close_timeout_seconds`` to go; the rest counts in
    ``abandoned``. ``inner`` stays the caller's to close. An error that is not a ``FleetwardError`` (a bug)
    stops the task and is raised on leaving the block.
    """

    def __init__(
        self,
        inner: NoticeSink,
        *,
        attempts: int = 5,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        max_pending: int = 1000,
        close_timeout_seconds: float = 5.0,
        max_failures_kept: int = 100,
    ) -> None:
        _positive("attempts", attempts)
        _positive("backoff_seconds", backoff_seconds, fraction=True)
        _positive("max_backoff_seconds", max_backoff_seconds, fraction=True)
        _positive("max_pending", max_pending)
        _positive("close_timeout_seconds", close_timeout_seconds, fraction=True)
        _positive("max_failures_kept", max_failures_kept)
        self._inner = inner
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._close_timeout = close_timeout_seconds
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=max_pending)
        self._failures: deque[DeliveryFailure] = deque(maxlen=max_failures_kept)
        self._task: asyncio.Task[None] | None = None
        self._in_flight = False
        self._closed = False
        self._delivered = self._failed = self._dropped = self._abandoned = 0

    @property
    def delivered(self) -> int:
        return self._delivered

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def abandoned(self) -> int:
        return self._abandoned

    @property
    def pending(self) -> int:
        """Notices queued or being sent."""
        return self._queue.qsize() + self._in_flight

    @property
    def recent_failures(self) -> tuple[DeliveryFailure, ...]:
        return tuple(self._failures)

    def offer(self, notice: Notice) -> bool:
        """Queue ``notice``; ``False`` (and one more ``dropped``) when the queue is full or closed."""
        if self._closed:
            self._dropped += 1
            return False
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self._dropped += 1
            return False
        return True

    async def flush(self) -> None:
        """Wait until every notice offered so far was delivered or given up on."""
        if self._task is None:
            raise RuntimeError("a RetryingSink delivers only inside its async with block")
        join = asyncio.ensure_future(self._queue.join())
        try:
            await asyncio.wait({join, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            join.cancel()
        if self._task.done():
            self._task.result()  # the bug that stopped it

    async def __aenter__(self) -> RetryingSink:
        if self._task is not None or self._closed:
            raise RuntimeError("a RetryingSink runs once")
        self._task = asyncio.create_task(self._run(), name="fleetward-notice-delivery")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        task = self._task
        assert task is not None
        join = asyncio.ensure_future(self._queue.join())
        try:
            await asyncio.wait({join, task}, timeout=self._close_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            join.cancel()
        task.cancel()
        await asyncio.wait({task})  # not ``await task``: that would take this task's own cancellation
        self._abandoned += self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._abandoned:
            logger.warning("notice delivery closed with %d notices not sent", self._abandoned)
        bug = None if task.cancelled() else task.exception()
        if bug is not None and exc is None:
            raise bug

    async def _run(self) -> None:
        while True:
            notice = await self._queue.get()
            self._in_flight = True
            try:
                await self._deliver(notice)
            except asyncio.CancelledError:
                self._abandoned += 1
                raise
            except BaseException:
                self._failed += 1  # a bug: counted, and raised when the block is left
                raise
            finally:
                self._in_flight = False
                self._queue.task_done()

    async def _deliver(self, notice: Notice) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                await self._inner.send(notice)
            except TransportError as error:
                if attempt == self._attempts:
                    self._give_up(notice, error, attempt)
                    return
                await asyncio.sleep(min(self._backoff * 2 ** (attempt - 1), self._max_backoff))
            except FleetwardError as error:
                self._give_up(notice, error, attempt)
                return
            else:
                self._delivered += 1
                return

    def _give_up(self, notice: Notice, error: FleetwardError, attempts: int) -> None:
        self._failed += 1
        self._failures.append(DeliveryFailure(notice.id, error.code, error.message, attempts))
        logger.warning(
            "notice %s not delivered after %d attempts: %s (%s)", notice.id, attempts, error, error.code
        )


class RecordingSink:
    """The in-memory fake: keeps what it was sent in ``notices``. Each of ``failures`` (in order) is raised
    by one send instead of keeping the notice, so that retries and refusals can be scripted."""

    def __init__(self, failures: Iterable[FleetwardError] = ()) -> None:
        self.notices: list[Notice] = []
        self.attempts = 0
        self._failures = deque(failures)
        self.closed = False

    async def send(self, notice: Notice) -> None:
        self.attempts += 1
        if self._failures:
            raise self._failures.popleft()
        self.notices.append(notice)

    async def aclose(self) -> None:
        self.closed = True


def check_webhook_url(url: str) -> str:
    """Refuse (``InvalidInput``) a URL a :class:`WebhookSink` would not send to, before it is stored;
    return what may be said of it (scheme, host and port: a path often holds a token)."""
    return _webhook_url(url)[1]
