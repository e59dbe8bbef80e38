"""Unit tests of the call log (docs/operations.md, "Call log and journal"): the writer thread pool against an
in-memory fake Store, and the SQLite store on a temporary file."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CALL_LOG_COLUMNS
from intaleq_signal.calllog import (
    CallActive,
    CallEnded,
    CallInitiated,
    CallLogWriter,
    MediaReported,
    SessionCreated,
    sql,
)
from intaleq_signal.calllog.sql import utc_text
from intaleq_signal.calllog.sqlite import SQLiteStore
from intaleq_signal.calllog.writer import BACKOFF_FATAL, BACKOFF_FIRST, BACKOFF_MAX, MAX_BATCH
from intaleq_signal.media import Media


def no_sleep(seconds: float) -> None:
    pass


class FakeStore:
    """An in-memory Store: records applied events, fails on demand."""

    healthy_state = "ok"

    def __init__(
        self,
        fail_first: int = 0,
        always_fail: bool = False,
        fail_every: int = 0,
        connect_fail_first: int = 0,
        fatal: bool = False,
        apply_delay: float = 0.0,
    ) -> None:
        self.lock = threading.Lock()
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.fail_every = fail_every
        self.connect_fail_first = connect_fail_first
        self.fatal = fatal
        self.apply_delay = apply_delay
        self.applied: list[Any] = []
        self.batches: list[int] = []  # sizes of apply_batch calls
        self.attempts = 0
        self.connect_attempts = 0
        self.connections = 0
        self.prepared = 0
        self.closed = 0
        self.threads: set[str] = set()
        self.states_at_apply: list[str] = []
        self.writer: CallLogWriter | None = None
        self.gate: threading.Event | None = None  # when set up, apply blocks until it is set
        self.at_gate = threading.Event()  # an apply is waiting at the gate

    def connect(self) -> object:
        with self.lock:
            self.connect_attempts += 1
            if self.connect_attempts <= self.connect_fail_first:
                raise ConnectionRefusedError("connection refused")
            self.connections += 1
        return object()

    def prepare(self, conn: object) -> None:
        with self.lock:
            self.prepared += 1

    def apply(self, conn: object, event: Any) -> None:
        self._apply(event, self.applied)

    def apply_batch(self, conn: object, events: list[Any]) -> None:
        """All or none, like a transaction."""
        self.batches.append(len(events))
        staged: list[Any] = []
        for event in events:
            self._apply(event, staged)
        with self.lock:
            self.applied.extend(staged)

    def _apply(self, event: Any, into: list[Any]) -> None:
        if self.gate is not None:
            self.at_gate.set()
            self.gate.wait()
        if self.apply_delay:
            time.sleep(self.apply_delay)
        with self.lock:
            self.attempts += 1
            self.threads.add(threading.current_thread().name)
            if self.writer is not None:
                self.states_at_apply.append(self.writer.state)
            if (
                self.always_fail
                or self.attempts <= self.fail_first
                or (self.fail_every and self.attempts % self.fail_every == 0)
            ):
                raise ConnectionResetError("server has gone away")
            into.append(event)

    def ping(self, conn: object) -> None:
        pass

    def claim(self, conn: object, node_id: str) -> bool:
        return True

    def load(self, conn: object, node_id: str, since: float) -> list[Any]:
        return []

    def close(self, conn: object) -> None:
        with self.lock:
            self.closed += 1

    def is_fatal(self, exc: BaseException) -> bool:
        return self.fatal

    def is_permanent(self, exc: BaseException) -> bool:
        return isinstance(exc, ValueError)


def lifecycle_events(session_id: str, t: float = 1_700_000_000.0) -> list[Any]:
    return [
        SessionCreated(session_id, f"ride-{session_id}", "drv", "pas", t),
        CallInitiated(session_id, "drv"),
        CallActive(session_id, t + 5),
        CallEnded(session_id, "user_terminated", t + 30),
    ]


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """Poll until ``condition()``; used before close() where close's deadline would cap the backoff."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def make_writer(store: FakeStore, **kwargs: Any) -> CallLogWriter:
    writer = CallLogWriter(store, **kwargs)
    store.writer = writer
    return writer


