"""The agent's outbox on a real SQLite file: order, acknowledgement, bounds and the full policy, durability
across reopening and across a killed process, concurrent puts sharing commits, damaged databases refused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetward.agent import dialect
from fleetward.agent.outbox import DROPPED, Outbox, OutboxCorrupt, OutboxFull, OutboxLimits, OutboxMessage
from fleetward.errors import ConfigurationError, InvalidInput, PayloadTooLarge

SRC = Path(__file__).resolve().parents[1] / "src"


def properties_of(message: OutboxMessage) -> dict[str, str]:
    return dict(message.properties)


async def take_all(outbox: Outbox) -> list[OutboxMessage]:
    return await outbox.take(1_000_000)


# ---------------------------------------------------------------------- order and acknowledgement


async def test_messages_come_out_in_order_with_their_properties_and_their_message_id_first(
    tmp_path: Path,
) -> None:
    async with Outbox.open(tmp_path) as outbox:
        ids = [
            await outbox.put(b"one", {"$.ct": "application/json", "room": "lab 1"}),
            await outbox.put(b"two", [("a", "1"), ("b", "")]),
            await outbox.put(b"three"),
        ]
        taken = await take_all(outbox)
    assert len(set(ids)) == 3
    assert [message.body for message in taken] == [b"one", b"two", b"three"]
    assert [message.message_id for message in taken] == ids
    assert [message.seq for message in taken] == sorted(message.seq for message in taken)
    assert taken[0].properties == (("$.mid", ids[0]), ("$.ct", "application/json"), ("room", "lab 1"))
    assert taken[1].properties == (("$.mid", ids[1]), ("a", "1"), ("b", ""))
    assert dict(parse_qsl(taken[0].encoded_properties)) == properties_of(taken[0])
    assert not any(message.redelivery for message in taken)


async def test_a_message_leaves_only_once_acknowledged_and_a_rewind_hands_out_the_rest_again_in_order(
    tmp_path: Path,
) -> None:
    async with Outbox.open(tmp_path) as outbox:
        for number in range(6):
            await outbox.put(f"m{number}".encode())
        first = await outbox.take(4)
        assert [message.body for message in first] == [b"m0", b"m1", b"m2", b"m3"]
        assert (await outbox.stats()).in_flight == 4
        assert [message.body for message in await outbox.take(10)] == [b"m4", b"m5"]
        assert await outbox.take(10) == []
        # PUBACKs for m1 and m2 only, then the connection is lost.
        await outbox.acknowledge([first[1].seq, first[2].seq])
        await outbox.rewind()
        again = await take_all(outbox)
        assert [message.body for message in again] == [b"m0", b"m3", b"m4", b"m5"]
        assert all(message.redelivery for message in again)
        assert [message.message_id for message in again] == [
            first[0].message_id,
            first[3].message_id,
            *[message.message_id for message in again[2:]],
        ]
        await outbox.acknowledge([message.seq for message in again])
        await asyncio.wait_for(outbox.wait_empty(), 1)
        stats = await outbox.stats()
    assert (stats.messages, stats.bytes, stats.in_flight) == (0, 0, 0)


async def test_what_was_not_acknowledged_survives_closing_and_reopening_with_the_same_ids(
    tmp_path: Path,
) -> None:
    async with Outbox.open(tmp_path) as outbox:
        ids = [await outbox.put(f"m{number}".encode(), {"n": str(number)}) for number in range(5)]
        taken = await outbox.take(3)
        await outbox.acknowledge([taken[0].seq])
    async with Outbox.open(tmp_path) as reopened:
        stats = await reopened.stats()
        again = await take_all(reopened)
    assert (stats.messages, stats.in_flight) == (4, 0)
    assert [message.message_id for message in again] == ids[1:]
    assert [properties_of(message)["n"] for message in again] == ["1", "2", "3", "4"]
    assert not any(message.redelivery for message in again)  # a new process knows nothing of earlier sends


async def test_concurrent_puts_are_stored_in_call_order_in_a_few_shared_commits(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path) as outbox:
        ids = await asyncio.gather(*(outbox.put(f"m{number}".encode()) for number in range(300)))
        stats = await outbox.stats()
        taken = await take_all(outbox)
    assert [message.body for message in taken] == [f"m{number}".encode() for number in range(300)]
    assert [message.message_id for message in taken] == list(ids)
    assert stats.messages == 300
    assert stats.commits <= 5, stats


async def test_puts_past_pending_max_wait_for_room_instead_of_queueing_without_bound(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path, OutboxLimits(pending_max=4, commit_batch_max=2)) as outbox:
        await asyncio.gather(*(outbox.put(b"x") for _ in range(40)))
        stats = await outbox.stats()
    assert stats.messages == 40
    assert stats.commits >= 20  # never more than two a transaction


# ---------------------------------------------------------------------- bounds and the full policy


async def test_when_full_the_oldest_unsent_non_critical_messages_are_dropped_counted_and_reported(
    tmp_path: Path,
) -> None:
    """Room is made from the oldest unsent, non-critical messages; in-flight and critical ones stay."""
    async with Outbox.open(tmp_path, OutboxLimits(max_messages=5)) as outbox:
        for body in (b"a", b"b"):
            await outbox.put(body)
        await outbox.put(b"alarm", critical=True)
        for body in (b"c", b"d"):
            await outbox.put(body)
        in_flight = await outbox.take(1)  # "a" is with the hub
        assert [message.body for message in in_flight] == [b"a"]
        await outbox.put(b"e")  # drops "b"
        await outbox.put(b"f")  # drops "c" ("alarm" is critical)
        stats = await outbox.stats()
        await outbox.rewind()
        kept = await take_all(outbox)
    assert [message.body for message in kept] == [b"a", b"alarm", b"d", b"e", b"f"]
    assert stats.dropped == 2
    assert stats.messages == 5
    dropped = {message.body: properties_of(message).get(DROPPED) for message in kept}
    assert dropped == {b"a": None, b"alarm": None, b"d": None, b"e": "1", b"f": "2"}
    async with Outbox.open(tmp_path, OutboxLimits(max_messages=5)) as reopened:
        assert (await reopened.stats()).dropped == 2


async def test_a_message_sent_before_a_lost_connection_is_not_dropped_so_every_drop_is_a_loss(
    tmp_path: Path,
) -> None:
    """Rewound by a lost connection, "a" may already be stored by the hub: dropping it would count a loss
    that perhaps is none, so room is made from messages never sent instead."""
    async with Outbox.open(tmp_path, OutboxLimits(max_messages=3)) as outbox:
        for body in (b"a", b"b", b"c"):
            await outbox.put(body)
        await outbox.take(1)  # "a" goes out, and its PUBACK never comes
        await outbox.rewind()
        await outbox.put(b"d")  # drops "b", not "a"
        stats = await outbox.stats()
        kept = await take_all(outbox)
    assert [message.body for message in kept] == [b"a", b"c", b"d"]
    assert kept[0].redelivery
    assert stats.dropped == 1


async def test_a_full_outbox_of_critical_messages_refuses_new_ones_with_outbox_full_and_drops_nothing(
    tmp_path: Path,
) -> None:
    async with Outbox.open(tmp_path, OutboxLimits(max_messages=3)) as outbox:
        await outbox.put(b"c0", critical=True)
        await outbox.put(b"c1", critical=True)
        await outbox.put(b"t0")
        await outbox.put(b"c2", critical=True)  # drops t0
        with pytest.raises(OutboxFull) as refused:
            await outbox.put(b"c3", critical=True)
        assert refused.value.code == "outbox_full"
        with pytest.raises(OutboxFull):
            await outbox.put(b"t1")
        stats = await outbox.stats()
        kept = await take_all(outbox)
    assert [message.body for message in kept] == [b"c0", b"c1", b"c2"]
    assert stats.dropped == 1


async def test_the_byte_bound_drops_as_many_old_messages_as_the_new_one_needs(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=4096, max_message_bytes=2048)
    async with Outbox.open(tmp_path, limits) as outbox:
        for number in range(6):
            await outbox.put(bytes([number]) * 500)
        assert (await outbox.stats()).bytes <= 4096
        await outbox.put(b"x" * 1900)
        stats = await outbox.stats()
        kept = await take_all(outbox)
    assert stats.bytes <= 4096
    assert kept[-1].body == b"x" * 1900
    assert [message.body[0] for message in kept[:-1]] == list(range(6 - len(kept) + 1, 6))
    assert stats.dropped == 6 - (len(kept) - 1)
    assert properties_of(kept[-1])[DROPPED] == str(stats.dropped)


@pytest.mark.parametrize(
    ("body", "properties", "error", "code"),
    [
        (b"x" * 3000, {}, PayloadTooLarge, "message_too_large"),
        (b"x" * 1800, {"k": "v" * 400}, PayloadTooLarge, "message_too_large"),
        (b"", {"$.mid": "mine"}, InvalidInput, "reserved_property"),
        (b"", {"$.other": "x"}, InvalidInput, "reserved_property"),
        (b"", {DROPPED: "0"}, InvalidInput, "reserved_property"),
        (b"", {"": "empty key"}, InvalidInput, "bad_properties"),
        (b"", {"k" * 129: "long key"}, InvalidInput, "bad_properties"),
        (b"", {"long value": "v" * 1025}, InvalidInput, "bad_properties"),
        (b"", {f"k{number}": "v" for number in range(63)}, InvalidInput, "bad_properties"),
    ],
)
async def test_messages_the_hub_would_refuse_are_refused_when_put(
    tmp_path: Path, body: bytes, properties: dict[str, str], error: type[Exception], code: str
) -> None:
    async with Outbox.open(tmp_path, OutboxLimits(max_message_bytes=2048)) as outbox:
        with pytest.raises(error) as refused:
            await outbox.put(body, properties)
        assert getattr(refused.value, "code", None) == code
        assert (await outbox.stats()).messages == 0


async def test_a_body_that_is_not_bytes_is_a_type_error(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path) as outbox:
        with pytest.raises(TypeError):
            await outbox.put("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "limits",
    [
        {"max_messages": 0},
        {"max_bytes": -1},
        {"max_bytes": 1000, "max_message_bytes": 2000},
    ],
)
def test_limits_validate_when_built(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must"):
        OutboxLimits(**limits)


def test_limits_of_the_wrong_type_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        OutboxLimits(max_messages=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- damage, sharing, crashes


async def test_a_damaged_or_foreign_database_is_refused_clearly_and_left_untouched(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "good") as outbox:
        await asyncio.gather(*(outbox.put(os.urandom(200)) for _ in range(300)))
    good = (tmp_path / "good" / "outbox.db").read_bytes()

    cases: dict[str, bytes] = {
        "garbage": b"this is not a database" * 300,
        "truncated": good[: len(good) // 2],
        "scribbled": good[:4096] + b"\xff" * 8192 + good[4096 + 8192 :],
    }
    for name, content in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "outbox.db").write_bytes(content)
        with pytest.raises(OutboxCorrupt) as refused:
            Outbox.open(directory)
        assert str(directory / "outbox.db") in refused.value.message, name
        assert (directory / "outbox.db").read_bytes() == content, name

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "outbox.db") as connection:
        connection.execute("CREATE TABLE recipes (name TEXT)")
    connection.close()
    with pytest.raises(OutboxCorrupt, match="not an outbox"):
        Outbox.open(foreign)

    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "outbox.db").write_bytes(good)
    with sqlite3.connect(newer / "outbox.db") as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(OutboxCorrupt) as refused:
        Outbox.open(newer)
    assert refused.value.code == "outbox_version"


VERSION_1_SCHEMA = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    properties TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    critical INTEGER NOT NULL
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('dropped', 7);
INSERT INTO messages VALUES (3, 'id-3', '[["$.mid", "id-3"]]', x'6f6c64', 40, 0);
INSERT INTO messages VALUES (5, 'id-5', '[["$.mid", "id-5"]]', x'616c61726d', 42, 1);
PRAGMA user_version = 1;
"""


