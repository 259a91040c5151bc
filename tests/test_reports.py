"""Device reports: failures and baselines sent through the hub, kept, grouped by signature, and downloaded."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from fleetward.api import schemas
from fleetward.cli.main import app
from fleetward.errors import InvalidInput, NotFound, PayloadTooLarge
from fleetward.monitor.reports import MAX_FAILURE_REPORT_BYTES, failures_csv, parse_report
from fleetward.sim.fleet import SimulatedDevice
from fleetward.wire.baseline import REPORT_PROPERTY, ListeningPort, SecurityBaseline, Traffic
from fleetward.wire.reports import CrashReport
from tests.conftest import HubSetup, healthy_software, make_tenant

COMPONENT = "8f3e2a10-5b7c-4d9e-a1f2-0c3b4d5e6f70"
IMAGE = "ab" * 32
AT = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def crash(tail: str, *, exit_code: int | None = None, signal: int | None = 11) -> bytes:
    report = CrashReport(
        component_id=COMPONENT,
        image_sha256=IMAGE,
        exit_code=exit_code,
        signal=None if exit_code is not None else signal,
        error_tail=tail,
        occurred_at=AT,
        restart_count=0,
    )
    return report.model_dump_json().encode()


BASELINE = SecurityBaseline(
    collected_at=AT,
    interval_seconds=300,
    listening=(ListeningPort(protocol="tcp", address="127.0.0.1", port=8080),),
    traffic=Traffic(bytes_in=2048, bytes_out=1024, packets_in=4, packets_out=2),
)

# ============================================================================================ the pure part


def test_alike_crashes_share_a_signature_whatever_their_addresses_and_a_headline_tells_them() -> None:
    first = parse_report("crash", crash("starting\nsegfault at 0x7ffd1234 in worker 12\n"))
    second = parse_report("crash", crash("other output\nsegfault at 0x55aa0000 in worker 3"))
    other = parse_report("crash", crash("starting\nout of memory", exit_code=3))
    assert first.signature == second.signature != other.signature
    assert first.headline == "SIGSEGV: segfault at 0x? in worker <n>"
    assert other.headline == "exit 3: out of memory"
    assert first.component_id == COMPONENT


def test_a_baseline_is_kept_whole_and_has_no_signature() -> None:
    parsed = parse_report("security-baseline", BASELINE.model_dump_json().encode())
    assert parsed.signature is None
    assert SecurityBaseline.model_validate_json(parsed.body) == BASELINE
    assert parsed.headline == "1 listening, 0 connections, 0 blocked"


@pytest.mark.parametrize(
    ("kind", "body", "error", "code"),
    [
        ("bogus", b"{}", InvalidInput, "report_kind_unknown"),
        ("crash", b"not json", InvalidInput, "report_malformed"),
        ("crash", b"[]", InvalidInput, "report_malformed"),
        ("crash", json.dumps({"kind": "crash"}).encode(), InvalidInput, "report_malformed"),
        (
            "crash",
            json.dumps({**json.loads(crash("x")), "exit_code": 3}).encode(),  # an exit code and a signal
            InvalidInput,
            "report_malformed",
        ),
        ("crash_loop", crash("x"), InvalidInput, "report_malformed"),  # sent as another kind
        (
            "crash",
            json.dumps({**json.loads(crash("x")), "extra": 1}).encode(),
            InvalidInput,
            "report_malformed",
        ),
        ("crash", b" " * (MAX_FAILURE_REPORT_BYTES + 1), PayloadTooLarge, "report_too_large"),
        ("security-baseline", b'{"collected_at": "yesterday"}', InvalidInput, "report_malformed"),
    ],
    ids=[
        "unknown kind",
        "not JSON",
        "not an object",
        "fields missing",
        "exit code and signal",
        "kind mismatch",
        "unknown field",
        "oversized",
        "bad baseline",
    ],
)
def test_a_bad_report_is_refused_with_a_code_that_says_what_was_wrong(
    kind: str, body: bytes, error: type[InvalidInput], code: str
) -> None:
    with pytest.raises(error) as refused:
        parse_report(kind, body)
    assert refused.value.code == code


def test_the_csv_download_keeps_a_spreadsheet_from_running_what_a_device_wrote() -> None:
    from fleetward.monitor.reports import FailureSignature

    row = FailureSignature("s" * 64, "crash", COMPONENT, "=HYPERLINK(evil)", 3, 2, AT, AT)
    parsed = list(csv.reader(io.StringIO(failures_csv([row]))))
    assert parsed[0][:5] == ["signature", "kind", "component_id", "headline", "count"]
    assert parsed[1][3] == "'=HYPERLINK(evil)"
    assert parsed[1][4:6] == ["3", "2"]


# ====================================================================================== through the hub


def report_topic(device: SimulatedDevice, kind: str) -> str:
    return f"devices/{device.device_id}/messages/events/{REPORT_PROPERTY}={quote(kind)}"


def send_reports(hub: HubSetup, device: SimulatedDevice, *reports: tuple[str, bytes]) -> None:
    async def run() -> None:
        async with hub.mqtt(device) as client:
            for kind, body in reports:
                await client.publish(report_topic(device, kind), body, qos=1)  # returns on PUBACK

    asyncio.run(run())


@pytest.fixture
def fleet(hub: HubSetup) -> list[SimulatedDevice]:
    return [hub.enroll(SimulatedDevice(f"panel-{n}", healthy_software())) for n in range(2)]


def test_reports_sent_through_the_hub_are_kept_apart_from_telemetry_and_grouped_by_signature(
    hub: HubSetup, fleet: list[SimulatedDevice]
) -> None:
    first, second = fleet
    send_reports(hub, first, ("crash", crash("segfault at 0x7ffd1234")), ("crash", crash("segfault at 0x1")))
    send_reports(
        hub,
        second,
        ("crash", crash("segfault at 0x99")),
        ("crash", crash("disk full", exit_code=1)),
        ("security-baseline", BASELINE.model_dump_json().encode()),
    )
    client, tenant_id = hub.tenant.client, hub.tenant.id
    reports = client.get_list(f"/v1/tenants/{tenant_id}/reports", schemas.ReportPublic)
    assert [report.kind for report in reports] == ["crash"] * 4 + ["security-baseline"]
    assert client.get_list(f"/v1/tenants/{tenant_id}/telemetry", schemas.TelemetryPublic) == []

    failures = client.get_list(f"/v1/tenants/{tenant_id}/failures", schemas.FailureSignaturePublic)
    assert [(row.headline, row.count, row.devices) for row in failures] == [
        ("SIGSEGV: segfault at 0x?", 3, 2),
        ("exit 1: disk full", 1, 1),
    ]
    only_second = client.get_list(
        f"/v1/tenants/{tenant_id}/failures", schemas.FailureSignaturePublic, {"device_id": second.device_id}
    )
    assert [(row.count, row.devices) for row in only_second] == [(1, 1), (1, 1)]

    downloaded = client.request("GET", f"/v1/tenants/{tenant_id}/failures", params={"format": "csv"})
    assert downloaded.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(downloaded.text)))
    assert [(row["headline"], row["count"]) for row in rows] == [
        ("SIGSEGV: segfault at 0x?", "3"),
        ("exit 1: disk full", "1"),
    ]

    baseline = client.get(
        f"/v1/tenants/{tenant_id}/devices/{second.device_id}/baseline", schemas.BaselinePublic
    )
    assert baseline.baseline == BASELINE
    with pytest.raises(NotFound) as missing:
        client.get(f"/v1/tenants/{tenant_id}/devices/{first.device_id}/baseline", schemas.BaselinePublic)
    assert missing.value.code == "baseline_not_found"


def test_a_malformed_report_is_acknowledged_recorded_as_a_security_event_and_not_kept(
    hub: HubSetup, fleet: list[SimulatedDevice]
) -> None:
    """Acknowledged, because it can never become valid: the device's queue must not send it forever."""
    device = fleet[0]
    send_reports(hub, device, ("crash", b'{"kind": "crash"}'), ("bogus", b"{}"))
    deadline = time.monotonic() + 10
    while {"report_malformed", "report_kind_unknown"} - {event.code for event in hub.hub_events()}:
        assert time.monotonic() < deadline, [event.code for event in hub.hub_events()]
        time.sleep(0.1)
    assert hub.tenant.client.get_list(f"/v1/tenants/{hub.tenant.id}/reports", schemas.ReportPublic) == []


