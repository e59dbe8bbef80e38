"""The MySQL call log against the real MariaDB/MySQL of this machine
(docs/protocol.md, "Call log"; docs/operations.md, "Call log and journal").

Each test gets a database with a random name, dropped afterwards. The outage
tests put a TCP proxy the test controls between the daemon and the database.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_calllog import MEDIA_EVENTS, MEDIA_ROW, T

from conftest import (
    CALL_LOG_COLUMNS,
    closed_with,
    connected_call,
    health,
    metric,
    recv_json,
    run_daemon,
    send_json,
    utcnow,
    wait_until,
)
from intaleq_signal.calllog import sql
from intaleq_signal.calllog.mysql import DDL
from intaleq_signal.media import Media
from mysql_support import Database

ROOT = Path(__file__).resolve().parent.parent


def test_ddl_is_database_sql_and_creates_the_table(server_factory, db) -> None:
    """docs/operations.md, "MySQL user and grants": the table is created at start from
    database.sql (one source of truth)."""
    assert (ROOT / "database.sql").read_text(encoding="utf-8") == DDL
    server_factory(**db.server_env())
    wait_until(lambda: db.query("SHOW TABLES LIKE 'call_logs'"))
    columns = {
        row["COLUMN_NAME"]: row
        for row in db.query(
            "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_MAXIMUM_LENGTH FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'call_logs'",
            db.name,
        )
    }
    assert set(columns) == set(CALL_LOG_COLUMNS)
    assert columns["session_id"]["CHARACTER_MAXIMUM_LENGTH"] == 36
    [table] = db.query(
        "SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'call_logs'",
        db.name,
    )
    assert table["ENGINE"] == "InnoDB"
    assert table["TABLE_COLLATION"].startswith("utf8mb4")
    indexes = {
        (row["Key_name"], row["Column_name"], row["Non_unique"])
        for row in db.query("SHOW INDEX FROM call_logs")
    }
    assert ("uq_call_logs_session_id", "session_id", 0) in indexes
    assert any(name != "PRIMARY" and column == "ride_id" for name, column, _ in indexes)


def test_every_end_reason_gives_its_row(server_factory, db) -> None:
    """docs/protocol.md, "Call log": created → active → ended rows with event times, for every end reason."""
    server = server_factory(SESSION_DURATION="2s", RECONNECT_GRACE="300ms", **db.server_env())
    before = utcnow() - datetime.timedelta(seconds=1)
    sessions = {}

    def new(reason):
        sessions[reason] = server.new_session(ride_id=f"ride-{reason}")
        return sessions[reason]

    new("expired")

    async def scenario() -> None:
        d, p = await connected_call(server, new("user_terminated"))
        await send_json(d, {"type": "offer", "sdp": "v=0"})
        await recv_json(p)
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000

        d, p = await connected_call(server, new("disconnect_driver"))
        await d.close()
        assert await recv_json(p) == {"type": "participant_left", "role": "driver"}
        assert await recv_json(p) == {"type": "call_ended", "reason": "disconnect_driver"}

        d, p = await connected_call(server, new("disconnect_passenger"))
        await send_json(p, {"type": "offer", "sdp": "v=0"})
        await recv_json(d)
        await p.close()
        assert await recv_json(d) == {"type": "participant_left", "role": "passenger"}
        assert await recv_json(d) == {"type": "call_ended", "reason": "disconnect_passenger"}

        d, p = await connected_call(server, new("max_duration_reached"))
        assert await recv_json(d, timeout=5) == {"type": "call_timeout", "reason": "max_duration_reached"}
        assert await closed_with(p) == 1000

        shutdown_d, shutdown_p = await connected_call(server, new("server_shutdown"))
        server.proc.send_signal(15)
        assert await recv_json(shutdown_d) == {"type": "call_ended", "reason": "server_shutdown"}
        assert await closed_with(shutdown_p) == 1001

    asyncio.run(scenario())
    assert server.stop() == 0
    after = utcnow() + datetime.timedelta(seconds=1)
    rows = {row["ride_id"]: row for row in db.rows()}
    assert len(rows) == 6
    for reason, session in sessions.items():
        row = rows[f"ride-{reason}"]
        assert row["session_id"] == session["session_id"]
        assert (row["driver_id"], row["passenger_id"]) == ("driver-1", "passenger-1")
        assert row["status"] == "ended", row
        assert row["end_reason"] == reason, row
        assert before <= row["created_at"] <= row["ended_at"] <= after, row
        if reason == "expired":
            assert row["connected_at"] is None
            assert row["ended_at"] - row["created_at"] >= datetime.timedelta(seconds=1.9)
        else:
            assert row["created_at"] <= row["connected_at"] <= row["ended_at"], row
    assert rows["ride-user_terminated"]["initiated_by"] == "driver-1"
    assert rows["ride-disconnect_passenger"]["initiated_by"] == "passenger-1"
    assert rows["ride-expired"]["initiated_by"] is None
    call = rows["ride-max_duration_reached"]
    assert (
        datetime.timedelta(seconds=1.9)
        <= call["ended_at"] - call["connected_at"]
        <= datetime.timedelta(seconds=3.5)
    )


def test_hundreds_of_parallel_sessions(server_factory, db) -> None:
    """docs/operations.md, "Call log and journal": concurrent sessions and calls over
    DB_POOL_SIZE threads all land, each in order."""
    server = server_factory(DB_POOL_SIZE="4", **db.server_env())
    with ThreadPoolExecutor(16) as pool:
        sessions = list(pool.map(lambda i: server.new_session(ride_id=f"par-{i}"), range(300)))

    # All from 127.0.0.1: at most 40 calls (80 sockets) between upgrade and
    # authenticate at once, under the 100 a client IP may have waiting
    # (docs/protocol.md, "Connecting").
    joining = asyncio.Semaphore(40)

    async def call(session) -> None:
        async with joining:
            d, p = await connected_call(server, session)
        await send_json(p, {"type": "offer", "sdp": "v=0"})
        await recv_json(d)
        await send_json(d, {"type": "end_call"})
        await closed_with(p)

    async def scenario() -> None:
        await asyncio.gather(*(call(s) for s in sessions[:150]))

    asyncio.run(scenario())
    assert server.stop() == 0
    rows = {row["session_id"]: row for row in db.rows()}
    assert len(rows) == 300
    for i, session in enumerate(sessions):
        row = rows[session["session_id"]]
        assert row["ride_id"] == f"par-{i}"
        if i < 150:
            assert (row["status"], row["end_reason"], row["initiated_by"]) == (
                "ended",
                "user_terminated",
                "passenger-1",
            )
            assert row["created_at"] <= row["connected_at"] <= row["ended_at"]
        else:
            assert (row["status"], row["end_reason"]) == ("ended", "server_shutdown")


def test_outage_mid_run_loses_nothing_and_does_not_touch_calls(server_factory, db, proxy) -> None:
    """docs/operations.md, "Call log and journal": MySQL cut for seconds during live calls:
    signaling unaffected, every record lands in order."""
    server = server_factory(**db.server_env(proxy.port))
    wait_until(lambda: health(server)["database"] == "ok")
    early = [server.new_session(ride_id=f"early-{i}") for i in range(5)]
    wait_until(lambda: len(db.rows()) == 5)

    timings: list[float] = []

    async def scenario() -> list[dict]:
        calls = [await connected_call(server, s) for s in early]
        proxy.cut()
        cut_at = utcnow()
        during = []
        for i in range(20):  # sessions created and calls relayed while the database is gone
            started = time.monotonic()
            during.append(server.new_session(ride_id=f"during-{i}"))
            timings.append(time.monotonic() - started)
        for d, p in calls:
            for n in range(10):
                started = time.monotonic()
                await send_json(d, {"type": "ice_candidate", "candidate": {"candidate": f"c{n}"}})
                assert (await recv_json(p))["candidate"] == {"candidate": f"c{n}"}
                timings.append(time.monotonic() - started)
        for d, p in calls[:3]:
            await send_json(d, {"type": "end_call"})
            assert await closed_with(p) == 1000
        await asyncio.sleep(3)
        assert health(server)["database"] == "unavailable"
        proxy.restore()
        return during, cut_at

    during, cut_at = asyncio.run(scenario())
    assert max(timings) < 0.5, timings  # no waiting on the database anywhere in signaling
    wait_until(lambda: health(server)["database"] == "ok", timeout=20)
    wait_until(lambda: len(db.rows()) == 25, timeout=20)
    assert server.stop() == 0
    rows = {row["ride_id"]: row for row in db.rows()}
    for i in range(len(early)):
        row = rows[f"early-{i}"]
        expected = "user_terminated" if i < 3 else "server_shutdown"
        assert (row["status"], row["end_reason"]) == ("ended", expected), row
        assert row["connected_at"] is not None
        assert row["created_at"] <= row["connected_at"] <= row["ended_at"]
    for i, session in enumerate(during):
        row = rows[f"during-{i}"]
        assert row["session_id"] == session["session_id"]
        assert row["status"] == "ended" and row["end_reason"] == "server_shutdown"
        # the event time, not the (later) time the write reached the database
        assert row["created_at"] <= cut_at + datetime.timedelta(seconds=3), row


def test_start_with_mysql_unreachable(server_factory, db, proxy) -> None:
    """docs/operations.md, "Call log and journal": the daemon starts and serves with the
    database down; records land when it comes."""
    proxy.cut()
    server = server_factory(**db.server_env(proxy.port))
    assert health(server)["database"] == "unavailable"
    session = server.new_session(ride_id="down-at-start")

    async def scenario() -> None:
        d, p = await connected_call(server, session)
        await send_json(d, {"type": "offer", "sdp": "v=0"})
        assert await recv_json(p) == {"type": "offer", "sdp": "v=0"}
        await send_json(d, {"type": "end_call"})
        await closed_with(p)

    asyncio.run(scenario())
    server.wait_for_log("database unavailable")
    proxy.restore()
    wait_until(lambda: health(server)["database"] == "ok", timeout=20)
    wait_until(lambda: db.query("SHOW TABLES LIKE 'call_logs'") and db.rows(), timeout=20)
    [row] = db.rows()
    assert (row["session_id"], row["status"], row["end_reason"], row["initiated_by"]) == (
        session["session_id"],
        "ended",
        "user_terminated",
        "driver-1",
    )


def test_wrong_credentials_reported_without_hot_retry(server_factory, db) -> None:
    """docs/operations.md, "Troubleshooting": credentials errors are reported clearly, not
    retried in a hot loop; signaling works."""
    env = db.server_env()
    env["DB_USERNAME"] = "no_such_user_intaleq"
    env["DB_PASSWORD"] = "wrong"
    server = server_factory(**env)
    line = server.wait_for_log("call log: database unavailable")
    assert "Access denied" in line
    session = server.new_session(ride_id="bad-credentials")
    assert session["expires_in"] == 60
    time.sleep(2)
    failed = metric(server, "intaleq_calllog_writes_failed_total")
    assert failed <= 2 * int(env.get("DB_POOL_SIZE", "4")), server.log
    assert metric(server, "intaleq_calllog_writes_pending") == 2  # the restart clean-up and the session's row


def test_sigkill_then_restart_closes_open_rows_as_server_restart(server_factory, db, tmp_path) -> None:
    """docs/protocol.md, "End reasons" (server_restart): after a SIGKILL, ended calls keep
    their final row; rows left open end as
    server_restart at the restart; new calls work."""
    env = {
        "SESSION_DURATION": "10m",
        "NODE_ID": "crash-node",
        "JOURNAL_PATH": str(tmp_path / "j"),
        **db.server_env(),
    }
    first = server_factory(**env)
    ended = first.new_session(ride_id="crash-ended")
    live = first.new_session(ride_id="crash-live")
    waiting = first.new_session(ride_id="crash-waiting")

    async def before_crash() -> None:
        d, p = await connected_call(first, ended)
        await send_json(d, {"type": "end_call"})
        assert await closed_with(p) == 1000
        await connected_call(first, live)
        # rows by ride: their ids follow the order the writer threads inserted them
        expected = {"crash-ended": "ended", "crash-live": "active", "crash-waiting": "created"}
        wait_until(
            lambda: {r["ride_id"]: r["status"] for r in db.rows()} == expected,
            explain=lambda: f"{db.rows()}\n{first.log}",
        )
        first.proc.kill()
        first.proc.wait(10)

    asyncio.run(before_crash())
    killed_at = utcnow()
    first.lines.append("(killed with SIGKILL by the test)")
    first.stop = lambda *args, **kwargs: 0  # already dead; teardown must not expect exit 0 from it

    second = server_factory(**env)
    wait_until(
        lambda: all(r["status"] == "ended" for r in db.rows()), explain=lambda: f"{db.rows()}\n{second.log}"
    )
    rows = {row["ride_id"]: row for row in db.rows()}
    assert rows["crash-ended"]["end_reason"] == "user_terminated"
    assert rows["crash-ended"]["ended_at"] < killed_at
    for ride in ("crash-live", "crash-waiting"):
        assert rows[ride]["end_reason"] == "server_restart", rows[ride]
        assert rows[ride]["ended_at"] >= killed_at - datetime.timedelta(seconds=1)
    assert rows["crash-live"]["connected_at"] is not None and rows["crash-waiting"]["connected_at"] is None
    assert waiting["session_id"] == rows["crash-waiting"]["session_id"]

    fresh = second.new_session(ride_id="crash-live")  # the ride gets a new session after the restart
    assert fresh["session_id"] != live["session_id"]

    async def after_restart() -> None:
        d, p = await connected_call(second, fresh)
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000

    asyncio.run(after_restart())
    assert second.stop() == 0
    row = next(r for r in db.rows() if r["session_id"] == fresh["session_id"])
    assert (row["status"], row["end_reason"]) == ("ended", "user_terminated")


def test_batch_is_one_transaction(db) -> None:
    """The writer's batches (calllog/writer.py) are all or nothing on MySQL
    too: a refused event rolls back those before it in the batch, and the
    connection stays usable."""
    from intaleq_signal.calllog import CallActive, SessionCreated

    store = db.store()
    conn = store.connect()
    try:
        store.prepare(conn)
        now = time.time()
        good = SessionCreated("s1", "ride-1", "drv", "pas", now)
        unstorable = SessionCreated("s2", "ride-\ud800", "drv", "pas", now)  # a lone surrogate
        try:
            store.apply_batch(conn, [good, unstorable])
        except Exception as exc:  # noqa: BLE001 - the driver's own error type
            assert store.is_permanent(exc), exc
        else:
            raise AssertionError("the unstorable ride_id was accepted")
        conn.commit()  # would make the first event visible had it not been rolled back
        assert db.rows() == []
        store.apply_batch(conn, [good, CallActive("s1", now + 5)])
        assert [row["status"] for row in db.rows()] == ["active"]
    finally:
        store.close(conn)


# -- nothing lost, nothing overwritten -----------------------------------------


def restartable_env(db, proxy, tmp_path, node_id: str) -> dict[str, str]:
    """A daemon writing through ``proxy``, whose restart (same settings) is
    the same instance: same NODE_ID, same journal."""
    return {
        "SESSION_DURATION": "10m",
        "NODE_ID": node_id,
        "JOURNAL_PATH": str(tmp_path / "journal"),
        **db.server_env(proxy.port),
    }


def rows_once_ended(db, server, rides: set[str]) -> dict[str, dict]:
    """The rows by ride, once exactly ``rides`` are ended (waits for the
    restarted ``server`` to write what the journal kept)."""
    wait_until(
        lambda: {r for r, row in rows_by_ride(db).items() if row["status"] == "ended"} == rides,
        timeout=30,
        explain=lambda: f"{db.rows()}\n{server.log}",
    )
    return rows_by_ride(db)


def rows_by_ride(db) -> dict[str, dict]:
    return {row["ride_id"]: row for row in db.rows()}


async def call_ended_by_driver(server, ride_id: str) -> None:
    """A whole call: both join, the driver offers, the passenger hangs up."""
    session = server.new_session(ride_id=ride_id)
    d, p = await connected_call(server, session)
    await send_json(d, {"type": "offer", "sdp": "v=0"})
    assert await recv_json(p) == {"type": "offer", "sdp": "v=0"}
    await send_json(p, {"type": "end_call"})
    assert await closed_with(d) == 1000


def test_sigterm_with_frozen_database_keeps_every_event_for_the_next_start(
    server_factory, db, proxy, tmp_path
) -> None:
    """The database stops answering mid-run: /health says degraded within
    seconds, SIGTERM still exits 0 on time, and the next start (database
    back, same journal) lands every row with its true reason and time."""
    env = restartable_env(db, proxy, tmp_path, "node-a")
    first = server_factory(**env)
    wait_until(lambda: health(first)["database"] == "ok")
    marks: dict[str, datetime.datetime] = {}

    async def frozen_run() -> None:
        await call_ended_by_driver(first, "before-freeze")
        wait_until(lambda: "before-freeze" in rows_by_ride(db) and db.rows()[0]["status"] == "ended")
        proxy.freeze()
        frozen_at = time.monotonic()
        for n in range(5):
            await call_ended_by_driver(first, f"frozen-ended-{n}")
        marks["ended"] = utcnow()
        live = first.new_session(ride_id="frozen-live")
        d, p = await connected_call(first, live)
        first.new_session(ride_id="frozen-waiting")
        states = []

        def not_ok() -> bool:
            states.append((round(time.monotonic() - frozen_at, 1), health(first)["database"]))
            return states[-1][1] != "ok"

        await asyncio.to_thread(wait_until, not_ok, 15)
        # a frozen database is reported from 5 s on, not after the driver's 10 s read timeout
        assert states[-1][1] == "degraded" and states[-1][0] < 9.0, states
        marks["stop"] = utcnow()
        started = time.monotonic()
        code = await asyncio.to_thread(first.stop)
        assert code == 0, first.log
        assert time.monotonic() - started < 12, first.log
        assert await recv_json(d) == {"type": "call_ended", "reason": "server_shutdown"}
        assert await recv_json(p) == {"type": "call_ended", "reason": "server_shutdown"}

    asyncio.run(frozen_run())
    first.stop = lambda *args, **kwargs: 0  # stopped already
    assert "kept in the journal" in first.log, first.log
    proxy.restore()

    second = server_factory(**env)
    second.wait_for_log("events from the journal are written first")
    rides = {"before-freeze", "frozen-live", "frozen-waiting"} | {f"frozen-ended-{n}" for n in range(5)}
    rows = rows_once_ended(db, second, rides)
    for n in range(5):
        row = rows[f"frozen-ended-{n}"]
        assert (row["end_reason"], row["initiated_by"], row["node_id"]) == (
            "user_terminated",
            "driver-1",
            "node-a",
        )
        assert row["created_at"] <= row["connected_at"] <= row["ended_at"] <= marks["ended"], row
    for ride in ("frozen-live", "frozen-waiting"):
        row = rows[ride]
        assert row["end_reason"] == "server_shutdown", row  # not server_restart at the restart
        assert marks["ended"] <= row["ended_at"] <= marks["stop"] + datetime.timedelta(seconds=3), row
    assert rows["frozen-live"]["connected_at"] is not None
    wait_until(lambda: health(second)["journal"] == 0)
    events = 1 + 5 * 4 + 3 + 1  # lost: 0 of them (each row above is whole)
    assert len(rows) == 8, events


def test_kill_9_with_frozen_database_loses_at_most_the_last_second(
    server_factory, db, proxy, tmp_path
) -> None:
    """kill -9 while the database is frozen: what happened more than a
    second before the kill is in the journal, and the restart writes it
    before it closes the killed process's open rows."""
    env = restartable_env(db, proxy, tmp_path, "node-k")
    first = server_factory(**env)
    wait_until(lambda: health(first)["database"] == "ok")
    proxy.freeze()

    async def frozen_run() -> None:
        for n in range(3):
            await call_ended_by_driver(first, f"ended-{n}")
        live = first.new_session(ride_id="live")
        await connected_call(first, live)
        await asyncio.sleep(1.0)  # "at most the last second"
        wait_until(lambda: health(first)["journal"] >= 3 * 4 + 2)
        first.proc.kill()
        first.proc.wait(10)

    asyncio.run(frozen_run())
    killed_at = utcnow()
    first.lines.append("(killed with SIGKILL by the test)")
    first.stop = lambda *args, **kwargs: 0
    proxy.restore()

    second = server_factory(**env)
    expected = {"ended-0", "ended-1", "ended-2", "live"}
    rows = rows_once_ended(db, second, expected)
    for n in range(3):
        row = rows[f"ended-{n}"]
        assert (row["end_reason"], row["initiated_by"]) == ("user_terminated", "driver-1"), row
        assert row["ended_at"] < killed_at, row
    assert rows["live"]["end_reason"] == "server_restart"
    assert rows["live"]["connected_at"] is not None
    wait_until(lambda: health(second)["journal"] == 0)


