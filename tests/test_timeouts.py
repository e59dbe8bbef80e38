"""Every network wait of the daemon has a bound. Each wait, its bound, and
the test that holds the daemon to it:

- an HTTP request (head and body) that does not arrive: ``OPEN_TIMEOUT``
  (10 s) for the whole request (docs/protocol.md, "Anything else"). Idle, half a head, half a body:
  ``test_http.py::test_idle_and_slow_clients_are_dropped``. The same
  trickled a byte at a time, which a per-read timeout would never stop:
  :func:`test_trickled_requests_are_dropped_within_open_timeout`.
- the first WebSocket message: ``AUTH_TIMEOUT`` (docs/protocol.md, rule 1). Silence:
  ``test_protocol.py::test_auth_timeout_closes_silent_socket``; an
  ``authenticate`` trickled a byte at a time (every byte is "something
  received" for the heartbeat): here, with the requests above.
- an authenticated peer that goes silent: ``HEARTBEAT_TIMEOUT``
  (docs/protocol.md, rule 8; ``test_protocol.py::test_heartbeat_*``).
- the closing handshake with a peer that never answers it: ``CLOSE_TIMEOUT``
  (2 s; docs/protocol.md, rule 6): :func:`test_unanswered_closing_handshakes_are_bounded`.
- writes to a peer that stopped reading: bounded by the 256 KiB of unsent
  output past which the peer is dropped
  (:func:`test_peer_that_stops_reading_is_dropped_not_buffered`), and the
  closing handshake with such a peer by ``CLOSE_TIMEOUT``
  (:func:`test_closing_a_peer_that_stopped_reading_is_bounded`).
- the database: PyMySQL's ``connect_timeout`` (5 s) for the TCP connect and
  ``read_timeout`` (10 s) for every answer, the server's greeting included:
  a MySQL that accepts connections but never answers
  (:func:`test_database_frozen_at_start`), one that stops answering on open
  connections during traffic (:func:`test_database_frozen_mid_traffic`).
  ``write_timeout`` (10 s) needs a full socket send buffer, which call-log
  statements of a few hundred bytes, each waiting for its answer, never
  fill: the read timeout is the bound that matters (docs/operations.md, "MySQL
  user and grants").
- shutdown: closing handshakes (``CLOSE_TIMEOUT`` + 1), unfinished HTTP
  requests (``CLOSE_TIMEOUT`` + 1) and the call-log flush (``FLUSH_TIMEOUT``,
  5 s; docs/operations.md, "Shutdown"):
  :func:`test_sigterm_with_database_frozen_exits_in_bounded_time`, and
  ``test_http.py::test_sigterm_with_idle_http_client_exits_promptly``.

The database tests put :class:`mysql_support.TCPProxy` between the daemon
and MariaDB, and freeze it: connections stay open, no byte moves.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import socket
import ssl
import time
import uuid
from typing import Any

import pytest

from conftest import (
    API_KEY,
    RawWebSocket,
    auth_msg,
    client_frame,
    closed_with,
    connected_call,
    health,
    join,
    metric,
    recv_json,
    ride,
    send_json,
    upgrade_head,
    utcnow,
    wait_until,
)
from intaleq_signal.calllog.mysql import IO_TIMEOUT
from intaleq_signal.server import CLOSE_TIMEOUT, FLUSH_TIMEOUT, OPEN_TIMEOUT
from mysql_support import mysql_available

#: Unsent output past which the daemon drops a peer as not reading
#: (``intaleq_signal.wire.MAX_UNREAD_BYTES``).
MAX_UNREAD_BYTES = 256 * 1024

AUTH_TIMEOUT = 10.0  # the default (docs/operations.md, "Configuration"), which the `server` fixture keeps

needs_mysql = pytest.mark.skipif(not mysql_available(), reason="no MySQL/MariaDB at DB_HOST:DB_PORT")


# -- helpers -----------------------------------------------------------------------------


def kernel_bytes(port_a: int, port_b: int) -> int:
    """Bytes the kernel holds for the loopback TCP connection between two
    ports: both sockets' send and receive queues, from /proc/net/tcp (0
    once the connection is gone)."""
    ends = {
        (f"0100007F:{port_a:04X}", f"0100007F:{port_b:04X}"),
        (f"0100007F:{port_b:04X}", f"0100007F:{port_a:04X}"),
    }
    total = 0
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if (fields[1], fields[2]) in ends:
                tx, rx = fields[4].split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


# -- HTTP and WebSocket ------------------------------------------------------------------


async def trickle(port: int, first: bytes, rest: bytes, every: float = 0.5) -> tuple[float, bytes]:
    """Send ``first``, then ``rest`` one byte every ``every`` seconds, until
    the daemon closes the connection: (seconds from connect to close, what
    it sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(first)

    async def feed() -> None:
        for byte in rest:
            await asyncio.sleep(every)
            if writer.transport.is_closing() or reader.at_eof():
                return
            writer.write(bytes([byte]))

    feeder = asyncio.create_task(feed())
    received = b""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT + 10):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - started
    feeder.cancel()
    writer.close()
    return elapsed, received


