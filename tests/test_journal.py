"""The local journal of call-log events (docs/operations.md, "Call log and
journal"): the file itself, the writer that keeps every event either
committed or journaled, and the start-up replay; plus the ``node_id``
migration of both stores."""

from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from typing import Any

import pytest
from test_calllog import FakeStore, lifecycle_events

from conftest import CALL_LOG_COLUMNS
from intaleq_signal.calllog import (
    CallActive,
    CallEnded,
    CallLogWriter,
    MediaReported,
    PreviousRunClosed,
    SessionCreated,
)
from intaleq_signal.calllog import writer as writer_module
from intaleq_signal.calllog.events import EventDecodeError, decode, encode
from intaleq_signal.calllog.journal import Journal, JournalError
from intaleq_signal.calllog.sql import sqlite_ddl, utc_text
from intaleq_signal.calllog.sqlite import SQLiteStore
from intaleq_signal.calllog.writer import StartError

T = 1_700_000_000.25


def no_sleep(seconds: float) -> None:
    pass


# -- events as journal entries -------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        SessionCreated("s1", "ride-\ud800", "drv", "pas", T, "node-a"),  # a lone surrogate survives
        CallActive("s1", T + 1),
        CallEnded("s1", "max_duration_reached", T + 60),
        MediaReported("s1", T + 3, T + 2, T + 3, "relay", None, 2),
        MediaReported("s1", driver_media_at=T + 2),
        PreviousRunClosed(T, "node-a"),
    ],
)
def test_events_round_trip_through_json(event):
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "text", ["", "[]", "{}", '{"event": "Nope"}', '{"event": "CallActive", "session_id": "s"}', "nul\x00"]
)
def test_unknown_journal_entries_are_refused(text):
    with pytest.raises(EventDecodeError):
        decode(text)


# -- the journal file ----------------------------------------------------------


def test_journal_keeps_events_in_order_across_opens(tmp_path):
    path = str(tmp_path / "journal")
    journal = Journal(path)
    assert journal.open() == []
    events = lifecycle_events("s1", T)
    journal.write([(3, events[2]), (1, events[0]), (2, events[1])], [])
    journal.write([(4, events[3])], [2])
    assert journal.count() == 3
    journal.close()
    again = Journal(path)
    assert again.open() == [(1, events[0]), (3, events[2]), (4, events[3])]
    again.close()


def test_journal_is_locked_to_one_process(tmp_path):
    path = str(tmp_path / "journal")
    first = Journal(path)
    first.open()
    with pytest.raises(JournalError, match="JOURNAL_PATH=.*in use by another process"):
        Journal(path).open()
    first.close()
    second = Journal(path)
    second.open()  # free again once closed
    second.close()


@pytest.mark.parametrize("kind", ["missing_directory", "not_sqlite"])
def test_unusable_journal_names_the_variable(tmp_path, kind):
    if kind == "missing_directory":
        path = str(tmp_path / "no" / "journal")
    else:
        path = str(tmp_path / "journal")
        with open(path, "wb") as handle:
            handle.write(b"this is not an SQLite file" * 100)
    with pytest.raises(JournalError, match="JOURNAL_PATH="):
        Journal(path).open()


def test_unreadable_entry_is_dropped_and_logged(tmp_path, caplog):
    path = str(tmp_path / "journal")
    journal = Journal(path)
    journal.open()
    journal.write([(1, CallActive("s1", T))], [])
    journal.close()
    with sqlite3.connect(path) as conn:
        conn.execute('INSERT INTO events (seq, event) VALUES (2, \'{"event": "FromTheFuture"}\')')
    again = Journal(path)
    assert again.open() == [(1, CallActive("s1", T))]
    assert again.count() == 1
    again.close()
    assert "entry 2 dropped" in caplog.text


# -- the writer with a journal -------------------------------------------------


def journaled_writer(store: FakeStore, path: str, **kwargs: Any) -> CallLogWriter:
    writer = CallLogWriter(store, journal=Journal(path), **kwargs)
    store.writer = writer
    return writer


def journal_rows(path: str) -> list[Any]:
    journal = Journal(path)
    try:
        return journal.open()
    finally:
        journal.close()


def test_healthy_database_leaves_the_journal_empty(tmp_path):
    """Events that commit within the linger never touch the journal file."""
    path = str(tmp_path / "journal")
    store = FakeStore()
    writer = journaled_writer(store, path, threads=2)
    assert writer.open() == 0
    writer.start()
    events = [e for n in range(20) for e in lifecycle_events(f"s{n}", T)]
    for event in events:
        writer.record(event)
    assert writer.close(5.0) == 0
    assert sorted(map(repr, store.applied)) == sorted(map(repr, events))
    assert journal_rows(path) == []
    assert writer.journal_backlog == 0