def test_two_instances_on_one_database_keep_each_others_rows(server_factory, db) -> None:
    """A second instance starting on the same database leaves the first
    one's live rows alone, and the first one's later endings land."""
    first = server_factory(SESSION_DURATION="10m", NODE_ID="node-1", **db.server_env())
    live = first.new_session(ride_id="first-live")
    waiting = first.new_session(ride_id="first-waiting")

    async def scenario() -> None:
        d, p = await connected_call(first, live)
        wait_until(lambda: rows_by_ride(db).get("first-live", {}).get("status") == "active")
        second = server_factory(SESSION_DURATION="10m", NODE_ID="node-2", **db.server_env())
        wait_until(lambda: metric(second, "intaleq_calllog_writes_total") >= 1)  # its start-up work landed
        await call_ended_by_driver(second, "second-call")
        wait_until(lambda: rows_by_ride(db).get("second-call", {}).get("status") == "ended")
        rows = rows_by_ride(db)
        assert rows["first-live"]["status"] == "active", rows
        assert rows["first-waiting"]["status"] == "created", rows
        await send_json(d, {"type": "end_call"})
        assert await closed_with(p) == 1000

    asyncio.run(scenario())
    wait_until(lambda: rows_by_ride(db)["first-live"]["status"] == "ended")
    rows = rows_by_ride(db)
    assert (rows["first-live"]["end_reason"], rows["first-live"]["node_id"]) == ("user_terminated", "node-1")
    assert (rows["second-call"]["end_reason"], rows["second-call"]["node_id"]) == (
        "user_terminated",
        "node-2",
    )
    assert rows["first-waiting"]["session_id"] == waiting["session_id"]
    assert rows["first-waiting"]["status"] == "created"