# -- CallLogWriter ------------------------------------------------------------


def test_writes_in_order_and_flushes_on_close():
    """docs/operations.md, "Call log and journal": writes for one session are applied in order;
    close() flushes and reports 0 left."""
    store = FakeStore()
    writer = make_writer(store)
    writer.start()
    events = lifecycle_events("s1")
    for event in events:
        writer.record(event)
    assert writer.close(5.0) == 0
    assert store.applied == events
    assert writer.writes == 4 and writer.failures == 0
    assert store.connections == 1 and store.prepared == 1
    assert store.closed == 1  # the thread closes its connection on exit


def test_failed_writes_are_retried_in_order():
    """docs/operations.md, "Call log and journal": an unreachable database delays writes, which
    retry with backoff and land in order."""
    store = FakeStore(fail_first=3)
    delays: list[float] = []
    writer = make_writer(store, sleep=delays.append)
    events = lifecycle_events("s1")
    for event in events:
        writer.record(event)
    writer.start()
    wait_for(lambda: len(store.applied) == 4)
    assert writer.close(5.0) == 0
    assert store.applied == events
    # the four queued events were tried as one batch (failure 1), then one
    # at a time: the first failed twice more, with backoff
    assert store.batches == [4]
    assert writer.failures == 3
    assert writer.writes == 4
    assert delays == [BACKOFF_FIRST, BACKOFF_FIRST * 2]
    # each failure of a single write drops the connection; the retry uses a fresh one
    assert store.connections == 3
    assert store.prepared == 3


def test_events_queued_behind_a_write_go_in_one_batch():
    """Events that pile up while a write is in progress land in one
    transaction, in order (one commit instead of one per event)."""
    store = FakeStore()
    store.gate = threading.Event()
    writer = make_writer(store)
    writer.start()
    writer.record(SessionCreated("s0", "r", "d", "p", 0.0))  # held at the gate
    assert store.at_gate.wait(5)
    assert writer.pending == 1
    events = [event for n in range(1, 4) for event in lifecycle_events(f"s{n}")]
    for event in events:
        writer.record(event)
    assert writer.pending == 1 + len(events)
    store.gate.set()
    assert writer.close(5.0) == 0
    assert store.applied[1:] == events
    assert store.batches == [len(events)]
    assert writer.writes == 1 + len(events)
    assert writer.pending == 0


def test_batches_are_bounded():
    store = FakeStore()
    writer = make_writer(store)
    for n in range(MAX_BATCH + 10):
        writer.record(CallEnded(f"s{n}", "expired", 60.0))
    writer.start()
    assert writer.close(5.0) == 0
    assert store.batches == [MAX_BATCH, 10]
    assert len(store.applied) == MAX_BATCH + 10


def test_state_unavailable_then_back():
    """docs/protocol.md, "GET /health": the database state goes `unavailable` while writes
    fail, then back to ok."""
    store = FakeStore(fail_first=2)
    writer = make_writer(store, sleep=no_sleep)
    writer.record(SessionCreated("s1", "r", "d", "p", 0.0))
    writer.record(CallEnded("s1", "expired", 60.0))
    writer.start()
    assert writer.close(5.0) == 0
    # a failed batch (first entry) is retried one event at a time
    assert store.states_at_apply == ["ok", "ok", "unavailable", "ok"]
    assert writer.state == "ok"


def test_state_known_right_after_start():
    """docs/protocol.md, "GET /health": the database state is reported from the start (ok when
    it connects)."""
    store = FakeStore()
    writer = make_writer(store)
    writer.start()
    try:
        assert writer.state == "ok"
    finally:
        assert writer.close(1.0) == 0


def test_state_unavailable_when_database_down_at_start():
    """docs/protocol.md, "GET /health": a database that is down at start is reported
    unavailable, not waited for."""
    store = FakeStore(connect_fail_first=10**9)
    writer = make_writer(store, sleep=no_sleep)
    started = time.monotonic()
    writer.start()
    assert time.monotonic() - started < 1.0
    assert writer.state == "unavailable"
    assert writer.close(0.1) == 0