def test_database_down_at_stop_keeps_every_event_for_the_next_start(tmp_path):
    """Stopping while the database refuses everything: close() returns on
    time, every event is in the journal; the next writer writes them first,
    in order, with their own times, then empties the journal."""
    path = str(tmp_path / "journal")
    down = FakeStore(always_fail=True)
    first = journaled_writer(down, path, threads=3, sleep=no_sleep)
    first.open()
    first.start()
    events = [e for n in range(10) for e in lifecycle_events(f"s{n}", T + n)]
    for event in events:
        first.record(event)
    started = time.monotonic()
    assert first.close(0.3) == len(events)
    assert time.monotonic() - started < 3.0
    assert [event for _, event in journal_rows(path)] == events  # in the order recorded

    up = FakeStore()
    second = journaled_writer(up, path, threads=3)
    assert second.open() == len(events)
    assert second.journal_backlog == len(events)
    second.start()
    second.record(SessionCreated("new", "ride-new", "d", "p", T + 100))
    assert second.close(5.0) == 0
    for n in range(10):  # per session, in order, with the original times
        assert [e for e in up.applied if e.session_id == f"s{n}"] == lifecycle_events(f"s{n}", T + n)
    assert [e.session_id for e in up.applied].count("new") == 1
    assert journal_rows(path) == []


def test_kill_loses_at_most_the_linger(tmp_path):
    """Without any close (as after kill -9), events recorded more than
    JOURNAL_LINGER ago while the database is down are already on disk."""
    path = str(tmp_path / "journal")
    store = FakeStore(always_fail=True)
    writer = journaled_writer(store, path, threads=1, sleep=lambda s: time.sleep(0.05))
    writer.open()
    writer.start()
    events = lifecycle_events("s1", T)
    for event in events:
        writer.record(event)
    deadline = time.monotonic() + 1.0  # "at most the last second"
    while time.monotonic() < deadline and writer.journal_backlog < len(events):
        time.sleep(0.01)
    # read the file from "another process": what a restart would find
    with sqlite3.connect(path) as conn:
        stored = [decode(text) for (text,) in conn.execute("SELECT event FROM events ORDER BY seq")]
    assert stored == events
    writer.close(0.1)


def test_start_up_work_waits_for_the_replayed_events(tmp_path):
    """PreviousRunClosed lands only after every replayed event, whichever
    thread each goes through: a killed process's own endings win over
    server_restart."""
    path = str(tmp_path / "journal")
    journal = Journal(path)
    journal.open()
    # sessions on the threads other than PreviousRunClosed's (session_id ""
    # goes to thread 0): without the wait it would land first
    sessions = [f"s{n}" for n in range(200) if zlib.crc32(f"s{n}".encode()) % 4 != 0][:40]
    replayed = [e for session_id in sessions for e in lifecycle_events(session_id, T)]
    journal.write(list(enumerate(replayed, 1)), [])
    journal.close()
    store = FakeStore(apply_delay=0.001)
    writer = journaled_writer(store, path, threads=4)
    writer.open()
    writer.record(PreviousRunClosed(T + 999, "node-a"))
    writer.start()
    assert writer.close(10.0) == 0
    position = next(i for i, e in enumerate(store.applied) if isinstance(e, PreviousRunClosed))
    assert position == len(replayed), position