def create_table(db, edition: int) -> None:
    """``call_logs`` as the version writing ``edition`` of it created it."""
    with db.connect() as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE" + sql.mysql_ddl(edition).split("\nCREATE TABLE", 1)[1])


def table_columns(db) -> list[str]:
    return [
        r["COLUMN_NAME"]
        for r in db.query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s"
            " AND TABLE_NAME = 'call_logs' ORDER BY ORDINAL_POSITION",
            db.name,
        )
    ]


def test_table_of_the_first_edition_gets_node_id_at_start(server_factory, db) -> None:
    create_table(db, edition=1)
    assert "node_id" not in table_columns(db)
    with db.connect() as conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO call_logs (session_id, ride_id, driver_id, passenger_id, status, created_at)"
            " VALUES ('old', 'old-ride', 'd', 'p', 'active', UTC_TIMESTAMP(3))"
        )
    server = server_factory(NODE_ID="node-m", **db.server_env())
    wait_until(lambda: metric(server, "intaleq_calllog_writes_total") >= 1)
    assert table_columns(db) == CALL_LOG_COLUMNS
    assert {r["Key_name"] for r in db.query("SHOW INDEX FROM call_logs")} >= {"idx_call_logs_node_status"}
    server.new_session(ride_id="new-ride")
    wait_until(lambda: "new-ride" in rows_by_ride(db))
    rows = rows_by_ride(db)
    assert (rows["old-ride"]["node_id"], rows["old-ride"]["status"]) == (
        None,
        "active",
    )  # not ours: untouched
    assert rows["new-ride"]["node_id"] == "node-m"


