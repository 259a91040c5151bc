"""Where the monitor's notices go out: the formats (JSON body, CEF, RFC 5424) as pure functions, the webhook
against a real HTTPS server, syslog against real UDP, TCP and TLS collectors, and the retrying queue."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st

from fleetward.errors import FleetwardError, InvalidInput, PayloadTooLarge, ServerError, TransportError
from fleetward.monitor.sinks import (
    CEF_SEVERITY,
    MAX_DETAIL_ITEMS,
    MAX_SUMMARY_CHARS,
    Notice,
    RecordingSink,
    RetryingSink,
    SyslogCefSink,
    SyslogTransport,
    WebhookRefused,
    WebhookSink,
    flatten_detail,
    format_cef,
    format_syslog,
    notice_body,
    signature_header,
    verify_signature,
)
from fleetward.service_tls import ServiceTls, ensure_service_tls
from tests.waiting import eventually

AT = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
SECRET = b"s3cr3t-webhook-key-\x01\x02-do-not-leak"
PATH_TOKEN = "T0KEN-in-the-path-xyz"


def make_notice(**changes: Any) -> Notice:
    values: dict[str, Any] = {
        "tenant_id": "tenant-1",
        "kind": "alert",
        "id": "alert-0001",
        "at": AT,
        "device_id": "device-7",
        "code": "undeclared_destination",
        "severity": "high",
        "summary": "device-7 connected to 203.0.113.9:443, which no manifest declares",
        "detail": {"dst": "203.0.113.9", "port": 443, "score": 0.93, "blocked": True, "app": None},
    }
    values.update(changes)
    return Notice(**values)


# --- a CEF and RFC 5424 reader, independent of the writer ---------------------------------------------------


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), value, flags=re.S)


def parse_cef(text: str) -> tuple[list[str], dict[str, str]]:
    """The six header fields after ``CEF:0`` (vendor, product, version, signature id, name, severity) and
    the extension of a CEF event, unescaped."""
    assert text.startswith("CEF:0|"), text[:20]
    fields: list[str] = []
    current: list[str] = []
    index = 0
    while len(fields) < 7:
        char = text[index]
        if char == "\\":
            current.append(text[index + 1])
            index += 2
        elif char == "|":
            fields.append("".join(current))
            current = []
            index += 1
        else:
            current.append(char)
            index += 1
    extension = text[index:]
    equals: list[int] = []
    index = 0
    while index < len(extension):
        if extension[index] == "\\":
            index += 2
            continue
        if extension[index] == "=":
            equals.append(index)
        index += 1
    keys: list[tuple[int, int, str]] = []
    for position in equals:
        found = re.search(r"(?:^| )([A-Za-z0-9_]+)$", extension[:position])
        assert found, f"an unescaped = inside a value: {extension!r}"
        keys.append((found.start(1), position, found.group(1)))
    pairs: dict[str, str] = {}
    for number, (_start, position, key) in enumerate(keys):
        end = keys[number + 1][0] - 1 if number + 1 < len(keys) else len(extension)
        assert key not in pairs
        pairs[key] = _unescape(extension[position + 1 : end])
    return fields[1:], pairs


SYSLOG = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (.*)", re.S)


def parse_syslog(message: bytes) -> tuple[int, list[str], str]:
    """PRI, the six header fields after the version, and the MSG (without its byte order mark)."""
    found = SYSLOG.fullmatch(message.decode("utf-8"))
    assert found, message[:120]
    text = found.group(8)
    return int(found.group(1)), list(found.groups()[1:7]), text.removeprefix("\ufeff")


# --- the notice ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"tenant_id": ""}, ValueError),
        ({"tenant_id": "has space"}, ValueError),
        ({"tenant_id": 7}, TypeError),
        ({"id": "x" * 129}, ValueError),
        ({"device_id": "dev\n1"}, ValueError),
        ({"code": "with|pipe"}, ValueError),
        ({"code": "c" * 65}, ValueError),
        ({"kind": "event"}, ValueError),
        ({"severity": "warning"}, ValueError),
        ({"summary": ""}, ValueError),
        ({"summary": "s" * (MAX_SUMMARY_CHARS + 1)}, ValueError),
        ({"at": dt.datetime(2026, 3, 1)}, ValueError),
        ({"at": "2026-03-01T00:00:00Z"}, TypeError),
        ({"detail": {"nested": {"a": 1}}}, TypeError),
        ({"detail": {"list": [1]}}, TypeError),
        ({"detail": {"bad key": 1}}, ValueError),
        ({"detail": {"nan": float("nan")}}, ValueError),
        ({"detail": {"huge": 2**64}}, ValueError),
        ({"detail": {"long": "v" * 1025}}, ValueError),
        ({"detail": {f"k{n}": n for n in range(MAX_DETAIL_ITEMS + 1)}}, ValueError),
    ],
)
def test_a_notice_refuses_what_it_cannot_carry(changes: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        make_notice(**changes)


def test_a_notice_copies_its_detail_so_the_caller_cannot_change_it_afterwards() -> None:
    detail: dict[str, Any] = {"port": 443}
    notice = make_notice(detail=detail)
    detail["port"] = 80
    assert notice.detail["port"] == 443
    with pytest.raises(TypeError):
        notice.detail["port"] = 22  # type: ignore[index]


def test_flatten_detail_makes_nested_evidence_flat_bounded_and_valid_for_a_notice() -> None:
    evidence = {
        "dst": {"ip": "203.0.113.9", "port": 443},
        "hits": [1, 2],
        "bad key!": "x" * 5000,
        "when": AT,
        "inf": float("inf"),
    }
    flat = flatten_detail(evidence)
    assert flat["dst.ip"] == "203.0.113.9"
    assert flat["dst.port"] == 443
    assert flat["hits.0"] == 1
    assert flat["hits.1"] == 2
    assert len(str(flat["bad_key_"])) == 1024
    assert str(flat["bad_key_"]).endswith("…")
    assert flat["when"] == str(AT)
    assert flat["inf"] == "inf"
    make_notice(detail=flat)

    many = flatten_detail({f"k{n}": n for n in range(100)}, max_items=10)
    assert len(many) == 10
    assert many["_omitted"] == 91
    make_notice(detail=many)


def test_the_webhook_body_is_the_documented_versioned_json() -> None:
    body = json.loads(notice_body(make_notice(summary="Zähler ☃")))
    assert body == {
        "format": "fleetward-notice-v1",
        "tenant_id": "tenant-1",
        "kind": "alert",
        "id": "alert-0001",
        "at": "2026-03-01T12:00:00.123Z",
        "device_id": "device-7",
        "code": "undeclared_destination",
        "severity": "high",
        "summary": "Zähler ☃",
        "detail": {"dst": "203.0.113.9", "port": 443, "score": 0.93, "blocked": True, "app": None},
    }


# --- CEF and syslog, pure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "header", "extension"),
    [
        (
            {},
            {"code": "undeclared_destination", "severity": "8"},
            {"cat": "alert", "deviceExternalId": "device-7"},
        ),
        ({}, {}, {"act": None}),
        ({"severity": "low"}, {"severity": "3"}, {}),
        ({"severity": "medium"}, {"severity": "5"}, {}),
        ({"severity": "critical"}, {"severity": "10"}, {}),
        ({"summary": r"a|b\c"}, {"name": r"a|b\c"}, {}),
        ({"summary": "line one\nline two\r"}, {"name": "line one line two "}, {}),
        ({"summary": "tab\tand\x00nul"}, {"name": "tab and nul"}, {}),
        ({"summary": "Gerät Überwachung ☃"}, {"name": "Gerät Überwachung ☃"}, {}),
        ({"detail": {"q": "a=b\\c\nd|e"}}, {}, {"cs2": '{"q":"a=b\\\\c\\nd|e"}'}),
        ({"device_id": None}, {}, {"deviceExternalId": None}),
        (
            {"kind": "action", "code": "quarantine"},
            {"code": "quarantine"},
            {"cat": "action", "act": "quarantine"},
        ),
        ({"id": "run=42"}, {}, {"externalId": "run=42"}),
    ],
)
def test_format_cef_escapes_maps_severity_and_names_the_fields(
    changes: dict[str, Any], header: dict[str, str], extension: dict[str, str | None]
) -> None:
    notice = make_notice(**changes)
    text = format_cef(notice, version="1.2.3")
    fields, pairs = parse_cef(text)
    assert fields[:3] == ["fleetward", "fleetward", "1.2.3"]
    named = dict(zip(("vendor", "product", "version", "code", "name", "severity"), fields, strict=True))
    assert "\n" not in text
    assert "\r" not in text
    for name, expected in header.items():
        assert named[name] == expected, name
    for key, value in extension.items():
        assert pairs.get(key) == value
    assert pairs["rt"] == str(int(AT.timestamp() * 1000))
    assert pairs["externalId"] == notice.id
    assert (pairs["cs1Label"], pairs["cs1"], pairs["cs2Label"]) == ("tenant", "tenant-1", "evidence")
    assert json.loads(pairs["cs2"]) == dict(notice.detail)


safe_text = st.text(
    st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from("\\|=\n\r "), max_size=300
)


@given(
    summary=safe_text.filter(bool),
    values=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), safe_text, max_size=8),
)
def test_cef_round_trips_any_summary_and_detail(summary: str, values: dict[str, str]) -> None:
    notice = make_notice(summary=summary, detail=values)
    fields, pairs = parse_cef(format_cef(notice))
    assert fields[4] == re.sub(r"[\r\n]", " ", summary)
    assert json.loads(pairs["cs2"]) == values


@given(
    summary=safe_text.filter(bool),
    values=st.dictionaries(
        st.from_regex(r"[a-z]{1,8}", fullmatch=True), safe_text, max_size=MAX_DETAIL_ITEMS
    ),
    bound=st.integers(min_value=480, max_value=4096),
)
def test_a_syslog_message_cut_to_its_bound_still_parses(
    summary: str, values: dict[str, str], bound: int
) -> None:
    notice = make_notice(summary=summary, detail=values)
    message = format_syslog(notice, hostname="collector-side", max_bytes=bound)
    assert len(message) <= bound
    _priority, header, text = parse_syslog(message)
    fields, pairs = parse_cef(text)
    assert fields[3] == notice.code
    assert pairs["externalId"] == notice.id
    assert pairs["cs1"] == "tenant-1"
    assert header[1] == "collector-side"


def test_cutting_marks_the_evidence_first_then_the_summary() -> None:
    notice = make_notice(summary="s" * 400, detail={f"k{n}": "v" * 500 for n in range(20)})
    whole = format_syslog(notice, hostname="h")
    assert len(parse_cef(parse_syslog(whole)[2])[1]["cs2"]) == 4000, "cut at CEF's bound for a custom string"
    cut = format_syslog(notice, hostname="h", max_bytes=1400)
    fields, pairs = parse_cef(parse_syslog(cut)[2])
    assert fields[4] == "s" * 400, "the summary is whole while cutting the evidence is enough"
    assert pairs["cs2"].endswith("…")
    assert len(cut) <= 1400

    tight = format_syslog(notice, hostname="h", max_bytes=480)
    fields, pairs = parse_cef(parse_syslog(tight)[2])
    assert fields[4].endswith("…")
    assert pairs["cs2"] == ""
    assert len(tight) <= 480


@pytest.mark.parametrize(
    ("severity", "facility", "priority"),
    [("critical", 16, 130), ("high", 16, 131), ("medium", 16, 132), ("low", 16, 133), ("high", 4, 35)],
)
def test_format_syslog_sets_priority_timestamp_and_msgid(severity: str, facility: int, priority: int) -> None:
    message = format_syslog(
        make_notice(severity=severity), hostname="fleet ward\n01", app_name="fw", facility=facility
    )
    found_priority, header, text = parse_syslog(message)
    assert found_priority == priority
    assert header == ["2026-03-01T12:00:00.123Z", "fleet_ward_01", "fw", "-", "alert", "-"]
    assert not message.startswith(b"\xef\xbb\xbf")
    assert b"\xef\xbb\xbf" not in message
    assert text.startswith("CEF:0|")


def test_format_syslog_marks_non_ascii_with_a_byte_order_mark_and_cuts_on_a_character() -> None:
    notice = make_notice(summary="☃" * 500, detail={})
    message = format_syslog(notice, hostname="h", max_bytes=600)
    assert b" - \xef\xbb\xbfCEF:0|" in message
    assert len(message) <= 600
    message.decode("utf-8")  # no character cut in half


@pytest.mark.parametrize(
    "call",
    [
        lambda: format_syslog(make_notice(), hostname="h", max_bytes=479),
        lambda: format_syslog(make_notice(), hostname="h", facility=24),
        lambda: format_syslog(make_notice(), hostname="h", app_name="two words"),
        lambda: format_syslog(make_notice(), hostname="h", app_name="a" * 49),
    ],
)
def test_format_syslog_refuses_settings_outside_rfc_5424(call: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError, match="syslog"):
        call()


# --- signatures ---------------------------------------------------------------------------------------------


def test_a_signature_verifies_and_anything_changed_or_stale_does_not() -> None:
    body = notice_body(make_notice())
    now = dt.datetime.now(dt.UTC)
    timestamp = str(int(now.timestamp()))
    header = signature_header(SECRET, timestamp, body)
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", header)
    assert verify_signature(SECRET, timestamp, body, header, now)
    assert verify_signature(SECRET, timestamp, body, header, now + dt.timedelta(seconds=299))
    assert not verify_signature(SECRET, timestamp, body + b" ", header, now), "a tampered body"
    assert not verify_signature(SECRET, timestamp, body.replace(b"high", b"low!"), header, now)
    assert not verify_signature(SECRET, str(int(timestamp) + 1), body, header, now), "a moved timestamp"
    assert not verify_signature(b"another-secret-of-16b", timestamp, body, header, now)
    assert not verify_signature(SECRET, timestamp, body, header, now + dt.timedelta(seconds=301)), "a replay"
    assert not verify_signature(SECRET, timestamp, body, header, now - dt.timedelta(seconds=301)), (
        "the future"
    )
    assert verify_signature(SECRET, timestamp, body, header, now + dt.timedelta(seconds=500), 600)
    for malformed in ("", "sha256=", header.upper(), "sha1=" + header[7:], header + "0"):
        assert not verify_signature(SECRET, timestamp, body, malformed, now)
    for bad_timestamp in ("", "-1", "1e9", " " + timestamp, "9" * 13):
        assert not verify_signature(SECRET, bad_timestamp, body, header, now)


# --- a real HTTPS receiver ----------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    delay_seconds: float = 0.0
    #: stream a body of up to this many 64 KiB chunks, stopping when the client goes away
    stream_chunks: int = 0


class Receiver:
    """An ASGI app that keeps every request and answers as scripted (200 when nothing is)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.answers: deque[Answer] = deque()
        self.streamed: list[tuple[int, bool]] = []  # (chunks sent, saw the client go)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
        self.requests.append(Received(scope["path"], headers, body))
        answer = self.answers.popleft() if self.answers else Answer()
        if answer.delay_seconds:
            await asyncio.sleep(answer.delay_seconds)
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        if not answer.stream_chunks:
            await send({"type": "http.response.body", "body": b"" if answer.status in (204, 304) else b"ok"})
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        sent = 0
        while not gone.is_set() and sent < answer.stream_chunks:
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            sent += 1
            await asyncio.sleep(0.005)
        watcher.cancel()
        self.streamed.append((sent, gone.is_set()))
        if not gone.is_set():
            await send({"type": "http.response.body", "body": b""})