def test_trickled_requests_are_dropped_within_open_timeout(server) -> None:
    """A request trickled a byte every 0.5 s, which would take 30 s or
    more to complete, is dropped OPEN_TIMEOUT after it connected — head, body
    or WebSocket upgrade: the bound is on the whole request, not on each read.
    An authenticate frame trickled the same way is refused at AUTH_TIMEOUT
    (10 s, the default) even though every byte counts as traffic."""
    session = server.new_session()
    body = json.dumps({"ride_id": ride(), "driver_id": "d", "passenger_id": "p"}).encode()
    padding = "X-Padding: " + "a" * 60
    upgrade = upgrade_head(padding)
    requests = {
        "head": (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n" + padding.encode() + b"\r\n\r\n"),
        "body": (
            b"POST /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode(),
            body,
        ),
        "upgrade": (upgrade[: upgrade.index(b"\r\n") + 2], upgrade[upgrade.index(b"\r\n") + 2 :]),
    }

    def trickled_authenticate() -> tuple[float, list[dict[str, Any]], int]:
        raw = RawWebSocket(server)
        started = time.monotonic()
        frame = client_frame(0x1, json.dumps(auth_msg(session, "driver-1")).encode())
        for byte in frame:  # ~70 s worth of bytes; the refusal comes first
            raw.send(bytes([byte]))
            if raw.poll(0.5):
                break
        messages, code = raw.closing()
        elapsed = time.monotonic() - started
        raw.close()
        return elapsed, messages, code

    async def scenario() -> tuple[dict[str, tuple[float, bytes]], tuple[float, list[dict[str, Any]], int]]:
        results = await asyncio.gather(
            *(trickle(server.port, first, rest) for first, rest in requests.values()),
            asyncio.to_thread(trickled_authenticate),
        )
        return dict(zip(requests, results[:-1], strict=True)), results[-1]

    dropped, (auth_elapsed, auth_messages, auth_code) = asyncio.run(scenario())
    for name, (elapsed, received) in dropped.items():
        assert OPEN_TIMEOUT - 0.5 <= elapsed <= OPEN_TIMEOUT + 2.5, (name, elapsed, received)
        assert b" 200 " not in received and b" 101 " not in received, (name, received)
    assert auth_messages == [{"type": "unauthorized", "reason": "auth_timeout"}]
    assert auth_code == 4001
    assert AUTH_TIMEOUT - 0.5 <= auth_elapsed <= AUTH_TIMEOUT + 2.5, auth_elapsed
    assert health(server)["status"] == "ok"


def test_unanswered_closing_handshakes_are_bounded(server) -> None:
    """A client that never answers the server's close frame (nor
    closes its TCP connection) is dropped CLOSE_TIMEOUT after the close
    frame — at the end of a call (1000), after a refusal (4001) and after a
    replacement (4002) — and /health counts no connection afterwards."""
    call, other = server.new_session(), server.new_session(driver_id="d-2")

    async def scenario() -> list[tuple[str, float]]:
        in_call = await asyncio.to_thread(RawWebSocket, server)
        await asyncio.to_thread(in_call.join, call, "passenger-1")
        driver, _ = await join(server, call, "driver-1")
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}
        assert await asyncio.to_thread(in_call.text) == {"type": "participant_joined", "role": "driver"}

        refused = await asyncio.to_thread(RawWebSocket, server)
        replaced = await asyncio.to_thread(RawWebSocket, server)
        await asyncio.to_thread(replaced.join, other, "d-2")

        def dropped(raw: RawWebSocket, expected: list[dict[str, Any]], code: int) -> float:
            messages, got = raw.closing()
            closed_at = time.monotonic()
            assert ([{k: v for k, v in m.items() if k != "message"} for m in messages], got) == (
                expected,
                code,
            )
            return raw.wait_eof() - closed_at

        waits = [
            asyncio.to_thread(dropped, in_call, [{"type": "call_ended", "reason": "user_terminated"}], 1000),
            asyncio.to_thread(
                dropped, refused, [{"type": "unauthorized", "reason": "session_not_found"}], 4001
            ),
            asyncio.to_thread(dropped, replaced, [{"type": "error", "code": "replaced"}], 4002),
        ]
        tasks = [asyncio.create_task(wait) for wait in waits]
        await send_json(driver, {"type": "end_call"})
        refused.send_json({"type": "authenticate", "session_id": str(uuid.uuid4()), "user_id": "x"})
        newer, _ = await join(server, other, "d-2")
        results = await asyncio.gather(*tasks)
        assert await closed_with(driver) == 1000
        await newer.close()
        for raw in (in_call, refused, replaced):
            raw.close()
        return list(zip(("call ended", "refused", "replaced"), results, strict=True))

    for name, waited in asyncio.run(scenario()):
        assert CLOSE_TIMEOUT - 0.5 <= waited <= CLOSE_TIMEOUT + 1.5, (name, waited)
    wait_until(lambda: health(server)["connections"] == 0, timeout=2)