def test_table_of_the_previous_edition_gets_the_media_columns(db) -> None:
    """docs/protocol.md, "Call log": a table made by the previous version (edition 2, no media columns)
    gets them when the store prepares it (twice: harmless), its rows with no media (media_failures 0);
    then the reports set them, a replay of the events changes nothing (the failures an absolute count), and
    a restart reads them back."""
    create_table(db, edition=2)
    assert table_columns(db) == CALL_LOG_COLUMNS[:12]
    with db.connect() as conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO call_logs (session_id, ride_id, driver_id, passenger_id, status, created_at,"
            " node_id) VALUES ('s1', 'ride-m', 'd', 'p', 'active', %s, 'node-m')",
            (sql.utc_text(T),),
        )
    store = db.store()
    conn = store.connect()
    try:
        store.prepare(conn)
        store.prepare(conn)
        assert table_columns(db) == CALL_LOG_COLUMNS
        assert media_of(db.rows()[0]) == dict.fromkeys(MEDIA_ROW) | {"media_failures": 0}
        for event in MEDIA_EVENTS:
            store.apply(conn, event)
        [row] = db.rows()
        assert media_of(row) == MEDIA_ROW
        for start in range(len(MEDIA_EVENTS)):
            store.apply_batch(conn, MEDIA_EVENTS[start:])
            assert db.rows() == [row]
        [restored] = store.load(conn, "node-m", T)
    finally:
        store.close(conn)
    assert restored.media == Media(T + 9, T + 6, T + 9, "relay", "srflx", 1)