async def test_an_outbox_of_version_1_is_upgraded_in_place_and_keeps_every_message_and_count(
    tmp_path: Path,
) -> None:
    """Version 2 drops the unique index on message ids (ADR 0014): an agent updated with messages waiting
    sends them all, in order, with their ids, and keeps counting drops where it was."""
    with sqlite3.connect(tmp_path / "outbox.db") as connection:
        connection.executescript(VERSION_1_SCHEMA)
    connection.close()
    async with Outbox.open(tmp_path) as outbox:
        await outbox.put(b"new")
        stats = await outbox.stats()
        kept = await take_all(outbox)
    assert [(message.body, message.message_id, message.critical) for message in kept[:2]] == [
        (b"old", "id-3", False),
        (b"alarm", "id-5", True),
    ]
    assert kept[2].body == b"new"
    assert kept[2].seq > 5  # seqs keep growing: nothing sent before is confused with what comes after
    assert stats.dropped == 7
    with sqlite3.connect(tmp_path / "outbox.db") as connection:
        indexes = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
        ).fetchall()
        (version,) = connection.execute("PRAGMA user_version").fetchone()
    connection.close()
    assert (indexes, version) == ([], 2)


async def test_a_second_agent_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path):
        with pytest.raises(ConfigurationError) as refused:
            Outbox.open(tmp_path)
        assert refused.value.code == "outbox_in_use"
    async with Outbox.open(tmp_path):  # released on close
        pass


