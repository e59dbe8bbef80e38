"""Restarts never cut a call (docs/operations.md, "Restarts"): with
``ON_STOP=handoff`` (the default) SIGTERM closes every socket with 1012 and
ends nothing, and the next start of the same ``NODE_ID`` restores the
sessions, the calls and the tombstones from the call log — after SIGTERM
and after ``kill -9`` alike, with SQLite and with MySQL. Real daemons, real
clients."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from conftest import closed_with, connected_call, health, join, recv_json, send_json, wait_until

CALLS = 50
PENDING = 20


def restart_env(tmp_path: Any, **extra: Any) -> dict[str, Any]:
    """Two daemons with these settings are one instance restarted: the same
    NODE_ID and call log; ON_STOP left at its default."""
    return {
        "ON_STOP": None,
        "NODE_ID": "restart-node",
        "SQLITE_PATH": str(tmp_path / "calls.sqlite3"),
        "JOURNAL_PATH": str(tmp_path / "journal"),
        "SESSION_DURATION": "10m",
        "RECONNECT_GRACE": "60s",
        **extra,
    }


async def closed_quietly(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every message received until the close, and the close code."""
    received = []
    try:
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    except Exception:  # noqa: BLE001 - ConnectionClosed*, the only way out
        pass
    return received, ws.close_code


async def rejoin(server: Any, session: dict[str, Any]) -> tuple[ClientConnection, ClientConnection, float]:
    """Both participants authenticate again after the restart, are told of
    each other, and the driver's ICE-restart offer reaches the passenger.
    Returns the sockets and how long (seconds) the slower one took."""
    started = time.monotonic()
    d, first = await join(server, session, "driver-1")
    assert first[1]["role"] == "driver", first
    p, _ = await join(server, session, "passenger-1")
    assert await recv_json(p) == {"type": "participant_joined", "role": "driver"}
    assert await recv_json(d) == {"type": "participant_joined", "role": "passenger"}
    waited = time.monotonic() - started
    offer = {"type": "offer", "sdp": f"v=0 ice-restart {session['session_id']}"}
    await send_json(d, offer)
    assert await recv_json(p) == offer
    return d, p, waited


def rows_by_ride(server: Any) -> dict[str, dict[str, Any]]:
    return {row["ride_id"]: row for row in server.call_logs()}