def media_of(row: dict) -> dict:
    """A MySQL row's media columns, times as the SQLite call log writes them (text)."""
    return {
        name: sql.utc_text(sql.epoch(row[name])) if isinstance(row[name], datetime.datetime) else row[name]
        for name in MEDIA_ROW
    }


def test_unusable_or_shared_journal_exits_78_naming_it(server_factory, db, tmp_path) -> None:
    """A journal that cannot be opened, or that another instance holds,
    stops the start with one line naming JOURNAL_PATH (exit 78)."""
    first = server_factory(JOURNAL_PATH=str(tmp_path / "shared"), **db.server_env())
    for path, words in ((tmp_path / "no-such-dir" / "j", "cannot be used"), (tmp_path / "shared", "in use")):
        env = {**first.env, "SERVER_ADDR": "127.0.0.1:0", "JOURNAL_PATH": str(path)}
        done = run_daemon(env)
        assert done.returncode == 78, done.stderr
        assert done.stderr.count("\n") == 1 and "JOURNAL_PATH=" in done.stderr and words in done.stderr, (
            done.stderr
        )


def test_second_instance_with_the_same_node_id_leaves_the_rows_alone(server_factory, db) -> None:
    """A copy-pasted NODE_ID: the second live instance's start-up work does
    not close the first one's open rows (it says why), and the first one's
    endings land."""
    first = server_factory(SESSION_DURATION="10m", NODE_ID="twin", **db.server_env())
    live = first.new_session(ride_id="twin-live")
    wait_until(lambda: rows_by_ride(db).get("twin-live", {}).get("status") == "created")
    second = server_factory(SESSION_DURATION="10m", NODE_ID="twin", **db.server_env())
    second.wait_for_log("NODE_ID 'twin' is held by another live instance")
    wait_until(lambda: metric(second, "intaleq_calllog_writes_pending") == 0)
    assert rows_by_ride(db)["twin-live"]["status"] == "created"

    async def scenario() -> None:
        d, p = await connected_call(first, live)
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000

    asyncio.run(scenario())
    wait_until(lambda: rows_by_ride(db)["twin-live"]["status"] == "ended")
    assert rows_by_ride(db)["twin-live"]["end_reason"] == "user_terminated"


