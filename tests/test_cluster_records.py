"""The data of several instances (docs/design.md, "Several instances"):
session records and inbox entries, without Redis."""

from __future__ import annotations

import dataclasses

import pytest

from intaleq_signal.calllog import MediaReported
from intaleq_signal.cluster.records import Entry, Keys, Record, holder, media_fields, pack, unpack
from intaleq_signal.media import Media

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
    assert Record.from_pairs("s-1", [x for pair in FIELDS.items() for x in pair]) == record
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


def test_a_records_media_progress_goes_to_its_row():
    """An adopted session goes on from its media progress (docs/protocol.md, "media_state") as a
    restarted one from its row: the record's fields are the media columns, written from the engine's
    MediaReported events (None: not written) and from a session's Media alike."""
    event = MediaReported("s-1", None, 1700000011.125, None, "relay", None, 2)
    fields = media_fields(dataclasses.asdict(event))
    assert fields == {"driver_media_at": "1700000011.125", "driver_candidate": "relay", "media_failures": "2"}
    media = Media(driver_media_at=1700000011.125, driver_candidate="relay", media_failures=2)
    assert media_fields(media.columns()) == fields
    record = Record.from_hash("s-1", {**FIELDS, **fields})
    assert record is not None and record.media == media and record.row().media == media
    assert Record.from_hash("s-1", {**FIELDS, "media_failures": "0"}).row().media is None  # type: ignore[union-attr]
    assert Record.from_hash("s-1", FIELDS).media is None  # type: ignore[union-attr]


@pytest.mark.parametrize("drop", ["ride_id", "status", "deadline", "created_at"])
def test_incomplete_or_broken_records_are_none(drop):
    fields = {k: v for k, v in FIELDS.items() if k != drop}
    assert Record.from_hash("s-1", fields) is None
    assert Record.from_hash("s-1", {**FIELDS, "deadline": "soon"}) is None


ENTRIES = [
    Entry("open", "b/1f2e.1", '{"type":"authenticate"}', ip="2001:db8::1"),
    Entry("msg", "b/1f2e.2", "héllo\nwith a newline and \x1f inside 😀"),
    Entry("frame", "b/1f2e.3"),
    Entry("gone", "host name:47881/1f2e.4"),
    Entry("send", "b/1f2e.5", '{"type":"pong"}'),
    Entry("close", "b/1f2e.6", "replaced", code=4002),
]


def test_entries_pack_into_one_field_and_back_in_order():
    assert unpack(pack(ENTRIES)) == ENTRIES
    assert unpack(pack([])) == []
    assert [e.edge for e in ENTRIES] == ["b", "b", "b", "host name:47881", "b", "b"]
    assert holder(ENTRIES[0].conn) == ("b", "1f2e")


@pytest.mark.parametrize(
    "tail",
    ["teleport\x1fb/1\x1f\x1f0\x1f0\n", "msg\x1fno-slash\x1f\x1f0\x1f0\n", "msg\x1fb/1\x1f\x1fx\x1f0\n",
     "msg\x1fb/1\x1f\x1f0\x1f99999\nshort", "msg\x1fb/1\n", "no newline"],
)  # fmt: skip
def test_a_malformed_entry_ends_the_batch(tail):
    """What another version wrote: the entries before it are read, it and
    the rest are skipped."""
    assert unpack(pack(ENTRIES[:2]) + tail + pack(ENTRIES[2:])) == ENTRIES[:2]


def test_keys_share_one_prefix():
    keys = Keys("p:")
    names = [keys.node("a"), keys.session("s"), keys.ride("r"), keys.owned("a"), keys.inbox("a")]
    assert names == ["p:node:a", "p:session:s", "p:ride:r", "p:owned:a", "p:inbox:a"]