def test_sigterm_hands_the_calls_to_the_next_start(server_factory, tmp_path) -> None:
    """50 live calls and 20 pending sessions through a SIGTERM restart: no
    ``call_ended``, every socket closed with 1012; after the start every
    call resumes (both re-authenticate, participant_joined, an ICE-restart
    offer relays) and later ends with ``user_terminated`` and its original
    ``connected_at``; every pending session is joinable; an ended session
    still answers ``session_ended``. Prints the figures."""
    env = restart_env(tmp_path)
    first = server_factory(**env)
    calls = [first.new_session(ride_id=f"live-{n}") for n in range(CALLS)]
    pending = [first.new_session(ride_id=f"pending-{n}") for n in range(PENDING)]
    ended = first.new_session(ride_id="ended")
    figures: dict[str, Any] = {}
    connected_at: dict[str, str] = {}

    async def before() -> list[tuple[ClientConnection, ClientConnection]]:
        sockets = [await connected_call(first, session) for session in calls]
        d, p = await connected_call(first, ended)
        await send_json(d, {"type": "end_call"})
        assert await closed_with(p) == 1000
        return sockets

    async def restart() -> None:
        sockets = await before()
        wait_until(
            lambda: (
                sum(row["status"] == "active" for r, row in rows_by_ride(first).items() if "live" in r)
                == CALLS
            )
        )
        connected_at.update({r: row["connected_at"] for r, row in rows_by_ride(first).items()})
        signalled = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(first.stop))
        outcomes = await asyncio.gather(*(closed_quietly(ws) for pair in sockets for ws in pair))
        assert await stopping == 0, first.log
        assert all(outcome == ([], 1012) for outcome in outcomes), outcomes[:3]
        second = server_factory(**env)
        figures["sigterm_to_serving_s"] = time.monotonic() - signalled
        second.wait_for_log(f"restored {CALLS + PENDING} live sessions")
        waits = []
        resumed = []
        for session in calls:
            d, p, waited = await rejoin(second, session)
            waits.append(waited)
            resumed.append((d, p))
        figures["longest_rejoin_s"] = max(waits)
        for session in pending:  # joinable as before
            await connected_call(second, session)
        for d, p in resumed:
            await send_json(p, {"type": "end_call"})
            assert await recv_json(d) == {"type": "call_ended", "reason": "user_terminated"}
        tomb = await second.ws()
        await send_json(
            tomb, {"type": "authenticate", "session_id": ended["session_id"], "user_id": "driver-1"}
        )
        assert await recv_json(tomb) == {"type": "unauthorized", "reason": "session_ended"}
        figures["server"] = second  # type: ignore[assignment]

    asyncio.run(restart())
    second: Any = figures.pop("server")
    wait_until(lambda: all(rows_by_ride(second)[f"live-{n}"]["status"] == "ended" for n in range(CALLS)))
    rows = rows_by_ride(second)
    dropped = 0
    for n in range(CALLS):
        row = rows[f"live-{n}"]
        if row["end_reason"] != "user_terminated":
            dropped += 1
        assert row["connected_at"] == connected_at[f"live-{n}"] < row["ended_at"], row
        assert row["initiated_by"] is None or row["initiated_by"] == "driver-1"
    assert dropped == 0, [rows[f"live-{n}"] for n in range(CALLS)][:3]
    assert all(rows[f"pending-{n}"]["status"] == "active" for n in range(PENDING))
    assert rows["ended"]["end_reason"] == "user_terminated"
    print(f"\nrestart figures: calls dropped 0 of {CALLS}, {figures}")