def test_same_node_id_on_another_database_of_the_server_is_another_instance(server_factory, db) -> None:
    """The claim on a NODE_ID is per call-log database: two deployments on
    one MySQL server (each with its own database) may both name an instance
    "twin" and each restores its own rows."""
    other = Database()
    try:
        first = server_factory(NODE_ID="twin", **db.server_env())
        second = server_factory(NODE_ID="twin", **other.server_env())
        wait_until(lambda: metric(second, "intaleq_calllog_writes_pending") == 0)
        for server in (first, second):
            assert "is held by another live instance" not in server.log, server.log
        assert (first.stop(), second.stop()) == (0, 0)
    finally:
        other.drop()


def test_health_tells_a_database_lost_while_idle(server_factory, db, proxy) -> None:
    """No call, no write: /health still says the database is gone (a
    frozen one: degraded, then unavailable; a cut one: unavailable) and
    back."""
    server = server_factory(**db.server_env(proxy.port))
    wait_until(lambda: health(server)["database"] == "ok")
    proxy.cut()
    wait_until(lambda: health(server)["database"] == "unavailable", timeout=20)
    proxy.restore()
    wait_until(lambda: health(server)["database"] == "ok", timeout=20)
    proxy.freeze()
    wait_until(lambda: health(server)["database"] != "ok", timeout=20)
    proxy.restore()
    wait_until(lambda: health(server)["database"] == "ok", timeout=30)