def test_journal_write_failure_is_retried_not_fatal(tmp_path, monkeypatch, caplog):
    """A journal that cannot be written (disk full) is reported and retried;
    the events are kept in memory meanwhile."""
    path = str(tmp_path / "journal")
    store = FakeStore(always_fail=True)
    writer = journaled_writer(store, path, threads=1, sleep=lambda s: time.sleep(0.02))
    writer.open()
    failing = {"left": 2}
    real_write = Journal.write

    def flaky(self: Journal, appends: Any, removes: Any) -> None:
        if failing["left"] > 0:
            failing["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        real_write(self, appends, removes)

    monkeypatch.setattr(Journal, "write", flaky)
    monkeypatch.setattr(writer_module, "JOURNAL_RETRY", 0.05)
    writer.start()
    events = lifecycle_events("s1", T)
    for event in events:
        writer.record(event)
    # no new event after the failures: the retries alone get them on disk
    deadline = time.monotonic() + 5
    while writer.journal_backlog < len(events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.journal_backlog == len(events) and writer.journal_writable
    with sqlite3.connect(path) as conn:  # as a restart would find it
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == len(events)
    assert writer.close(0.5) == len(events)
    assert [e for _, e in journal_rows(path)] == events
    assert "journal: write failed, will retry" in caplog.text
    assert "writing again" in caplog.text


def test_journal_that_cannot_be_written_at_exit_says_what_is_lost(tmp_path, monkeypatch, caplog):
    """The last write failing too: the events it could not keep are
    counted and said to be lost, never reported as kept."""
    path = str(tmp_path / "journal")
    writer = journaled_writer(FakeStore(always_fail=True), path, threads=1, sleep=no_sleep)
    writer.open()

    def full(self: Journal, appends: Any, removes: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Journal, "write", full)
    writer.start()
    events = lifecycle_events("s1", T)
    for event in events:
        writer.record(event)
    started = time.monotonic()
    assert writer.close(0.2) == len(events)
    assert time.monotonic() - started < 5
    assert writer.journal_lost == len(events) and writer.journal_backlog == 0
    assert f"{len(events)} events could not be kept at exit" in caplog.text
    assert "kept in the journal" not in caplog.text


def test_journal_removed_while_running_is_written_anew(tmp_path):
    """An operator (or a clean-up job) deletes the journal file: the next
    write notices and writes a new file with every event the old one held."""
    import os

    path = str(tmp_path / "journal")
    writer = journaled_writer(FakeStore(always_fail=True), path, threads=1, sleep=lambda s: time.sleep(0.02))
    writer.open()
    writer.start()
    first, second = lifecycle_events("s1", T), lifecycle_events("s2", T + 1)
    for event in first:
        writer.record(event)
    deadline = time.monotonic() + 5
    while writer.journal_backlog < len(first) and time.monotonic() < deadline:
        time.sleep(0.01)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    for event in second:
        writer.record(event)
    assert writer.close(0.2) == len(first) + len(second)
    assert [e for _, e in journal_rows(path)] == first + second


def test_journal_reached_by_another_name_is_still_locked(tmp_path):
    import os

    path = tmp_path / "journal"
    first = Journal(str(path))
    first.open()
    os.symlink(path, tmp_path / "alias")
    with pytest.raises(JournalError, match="in use by another process"):
        Journal(str(tmp_path / "alias")).open()
    first.close()


def test_an_sqlite_file_with_other_tables_is_not_a_journal(tmp_path):
    path = str(tmp_path / "calls.sqlite3")
    SQLiteStore(path).check()  # the development call log, say
    with pytest.raises(JournalError, match=r"JOURNAL_PATH=.*other tables \(call_logs, .*\), not a journal"):
        Journal(path).open()


# -- /health's database state --------------------------------------------------


def test_health_is_degraded_while_a_write_waits(monkeypatch):
    monkeypatch.setattr(writer_module, "DEGRADED_AFTER", 0.2)
    store = FakeStore()
    store.gate = threading.Event()
    writer = CallLogWriter(store, threads=1)
    writer.start()
    assert writer.health() == "ok"
    writer.record(SessionCreated("s1", "r", "d", "p", T))
    assert store.at_gate.wait(5)
    assert writer.health() == "ok"  # waiting, not yet for long
    time.sleep(0.3)
    assert writer.health() == "degraded"
    store.gate.set()
    assert writer.close(5.0) == 0
    assert writer.health() == "ok"


def test_health_is_degraded_after_a_failed_write(monkeypatch):
    monkeypatch.setattr(writer_module, "DEGRADED_AFTER", 0.3)
    store = FakeStore(fail_first=1)
    writer = CallLogWriter(store, threads=1, sleep=no_sleep)
    writer.start()
    writer.record(SessionCreated("s1", "r", "d", "p", T))
    deadline = time.monotonic() + 5
    while store.applied == [] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.applied and writer.health() == "degraded"
    time.sleep(0.35)
    assert writer.health() == "ok"
    writer.close(1.0)


def test_health_tells_a_database_lost_while_idle(monkeypatch):
    """No events to write: the idle writer's probe still finds the database
    gone (and back)."""
    monkeypatch.setattr(writer_module, "IDLE_PROBE", 0.05)
    store = FakeStore()
    alive = {"up": True}

    def ping(conn: object) -> None:
        if not alive["up"]:
            raise ConnectionResetError("server has gone away")

    store.ping = ping  # type: ignore[method-assign]
    writer = CallLogWriter(store, threads=2, sleep=no_sleep)
    writer.start()
    assert writer.health() == "ok"
    alive["up"] = False
    deadline = time.monotonic() + 5
    while writer.health() != "unavailable" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.health() == "unavailable"
    alive["up"] = True
    deadline = time.monotonic() + 5
    while writer.state != "ok" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.state == "ok"
    writer.close(1.0)


def test_start_up_work_is_skipped_when_another_instance_holds_the_node(caplog):
    """A second live instance with the same NODE_ID: its start-up work on
    open rows is not done (the first instance's rows stay open), and it
    says why."""

    class Taken(FakeStore):
        def claim(self, conn: object, node_id: str) -> bool:
            return False

    store = Taken()
    writer = CallLogWriter(store, threads=2)
    writer.claim_node("node-a")
    writer.start()
    writer.record(PreviousRunClosed(T, "node-a"))
    writer.record(SessionCreated("s1", "r", "d", "p", T, "node-a"))
    assert writer.close(5.0) == 0
    assert store.applied == [SessionCreated("s1", "r", "d", "p", T, "node-a")]
    assert writer.node_claimed is False
    assert "NODE_ID 'node-a' is held by another live instance" in caplog.text


def test_health_is_unavailable_while_the_database_is_down():
    writer = CallLogWriter(FakeStore(connect_fail_first=10**9), threads=1, sleep=no_sleep)
    writer.start()
    assert writer.health() == "unavailable"
    writer.close(0.1)


# -- threads -------------------------------------------------------------------


def test_no_thread_left_is_a_start_error(tmp_path, monkeypatch):
    """A task limit below what the pool needs is one clear error, and the
    threads already started are stopped."""
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def limited(self: threading.Thread) -> None:
        if len(started) >= 2:
            raise RuntimeError("can't start new thread")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", limited)
    writer = CallLogWriter(FakeStore(), threads=4, journal=Journal(str(tmp_path / "journal")))
    writer.open()
    with pytest.raises(StartError, match=r"call-log thread 3 of 5 .*TasksMax=.*DB_POOL_SIZE"):
        writer.start()
    for thread in started:
        thread.join(5)
        assert not thread.is_alive()


# -- node_id -------------------------------------------------------------------

#: The table as the first edition made it: today's without node_id.
FIRST_EDITION_DDL = sqlite_ddl(edition=1)


def test_sqlite_table_of_the_first_edition_gets_node_id(tmp_path):
    path = str(tmp_path / "calls.sqlite3")
    assert "node_id" not in FIRST_EDITION_DDL
    with sqlite3.connect(path) as conn:
        conn.executescript(FIRST_EDITION_DDL)
        conn.execute(
            "INSERT INTO call_logs (session_id, ride_id, driver_id, passenger_id, status, created_at)"
            " VALUES ('old', 'r0', 'd', 'p', 'active', ?)",
            (utc_text(T),),
        )
    store = SQLiteStore(path)
    store.check()
    conn = store.connect()
    try:
        store.prepare(conn)  # twice: harmless
        columns = [row[1] for row in conn.execute("PRAGMA table_info(call_logs)")]
        assert columns == CALL_LOG_COLUMNS
        indexes = [row[1] for row in conn.execute("PRAGMA index_list(call_logs)")]
        assert "idx_call_logs_node_status" in indexes
        store.apply(conn, SessionCreated("new", "r1", "d", "p", T + 1, "node-a"))
        store.apply(conn, PreviousRunClosed(T + 10, "node-a"))
        rows = {r[0]: r[1:] for r in conn.execute("SELECT session_id, node_id, status FROM call_logs")}
    finally:
        conn.close()
    # the row of the first edition has no owner and is left alone
    assert rows == {"old": (None, "active"), "new": ("node-a", "ended")}


def test_previous_run_closed_touches_only_its_own_node(tmp_path):
    store = SQLiteStore(str(tmp_path / "calls.sqlite3"))
    store.check()
    conn = store.connect()
    try:
        for session_id, node in (("a1", "node-a"), ("b1", "node-b"), ("a2", "node-a")):
            store.apply(conn, SessionCreated(session_id, f"r-{session_id}", "d", "p", T, node))
        store.apply(conn, CallActive("b1", T + 1))
        store.apply(conn, CallEnded("a2", "user_terminated", T + 2))
        store.apply(conn, PreviousRunClosed(T + 10, "node-a"))
        rows = {r[0]: r[1:] for r in conn.execute("SELECT session_id, status, end_reason FROM call_logs")}
    finally:
        conn.close()
    assert rows == {
        "a1": ("ended", "server_restart"),
        "b1": ("active", None),
        "a2": ("ended", "user_terminated"),
    }


def test_replayed_start_up_work_waits_only_for_what_came_before_it(tmp_path):
    """A PreviousRunClosed that is itself in the journal (its process was
    killed before it committed) waits for the replayed events before it,
    not for itself or later ones."""
    path = str(tmp_path / "journal")
    journal = Journal(path)
    journal.open()
    before, after = lifecycle_events("s1", T), lifecycle_events("s2", T + 50)
    entries = [*before, PreviousRunClosed(T + 40, "node-a"), *after]
    journal.write(list(enumerate(entries, 1)), [])
    journal.close()
    store = FakeStore()
    writer = journaled_writer(store, path, threads=2)
    assert writer.open() == len(entries)
    writer.record(PreviousRunClosed(T + 99, "node-a"))
    writer.start()
    assert writer.close(5.0) == 0
    applied = store.applied
    assert len(applied) == len(entries) + 1
    first_closing = applied.index(entries[4])
    assert all(applied.index(event) < first_closing for event in before)
    assert applied[-1] == PreviousRunClosed(T + 99, "node-a")
    assert journal_rows(path) == []
