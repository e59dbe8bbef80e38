"""The data of several instances (docs/design.md, "Several instances"):
session records and inbox entries, without Redis."""

from __future__ import annotations

import pytest

from intaleq_signal.cluster.records import Entry, Keys, Record, decode_entry, encode_entry

FIELDS = {
    "ride_id": "ride-1",
    "driver_id": "driver-1",
    "passenger_id": "passenger-1",
    "owner": "b",
    "creator": "a",
    "status": "active",
    "created_at": "1700000000.25",
    "deadline": "1700003600.5",
    "connected_at": "1700000010.5",
    "initiated_by": "driver-1",
}


def test_record_from_a_hash_and_as_a_row():
    record = Record.from_hash("s-1", {k.encode(): v.encode() for k, v in FIELDS.items()})
    assert record is not None
    assert (record.owner, record.creator, record.status) == ("b", "a", "active")
    row = record.row()
    assert (row.session_id, row.ride_id, row.status, row.initiated_by) == (
        "s-1",
        "ride-1",
        "active",
        "driver-1",
    )
    assert (row.created_at, row.connected_at, row.ended_at, row.end_reason) == (
        1700000000.25,
        1700000010.5,
        None,
        None,
    )
    assert record.live(1700003600.4) and not record.live(1700003600.5)
    ended = Record.from_hash(
        "s-1", {**FIELDS, "status": "ended", "end_reason": "expired", "ended_at": "1700000100"}
    )
    assert ended is not None and not ended.live(0) and ended.row().ended_at == 1700000100.0


@pytest.mark.parametrize("drop", ["ride_id", "status", "deadline", "created_at"])
def test_incomplete_or_broken_records_are_none(drop):
    fields = {k: v for k, v in FIELDS.items() if k != drop}
    assert Record.from_hash("s-1", fields) is None
    assert Record.from_hash("s-1", {**FIELDS, "deadline": "soon"}) is None


@pytest.mark.parametrize(
    "entry",
    [
        Entry("open", "b/1", '{"type":"authenticate"}', ip="2001:db8::1"),
        Entry("msg", "b/2", "héllo"),
        Entry("frame", "b/3"),
        Entry("gone", "host:47881/4"),
        Entry("send", "b/5", '{"type":"pong"}'),
        Entry("close", "b/6", "replaced", code=4002),
    ],
)
def test_entries_round_trip(entry):
    fields = encode_entry(entry)
    assert decode_entry(fields) == entry
    assert decode_entry({k.encode(): v.encode() for k, v in fields.items()}) == entry
    assert entry.edge == entry.conn.rpartition("/")[0]


@pytest.mark.parametrize(
    "fields",
    [{}, {"k": "teleport", "c": "b/1"}, {"k": "msg", "c": "no-slash"}, {"k": "close", "c": "b/1", "n": "x"}],
)
def test_malformed_entries_are_skipped(fields):
    assert decode_entry(fields) is None


def test_keys_share_one_prefix():
    keys = Keys("p:")
    names = [keys.node("a"), keys.session("s"), keys.ride("r"), keys.owned("a"), keys.inbox("a")]
    assert names == ["p:node:a", "p:session:s", "p:ride:r", "p:owned:a", "p:inbox:a"]