@dataclass
class Https:
    app: Receiver
    url: str
    trust: ssl.SSLContext
    tls: ServiceTls


@pytest.fixture(scope="module")
def service_tls(tmp_path_factory: pytest.TempPathFactory) -> ServiceTls:
    return ensure_service_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https(service_tls: ServiceTls) -> Iterator[Https]:
    """A real uvicorn HTTPS server on a thread, with a certificate of a private CA."""
    app = Receiver()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        ssl_certfile=str(service_tls.certificate_file),
        ssl_keyfile=str(service_tls.private_key_file),
        log_level="critical",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="webhook-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the receiver stopped"
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    trust = ssl.create_default_context(cafile=str(service_tls.ca_file))
    yield Https(app, f"https://127.0.0.1:{port}/hooks/{PATH_TOKEN}", trust, service_tls)
    server.should_exit = True
    thread.join(timeout=30)


def webhook(https: Https, **options: Any) -> WebhookSink:
    return WebhookSink(https.url, SECRET, ssl_context=https.trust, **options)


async def test_a_webhook_delivers_signed_json_that_the_receiver_can_verify(https: Https) -> None:
    notice = make_notice()
    async with webhook(https) as sink:
        await sink.send(notice)
    [request] = https.app.requests
    assert request.path == f"/hooks/{PATH_TOKEN}"
    assert request.body == notice_body(notice)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-fleetward-notice-id"] == "alert-0001"
    timestamp = request.headers["x-fleetward-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    signature = request.headers["x-fleetward-signature"]
    now = dt.datetime.now(dt.UTC)
    assert verify_signature(SECRET, timestamp, request.body, signature, now)
    assert not verify_signature(SECRET, timestamp, request.body[:-1] + b" ", signature, now)
    assert not verify_signature(SECRET, timestamp, request.body, signature, now + dt.timedelta(seconds=400))
    assert SECRET.hex() not in str(request.headers)
    assert "s3cr3t" not in str(request.headers)


async def test_each_answer_is_delivered_retryable_or_final(https: Https) -> None:
    table: list[tuple[int, type[FleetwardError] | None, str | None]] = [
        (200, None, None),
        (202, None, None),
        (204, None, None),
        (500, ServerError, "webhook_server_error"),
        (503, ServerError, "webhook_server_error"),
        (429, TransportError, "webhook_busy"),
        (408, TransportError, "webhook_busy"),
        (400, WebhookRefused, "webhook_refused"),
        (401, WebhookRefused, "webhook_unauthorized"),
        (404, WebhookRefused, "webhook_not_found"),
        (413, WebhookRefused, "webhook_too_large"),
        (422, WebhookRefused, "webhook_refused"),
    ]
    async with webhook(https) as sink:
        for status, expected, code in table:
            https.app.answers.append(Answer(status))
            if expected is None:
                await sink.send(make_notice())
                continue
            with pytest.raises(expected) as raised:
                await sink.send(make_notice())
            assert type(raised.value) is expected, status
            assert raised.value.code == code
            retryable = isinstance(raised.value, TransportError)
            assert retryable == (status >= 500 or status in (408, 429)), status
            if isinstance(raised.value, WebhookRefused):
                assert isinstance(raised.value, InvalidInput)
                assert raised.value.status == status
    assert len(https.app.requests) == len(table)


async def test_a_500_is_retried_with_the_same_notice_and_then_delivered(https: Https) -> None:
    https.app.answers.extend([Answer(500), Answer(503), Answer(200)])
    async with webhook(https) as sink, RetryingSink(sink, attempts=4, backoff_seconds=0.01) as outbox:
        assert outbox.offer(make_notice())
        await outbox.flush()
        assert (outbox.delivered, outbox.failed) == (1, 0)
    first, second, third = https.app.requests
    assert first.body == second.body == third.body
    assert {r.headers["x-fleetward-notice-id"] for r in (first, second, third)} == {"alert-0001"}
    now = dt.datetime.now(dt.UTC)
    for request in (first, second, third):
        assert verify_signature(
            SECRET,
            request.headers["x-fleetward-timestamp"],
            request.body,
            request.headers["x-fleetward-signature"],
            now,
        )


async def test_a_400_is_not_retried(https: Https) -> None:
    https.app.answers.append(Answer(400))
    async with webhook(https) as sink, RetryingSink(sink, attempts=5, backoff_seconds=0.01) as outbox:
        outbox.offer(make_notice(id="refused"))
        outbox.offer(make_notice(id="next"))
        await outbox.flush()
        assert (outbox.delivered, outbox.failed) == (1, 1)
        [failure] = outbox.recent_failures
        assert (failure.notice_id, failure.code, failure.attempts) == ("refused", "webhook_refused", 1)
    assert [r.headers["x-fleetward-notice-id"] for r in https.app.requests] == ["refused", "next"]


async def test_a_redirect_is_not_followed(https: Https) -> None:
    elsewhere = https.url.replace(PATH_TOKEN, "elsewhere")
    https.app.answers.append(Answer(307, [(b"location", elsewhere.encode())]))
    async with webhook(https) as sink:
        with pytest.raises(WebhookRefused) as raised:
            await sink.send(make_notice())
    assert raised.value.code == "webhook_redirected"
    assert raised.value.status == 307
    assert [r.path for r in https.app.requests] == [f"/hooks/{PATH_TOKEN}"]


async def test_a_receiver_slower_than_the_timeout_is_a_transport_error(https: Https) -> None:
    https.app.answers.append(Answer(200, delay_seconds=3))
    started = time.monotonic()
    async with webhook(https, timeout_seconds=0.3) as sink:
        with pytest.raises(TransportError) as raised:
            await sink.send(make_notice())
    assert raised.value.code == "webhook_timeout"
    assert time.monotonic() - started < 2.5


async def test_only_a_bounded_part_of_an_answer_is_read(https: Https) -> None:
    https.app.answers.append(Answer(200, stream_chunks=2000))  # 125 MiB if read whole
    async with webhook(https, max_response_bytes=4096) as sink:
        await sink.send(make_notice())

    async def streamed() -> tuple[int, bool] | None:
        return https.app.streamed[0] if https.app.streamed else None

    sent, saw_the_client_go = await eventually(streamed, what="the receiver to stop streaming")
    assert saw_the_client_go
    assert sent < 2000


async def test_a_server_with_a_certificate_not_trusted_is_a_transport_error(https: Https) -> None:
    async with WebhookSink(https.url, SECRET) as sink:  # the system's CAs, which do not know the private CA
        with pytest.raises(TransportError) as raised:
            await sink.send(make_notice())
    assert raised.value.code == "unreachable"
    assert https.app.requests == []


async def test_a_body_over_the_bound_is_refused_before_sending(https: Https) -> None:
    big = make_notice(detail={f"k{n}": "v" * 1000 for n in range(20)})
    async with webhook(https, max_body_bytes=4096) as sink:
        with pytest.raises(PayloadTooLarge):
            await sink.send(big)
    assert https.app.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "http://10.0.0.1/hook",
        "http://[2001:db8::1]/hook",
        "ftp://127.0.0.1/hook",
        "https://user:pass@example.com/hook",
        "not a url",
        "https://" + "a" * 2100 + ".example/",
    ],
)
def test_a_webhook_url_that_is_not_https_or_loopback_http_is_refused_when_built(url: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        WebhookSink(url, SECRET)
    assert "pass" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://[::1]:9/hook", "https://example.com/"],
)
async def test_https_and_loopback_http_are_accepted(url: str) -> None:
    async with WebhookSink(url, SECRET):
        pass