def retry_delays(store: FakeStore) -> list[float]:
    """The waits of a writer retrying one event into ``store`` until it
    lands (and closes with nothing left)."""
    delays: list[float] = []
    writer = make_writer(store, sleep=delays.append)
    writer.record(CallActive("s1", 0.0))
    writer.start()
    wait_for(lambda: store.applied)
    assert writer.close(5.0) == 0
    return delays


def test_backoff_is_exponential_and_capped():
    """docs/operations.md, "Call log and journal": retries back off exponentially up to a cap
    (no hot loop against a dead database)."""
    store = FakeStore(fail_first=9)
    delays = retry_delays(store)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX])
    assert store.applied == [CallActive("s1", 0.0)]


def test_fatal_errors_back_off_long():
    """docs/operations.md, "Call log and journal": errors a retry cannot fix soon (credentials)
    are retried slowly."""
    store = FakeStore(fail_first=2, fatal=True)
    assert retry_delays(store) == [BACKOFF_FATAL, BACKOFF_FATAL]
    assert len(store.applied) == 1


def test_connect_failures_are_retried():
    """docs/operations.md, "Call log and journal": a database that is down at start is retried
    until it comes up."""
    store = FakeStore(connect_fail_first=3)
    writer = make_writer(store, sleep=no_sleep)
    events = lifecycle_events("s1")
    for event in events:
        writer.record(event)
    writer.start()
    assert writer.close(5.0) == 0
    assert store.applied == events
    assert store.connect_attempts == 4
    assert store.prepared == 1
    assert writer.state == "ok"


def test_many_sessions_keep_per_session_order_with_threads():
    """docs/operations.md, "Call log and journal": with several writer threads and a flaky
    database, each session's writes stay in order."""
    store = FakeStore(fail_every=7)
    writer = make_writer(store, threads=4, sleep=no_sleep)
    writer.start()
    sessions = [f"session-{i}" for i in range(40)]
    expected: dict[str, list[Any]] = {s: [] for s in sessions}
    for seq in range(25):
        for session_id in sessions:
            event = CallActive(session_id, float(seq))
            expected[session_id].append(event)
            writer.record(event)
    assert writer.close(10.0) == 0
    got: dict[str, list[Any]] = {s: [] for s in sessions}
    for event in store.applied:
        got[event.session_id].append(event)
    assert got == expected
    assert len(store.threads) > 1  # the work really was spread over threads
    assert writer.failures > 0


def test_close_waits_for_slow_writes():
    """docs/operations.md, "Shutdown": shutdown flushes the call-log writes that are queued."""
    store = FakeStore(apply_delay=0.001)
    writer = make_writer(store, threads=2)
    writer.start()
    for i in range(200):
        writer.record(CallActive(f"s{i % 10}", float(i)))
    assert writer.close(10.0) == 0
    assert len(store.applied) == 200
    assert writer.pending == 0


@pytest.mark.parametrize("sleep", [None, no_sleep], ids=["real-backoff", "no-sleep"])
def test_close_with_dead_database_returns_unwritten_count(sleep):
    """docs/operations.md, "Shutdown": shutdown gives up on an unreachable database within the
    timeout and reports what is lost."""
    store = FakeStore(always_fail=True)
    writer = make_writer(store, threads=2, sleep=sleep)
    writer.start()
    for i in range(7):
        writer.record(CallActive(f"s{i}", float(i)))
    time.sleep(0.05)  # let the threads start failing and backing off
    started = time.monotonic()
    left = writer.close(0.3)
    elapsed = time.monotonic() - started
    assert left == 7
    assert elapsed < 1.5
    assert store.applied == []
    assert writer.state == "unavailable"


def test_close_with_a_stuck_write_returns_within_timeout():
    """docs/operations.md, "Shutdown": a write hanging in the driver does not hold shutdown
    past the timeout."""
    store = FakeStore()
    store.gate = threading.Event()
    writer = make_writer(store)
    writer.start()
    for event in lifecycle_events("s1"):
        writer.record(event)
    started = time.monotonic()
    try:
        left = writer.close(0.2)
        elapsed = time.monotonic() - started
    finally:
        store.gate.set()  # let the daemon thread finish
    assert left == 4  # one in hand, three queued
    assert elapsed < 1.0