def test_client_keeping_its_socket_after_its_own_close_frame_is_dropped(server_factory) -> None:
    """A client that sends a close frame, reads the server's answer and then
    keeps its TCP connection open (a hostile client, or a phone that lost
    its network right after) is dropped CLOSE_TIMEOUT later: it leaves the
    call (the peer gets participant_left) and /health stops counting it —
    for an authenticated participant and for a socket that never
    authenticated. Found by a newcomer's adversarial session: both were held
    until the client closed."""
    server = server_factory(RECONNECT_GRACE="30s")
    session = server.new_session()

    async def scenario() -> None:
        driver, _ = await join(server, session, "driver-1")
        passenger = await asyncio.to_thread(RawWebSocket, server)
        await asyncio.to_thread(passenger.join, session, "passenger-1")
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}
        anonymous = await asyncio.to_thread(RawWebSocket, server)
        wait_until(lambda: health(server)["connections"] == 3, timeout=5)
        started = time.monotonic()
        for raw in (passenger, anonymous):
            raw.send_close(1000)
        for raw in (passenger, anonymous):
            assert (await asyncio.to_thread(raw.closing))[1] == 1000  # the server's answer
        # the sockets stay open on the client side from here on
        assert await recv_json(driver) == {"type": "participant_left", "role": "passenger"}
        wait_until(lambda: health(server)["connections"] == 1, timeout=CLOSE_TIMEOUT + 2)
        assert time.monotonic() - started <= CLOSE_TIMEOUT + 2
        await driver.close()
        for raw in (passenger, anonymous):
            raw.close()

    asyncio.run(scenario())


def test_peer_that_stops_reading_is_dropped_not_buffered(server_factory) -> None:
    """Relaying to a peer that stopped reading cannot pile up in the
    daemon: once more than 256 KiB is unsent beyond what the kernel holds,
    the peer is dropped like a lost network (participant_left, and with no
    grace the call ends)."""
    server = server_factory(MAX_MESSAGE_BYTES="1048576", RECONNECT_GRACE="0s")
    session = server.new_session()

    async def scenario() -> tuple[int, int]:
        stalled = await asyncio.to_thread(RawWebSocket, server, rcvbuf=4096)
        await asyncio.to_thread(stalled.join, session, "passenger-1")
        driver, _ = await join(server, session, "driver-1")
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}
        sent = kernel = 0
        offer = json.dumps({"type": "offer", "sdp": "a" * 1_000_000})
        for _ in range(20):
            await driver.send(offer)
            sent += len(offer)
            try:
                left = await recv_json(driver, timeout=0.3)
            except TimeoutError:
                kernel = max(kernel, kernel_bytes(server.port, stalled.port))
                continue
            assert left == {"type": "participant_left", "role": "passenger"}
            break
        else:
            raise AssertionError(f"{sent} bytes relayed to a peer that does not read, and it is still there")
        assert await recv_json(driver) == {"type": "call_ended", "reason": "disconnect_passenger"}
        assert await closed_with(driver) == 1000
        stalled.close()
        return sent, kernel

    sent, kernel = asyncio.run(scenario())
    # dropped once the backlog outside the kernel passed 256 KiB: at most one
    # message (1 MB) later than that
    assert sent <= kernel + MAX_UNREAD_BYTES + 2_000_000, (sent, kernel)
    wait_until(lambda: health(server)["connections"] == 0, timeout=2)