def test_a_webhook_secret_is_bytes_of_at_least_16() -> None:
    with pytest.raises(TypeError):
        WebhookSink("https://example.com/", "a string secret of some length")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16 bytes"):
        WebhookSink("https://example.com/", b"short")


async def test_no_error_names_the_secret_or_the_path_of_the_url(https: Https) -> None:
    errors: list[BaseException] = []
    for status in (400, 401, 500, 307):
        https.app.answers.append(Answer(status, [(b"location", https.url.encode())]))
    async with webhook(https, timeout_seconds=0.5, max_body_bytes=2000) as sink:
        for _ in range(4):
            with pytest.raises(FleetwardError) as raised:
                await sink.send(make_notice())
            errors.append(raised.value)
        https.app.answers.append(Answer(200, delay_seconds=2))
        with pytest.raises(TransportError) as timed_out:
            await sink.send(make_notice())
        errors.append(timed_out.value)
        with pytest.raises(PayloadTooLarge) as too_large:
            await sink.send(make_notice(detail={f"k{n}": "v" * 1000 for n in range(5)}))
        errors.append(too_large.value)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with WebhookSink(f"https://127.0.0.1:{port}/hooks/{PATH_TOKEN}", SECRET) as unreachable:
        with pytest.raises(TransportError) as raised_unreachable:
            await unreachable.send(make_notice())
        errors.append(raised_unreachable.value)
    async with WebhookSink(https.url, SECRET) as untrusted:
        with pytest.raises(TransportError) as raised_untrusted:
            await untrusted.send(make_notice())
        errors.append(raised_untrusted.value)
    for refused_url in (f"http://example.com/hooks/{PATH_TOKEN}", f"https://u:{PATH_TOKEN}@example.com/"):
        with pytest.raises(InvalidInput) as raised_url:
            WebhookSink(refused_url, SECRET)
        errors.append(raised_url.value)
    assert len(errors) == 10
    for error in errors:
        assert isinstance(error, FleetwardError)
        for shown in (str(error), repr(error), error.code, repr(error.args)):
            for secret_form in (SECRET.decode("latin-1"), SECRET.hex(), "s3cr3t", PATH_TOKEN):
                assert secret_form not in shown, (type(error).__name__, shown)
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
    assert PATH_TOKEN not in repr(webhook(https))