def test_record_never_blocks():
    """docs/protocol.md, "Call log": a slow database never delays signaling: record() returns at once."""
    store = FakeStore()
    store.gate = threading.Event()
    writer = make_writer(store)
    writer.start()
    started = time.monotonic()
    for i in range(5000):
        writer.record(CallActive(f"s{i}", float(i)))
    assert time.monotonic() - started < 1.0
    assert writer.pending >= 4999
    store.gate.set()
    assert writer.close(10.0) == 0
    assert len(store.applied) == 5000


def test_max_pending_drops_and_counts(caplog):
    """docs/operations.md, "Call log and journal": the queue is bounded; past max_pending new
    events are dropped, counted and warned about."""
    store = FakeStore()
    writer = make_writer(store, max_pending=10)
    with caplog.at_level(logging.WARNING, logger="intaleq_signal.calllog"):
        events = [CallActive(f"s{i}", float(i)) for i in range(15)]
        for event in events:
            writer.record(event)
    assert writer.dropped == 5
    assert writer.pending == 10
    assert any("backlog" in record.getMessage() for record in caplog.records)
    writer.start()
    assert writer.close(5.0) == 0
    assert store.applied == events[:10]


# -- SQLiteStore --------------------------------------------------------------

T = 1_700_000_000.25  # 2023-11-14 22:13:20.250 UTC


@pytest.fixture
def sqlite_store(tmp_path):
    store = SQLiteStore(str(tmp_path / "calls.sqlite3"))
    conn = store.connect()
    store.prepare(conn)
    yield store, conn
    store.close(conn)


def rows(store: SQLiteStore) -> list[dict[str, Any]]:
    with sqlite3.connect(store.path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM call_logs ORDER BY id")]


def only_row(store: SQLiteStore) -> dict[str, Any]:
    (row,) = rows(store)
    return row


def test_sqlite_batch_is_all_or_nothing(sqlite_store):
    """A batch is one transaction: an event that fails rolls back those
    before it, and the connection is usable afterwards."""
    store, conn = sqlite_store
    good = SessionCreated("s1", "ride-1", "drv", "pas", T)
    bad = SessionCreated("s2", "ride-\ud800", "drv", "pas", T)  # a lone surrogate: not storable
    with pytest.raises(UnicodeEncodeError):
        store.apply_batch(conn, [good, bad])
    assert rows(store) == []
    assert not conn.in_transaction
    store.apply_batch(conn, [good, CallActive("s1", T + 5)])
    assert only_row(store)["status"] == "active"


def test_sqlite_schema_columns(sqlite_store):
    """docs/protocol.md, "Call log": the call_logs columns of the seed schema."""
    store, conn = sqlite_store
    columns = [row[1] for row in conn.execute("PRAGMA table_info(call_logs)")]
    assert columns == CALL_LOG_COLUMNS
    store.prepare(conn)  # created when missing: preparing again is harmless


def test_sqlite_schema_indexes_and_constraints(sqlite_store):
    """The SQLite table from calllog/sql.py: unique session_id, the id as
    its rowid, the indexes on ride_id and (node_id, status), NOT NULL
    created_at (the MySQL table differs there: see sql.COLUMNS)."""
    store, conn = sqlite_store
    indexes = {row[1]: row[2] for row in conn.execute("PRAGMA index_list(call_logs)")}  # name: unique
    named = {name: unique for name, unique in indexes.items() if not name.startswith("sqlite_autoindex")}
    assert named == {"idx_call_logs_ride_id": 0, "idx_call_logs_node_status": 0}
    assert sorted(indexes.values()) == [0, 0, 1]  # the inline UNIQUE of session_id
    info = {row[1]: row for row in conn.execute("PRAGMA table_info(call_logs)")}
    assert info["id"][5] == 1 and info["created_at"][3] == 1 and info["connected_at"][3] == 0
    store.apply(conn, SessionCreated("s1", "ride-1", "drv", "pas", T))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO call_logs (session_id, ride_id, driver_id, passenger_id, created_at)"
            " VALUES ('s1', 'r', 'd', 'p', 'now')"
        )