async def test_the_database_is_private_to_the_agent(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "state") as outbox:
        await outbox.put(b"secret reading")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "outbox.db").stat().st_mode & 0o777 == 0o600


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from fleetward.agent.outbox import Outbox

    async def main():
        outbox = Outbox.open(Path(sys.argv[1]))
        number = 0
        while True:
            ids = await asyncio.gather(*(outbox.put(f"m{number + i}".encode()) for i in range(7)))
            number += 7
            print(*ids, sep="\\n", flush=True)

    asyncio.run(main())
    """
)


def test_a_killed_agent_loses_no_message_whose_put_returned(tmp_path: Path) -> None:
    """SIGKILL while puts commit: everything a put returned for is there, in order, after the restart."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        text=True,
    )
    assert child.stdout is not None
    confirmed: list[str] = []
    while len(confirmed) < 300:
        line = child.stdout.readline()
        assert line, "the child ended early"
        confirmed.append(line.strip())
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()

    async def reopen() -> list[OutboxMessage]:
        async with Outbox.open(tmp_path) as outbox:
            return await take_all(outbox)

    stored = asyncio.run(reopen())
    stored_ids = [message.message_id for message in stored]
    assert stored_ids[: len(confirmed)] == confirmed
    assert [message.body for message in stored] == [f"m{number}".encode() for number in range(len(stored))]


# ---------------------------------------------------------------------- the property bag codec

_key = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="$"), min_size=1, max_size=20
).filter(lambda key: not key.startswith("fleetward."))
_value = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)


@given(st.lists(st.tuples(_key, _value), max_size=10))
def test_property_bags_survive_encoding_for_the_topic_and_decoding(pairs: list[tuple[str, str]]) -> None:
    checked = dialect.check_properties(pairs)
    encoded = dialect.encode_properties(checked)
    assert "/" not in encoded
    assert "#" not in encoded
    assert "+" not in encoded
    assert dialect.decode_properties(encoded) == checked