# --- real syslog collectors ---------------------------------------------------------------------------------


class UdpCollector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams.put_nowait(data)


@pytest.fixture
async def udp_collector() -> AsyncIterator[tuple[UdpCollector, int]]:
    transport, collector = await asyncio.get_running_loop().create_datagram_endpoint(
        UdpCollector, local_addr=("127.0.0.1", 0)
    )
    yield collector, transport.get_extra_info("sockname")[1]
    transport.close()


class StreamCollector:
    """A TCP (or TLS) syslog collector that reads RFC 6587 octet-counted frames; it can stop and start again
    on the same port."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for writer in self._writers:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        self._writers.clear()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                length = await reader.readuntil(b" ")
                assert re.fullmatch(rb"[1-9][0-9]{0,5} ", length), length
                self.messages.put_nowait(await reader.readexactly(int(length)))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass


@pytest.fixture
async def tcp_collector() -> AsyncIterator[StreamCollector]:
    collector = StreamCollector()
    await collector.start()
    yield collector
    await collector.stop()


@pytest.fixture
async def tls_collector(service_tls: ServiceTls) -> AsyncIterator[StreamCollector]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(service_tls.certificate_file, service_tls.private_key_file)
    collector = StreamCollector(context)
    await collector.start()
    yield collector
    await collector.stop()


async def next_message(queue: asyncio.Queue[bytes]) -> bytes:
    async with asyncio.timeout(10):
        return await queue.get()


def assert_carries(message: bytes, notice: Notice) -> None:
    priority, header, text = parse_syslog(message)
    assert priority == 16 * 8 + {"low": 5, "medium": 4, "high": 3, "critical": 2}[notice.severity]
    assert header[2:5] == ["fleetward", "-", notice.kind]
    fields, pairs = parse_cef(text)
    assert fields[3:5] == [notice.code, notice.summary]
    assert pairs["externalId"] == notice.id
    assert pairs["cs1"] == notice.tenant_id
    assert json.loads(pairs["cs2"]) == dict(notice.detail)


async def test_syslog_over_udp_sends_one_datagram_per_notice_cut_to_the_bound(
    udp_collector: tuple[UdpCollector, int],
) -> None:
    collector, port = udp_collector
    small = make_notice()
    large = make_notice(id="large", detail={f"k{n}": "v" * 900 for n in range(10)})
    async with SyslogCefSink("127.0.0.1", port, transport="udp", max_datagram_bytes=1024) as sink:
        await sink.send(small)
        await sink.send(large)
    assert_carries(await next_message(collector.datagrams), small)
    datagram = await next_message(collector.datagrams)
    assert len(datagram) <= 1024
    _fields, pairs = parse_cef(parse_syslog(datagram)[2])
    assert pairs["externalId"] == "large"
    assert pairs["cs2"].endswith("…")


async def test_syslog_over_tcp_frames_by_octet_count_on_one_connection(
    tcp_collector: StreamCollector,
) -> None:
    notices = [
        make_notice(id=f"n{n}", summary=f"line\n{n} ☃ | = \\", severity=severity)
        for n, severity in enumerate(["low", "medium", "high", "critical"])
    ]
    async with SyslogCefSink("127.0.0.1", tcp_collector.port, transport="tcp", hostname="fw-1") as sink:
        for notice in notices:
            await sink.send(notice)
        for notice in notices:
            message = await next_message(tcp_collector.messages)
            _priority, header, text = parse_syslog(message)
            assert header[1] == "fw-1"
            fields, pairs = parse_cef(text)
            assert pairs["externalId"] == notice.id
            assert fields[4] == notice.summary.replace("\n", " ")
            assert fields[5] == str(CEF_SEVERITY[notice.severity])
    assert tcp_collector.connections == 1


async def test_syslog_over_tls_verifies_the_collector_and_delivers(
    tls_collector: StreamCollector, service_tls: ServiceTls
) -> None:
    trust = ssl.create_default_context(cafile=str(service_tls.ca_file))
    notice = make_notice(kind="action", code="quarantine", severity="critical")
    async with SyslogCefSink("127.0.0.1", tls_collector.port, transport="tls", ssl_context=trust) as sink:
        await sink.send(notice)
        assert_carries(await next_message(tls_collector.messages), notice)

    async with SyslogCefSink("127.0.0.1", tls_collector.port, transport="tls") as untrusting:
        with pytest.raises(TransportError) as raised:
            await untrusting.send(notice)
    assert "SSL" in str(raised.value)
    assert tls_collector.messages.empty()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_syslog_reconnects_after_the_collector_restarts_and_fails_when_it_is_gone(
    transport: SyslogTransport, service_tls: ServiceTls
) -> None:
    server_context: ssl.SSLContext | None = None
    client_context: ssl.SSLContext | None = None
    if transport == "tls":
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(service_tls.certificate_file, service_tls.private_key_file)
        client_context = ssl.create_default_context(cafile=str(service_tls.ca_file))
    collector = StreamCollector(server_context)
    await collector.start()
    sink = SyslogCefSink(
        "127.0.0.1",
        collector.port,
        transport=transport,
        ssl_context=client_context,
        timeout_seconds=2,
    )
    try:
        await sink.send(make_notice(id="before"))
        assert parse_cef(parse_syslog(await next_message(collector.messages))[2])[1]["externalId"] == "before"

        await collector.stop()
        await collector.start()  # the same port
        await sink.send(make_notice(id="after-restart"))
        message = await next_message(collector.messages)
        assert parse_cef(parse_syslog(message)[2])[1]["externalId"] == "after-restart"
        assert collector.connections == 2

        await collector.stop()
        with pytest.raises(TransportError) as raised:
            await sink.send(make_notice(id="nobody-listens"))
        assert raised.value.code == "unreachable"

        await collector.start()
        await sink.send(make_notice(id="back"))
        assert parse_cef(parse_syslog(await next_message(collector.messages))[2])[1]["externalId"] == "back"
    finally:
        await sink.aclose()
        await collector.stop()


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"port": 0}, ValueError),
        ({"port": 70000}, ValueError),
        ({"transport": "http"}, ValueError),
        ({"transport": "udp", "ssl_context": ssl.create_default_context()}, ValueError),
        ({"max_datagram_bytes": 100}, ValueError),
        ({"timeout_seconds": 0}, ValueError),
        ({"timeout_seconds": "1"}, TypeError),
        ({"facility": 30}, ValueError),
        ({"app_name": ""}, ValueError),
    ],
)
def test_a_syslog_sink_refuses_settings_it_cannot_run_with(
    arguments: dict[str, Any], error: type[Exception]
) -> None:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 6514} | arguments
    with pytest.raises(error):
        SyslogCefSink(**settings)


# --- the retrying queue -------------------------------------------------------------------------------------


class GatedSink:
    """Sends only once ``gate`` is open; ``entered`` is set when a send is waiting at it."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.notices: list[Notice] = []

    async def send(self, notice: Notice) -> None:
        self.entered.set()
        await self.gate.wait()
        self.notices.append(notice)