CALL_LOGS_SQL = Path(sql.__file__).with_name("call_logs.sql")


def test_call_logs_sql_is_the_generated_mysql_ddl():
    """call_logs.sql (database.sql links to it) is what calllog/sql.py
    generates from its table: `make schema` rewrites it."""
    assert CALL_LOGS_SQL.read_text(encoding="utf-8") == sql.mysql_ddl()
    assert (Path(__file__).resolve().parent.parent / "database.sql").resolve() == CALL_LOGS_SQL.resolve()


def test_both_ddls_have_every_column_in_order():
    names = [column.name for column in sql.COLUMNS]
    for ddl in (sql.mysql_ddl(), sql.sqlite_ddl()):
        table = ddl.split("CREATE TABLE IF NOT EXISTS call_logs (\n", 1)[1]
        assert [line.split()[0] for line in table.splitlines()][: len(names)] == names, ddl
    assert [column.name for column in sql.ADDED_COLUMNS] == ["node_id", *CALL_LOG_COLUMNS[12:]]
    assert [index.name for index in sql.late_indexes("mysql")] == ["idx_call_logs_node_status"]
    assert [index.name for index in sql.late_indexes("sqlite")] == ["idx_call_logs_node_status"]


def test_schema_command_rewrites_and_checks_the_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "call_logs.sql"
    monkeypatch.setattr(sql, "MYSQL_DDL_FILE", target)
    assert sql.main(["--check"]) == 1 and not target.exists()
    assert sql.main([]) == 0 and target.read_text(encoding="utf-8") == sql.mysql_ddl()
    assert sql.main(["--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("up to date")


def test_sqlite_every_event(sqlite_store):
    """docs/protocol.md, "Call log": created → active → ended rows with initiated_by and the
    event times in UTC."""
    store, conn = sqlite_store
    store.apply(conn, SessionCreated("s1", "ride-1", "drv", "pas", T, "node-a"))
    assert only_row(store) | {"id": 0} == {
        "id": 0,
        "session_id": "s1",
        "ride_id": "ride-1",
        "driver_id": "drv",
        "passenger_id": "pas",
        "status": "created",
        "initiated_by": None,
        "end_reason": None,
        "created_at": "2023-11-14 22:13:20.250",
        "connected_at": None,
        "ended_at": None,
        "node_id": "node-a",
        "media_connected_at": None,
        "driver_candidate": None,
        "passenger_candidate": None,
        "media_failures": 0,
        "driver_media_at": None,
        "passenger_media_at": None,
    }
    store.apply(conn, CallInitiated("s1", "drv"))
    assert only_row(store)["initiated_by"] == "drv"
    store.apply(conn, CallActive("s1", T + 5))
    row = only_row(store)
    assert (row["status"], row["connected_at"]) == ("active", "2023-11-14 22:13:25.250")
    store.apply(conn, CallEnded("s1", "max_duration_reached", T + 65))
    row = only_row(store)
    assert (row["status"], row["end_reason"], row["ended_at"]) == (
        "ended",
        "max_duration_reached",
        "2023-11-14 22:14:25.250",
    )
    assert row["created_at"] == "2023-11-14 22:13:20.250"


def test_sqlite_replays_are_idempotent(sqlite_store):
    """docs/operations.md, "Call log and journal": every apply is idempotent, since the writer
    resends after a broken connection."""
    store, conn = sqlite_store
    for event in lifecycle_events("s1", T):
        store.apply(conn, event)
        before = rows(store)
        store.apply(conn, event)
        assert rows(store) == before
    assert len(rows(store)) == 1


def test_sqlite_late_replays_do_not_rewind(sqlite_store):
    """docs/operations.md, "Call log and journal": replaying older events after the end changes
    nothing (no status going back)."""
    store, conn = sqlite_store
    events = lifecycle_events("s1", T)
    for event in events:
        store.apply(conn, event)
    final = rows(store)
    for event in events:
        store.apply(conn, event)
    assert rows(store) == final


def test_sqlite_call_ended_never_overwritten(sqlite_store):
    """docs/operations.md, "Call log and journal": the first end reason and end time stay; a
    later CallEnded does not overwrite them."""
    store, conn = sqlite_store
    store.apply(conn, SessionCreated("s1", "r", "d", "p", T))
    store.apply(conn, CallEnded("s1", "expired", T + 60))
    store.apply(conn, CallEnded("s1", "server_shutdown", T + 90))
    store.apply(conn, CallEnded("s1", "server_restart", T + 900))
    row = only_row(store)
    assert (row["status"], row["end_reason"], row["ended_at"]) == ("ended", "expired", utc_text(T + 60))
    assert row["connected_at"] is None


def test_sqlite_initiated_by_set_once(sqlite_store):
    """docs/protocol.md, rule 4: the first participant to send an offer is initiated_by."""
    store, conn = sqlite_store
    store.apply(conn, SessionCreated("s1", "r", "d", "p", T))
    store.apply(conn, CallInitiated("s1", "p"))
    store.apply(conn, CallInitiated("s1", "d"))
    assert only_row(store)["initiated_by"] == "p"


def test_sqlite_sessions_are_separate_rows(sqlite_store):
    """docs/protocol.md, "Call log": one row per session_id (unique)."""
    store, conn = sqlite_store
    for session_id in ("a", "b", "c"):
        store.apply(conn, SessionCreated(session_id, "ride", "d", "p", T))
    store.apply(conn, CallEnded("b", "expired", T + 60))
    assert [(r["session_id"], r["status"]) for r in rows(store)] == [
        ("a", "created"),
        ("b", "ended"),
        ("c", "created"),
    ]


#: A call's media reports as the engine records them (docs/protocol.md, "media_state"): the driver
#: connected over host, a failure, the driver through TURN after an ICE restart, the passenger connected.
MEDIA_EVENTS = [
    MediaReported("s1", driver_media_at=T + 6, driver_candidate="host"),
    MediaReported("s1", driver_media_at=T + 6, driver_candidate="host", media_failures=1),
    MediaReported("s1", driver_media_at=T + 6, driver_candidate="relay", media_failures=1),
    MediaReported("s1", T + 9, T + 6, T + 9, "relay", "srflx", 1),
]
#: The row's media columns after them.
MEDIA_ROW = {
    "media_connected_at": utc_text(T + 9),
    "driver_candidate": "relay",
    "passenger_candidate": "srflx",
    "media_failures": 1,
    "driver_media_at": utc_text(T + 6),
    "passenger_media_at": utc_text(T + 9),
}


def media_columns(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in MEDIA_ROW}


def test_sqlite_media_columns(sqlite_store):
    """docs/protocol.md, "Call log": the media columns as the reports set them, and back as a restart
    restores them."""
    store, conn = sqlite_store
    for event in [*lifecycle_events("s1", T)[:3], *MEDIA_EVENTS]:
        store.apply(conn, event)
    assert media_columns(only_row(store)) == MEDIA_ROW
    [restored] = store.load(conn, "", T - 60)
    assert restored.media == Media(T + 9, T + 6, T + 9, "relay", "srflx", 1)


def test_sqlite_media_replays_are_idempotent(sqlite_store):
    """docs/operations.md, "Call log and journal": a replay — any event again, or the journal's events
    again in their order after the later ones landed — leaves the media columns as they were: the times
    set once, the failures an absolute count (never counted twice, never lowered)."""
    store, conn = sqlite_store
    store.apply(conn, SessionCreated("s1", "r", "d", "p", T))
    for event in MEDIA_EVENTS:
        store.apply(conn, event)
        before = only_row(store)
        store.apply(conn, event)
        assert only_row(store) == before
    final = only_row(store)
    for start in range(len(MEDIA_EVENTS)):
        for event in MEDIA_EVENTS[start:]:
            store.apply(conn, event)
        assert only_row(store) == final
    store.apply(conn, MediaReported("s1", T + 50, T + 50, T + 50, None, None, 0))  # older, or a stale owner
    assert media_columns(only_row(store)) == MEDIA_ROW


def test_sqlite_row_without_reports_restores_no_media(sqlite_store):
    store, conn = sqlite_store
    for event in lifecycle_events("s1", T)[:3]:
        store.apply(conn, event)
    row = only_row(store)
    assert media_columns(row) == dict.fromkeys(MEDIA_ROW) | {"media_failures": 0}
    [restored] = store.load(conn, "", T - 60)
    assert restored.media is None


def test_sqlite_table_of_the_previous_edition_gets_the_media_columns(tmp_path):
    """A call log made by the previous version (edition 2: no media columns) gets them at start, its rows
    with no media (media_failures 0); preparing again changes nothing; its rows take media reports."""
    path = str(tmp_path / "calls.sqlite3")
    with sqlite3.connect(path) as conn:
        conn.executescript(sql.sqlite_ddl(edition=2))
        conn.execute(
            "INSERT INTO call_logs (session_id, ride_id, driver_id, passenger_id, status, created_at)"
            " VALUES ('s1', 'r0', 'd', 'p', 'active', ?)",
            (utc_text(T),),
        )
        assert [row[1] for row in conn.execute("PRAGMA table_info(call_logs)")] == CALL_LOG_COLUMNS[:12]
    store = SQLiteStore(path)
    store.check()
    conn = store.connect()
    try:
        store.prepare(conn)  # twice: harmless
        assert [row[1] for row in conn.execute("PRAGMA table_info(call_logs)")] == CALL_LOG_COLUMNS
        assert media_columns(only_row(store)) == dict.fromkeys(MEDIA_ROW) | {"media_failures": 0}
        for event in MEDIA_EVENTS:
            store.apply(conn, event)
    finally:
        conn.close()
    assert media_columns(only_row(store)) == MEDIA_ROW


@pytest.mark.parametrize(
    "at, text",
    [
        (0.0, "1970-01-01 00:00:00.000"),
        (1.2345, "1970-01-01 00:00:01.234"),
        (T, "2023-11-14 22:13:20.250"),
        (1_735_689_599.999, "2024-12-31 23:59:59.999"),
    ],
)
def test_utc_text(at, text):
    """docs/protocol.md, "Call log": times are UTC, with milliseconds."""
    assert utc_text(at) == text


def test_sqlite_unopenable_path_is_fatal(tmp_path):
    """docs/operations.md, "Call log and journal": an SQLite file that cannot be opened is not hot-retried."""
    store = SQLiteStore(str(tmp_path / "missing-dir" / "calls.sqlite3"))
    with pytest.raises(sqlite3.OperationalError) as info:
        store.connect()
    assert store.is_fatal(info.value)
    assert not store.is_fatal(sqlite3.OperationalError("database is locked"))
    assert not store.is_fatal(ValueError("x"))
    assert store.healthy_state == "sqlite"


def test_writer_with_sqlite_store(tmp_path):
    """docs/operations.md, "Call log and journal": in development the writer logs calls to the
    SQLite file, state `sqlite`."""
    store = SQLiteStore(str(tmp_path / "calls.sqlite3"))
    writer = CallLogWriter(store, threads=1)
    writer.start()
    for session_id in ("s1", "s2"):
        for event in lifecycle_events(session_id, T):
            writer.record(event)
    assert writer.close(5.0) == 0
    assert writer.state == "sqlite"
    assert [(r["session_id"], r["status"], r["initiated_by"], r["end_reason"]) for r in rows(store)] == [
        ("s1", "ended", "drv", "user_terminated"),
        ("s2", "ended", "drv", "user_terminated"),
    ]


def test_event_refused_as_data_error_is_skipped_not_retried():
    """docs/operations.md, "Call log and journal": one event the database refuses for its data
    does not block the session queue behind it."""

    class RefusingStore(FakeStore):
        def _apply(self, event: Any, into: list[Any]) -> None:
            if isinstance(event, CallInitiated):
                raise ValueError("unencodable user id")
            super()._apply(event, into)

    store = RefusingStore()
    writer = CallLogWriter(store, threads=1, sleep=lambda s: None)
    writer.start()
    for event in lifecycle_events("s1"):
        writer.record(event)
    assert writer.close(5.0) == 0
    assert [type(e).__name__ for e in store.applied] == ["SessionCreated", "CallActive", "CallEnded"]
    assert writer.rejected == 1