def test_another_tenant_sees_none_of_these_reports(hub: HubSetup, fleet: list[SimulatedDevice]) -> None:
    send_reports(hub, fleet[0], ("crash", crash("segfault at 0x1")))
    other = make_tenant(hub.tenant.client, "other-farm")
    assert other.client.get_list(f"/v1/tenants/{other.id}/reports", schemas.ReportPublic) == []
    assert other.client.get_list(f"/v1/tenants/{other.id}/failures", schemas.FailureSignaturePublic) == []
    with pytest.raises(NotFound):
        other.client.get(
            f"/v1/tenants/{other.id}/devices/{fleet[0].device_id}/baseline", schemas.BaselinePublic
        )


def test_the_cli_lists_grouped_failures_downloads_them_and_shows_a_baseline(
    hub: HubSetup, fleet: list[SimulatedDevice], tmp_path: Path
) -> None:
    device = fleet[0]
    send_reports(
        hub,
        device,
        ("crash", crash("segfault at 0x7ffd1234")),
        ("crash", crash("segfault at 0x1")),
        ("security-baseline", BASELINE.model_dump_json().encode()),
    )
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    env["FLEETWARD_CLI_CONFIG"] = str(tmp_path / "cli.json")
    env["FLEETWARD_CA_FILE"] = str(hub.tls.ca_file)
    options = ["--url", hub.server.url, "--token", hub.token, "--tenant", hub.tenant.id]

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, [*options, *args], env=env)
        assert result.exit_code == 0, f"{args}: {result.output}{result.exception!r}"
        return result.stdout

    listed = json.loads(run("--json", "failure", "list"))
    assert [(row["headline"], row["count"]) for row in listed] == [("SIGSEGV: segfault at 0x?", 2)]
    reports = json.loads(run("--json", "report", "list", "--device-id", device.device_id))
    assert [report["kind"] for report in reports] == ["crash", "crash", "security-baseline"]
    run("failure", "download", "--output", str(tmp_path / "failures.csv"))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "failures.csv").read_text())))
    assert [(row["kind"], row["devices"]) for row in rows] == [("crash", "1")]
    shown = run("device", "baseline", device.device_id)
    assert "listening  tcp 127.0.0.1:8080" in shown
    assert "in 2048 B / 4 packets" in shown


def test_denied_capabilities_group_by_capability_and_detail() -> None:
    def denied(capability: str, detail: str) -> bytes:
        return json.dumps(
            {
                "kind": "capability_denied",
                "component_id": COMPONENT,
                "capability": capability,
                "detail": detail,
                "occurred_at": "2026-12-01T12:00:00Z",
            }
        ).encode()

    first = parse_report("capability_denied", denied("AllowedConnections", "evil.example.com:443"))
    again = parse_report("capability_denied", denied("AllowedConnections", "evil.example.com:443"))
    other = parse_report("capability_denied", denied("Gpio", "5"))
    assert first.signature == again.signature != other.signature
    assert first.headline == "AllowedConnections not declared: evil.example.com:443"
    with pytest.raises(InvalidInput):
        parse_report("capability_denied", denied("Not a capability!", "x"))