def test_closing_a_peer_that_stopped_reading_is_bounded(server_factory) -> None:
    """When a call ends while its peer has stopped reading with
    output still unsent (more than the transport's high-water mark, so
    writing is paused, but less than the 256 KiB that drops it), the
    closing handshake is still bounded by CLOSE_TIMEOUT: the connection is
    gone from /health soon after, not held until the peer reads again."""
    server = server_factory(MAX_MESSAGE_BYTES="1048576")
    session = server.new_session()

    async def scenario() -> int:
        stalled = await asyncio.to_thread(RawWebSocket, server, rcvbuf=4096)
        await asyncio.to_thread(stalled.join, session, "passenger-1")
        driver, _ = await join(server, session, "driver-1")
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}
        # Fill the kernel's buffers (the daemon's send queue, the client's
        # receive queue) 128 KiB at a time, until 40-168 KiB wait in the
        # daemon itself: over websockets' 32 KiB high-water mark, under the
        # 256 KiB that would drop the peer.
        sent = backlog = 0
        offer = json.dumps({"type": "offer", "sdp": "a" * (128 * 1024)})
        while backlog <= 40 * 1024:
            assert sent < 16_000_000, "the kernel never stopped taking data"
            await driver.send(offer)
            sent += len(offer) + 10  # the relayed frame: same JSON, a 10-byte header
            await asyncio.sleep(0.15)
            backlog = sent - kernel_bytes(server.port, stalled.port)
        assert backlog < MAX_UNREAD_BYTES
        assert health(server)["connections"] == 2  # not dropped: paused
        await send_json(driver, {"type": "end_call"})
        assert await recv_json(driver) == {"type": "call_ended", "reason": "user_terminated"}
        assert await closed_with(driver) == 1000
        ended = time.monotonic()
        try:
            wait_until(lambda: health(server)["connections"] == 0, timeout=CLOSE_TIMEOUT + 2, step=0.2)
        except AssertionError:
            raise AssertionError(
                f"the connection of a peer that stopped reading with {backlog} bytes unsent was still open"
                f" {time.monotonic() - ended:.1f}s after its call ended (CLOSE_TIMEOUT is {CLOSE_TIMEOUT}s)"
            ) from None
        finally:
            stalled.close()
        return backlog

    asyncio.run(scenario())


# -- the database ------------------------------------------------------------------------


async def timed(timings: list[float], awaitable: Any) -> Any:
    started = time.monotonic()
    result = await awaitable
    timings.append(time.monotonic() - started)
    return result


@needs_mysql
def test_database_frozen_at_start(server_factory, db, proxy) -> None:
    """Database connect: a MySQL that accepts the TCP connection but
    never sends its greeting delays start-up by at most the writer's 1 s
    wait; signaling works at once; the connect attempt gives up after the
    read timeout (reported); once the database answers, the records land."""
    proxy.freeze()
    spawned = time.monotonic()
    server = server_factory(**db.server_env(proxy.port))
    assert time.monotonic() - spawned < 5.0
    assert health(server)["database"] == "unavailable"
    session = server.new_session()
    timings: list[float] = []

    async def scenario() -> None:
        driver, passenger = await connected_call(server, session)
        await timed(timings, send_json(driver, {"type": "offer", "sdp": "v=0"}))
        assert await timed(timings, recv_json(passenger)) == {"type": "offer", "sdp": "v=0"}
        await send_json(passenger, {"type": "end_call"})
        assert await closed_with(driver) == 1000

    asyncio.run(scenario())
    assert max(timings) < 0.5, timings
    server.wait_for_log("database unavailable at start", timeout=IO_TIMEOUT + 5)
    assert time.monotonic() - spawned <= IO_TIMEOUT + 4
    proxy.restore()
    wait_until(lambda: health(server)["database"] == "ok", timeout=10)
    wait_until(lambda: db.rows() and db.rows()[0]["status"] == "ended", timeout=10)
    [row] = db.rows()
    assert (row["session_id"], row["end_reason"], row["initiated_by"]) == (
        session["session_id"],
        "user_terminated",
        "driver-1",
    )
    assert row["created_at"] <= row["connected_at"] <= row["ended_at"]