class TimedSink:
    """Fails ``failures`` times with a TransportError, noting when each attempt came."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.times: list[float] = []

    async def send(self, notice: Notice) -> None:
        self.times.append(time.monotonic())
        if len(self.times) <= self.failures:
            raise TransportError("not now")


async def test_retrying_keeps_order_while_one_notice_is_retried() -> None:
    inner = RecordingSink([TransportError("down"), TransportError("still down")])
    notices = [make_notice(id=f"n{n}") for n in range(5)]
    async with RetryingSink(inner, attempts=3, backoff_seconds=0.01) as outbox:
        for notice in notices:
            assert outbox.offer(notice)
        await outbox.flush()
        assert (outbox.delivered, outbox.failed, outbox.dropped, outbox.pending) == (5, 0, 0, 0)
    assert inner.notices == notices
    assert inner.attempts == 7


async def test_retrying_backs_off_exponentially_between_attempts() -> None:
    inner = TimedSink(failures=3)
    async with RetryingSink(inner, attempts=4, backoff_seconds=0.05, max_backoff_seconds=0.1) as outbox:
        outbox.offer(make_notice())
        await outbox.flush()
        assert outbox.delivered == 1
    gaps = [later - earlier for earlier, later in zip(inner.times, inner.times[1:], strict=False)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    assert gaps[2] >= 0.1
    assert gaps[2] < 1.0, "capped at max_backoff_seconds"


async def test_a_notice_that_keeps_failing_is_counted_and_kept_in_the_failures() -> None:
    inner = RecordingSink([TransportError("down", code="unreachable")] * 3 + [InvalidInput("no", code="bad")])
    async with RetryingSink(inner, attempts=3, backoff_seconds=0.01) as outbox:
        for name in ("exhausted", "refused", "fine"):
            outbox.offer(make_notice(id=name))
        await outbox.flush()
        assert (outbox.delivered, outbox.failed) == (1, 2)
        assert [(f.notice_id, f.code, f.attempts) for f in outbox.recent_failures] == [
            ("exhausted", "unreachable", 3),
            ("refused", "bad", 1),
        ]
    assert [notice.id for notice in inner.notices] == ["fine"]


async def test_a_full_queue_refuses_and_counts_the_drop_and_keeps_order() -> None:
    inner = GatedSink()
    async with RetryingSink(inner, max_pending=2, backoff_seconds=0.01) as outbox:
        assert outbox.offer(make_notice(id="n1"))
        await asyncio.wait_for(inner.entered.wait(), 5)  # n1 is being sent, the queue is empty
        assert outbox.offer(make_notice(id="n2"))
        assert outbox.offer(make_notice(id="n3"))
        assert not outbox.offer(make_notice(id="n4"))
        assert not outbox.offer(make_notice(id="n5"))
        assert (outbox.dropped, outbox.pending) == (2, 3)
        inner.gate.set()
        await outbox.flush()
        assert (outbox.delivered, outbox.dropped, outbox.pending) == (3, 2, 0)
        assert outbox.offer(make_notice(id="n6")), "room again"
        await outbox.flush()
    assert [notice.id for notice in inner.notices] == ["n1", "n2", "n3", "n6"]


async def test_what_is_not_sent_by_the_close_timeout_is_counted_abandoned() -> None:
    inner = GatedSink()
    outbox = RetryingSink(inner, max_pending=10, close_timeout_seconds=0.1)
    async with outbox:
        for n in range(3):
            outbox.offer(make_notice(id=f"n{n}"))
        await asyncio.wait_for(inner.entered.wait(), 5)
    assert (outbox.abandoned, outbox.delivered, outbox.pending) == (3, 0, 0)
    assert not outbox.offer(make_notice(id="late"))
    assert outbox.dropped == 1


async def test_a_bug_in_the_inner_sink_is_raised_when_the_block_is_left() -> None:
    class Broken:
        async def send(self, notice: Notice) -> None:
            raise RuntimeError("a bug")

    async def run(outbox: RetryingSink, *, flush: bool) -> None:
        async with outbox:
            outbox.offer(make_notice())
            if flush:
                await outbox.flush()

    for flush in (False, True):
        outbox = RetryingSink(Broken())
        with pytest.raises(RuntimeError, match="a bug"):
            await run(outbox, flush=flush)
        assert outbox.failed == 1


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"attempts": 0}, ValueError),
        ({"attempts": 1.5}, TypeError),
        ({"max_pending": 0}, ValueError),
        ({"backoff_seconds": -1}, ValueError),
        ({"max_pending": True}, TypeError),
    ],
)
def test_a_retrying_sink_refuses_limits_that_are_not_positive(
    arguments: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        RetryingSink(RecordingSink(), **arguments)


async def test_the_recording_sink_keeps_notices_and_raises_scripted_failures() -> None:
    sink = RecordingSink([TransportError("once")])
    with pytest.raises(TransportError):
        await sink.send(make_notice(id="a"))
    await sink.send(make_notice(id="b"))
    await sink.aclose()
    assert [n.id for n in sink.notices] == ["b"]
    assert sink.attempts == 2
    assert sink.closed
