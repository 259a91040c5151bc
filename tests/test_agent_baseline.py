"""The security baseline: /proc/net parsed exactly, traffic per interval, bounds, the real kernel's view."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetward.agent.baseline import (
    BaselineCollector,
    decode_endpoint,
    parse_interfaces,
    parse_sockets,
    traffic_between,
)
from fleetward.errors import InvalidInput
from fleetward.wire.baseline import MAX_LISTENING, ListeningPort, SecurityBaseline, Traffic

ANY_ADDRESS = "0.0.0.0"  # noqa: S104 (what the kernel shows for a socket bound to every address)
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP = HEADER + (
    "   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   119        0 27004 1\n"
    "   1: 0F02000A:C350 2A00A8C0:20FB 01 00000000:00000000 00:00000000 00000000     0        0 27005 1\n"
    "   2: 0F02000A:C351 0100007F:1F90 06 00000000:00000000 00:00000000 00000000     0        0 0 1\n"
)
TCP6 = HEADER + (
    "   0: 00000000000000000000000001000000:18EB 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 5126 1\n"
    "   1: 0000000000000000FFFF00000F02000A:C352 0000000000000000FFFF00002A00A8C0:01BB 01 "
    "00000000:00000000 00:00000000 00000000     0        0 5127 1\n"
)
UDP = HEADER + (
    "  10: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2\n"
    "  11: 0F02000A:D000 08080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 2 2\n"
)
DEV_HEADER = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls "
    "carrier compressed\n"
)


def dev(**interfaces: tuple[int, int, int, int]) -> str:
    lines = [
        f"{name:>6}: {bytes_in} {packets_in} 0 0 0 0 0 0 {bytes_out} {packets_out} 0 0 0 0 0 0"
        for name, (bytes_in, packets_in, bytes_out, packets_out) in interfaces.items()
    ]
    return DEV_HEADER + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0100007F:0CEA", ("127.0.0.1", 3306)),
        ("00000000:0000", (ANY_ADDRESS, 0)),
        ("0F02000A:C350", ("10.0.2.15", 50000)),
        ("00000000000000000000000001000000:18EB", ("::1", 6379)),
        ("0000000000000000FFFF00000F02000A:01BB", ("10.0.2.15", 443)),  # IPv4 mapped into IPv6
        ("B80D0120000000000000000001000000:0050", ("2001:db8::1", 80)),
    ],
)
def test_endpoints_decode_from_the_kernel_s_host_order_words(text: str, expected: tuple[str, int]) -> None:
    assert decode_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "0100007F", "0100007F:", "XYZ:0050", "0100007F00:0050", "01:zz"])
def test_a_malformed_endpoint_is_refused_as_unreadable(text: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        decode_endpoint(text)
    assert refused.value.code == "baseline_unreadable"


def test_listening_and_established_sockets_are_told_apart_and_other_states_ignored() -> None:
    listening, established = parse_sockets(TCP, "tcp")
    assert listening == [ListeningPort(protocol="tcp", address="127.0.0.1", port=3306)]
    assert [(c.remote_address, c.remote_port) for c in established] == [("192.168.0.42", 8443)]
    listening6, established6 = parse_sockets(TCP6, "tcp")
    assert listening6 == [ListeningPort(protocol="tcp", address="::1", port=6379)]
    assert [(c.local_address, c.remote_address, c.remote_port) for c in established6] == [
        ("10.0.2.15", "192.168.0.42", 443)
    ]
    udp_listening, udp_established = parse_sockets(UDP, "udp")
    assert udp_listening == [ListeningPort(protocol="udp", address=ANY_ADDRESS, port=68)]
    assert udp_established == []  # a connected UDP socket is not a server


def test_interface_counters_are_read_and_traffic_is_the_difference_without_loopback() -> None:
    before = parse_interfaces(dev(lo=(1000, 10, 1000, 10), eth0=(500, 5, 300, 3)))
    after = parse_interfaces(dev(lo=(9000, 90, 9000, 90), eth0=(1500, 15, 700, 7), wlan0=(40, 1, 60, 2)))
    assert traffic_between(before, after) == Traffic(
        bytes_in=1040, packets_in=11, bytes_out=460, packets_out=6
    )


def test_a_counter_that_went_back_counts_from_zero() -> None:
    before = parse_interfaces(dev(eth0=(5000, 50, 5000, 50)))
    after = parse_interfaces(dev(eth0=(100, 1, 200, 2)))  # the interface was recreated
    assert traffic_between(before, after) == Traffic(bytes_in=100, packets_in=1, bytes_out=200, packets_out=2)


@pytest.mark.parametrize("line", ["  eth0 1 2 3", "  eth0: 1 2 3", "  eth0: a b c d e f g h i j k"])
def test_a_malformed_interface_line_is_refused_as_unreadable(line: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_interfaces(DEV_HEADER + line + "\n")
    assert refused.value.code == "baseline_unreadable"


def fake_proc(root: Path, *, tcp: str = TCP, dev_text: str = "") -> Path:
    (root / "net").mkdir(parents=True, exist_ok=True)
    (root / "net" / "tcp").write_text(tcp)
    (root / "net" / "tcp6").write_text(TCP6)
    (root / "net" / "udp").write_text(UDP)
    (root / "net" / "dev").write_text(dev_text or dev(eth0=(0, 0, 0, 0)))
    return root  # no udp6: a kernel without it is read as having no such sockets


def test_a_report_covers_the_interval_since_the_last_one_and_then_starts_afresh(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    collector = BaselineCollector(proc)
    start = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
    first = collector.report(start)
    assert first.traffic == Traffic()  # nothing to compare with yet
    (proc / "net" / "dev").write_text(dev(eth0=(2048, 4, 1024, 2)))
    collector.blocked("panel-monitor", "evil.example.com", 443)
    collector.blocked("panel-monitor", "evil.example.com", 443)
    second = collector.report(start + dt.timedelta(minutes=5))
    assert second.interval_seconds == 300
    assert second.traffic == Traffic(bytes_in=2048, packets_in=4, bytes_out=1024, packets_out=2)
    assert {(item.protocol, item.port) for item in second.listening} == {
        ("tcp", 3306),
        ("tcp", 6379),
        ("udp", 68),
    }
    assert {(item.address, item.port) for item in second.destinations} == {
        ("192.168.0.42", 8443),
        ("192.168.0.42", 443),
    }
    assert [(item.host, item.count) for item in second.blocked] == [("evil.example.com", 2)]
    third = collector.report(start + dt.timedelta(minutes=10))
    assert third.blocked == ()
    assert third.traffic == Traffic()
    assert SecurityBaseline.model_validate_json(second.model_dump_json()) == second


def test_a_device_listening_on_more_ports_than_a_report_holds_says_how_many_were_left_out(
    tmp_path: Path,
) -> None:
    extra = MAX_LISTENING + 7
    rows = "".join(
        f"{n:4}: 0100007F:{n + 1:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 {n} 1\n"
        for n in range(extra)
    )
    collector = BaselineCollector(fake_proc(tmp_path, tcp=HEADER + rows))
    report = collector.report(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    assert len(report.listening) == MAX_LISTENING
    assert report.truncated == extra + 2 - MAX_LISTENING  # plus ::1:6379 from tcp6 and udp 68


def test_a_proc_file_that_is_not_what_the_kernel_writes_is_refused(tmp_path: Path) -> None:
    collector = BaselineCollector(fake_proc(tmp_path, tcp=HEADER + "   0: nonsense here 0A\n"))
    with pytest.raises(InvalidInput) as refused:
        collector.report(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    assert refused.value.code == "baseline_unreadable"


def test_a_report_from_a_device_with_an_address_that_is_not_one_is_refused_by_the_wire_format() -> None:
    with pytest.raises(ValidationError):
        SecurityBaseline.model_validate(
            {
                "collected_at": "2026-12-01T00:00:00Z",
                "interval_seconds": 60,
                "listening": [{"protocol": "tcp", "address": "not-an-ip", "port": 22}],
            }
        )


def test_the_real_kernel_shows_a_server_this_test_opens_and_a_connection_to_it() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                listening, established = BaselineCollector().sockets()
                client_port = client.getsockname()[1]
    assert ListeningPort(protocol="tcp", address="127.0.0.1", port=port) in listening
    assert any(c.local_port == client_port and c.remote_port == port for c in established)