@needs_mysql
def test_database_frozen_mid_traffic(server_factory, db, proxy) -> None:
    """Database read/write: MySQL stops answering on its open
    connections (nothing is closed) during live calls. Sessions are created
    and messages relayed with no added latency; /health reports the database
    unavailable within the PyMySQL read timeout (10 s) and a backoff step;
    when it answers again, every record lands, in order, with the times the
    events happened."""
    server = server_factory(**db.server_env(proxy.port))
    wait_until(lambda: health(server)["database"] == "ok")
    early = [server.new_session(ride_id=f"early-{i}") for i in range(3)]
    timings: list[float] = []

    async def scenario() -> tuple[list[dict[str, Any]], float, float, datetime.datetime]:
        calls = [await connected_call(server, s) for s in early]
        wait_until(lambda: [r["status"] for r in db.rows()] == ["active"] * 3)
        wait_until(lambda: metric(server, "intaleq_calllog_writes_pending") == 0)
        proxy.freeze()
        frozen = time.monotonic()
        during = [
            await timed(timings, asyncio.to_thread(server.new_session, f"during-{i}")) for i in range(5)
        ]
        for driver, passenger in calls:
            for n in range(10):
                candidate = {"type": "ice_candidate", "candidate": {"candidate": f"c{n}", "sdpMid": "0"}}
                await timed(timings, send_json(driver, candidate))
                assert await timed(timings, recv_json(passenger)) == candidate
        driver, passenger = calls[0]
        await send_json(driver, {"type": "offer", "sdp": "v=0"})
        await recv_json(passenger)
        await send_json(driver, {"type": "end_call"})
        assert await closed_with(passenger) == 1000
        driver, passenger = await connected_call(server, during[0])
        await send_json(passenger, {"type": "offer", "sdp": "v=0"})
        await recv_json(driver)
        await send_json(driver, {"type": "end_call"})
        assert await closed_with(passenger) == 1000
        while health(server)["database"] != "unavailable":
            assert time.monotonic() - frozen < IO_TIMEOUT + 3, "database still reported ok"
            await timed(timings, asyncio.to_thread(health, server))
            await asyncio.sleep(0.2)
        unavailable_after = time.monotonic() - frozen
        during.append(server.new_session(ride_id="during-late"))  # queued behind the stuck writes
        restored_at = utcnow()
        proxy.restore()
        return during, unavailable_after, frozen, restored_at

    during, unavailable_after, frozen, restored_at = asyncio.run(scenario())
    assert max(timings) < 0.5, max(timings)  # nothing in signaling waits for the database
    assert unavailable_after <= IO_TIMEOUT + 3, unavailable_after
    wait_until(lambda: health(server)["database"] == "ok", timeout=10)
    wait_until(lambda: metric(server, "intaleq_calllog_writes_pending") == 0, timeout=10)
    recovered_after = time.monotonic() - frozen

    def check(final: bool) -> None:
        rows = {row["ride_id"]: row for row in db.rows()}
        assert len(rows) == len(early) + len(during), sorted(rows)
        expect = {
            "early-0": ("ended", "user_terminated", "driver-1"),
            "early-1": ("ended", "server_shutdown", None) if final else ("active", None, None),
            "early-2": ("ended", "server_shutdown", None) if final else ("active", None, None),
            "during-0": ("ended", "user_terminated", "passenger-1"),
        }
        for name, row in rows.items():
            state = expect.get(name, ("ended", "server_shutdown", None) if final else ("created", None, None))
            assert (row["status"], row["end_reason"], row["initiated_by"]) == state, (
                name,
                row,
                recovered_after,
            )
            if name.startswith("during"):
                assert row["created_at"] <= restored_at, row  # the event's time, not the write's
            if row["connected_at"] is not None:
                assert row["created_at"] <= row["connected_at"], row
            if row["ended_at"] is not None:
                assert (row["connected_at"] or row["created_at"]) <= row["ended_at"], row
        assert rows["during-0"]["connected_at"] is not None

    check(final=False)
    assert server.stop() == 0
    check(final=True)