def utc(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")


@pytest.mark.parametrize("stop", ["sigterm", "kill -9"])
def test_what_fell_due_while_down_ends_with_its_own_reason_at_its_own_time(
    server_factory, tmp_path, stop
) -> None:
    """A call whose deadline and a session whose expiry pass while no
    process runs end, at the next start, as ``max_duration_reached`` at the
    deadline and ``expired`` at the expiry; a tombstone of an expired
    session still answers ``session_expired``; a live call restored after
    ``kill -9`` resumes like after SIGTERM."""
    # The tombstones are remembered for SESSION_DURATION after their end (while
    # no process ran): long enough for a slow start to still find them.
    env = restart_env(tmp_path, SESSION_DURATION="5s")
    first = server_factory(**env)
    timed = first.new_session(ride_id="timed")
    waiting = first.new_session(ride_id="waiting")

    async def before() -> None:
        await connected_call(first, timed)
        wait_until(lambda: rows_by_ride(first).get("timed", {}).get("status") == "active")
        if stop == "sigterm":
            assert await asyncio.to_thread(first.stop) == 0
        else:
            first.proc.kill()
            first.proc.wait(10)
            first.lines.append("(killed with SIGKILL by the test)")
            first.stop = lambda *args, **kwargs: 0  # type: ignore[method-assign]

    asyncio.run(before())
    time.sleep(5.5)  # both fall due while no process runs
    second = server_factory(**env)
    wait_until(lambda: all(row["status"] == "ended" for row in second.call_logs()))
    rows = rows_by_ride(second)
    timed_row, waiting_row = rows["timed"], rows["waiting"]
    assert timed_row["end_reason"] == "max_duration_reached", timed_row
    due = utc(timed_row["connected_at"]) + datetime.timedelta(seconds=5)
    assert abs((utc(timed_row["ended_at"]) - due).total_seconds()) < 0.002, timed_row
    assert waiting_row["end_reason"] == "expired", waiting_row
    due = utc(waiting_row["created_at"]) + datetime.timedelta(seconds=5)
    assert abs((utc(waiting_row["ended_at"]) - due).total_seconds()) < 0.002, waiting_row

    async def tombstones() -> None:
        for session, reason in ((waiting, "session_expired"), (timed, "session_ended")):
            ws = await second.ws()
            await send_json(
                ws, {"type": "authenticate", "session_id": session["session_id"], "user_id": "driver-1"}
            )
            assert await recv_json(ws) == {"type": "unauthorized", "reason": reason}

    asyncio.run(tombstones())


def test_kill_9_mid_call_resumes_after_the_start(server_factory, tmp_path) -> None:
    """``kill -9`` during a call: the next start restores it as after a
    SIGTERM; both come back, renegotiate and hang up normally."""
    env = restart_env(tmp_path)
    first = server_factory(**env)
    session = first.new_session(ride_id="killed")

    async def scenario() -> None:
        await connected_call(first, session)
        wait_until(lambda: rows_by_ride(first).get("killed", {}).get("status") == "active")
        first.proc.kill()
        first.proc.wait(10)
        first.lines.append("(killed with SIGKILL by the test)")
        first.stop = lambda *args, **kwargs: 0  # type: ignore[method-assign]
        second = server_factory(**env)
        second.wait_for_log("restored 1 live sessions")
        d, p, _ = await rejoin(second, session)
        await send_json(d, {"type": "end_call"})
        assert await closed_with(p) == 1000
        wait_until(lambda: rows_by_ride(second)["killed"]["end_reason"] == "user_terminated")

    asyncio.run(scenario())


def test_nobody_back_within_the_grace_ends_the_restored_call(server_factory, tmp_path) -> None:
    """Each participant of a restored call has RECONNECT_GRACE from the
    start; one that came back sees the other's disconnect ending."""
    env = restart_env(tmp_path, RECONNECT_GRACE="1s")
    first = server_factory(**env)
    session = first.new_session(ride_id="grace")

    async def scenario() -> None:
        await connected_call(first, session)
        wait_until(lambda: rows_by_ride(first).get("grace", {}).get("status") == "active")
        assert await asyncio.to_thread(first.stop) == 0
        second = server_factory(**env)
        p, _ = await join(second, session, "passenger-1")
        assert await recv_json(p, timeout=10) == {"type": "call_ended", "reason": "disconnect_driver"}
        assert await closed_with(p) == 1000

    asyncio.run(scenario())


def test_on_stop_end_keeps_the_ending_behaviour(server_factory, tmp_path) -> None:
    """ON_STOP=end: SIGTERM ends the call (call_ended server_shutdown, close
    1001) and the next start restores nothing."""
    env = restart_env(tmp_path, ON_STOP="end")
    first = server_factory(**env)
    session = first.new_session(ride_id="ended-by-stop")

    async def scenario() -> None:
        d, p = await connected_call(first, session)
        stopping = asyncio.create_task(asyncio.to_thread(first.stop))
        assert await closed_quietly(d) == ([{"type": "call_ended", "reason": "server_shutdown"}], 1001)
        assert await stopping == 0

    asyncio.run(scenario())
    second = server_factory(**env)
    assert rows_by_ride(second)["ended-by-stop"]["end_reason"] == "server_shutdown"
    assert "restored" not in second.log


def test_handoff_with_mysql_and_its_journal(server_factory, db, tmp_path) -> None:
    """The same with the production call log: 10 calls and 5 pending
    sessions survive a SIGTERM restart on MySQL."""
    env = {**restart_env(tmp_path), **db.server_env()}
    first = server_factory(**env)
    calls = [first.new_session(ride_id=f"m-live-{n}") for n in range(10)]
    pending = [first.new_session(ride_id=f"m-pending-{n}") for n in range(5)]

    async def scenario() -> None:
        for session in calls:
            await connected_call(first, session)
        wait_until(lambda: sum(row["status"] == "active" for row in db.rows()) == 10)
        assert await asyncio.to_thread(first.stop) == 0
        second = server_factory(**env)
        second.wait_for_log("restored 15 live sessions")
        for session in calls:
            d, p, _ = await rejoin(second, session)
            await send_json(d, {"type": "end_call"})
            assert await closed_with(p) == 1000
        for session in pending:
            await connected_call(second, session)
        assert health(second)["active_calls"] == 5

    asyncio.run(scenario())
    wait_until(lambda: sum(row["end_reason"] == "user_terminated" for row in db.rows()) == 10)


def test_a_second_instance_with_the_same_node_id_takes_nothing_over(server_factory, db, tmp_path) -> None:
    """A copy-pasted NODE_ID while the first instance runs: the second one
    restores nothing and closes nothing, so the first one's call goes on and
    its own ending lands."""
    env = {**restart_env(tmp_path, RECONNECT_GRACE="1s"), **db.server_env()}
    first = server_factory(**env)
    session = first.new_session(ride_id="twin-call")

    async def scenario() -> None:
        d, p = await connected_call(first, session)
        wait_until(lambda: [row["status"] for row in db.rows()] == ["active"])
        second = server_factory(**{**env, "JOURNAL_PATH": str(tmp_path / "journal-2")})
        second.wait_for_log("sessions not restored: another live instance holds NODE_ID")
        await asyncio.sleep(2.0)  # past the restored grace, had it restored
        assert [row["status"] for row in db.rows()] == ["active"]
        offer = {"type": "offer", "sdp": "v=0 still here"}
        await send_json(d, offer)
        assert await recv_json(p) == offer
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000

    asyncio.run(scenario())
    wait_until(lambda: [row["end_reason"] for row in db.rows()] == ["user_terminated"])


def test_rows_not_restored_are_closed_when_the_database_is_back(server_factory, db, proxy, tmp_path) -> None:
    """The call log cannot be read at the start (MySQL unreachable): nothing
    is restored, and once MySQL is back the rows the previous process left
    open end as server_restart at this start, so a later restart does not
    bring back calls the apps were told are gone."""
    env = {**restart_env(tmp_path), **db.server_env(proxy.port)}
    first = server_factory(**env)
    session = first.new_session(ride_id="unreadable")

    async def call() -> None:
        await connected_call(first, session)
        wait_until(lambda: [row["status"] for row in db.rows()] == ["active"])
        assert await asyncio.to_thread(first.stop) == 0

    asyncio.run(call())
    proxy.cut()
    started = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    second = server_factory(**env)
    second.wait_for_log("sessions not restored")
    assert health(second)["sessions"] == 0
    proxy.restore()
    wait_until(lambda: [row["status"] for row in db.rows()] == ["ended"], timeout=30)
    [row] = db.rows()
    assert row["end_reason"] == "server_restart", row
    assert abs((row["ended_at"] - started).total_seconds()) < 5, (row, started)
    assert second.stop() == 0
    third = server_factory(**env)
    third.wait_for_log("restored 0 live sessions")


def test_a_handoff_stop_accepts_nothing_more(server_factory, tmp_path) -> None:
    """From SIGTERM on, a handing-off daemon accepts no new connection (they
    wait for the next process, or are refused without socket activation),
    even while it waits for a socket that does not close."""
    env = restart_env(tmp_path)
    first = server_factory(**env)
    session = first.new_session(ride_id="drain")

    async def scenario() -> None:
        d, _ = await join(first, session, "driver-1")
        d.transport.pause_reading()  # a phone gone quiet: its close is never answered
        stopping = asyncio.create_task(asyncio.to_thread(first.stop))
        await asyncio.to_thread(first.wait_for_log, "stopping: handing the calls over")
        refused = 0
        while not stopping.done():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await reader.read(200)
                writer.close()
            except OSError:  # refused, or reset: queued just before the listener closed
                refused += 1
            else:
                # a connection accepted just before the listener closed may
                # be closed unanswered; an answer (a 503) is the fault
                assert answer == b"", f"answered while stopping: {answer!r}"
                refused += 1
            await asyncio.sleep(0.1)
        assert await stopping == 0 and refused > 0

    asyncio.run(scenario())