@needs_mysql
def test_sigterm_with_database_frozen_exits_in_bounded_time(server_factory, db, proxy) -> None:
    """docs/operations.md, "Shutdown": SIGTERM while MySQL has stopped answering, with a
    call whose passenger never answers the closing handshake and a
    half-sent HTTP request: the process exits 0 within FLUSH_TIMEOUT plus
    the close timeouts, and logs how many call-log events it keeps in the
    journal for the next start — every event since the freeze."""
    server = server_factory(**db.server_env(proxy.port))
    wait_until(lambda: health(server)["database"] == "ok")
    wait_until(lambda: metric(server, "intaleq_calllog_writes_pending") == 0)
    proxy.freeze()
    sessions = [server.new_session() for _ in range(3)]  # 3 events

    async def scenario() -> float:
        passenger = await asyncio.to_thread(RawWebSocket, server)
        await asyncio.to_thread(passenger.join, sessions[0], "passenger-1")
        driver, _ = await join(server, sessions[0], "driver-1")  # the call is active: 1 event
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}
        await send_json(driver, {"type": "offer", "sdp": "v=0"})  # initiated_by: 1 event
        assert await asyncio.to_thread(passenger.text) == {"type": "participant_joined", "role": "driver"}
        assert await asyncio.to_thread(passenger.text) == {"type": "offer", "sdp": "v=0"}
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"POST /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        signalled = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(server.stop, timeout=30))
        # the 3 sessions end with server_shutdown: 3 events
        assert await recv_json(driver) == {"type": "call_ended", "reason": "server_shutdown"}
        assert await closed_with(driver) == 1001
        messages, code = await asyncio.to_thread(passenger.closing)
        assert (messages, code) == ([{"type": "call_ended", "reason": "server_shutdown"}], 1001)
        assert await stopping == 0
        elapsed = time.monotonic() - signalled
        half.close()
        passenger.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    bound = FLUSH_TIMEOUT + 2 * (CLOSE_TIMEOUT + 1) + 3  # flush, closing handshakes, HTTP, start-up slack
    assert elapsed < bound, (elapsed, server.log)
    assert elapsed >= FLUSH_TIMEOUT, elapsed  # it did try to flush
    stopped = re.search(r"stopped \((\d+) call-log events not yet in the database\)", server.log)
    assert stopped and int(stopped.group(1)) == 8, server.log
    assert "call log: 8 events not committed to the database are kept in the journal" in server.log
    assert db.rows() == []  # nothing since the freeze reached the database


@needs_mysql
def test_sigterm_during_database_outage_exits_cleanly(server_factory, db, proxy, tmp_path) -> None:
    """docs/operations.md, "Shutdown": SIGTERM while the database refuses connections and
    writes are pending. The writer threads retry until the flush deadline and
    are then abandoned; the process must still exit 0 (not die of a signal)
    within FLUSH_TIMEOUT and a little, logging the events it could not write.

    PyMySQL (1.1.1 and later, TLS "preferred") builds an SSL context with the
    system CA bundle on every connection attempt, and every writer thread
    makes one more attempt when the deadline wakes it, just as the main
    thread exits. The bundle here is the system one 20 times over, which
    makes each attempt take about a second instead of ~60 ms: the same race,
    made wide enough to be lost every time rather than now and then."""
    bundle = ssl.get_default_verify_paths().cafile
    env = db.server_env(proxy.port)
    if bundle and os.path.exists(bundle):
        slow = tmp_path / "ca-bundle-20x.pem"
        slow.write_bytes(open(bundle, "rb").read() * 20)
        env["SSL_CERT_FILE"] = str(slow)
    server = server_factory(**env)
    wait_until(lambda: health(server)["database"] == "ok", timeout=30)
    wait_until(lambda: metric(server, "intaleq_calllog_writes_pending") == 0)
    proxy.cut()
    for _ in range(40):  # 40 created + 40 ended at shutdown, spread over the 4 writer threads
        server.new_session()
    signalled = time.monotonic()
    code = server.stop(timeout=30)
    elapsed = time.monotonic() - signalled
    assert code == 0, (
        f"exit status {code} after SIGTERM (negative: killed by that signal)\n{server.log[-3000:]}"
    )
    assert elapsed < FLUSH_TIMEOUT + 3, elapsed
    stopped = re.search(r"stopped \((\d+) call-log events not yet in the database\)", server.log)
    assert stopped and int(stopped.group(1)) == 80, server.log[-3000:]
