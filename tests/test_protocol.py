"""The WebSocket protocol of SPEC §4, rule by rule, with real clients against
the real daemon process.

Every test names the rule it covers in its docstring and asserts something
that fails when the daemon breaks that rule. Timers are shortened through
the environment (``SESSION_DURATION``, ``RECONNECT_GRACE``, ``AUTH_TIMEOUT``,
``HEARTBEAT_*``); waits are on events with generous timeouts, and the few
sleeps only make sure that a timer which must *not* fire has had its chance.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import struct
import time
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from conftest import recv_json, send_json

SDP_OFFER = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/SAVPF 111\r\n"
SDP_ANSWER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
CANDIDATE_LINE = "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 0.0.0.0 rport 0"

# The whole protocol also runs against the oldest websockets allowed (make test-compat).
pytestmark = pytest.mark.compat


# -- helpers -----------------------------------------------------------------


def unique(prefix: str = "ride") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def new_session(server: Any, driver: str = "driver-1", passenger: str = "passenger-1") -> dict[str, Any]:
    return server.new_session(ride_id=unique(), driver_id=driver, passenger_id=passenger)


def auth_msg(session: dict[str, Any], user_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "authenticate", "session_id": session["session_id"], "user_id": user_id, **extra}


def candidate(n: int) -> dict[str, Any]:
    return {"candidate": f"{CANDIDATE_LINE} generation {n}", "sdpMid": "0", "sdpMLineIndex": 0}


def ice(n: int) -> dict[str, Any]:
    return {"type": "ice_candidate", "candidate": candidate(n)}


def utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def row_of(server: Any, session: dict[str, Any]) -> dict[str, Any]:
    rows = [row for row in server.call_logs() if row["session_id"] == session["session_id"]]
    assert len(rows) == 1, rows
    return rows[0]


def assert_error(message: dict[str, Any], code: str) -> None:
    """An ``error`` has exactly ``type``, ``code`` and a text ``message``."""
    assert set(message) == {"type", "code", "message"}, message
    assert message["type"] == "error" and message["code"] == code, message
    assert isinstance(message["message"], str) and message["message"], message


async def expect(ws: ClientConnection, *messages: dict[str, Any], timeout: float = 5.0) -> None:
    """The next messages on ``ws`` are exactly ``messages``, in order."""
    got = [await recv_json(ws, timeout) for _ in messages]
    assert got == list(messages)


async def until_pong(ws: ClientConnection, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send a ``heartbeat``; return every message received before its ``pong``
    (proves the socket is open and shows what else was pending)."""
    await send_json(ws, {"type": "heartbeat"})
    before = []
    while True:
        message = await recv_json(ws, timeout)
        if message == {"type": "pong"}:
            return before
        before.append(message)


async def drain(ws: ClientConnection, timeout: float = 5.0) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes ``ws``, and the close code."""
    messages = []
    try:
        while True:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except ConnectionClosed:
        pass
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return messages, ws.close_code


async def refused(ws: ClientConnection, reason: str) -> None:
    """``ws`` gets exactly ``unauthorized`` ``reason`` and close 4001."""
    messages, code = await drain(ws)
    assert messages == [{"type": "unauthorized", "reason": reason}]
    assert code == 4001


class Clients:
    """Opens real websockets clients and aborts whatever is left at the end,
    so that no test leaves a socket for the server to wait on."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.opened: list[Any] = []

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.opened:
            ws.transport.abort()
        await asyncio.sleep(0)

    async def connect(self, **kwargs: Any) -> ClientConnection:
        ws = await self.server.ws(**kwargs)
        self.opened.append(ws)
        return ws

    async def join(
        self, session: dict[str, Any], user_id: str, **extra: Any
    ) -> tuple[ClientConnection, list[dict[str, Any]]]:
        ws = await self.connect()
        await send_json(ws, auth_msg(session, user_id, **extra))
        first = [await recv_json(ws), await recv_json(ws)]
        assert [m["type"] for m in first] == ["authenticated", "session_joined"], first
        return ws, first

    async def pair(
        self, session: dict[str, Any], driver: str = "driver-1", passenger: str = "passenger-1"
    ) -> tuple[ClientConnection, ClientConnection]:
        """Both participants connected, the call active, joins consumed."""
        d, _ = await self.join(session, driver)
        p, _ = await self.join(session, passenger)
        await expect(p, {"type": "participant_joined", "role": "driver"})
        await expect(d, {"type": "participant_joined", "role": "passenger"})
        return d, p

    async def raw(self, extra_headers: str = "") -> RawClient:
        client = await RawClient.open(self.server.port, extra_headers)
        self.opened.append(client.writer)
        return client


class RawClient:
    """A WebSocket client written by hand on a TCP socket: it never answers
    pings unless told to, and it shows every frame the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.head = head

    @classmethod
    async def open(cls, port: int, extra_headers: str = "") -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{extra_headers}\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer, head)

    @property
    def transport(self) -> asyncio.BaseTransport:
        return self.writer.transport

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    def send_json(self, message: Any) -> None:
        self.send_frame(0x1, json.dumps(message).encode())

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next frame as ``(opcode, payload)``; None at end of stream."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            assert not second & 0x80, "server frames are never masked"
            return first & 0x0F, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    async def text(self, timeout: float = 5.0, answer_pings: bool = True) -> dict[str, Any]:
        """The next text message, answering pings on the way."""
        while True:
            frame = await self.frame(timeout)
            assert frame is not None, "connection closed"
            opcode, payload = frame
            if opcode == 0x9 and answer_pings:
                self.send_frame(0xA, payload)
            elif opcode == 0x1:
                return json.loads(payload)


# -- rule 1: authentication ------------------------------------------------------


def test_auth_other_message_first_is_refused(server) -> None:
    """SPEC §4 rule 1: any message but authenticate first gets unauthorized not_authenticated, close 4001."""
    session = new_session(server)
    firsts: list[Any] = [
        {"type": "heartbeat"},
        {"type": "offer", "sdp": SDP_OFFER},
        {"type": "answer", "sdp": SDP_ANSWER},
        {"type": "ice_candidate", "candidate": candidate(0)},
        {"type": "end_call"},
        {"type": "no_such_type"},
        {"type": "offer", "session_id": session["session_id"], "user_id": "driver-1", "sdp": "x"},
        [],
        "authenticate",
        {"session_id": session["session_id"], "user_id": "driver-1"},
    ]

    async def scenario() -> None:
        async with Clients(server) as clients:
            for first in firsts:
                ws = await clients.connect()
                await send_json(ws, first)
                await refused(ws, "not_authenticated")
            # the session was not touched by any of them: the driver still joins
            await clients.join(session, "driver-1")

    asyncio.run(scenario())


def test_auth_invalid_json_or_binary_first_is_refused(server) -> None:
    """SPEC §4 rule 1 / precise points: invalid JSON or a binary frame before authenticate → 4001."""
    session = new_session(server)
    valid = json.dumps(auth_msg(session, "driver-1"))
    frames: list[str | bytes] = [
        "this is not json",
        "{",
        "",
        "NaN",
        '{"type": "authenticate", "session_id": NaN, "user_id": "driver-1"}',
        b"\x00\x01\x02",
        valid.encode(),  # a well-formed authenticate, but in a binary frame
    ]

    async def scenario() -> None:
        async with Clients(server) as clients:
            for frame in frames:
                ws = await clients.connect()
                await ws.send(frame)
                await refused(ws, "not_authenticated")

    asyncio.run(scenario())


def test_auth_malformed_authenticate_is_invalid_message(server) -> None:
    """SPEC §4 rule 1: a malformed authenticate (missing or non-string ids) → invalid_message, 4001."""
    session = new_session(server)
    sid = session["session_id"]
    malformed: list[dict[str, Any]] = [
        {"type": "authenticate"},
        {"type": "authenticate", "session_id": sid},
        {"type": "authenticate", "user_id": "driver-1"},
        {"type": "authenticate", "session_id": 12345, "user_id": "driver-1"},
        {"type": "authenticate", "session_id": sid, "user_id": None},
        {"type": "authenticate", "session_id": sid, "user_id": ["driver-1"]},
        {"type": "authenticate", "session_id": {"id": sid}, "user_id": "driver-1"},
        {"type": "authenticate", "session_id": sid, "user_id": 1},
        {"type": "authenticate", "session_id": sid, "user_id": True},
    ]

    async def scenario() -> None:
        async with Clients(server) as clients:
            for message in malformed:
                ws = await clients.connect()
                await send_json(ws, message)
                await refused(ws, "invalid_message")
            await clients.join(session, "driver-1")

    asyncio.run(scenario())


def test_auth_timeout_closes_silent_socket(server_factory) -> None:
    """SPEC §4 rule 1: silence past AUTH_TIMEOUT → unauthorized auth_timeout, close 4001."""
    server = server_factory(AUTH_TIMEOUT="500ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            joined, _ = await clients.join(session, "driver-1")
            started = time.monotonic()
            silent = await clients.connect()
            await refused(silent, "auth_timeout")
            elapsed = time.monotonic() - started
            assert 0.4 <= elapsed < 4.0, elapsed
            # the authenticated socket, older than AUTH_TIMEOUT, is untouched
            assert await until_pong(joined) == []

    asyncio.run(scenario())


def test_auth_unknown_session_is_session_not_found(server) -> None:
    """SPEC §4 rule 1: an unknown session_id → unauthorized session_not_found, close 4001."""

    async def scenario() -> None:
        async with Clients(server) as clients:
            for session_id in (str(uuid.uuid4()), "not-a-uuid"):
                ws = await clients.connect()
                await send_json(ws, {"type": "authenticate", "session_id": session_id, "user_id": "driver-1"})
                await refused(ws, "session_not_found")

    asyncio.run(scenario())


def test_auth_user_not_in_session(server) -> None:
    """SPEC §4 rule 1: a user that is neither driver nor passenger → user_not_in_session, close 4001."""
    session = new_session(server, "driver-7", "passenger-7")
    other = new_session(server, "driver-8", "passenger-8")

    async def scenario() -> None:
        async with Clients(server) as clients:
            for user in ("stranger", "driver-8", "DRIVER-7", "driver-7 "):
                ws = await clients.connect()
                await send_json(ws, auth_msg(session, user))
                await refused(ws, "user_not_in_session")
            _, first = await clients.join(other, "passenger-8")
            assert first[1]["role"] == "passenger"

    asyncio.run(scenario())


def test_auth_roles_come_from_session_ids(server) -> None:
    """SPEC §4 rule 1: authenticated {user_id} then session_joined {session_id, ride_id, role}."""
    session = new_session(server, "d-42", "p-42")

    async def scenario() -> None:
        async with Clients(server) as clients:
            _, first = await clients.join(session, "p-42")
            assert first == [
                {"type": "authenticated", "user_id": "p-42"},
                {
                    "type": "session_joined",
                    "session_id": session["session_id"],
                    "ride_id": session["ride_id"],
                    "role": "passenger",
                },
            ]
            _, first = await clients.join(session, "d-42")
            assert first[1]["role"] == "driver"

    asyncio.run(scenario())


def test_auth_ids_counted_in_characters(server) -> None:
    """SPEC §4 rule 1 / precise points: ids of 255 non-ASCII characters (over 255 bytes) authenticate."""
    driver, passenger = "د" * 255, "😀" * 255
    session = new_session(server, driver, passenger)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, first = await clients.join(session, driver)
            assert first[0] == {"type": "authenticated", "user_id": driver}
            assert first[1]["role"] == "driver"
            p, first = await clients.join(session, passenger)
            assert first[0] == {"type": "authenticated", "user_id": passenger}
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await expect(d, {"type": "participant_joined", "role": "passenger"})

    asyncio.run(scenario())


def test_auth_session_ended_after_end_call(server_factory) -> None:
    """SPEC §4 rule 1 / precise points: an ended session is remembered → session_ended."""
    server = server_factory(SESSION_DURATION="3s")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await send_json(d, {"type": "end_call"})
            assert await drain(d) == ([{"type": "call_ended", "reason": "user_terminated"}], 1000)
            assert await drain(p) == ([{"type": "call_ended", "reason": "user_terminated"}], 1000)
            for user in ("driver-1", "passenger-1"):
                ws = await clients.connect()
                await send_json(ws, auth_msg(session, user))
                await refused(ws, "session_ended")
            # still remembered well into SESSION_DURATION after the end
            await asyncio.sleep(1.5)
            ws = await clients.connect()
            await send_json(ws, auth_msg(session, "driver-1"))
            await refused(ws, "session_ended")

    asyncio.run(scenario())


def test_auth_second_authenticate_is_already_authenticated(server) -> None:
    """SPEC §4 rule 1: a second authenticate → error already_authenticated; the socket stays open."""
    session = new_session(server)
    other = new_session(server, "driver-9", "passenger-9")

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            for again in (
                auth_msg(session, "driver-1"),
                auth_msg(session, "passenger-1"),
                auth_msg(other, "driver-9"),
            ):
                await send_json(d, again)
                assert_error(await recv_json(d), "already_authenticated")
            assert await until_pong(d) == []
            # still the driver of the first session, nothing else happened
            assert await until_pong(p) == []
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})

    asyncio.run(scenario())


# -- rule 2: replace on reconnect ------------------------------------------------


def test_reconnect_replaces_old_socket(server_factory) -> None:
    """SPEC §4 rule 2: new socket wins; old gets error replaced + 4002; peer sees no participant_left."""
    server = server_factory(RECONNECT_GRACE="300ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d1, p = await clients.pair(session)
            d2, first = await clients.join(session, "driver-1")
            assert first[1]["role"] == "driver"
            await expect(d2, {"type": "participant_joined", "role": "passenger"})
            await expect(p, {"type": "participant_joined", "role": "driver"})
            messages, code = await drain(d1)
            assert len(messages) == 1, messages
            assert_error(messages[0], "replaced")
            assert code == 4002
            # the replaced socket's close is ignored: no participant_left, and
            # nothing ends once RECONNECT_GRACE has passed
            await asyncio.sleep(0.8)
            assert await until_pong(p) == []
            assert await until_pong(d2) == []
            await send_json(d2, {"type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})
            await send_json(p, {"type": "answer", "sdp": SDP_ANSWER})
            await expect(d2, {"type": "answer", "sdp": SDP_ANSWER})
            # the new socket's own close still counts
            await d2.close()
            await expect(p, {"type": "participant_left", "role": "driver"})

    asyncio.run(scenario())


def test_reconnect_replaced_socket_late_messages_ignored(server_factory) -> None:
    """SPEC §4 rule 2: messages a replaced socket sends after replacement are neither relayed nor acted on."""
    server = server_factory(RECONNECT_GRACE="300ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d1, p = await clients.pair(session)
            # d1 stops reading: it does not see its replacement and keeps talking
            d1.transport.pause_reading()
            d2, _ = await clients.join(session, "driver-1")
            await expect(d2, {"type": "participant_joined", "role": "passenger"})
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await send_json(d1, {"type": "offer", "sdp": "v=0\r\nstale offer"})
            await send_json(d1, ice(1))
            await send_json(d1, {"type": "end_call"})
            await asyncio.sleep(0.3)
            await send_json(d2, {"type": "offer", "sdp": "v=0\r\nfresh offer"})
            await expect(p, {"type": "offer", "sdp": "v=0\r\nfresh offer"})
            assert await until_pong(p) == []
            assert await until_pong(d2) == []
            d1.transport.resume_reading()
            messages, code = await drain(d1)
            assert [m.get("code") for m in messages] == ["replaced"], messages
            assert code == 4002
            await asyncio.sleep(0.6)  # past RECONNECT_GRACE: still nothing ended
            assert await until_pong(p) == []
            await send_json(p, {"type": "answer", "sdp": SDP_ANSWER})
            await expect(d2, {"type": "answer", "sdp": SDP_ANSWER})

    asyncio.run(scenario())


def test_reconnect_replacement_before_peer_joined(server) -> None:
    """SPEC §4 rule 2: replacing a lone participant's socket leaves the session joinable."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d1, _ = await clients.join(session, "driver-1")
            d2, _ = await clients.join(session, "driver-1")
            messages, code = await drain(d1)
            assert [m.get("code") for m in messages] == ["replaced"] and code == 4002
            assert await until_pong(d2) == []
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await expect(d2, {"type": "participant_joined", "role": "passenger"})
            await send_json(p, ice(3))
            await expect(d2, ice(3))

    asyncio.run(scenario())


# -- rule 3: session lifecycle ---------------------------------------------------


def test_lifecycle_never_active_session_expires(server_factory) -> None:
    """SPEC §4 rules 1, 3: a never-active session expires: call_ended expired, 1000; then session_expired."""
    server = server_factory(SESSION_DURATION="1s")
    session = new_session(server)
    nobody = new_session(server)
    created = time.monotonic()

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            messages, code = await drain(d)
            assert time.monotonic() - created >= 0.8
            assert messages == [{"type": "call_ended", "reason": "expired"}]
            assert code == 1000
            ws = await clients.connect()
            await send_json(ws, auth_msg(session, "passenger-1"))
            await refused(ws, "session_expired")
            # SPEC §4 rule 1: also for a session nobody ever joined
            ws = await clients.connect()
            await send_json(ws, auth_msg(nobody, "driver-1"))
            await refused(ws, "session_expired")

    asyncio.run(scenario())
    assert server.stop() == 0
    for s in (session, nobody):
        row = row_of(server, s)
        assert row["status"] == "ended"
        assert row["end_reason"] == "expired"
        assert row["connected_at"] is None
        assert row["ended_at"] is not None
    # a session of 1s: expired about 1s after it was created, not at shutdown
    row = row_of(server, nobody)
    lived = (utc(row["ended_at"]) - utc(row["created_at"])).total_seconds()
    assert 0.8 <= lived <= 3.0, lived


def test_lifecycle_active_call_cut_after_duration_from_connected_at(server_factory) -> None:
    """SPEC §4 rule 3: an active call is cut SESSION_DURATION after connected_at: call_timeout, 1000."""
    server = server_factory(SESSION_DURATION="1500ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            await asyncio.sleep(0.9)  # the call starts well after the session was created
            p, _ = await clients.join(session, "passenger-1")
            activated = time.monotonic()
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await expect(d, {"type": "participant_joined", "role": "passenger"})
            timeout = {"type": "call_timeout", "reason": "max_duration_reached"}
            assert await drain(d, timeout=6) == ([timeout], 1000)
            elapsed = time.monotonic() - activated
            assert await drain(p) == ([timeout], 1000)
            # measured from connected_at (1.5s), not from creation (0.6s left then)
            assert 1.25 <= elapsed <= 4.5, elapsed
            ws = await clients.connect()
            await send_json(ws, auth_msg(session, "driver-1"))
            await refused(ws, "session_ended")

    asyncio.run(scenario())
    assert server.stop() == 0
    row = row_of(server, session)
    assert row["status"] == "ended"
    assert row["end_reason"] == "max_duration_reached"
    assert row["connected_at"] is not None
    created, connected, ended = utc(row["created_at"]), utc(row["connected_at"]), utc(row["ended_at"])
    assert 0.8 <= (connected - created).total_seconds() <= 3.0
    assert 1.3 <= (ended - connected).total_seconds() <= 4.5


def test_lifecycle_sessions_that_never_became_calls_are_logged_as_sessions(server_factory) -> None:
    """docs/protocol.md, rule 3: a session that ends before it
    became a call (expired with nobody or one participant, or ended by
    end_call before the other joined) is logged as "session ended" with its
    reason and no duration — not as a call of 0.0s; a call that was active
    keeps its "call ended … duration=" line."""
    server = server_factory(SESSION_DURATION="1s")
    nobody, lone, early, call = (new_session(server) for _ in range(4))

    async def scenario() -> None:
        async with Clients(server) as clients:
            await clients.join(lone, "driver-1")
            d, _ = await clients.join(early, "driver-1")
            await send_json(d, {"type": "end_call"})
            assert await drain(d) == ([{"type": "call_ended", "reason": "user_terminated"}], 1000)
            d, p = await clients.pair(call)
            timeout = {"type": "call_timeout", "reason": "max_duration_reached"}
            assert await drain(d, timeout=6) == ([timeout], 1000)

    asyncio.run(scenario())
    for session, reason in ((nobody, "expired"), (lone, "expired"), (early, "user_terminated")):
        line = server.wait_for_log(f"session ended session={session['session_id']} reason={reason}")
        assert "duration" not in line, line
    server.wait_for_log(f"call ended session={call['session_id']} reason=max_duration_reached duration=")
    for session in (nobody, lone, early):
        assert f"call ended session={session['session_id']}" not in server.log
    assert f"session ended session={call['session_id']}" not in server.log


# -- rule 4: relay ---------------------------------------------------------------


def test_relay_order_preserved_both_ways(server) -> None:
    """SPEC §4 rule 4: offer, answer and ice_candidate reach the other participant in the order sent."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            from_driver = [{"type": "offer", "sdp": SDP_OFFER}] + [ice(n) for n in range(30)]
            from_driver.insert(15, {"type": "offer", "sdp": SDP_OFFER + "a=ice-options:trickle\r\n"})
            from_passenger = [ice(100 + n) for n in range(20)]
            from_passenger.insert(3, {"type": "answer", "sdp": SDP_ANSWER})
            for message in from_driver:
                await send_json(d, message)
            for message in from_passenger:
                await send_json(p, message)
            await expect(p, *from_driver)
            await expect(d, *from_passenger)
            # never echoed to the sender
            assert await until_pong(d) == []
            assert await until_pong(p) == []

    asyncio.run(scenario())


def test_relay_rebuilds_defined_fields_only(server) -> None:
    """SPEC §4 rule 4: relayed messages are rebuilt from defined fields; extra fields are dropped."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            extra = {"session_id": "forged", "user_id": "passenger-1", "role": "passenger", "x": [1, 2]}
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER, **extra})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})
            await send_json(p, {"type": "answer", "sdp": SDP_ANSWER, "from": "driver-1", **extra})
            await expect(d, {"type": "answer", "sdp": SDP_ANSWER})
            full = {
                "candidate": CANDIDATE_LINE,
                "sdpMid": "audio",
                "sdpMLineIndex": 1,
                "usernameFragment": "u4Kx",
            }
            await send_json(
                d,
                {
                    "type": "ice_candidate",
                    "candidate": {**full, "foo": "bar", "type": "offer", "port": 5000, "address": "10.0.0.1"},
                    "sdp": SDP_OFFER,
                    **extra,
                },
            )
            await expect(p, {"type": "ice_candidate", "candidate": full})

    asyncio.run(scenario())


def test_relay_candidate_forms_as_given(server) -> None:
    """SPEC §4 rule 4: candidate null / "" and missing or null sdpMid/sdpMLineIndex relayed as given."""
    session = new_session(server)
    forms: list[Any] = [
        None,
        {"candidate": ""},
        {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0},
        {"candidate": CANDIDATE_LINE},
        {"candidate": CANDIDATE_LINE, "sdpMid": None, "sdpMLineIndex": None},
        {"candidate": CANDIDATE_LINE, "sdpMid": "0"},
        {"candidate": CANDIDATE_LINE, "sdpMLineIndex": 0},
        {"candidate": CANDIDATE_LINE, "sdpMid": "", "sdpMLineIndex": 0, "usernameFragment": None},
        {"candidate": CANDIDATE_LINE, "sdpMid": "0", "sdpMLineIndex": 3, "usernameFragment": "abcd"},
    ]

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            for form in forms:
                await send_json(d, {"type": "ice_candidate", "candidate": form})
            for form in forms:
                raw = await asyncio.wait_for(p.recv(), 5)
                got = json.loads(raw)
                assert got == {"type": "ice_candidate", "candidate": form}, raw
                if form is not None:  # missing stays missing, null stays null
                    assert set(got["candidate"]) == set(form), raw

    asyncio.run(scenario())


def test_relay_held_until_peer_joins(server) -> None:
    """SPEC §4 rule 4: messages sent before the peer joins are held, delivered after participant_joined."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            held = [{"type": "offer", "sdp": SDP_OFFER}] + [ice(n) for n in range(5)]
            held.append({"type": "ice_candidate", "candidate": None})
            for message in held:
                await send_json(d, message)
            assert await until_pong(d) == []  # held, no error
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"}, *held)
            await expect(d, {"type": "participant_joined", "role": "passenger"})
            assert await until_pong(p) == []  # delivered once
            await send_json(p, {"type": "answer", "sdp": SDP_ANSWER})
            await expect(d, {"type": "answer", "sdp": SDP_ANSWER})

    asyncio.run(scenario())


def test_relay_hold_bound_64_messages(server) -> None:
    """SPEC §4 rule 4: at most 64 messages are held; each one past that gets error peer_not_connected."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            messages = [ice(n) for n in range(66)]
            for message in messages:
                await send_json(d, message)
            before = await until_pong(d)
            assert len(before) == 2, before
            for error in before:
                assert_error(error, "peer_not_connected")
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"}, *messages[:64])
            assert await until_pong(p) == []
            # once the peer is there nothing is refused
            await send_json(d, ice(99))
            await expect(p, ice(99))

    asyncio.run(scenario())


def test_relay_hold_bound_16_kib(server) -> None:
    """SPEC §4 rule 4: held messages are bounded to 16 KiB; the message past it gets peer_not_connected."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            # ~3.9 KB each: four fit in 16 KiB, a fifth does not
            offers = [{"type": "offer", "sdp": f"v={n}\r\n" + "a" * 3900} for n in range(5)]
            for offer in offers:
                await send_json(d, offer)
            before = await until_pong(d)
            assert len(before) == 1, before
            assert_error(before[0], "peer_not_connected")
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"}, *offers[:4])
            assert await until_pong(p) == []

    asyncio.run(scenario())


def test_relay_hold_bound_counts_bytes_not_characters(server) -> None:
    """SPEC §4 rule 4: the 16 KiB hold bound is in bytes on the wire, not characters."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            # 1900 × "é" is 1900 characters but several KB once sent, however encoded
            offers = [{"type": "offer", "sdp": f"v={n}\r\n" + "é" * 1900} for n in range(5)]
            for offer in offers:
                frame = json.dumps(offer, ensure_ascii=False)
                assert len(frame.encode()) < 4096
                await d.send(frame)
            refused = await until_pong(d)
            for message in refused:
                assert_error(message, "peer_not_connected")
            held = len(offers) - len(refused)
            assert 1 <= held < len(offers), "5 offers of 1900 characters each were all held (over 16 KiB)"
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"})
            frames = [await asyncio.wait_for(p.recv(), 5) for _ in range(held)]
            assert [json.loads(f) for f in frames] == offers[:held]
            sizes = [len(f.encode()) for f in frames]
            assert sum(sizes) <= 16 * 1024 < sum(sizes) + sizes[0], sizes

    asyncio.run(scenario())


def test_relay_hold_each_direction_has_its_own_bound(server_factory) -> None:
    """SPEC §4 rule 4 / precise points: held for a participant in grace, each direction its own bound."""
    server = server_factory(RECONNECT_GRACE="5s")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            # driver away: the passenger fills the driver's queue
            await d.close()
            await expect(p, {"type": "participant_left", "role": "driver"})
            to_driver = [ice(n) for n in range(65)]
            for message in to_driver:
                await send_json(p, message)
            before = await until_pong(p)
            assert [m.get("code") for m in before] == ["peer_not_connected"], before
            d, _ = await clients.join(session, "driver-1")
            await expect(d, {"type": "participant_joined", "role": "passenger"}, *to_driver[:64])
            await expect(p, {"type": "participant_joined", "role": "driver"})
            # passenger away: the driver has a full bound of its own
            await p.close()
            await expect(d, {"type": "participant_left", "role": "passenger"})
            to_passenger = [ice(1000 + n) for n in range(65)]
            for message in to_passenger:
                await send_json(d, message)
            before = await until_pong(d)
            assert [m.get("code") for m in before] == ["peer_not_connected"], before
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"}, *to_passenger[:64])
            await expect(d, {"type": "participant_joined", "role": "passenger"})
            assert await until_pong(p) == []
            assert await until_pong(d) == []

    asyncio.run(scenario())


def test_relay_initiated_by_is_first_offerer(server) -> None:
    """SPEC §4 rule 4: the first participant to send an offer is recorded as initiated_by."""
    first = new_session(server, "drv-a", "pas-a")
    second = new_session(server, "drv-b", "pas-b")

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(first, "drv-a", "pas-a")
            await send_json(d, ice(1))
            await send_json(d, {"type": "answer", "sdp": SDP_ANSWER})
            await send_json(p, {"type": "offer", "sdp": SDP_OFFER})
            await expect(d, {"type": "offer", "sdp": SDP_OFFER})
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await expect(
                p, ice(1), {"type": "answer", "sdp": SDP_ANSWER}, {"type": "offer", "sdp": SDP_OFFER}
            )
            # second session: the driver offers before the passenger is there
            d2, _ = await clients.join(second, "drv-b")
            await send_json(d2, {"type": "offer", "sdp": SDP_OFFER})
            p2, _ = await clients.join(second, "pas-b")
            await expect(
                p2, {"type": "participant_joined", "role": "driver"}, {"type": "offer", "sdp": SDP_OFFER}
            )
            await send_json(p2, {"type": "offer", "sdp": SDP_OFFER})
            await expect(d2, {"type": "participant_joined", "role": "passenger"})
            await expect(d2, {"type": "offer", "sdp": SDP_OFFER})

    asyncio.run(scenario())
    assert server.stop() == 0
    assert row_of(server, first)["initiated_by"] == "pas-a"
    assert row_of(server, second)["initiated_by"] == "drv-b"


def test_relay_stays_inside_the_session(server) -> None:
    """SPEC §4: SDP and candidates go only to the other participant of the same session, never elsewhere."""
    one = new_session(server, "driver-1", "passenger-1")
    two = new_session(server, "driver-2", "passenger-2")

    async def scenario() -> None:
        async with Clients(server) as clients:
            d1, p1 = await clients.pair(one, "driver-1", "passenger-1")
            d2, p2 = await clients.pair(two, "driver-2", "passenger-2")
            await send_json(d1, {"type": "offer", "sdp": SDP_OFFER})
            await send_json(d1, ice(7))
            await expect(p1, {"type": "offer", "sdp": SDP_OFFER}, ice(7))
            for ws in (d1, d2, p2):
                assert await until_pong(ws) == []

    asyncio.run(scenario())


# -- rule 5: end_call --------------------------------------------------------------


def test_end_call_by_passenger_ends_for_both(server) -> None:
    """SPEC §4 rule 5: end_call → both get call_ended user_terminated, both closed 1000."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await send_json(p, {"type": "end_call", "reason": "bogus", "extra": 1})
            ended = {"type": "call_ended", "reason": "user_terminated"}
            assert await drain(p) == ([ended], 1000)
            assert await drain(d) == ([ended], 1000)

    asyncio.run(scenario())
    assert server.stop() == 0
    row = row_of(server, session)
    assert row["status"] == "ended"
    assert row["end_reason"] == "user_terminated"
    assert row["connected_at"] is not None


def test_end_call_before_peer_joined_ends_session(server) -> None:
    """SPEC §4 rule 5 / precise points: end_call before the peer ever joined ends the session (close 1000)."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await send_json(d, {"type": "end_call"})
            assert await drain(d) == ([{"type": "call_ended", "reason": "user_terminated"}], 1000)
            ws = await clients.connect()
            await send_json(ws, auth_msg(session, "passenger-1"))
            await refused(ws, "session_ended")

    asyncio.run(scenario())
    assert server.stop() == 0
    row = row_of(server, session)
    assert row["status"] == "ended"
    assert row["end_reason"] == "user_terminated"
    assert row["connected_at"] is None


# -- rule 6: disconnect --------------------------------------------------------------


@pytest.mark.parametrize(
    ("leaver", "how"),
    [("driver", "close"), ("passenger", "network_loss")],
)
def test_disconnect_without_return_ends_call(server_factory, leaver: str, how: str) -> None:
    """SPEC §4 rule 6: participant_left, then after RECONNECT_GRACE call_ended disconnect_<role>."""
    server = server_factory(RECONNECT_GRACE="600ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            gone, other = (d, p) if leaver == "driver" else (p, d)
            if how == "close":
                await gone.close()
            else:
                gone.transport.abort()
            await expect(other, {"type": "participant_left", "role": leaver})
            left = time.monotonic()
            messages, code = await drain(other)
            assert time.monotonic() - left >= 0.45
            assert messages == [{"type": "call_ended", "reason": f"disconnect_{leaver}"}]
            assert code == 1000
            ws = await clients.connect()
            await send_json(ws, auth_msg(session, f"{leaver}-1"))
            await refused(ws, "session_ended")

    asyncio.run(scenario())
    assert server.stop() == 0
    row = row_of(server, session)
    assert row["status"] == "ended"
    assert row["end_reason"] == f"disconnect_{leaver}"


def test_disconnect_with_zero_grace_ends_at_once(server_factory) -> None:
    """SPEC §4 rule 6: with RECONNECT_GRACE=0 the call ends as soon as an active participant drops."""
    server = server_factory(RECONNECT_GRACE="0")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await d.close()
            messages, code = await drain(p)
            assert messages == [
                {"type": "participant_left", "role": "driver"},
                {"type": "call_ended", "reason": "disconnect_driver"},
            ]
            assert code == 1000

    asyncio.run(scenario())


def test_disconnect_return_within_grace_continues_call(server_factory) -> None:
    """SPEC §4 rules 2, 6: back within RECONNECT_GRACE: joins as a first join, held messages delivered."""
    server = server_factory(RECONNECT_GRACE="1s")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})
            await d.close()
            await expect(p, {"type": "participant_left", "role": "driver"})
            held = [{"type": "answer", "sdp": SDP_ANSWER}, ice(1), ice(2)]
            for message in held:
                await send_json(p, message)
            assert await until_pong(p) == []  # held, not refused
            d, first = await clients.join(session, "driver-1")
            assert first == [
                {"type": "authenticated", "user_id": "driver-1"},
                {
                    "type": "session_joined",
                    "session_id": session["session_id"],
                    "ride_id": session["ride_id"],
                    "role": "driver",
                },
            ]
            await expect(d, {"type": "participant_joined", "role": "passenger"}, *held)
            await expect(p, {"type": "participant_joined", "role": "driver"})
            restart = {"type": "offer", "sdp": SDP_OFFER + "a=ice-options:ice2\r\n"}
            await send_json(d, restart)
            await expect(p, restart)
            await asyncio.sleep(1.3)  # past the grace the driver came back within
            assert await until_pong(d) == []
            assert await until_pong(p) == []
            # the call is still live: the shutdown is what ends it
            stopped = asyncio.create_task(asyncio.to_thread(server.stop))
            shutdown = {"type": "call_ended", "reason": "server_shutdown"}
            assert await drain(d) == ([shutdown], 1001)
            assert await drain(p) == ([shutdown], 1001)
            assert await stopped == 0

    asyncio.run(scenario())
    row = row_of(server, session)
    assert row["end_reason"] == "server_shutdown"
    assert row["connected_at"] is not None


def test_disconnect_before_active_ends_nothing(server_factory) -> None:
    """SPEC §4 rule 6: before the call is active a disconnect ends nothing; the session stays joinable."""
    server = server_factory(RECONNECT_GRACE="300ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            await d.close()
            await asyncio.sleep(0.6)  # well past RECONNECT_GRACE
            p, _ = await clients.join(session, "passenger-1")
            assert await until_pong(p) == []  # no participant_joined: the driver is away
            p.transport.abort()
            await asyncio.sleep(0.6)
            d, _ = await clients.join(session, "driver-1")
            assert await until_pong(d) == []
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await expect(d, {"type": "participant_joined", "role": "passenger"})
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})

    asyncio.run(scenario())
    assert server.stop() == 0
    row = row_of(server, session)
    assert row["end_reason"] == "server_shutdown"
    assert row["connected_at"] is not None


# -- rule 7: bad messages and the message rate ------------------------------------------

BAD_MESSAGES: list[tuple[str, str]] = [
    ("not json at all", "invalid_json"),
    ("{", "invalid_json"),
    ('{"type": "heartbeat",}', "invalid_json"),
    ("NaN", "invalid_json"),
    ('{"type": "offer", "sdp": NaN}', "invalid_json"),
    ('{"type": "heartbeat", "x": Infinity}', "invalid_json"),
    ('{"type": "heartbeat", "x": -Infinity}', "invalid_json"),
    ("[]", "invalid_message"),
    ('["offer", "v=0"]', "invalid_message"),
    ('"offer"', "invalid_message"),
    ("42", "invalid_message"),
    ("null", "invalid_message"),
    ("{}", "invalid_message"),
    ('{"type": 5}', "invalid_message"),
    ('{"type": null}', "invalid_message"),
    ('{"type": ["offer"]}', "invalid_message"),
    ('{"type": "offer"}', "invalid_message"),
    ('{"type": "offer", "sdp": ""}', "invalid_message"),
    ('{"type": "offer", "sdp": 5}', "invalid_message"),
    ('{"type": "answer", "sdp": null}', "invalid_message"),
    ('{"type": "answer", "sdp": {"sdp": "v=0"}}', "invalid_message"),
    ('{"type": "ice_candidate"}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host"}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": 5}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": 5}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": null}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": {"candidate": "x"}}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": "", "sdpMLineIndex": "0"}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": "", "sdpMLineIndex": true}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": "", "sdpMLineIndex": 1.5}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": "", "sdpMid": 0}}', "invalid_message"),
    ('{"type": "ice_candidate", "candidate": {"candidate": "", "usernameFragment": 7}}', "invalid_message"),
    ('{"type": "no_such_type"}', "unknown_type"),
    ('{"type": "OFFER", "sdp": "v=0"}', "unknown_type"),
    ('{"type": "pong"}', "unknown_type"),
    ('{"type": "call_ended", "reason": "user_terminated"}', "unknown_type"),
]


def test_bad_messages_get_errors_and_socket_stays_open(server) -> None:
    """SPEC §4 rule 7: invalid_json / invalid_message / unknown_type; the socket stays open."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            for frame, code in BAD_MESSAGES:
                await d.send(frame)
                message = await recv_json(d)
                assert message.get("code") == code, (frame, message)
                assert_error(message, code)
                assert await until_pong(d) == [], frame
            assert await until_pong(p) == []  # none of them reached the peer
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})

    asyncio.run(scenario())


def test_bad_messages_also_before_peer_joined(server) -> None:
    """SPEC §4 rule 7: an invalid relayed message is refused, not held for the absent peer."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            await send_json(d, {"type": "offer", "sdp": ""})
            assert_error(await recv_json(d), "invalid_message")
            await send_json(d, {"type": "ice_candidate", "candidate": {"candidate": 1}})
            assert_error(await recv_json(d), "invalid_message")
            p, _ = await clients.join(session, "passenger-1")
            await expect(p, {"type": "participant_joined", "role": "driver"})
            assert await until_pong(p) == []

    asyncio.run(scenario())


def test_rate_limit_burst_allowed_then_flood_closed_1008(server) -> None:
    """SPEC §4 rule 7: bursts of 100 pass; a heartbeat flood → error rate_limited, close 1008."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            # a burst just under 100 frames (the authenticate took one) passes
            for _ in range(95):
                await send_json(d, {"type": "heartbeat"})
            for _ in range(95):
                assert await recv_json(d) == {"type": "pong"}
            await asyncio.sleep(1.0)  # ~50 frames' worth refills
            for _ in range(40):
                await send_json(d, {"type": "heartbeat"})
            for _ in range(40):
                assert await recv_json(d) == {"type": "pong"}
            # a flood of heartbeats only
            flood_started = time.monotonic()
            try:
                for _ in range(200):
                    await send_json(d, {"type": "heartbeat"})
            except ConnectionClosed:
                pass
            assert time.monotonic() - flood_started < 1.0
            messages, code = await drain(d)
            pongs = [m for m in messages if m == {"type": "pong"}]
            assert messages == pongs + [messages[-1]], messages[-3:]
            assert_error(messages[-1], "rate_limited")
            # what was left of the bucket (~15 frames), far from the 200 sent
            assert 1 <= len(pongs) <= 90, len(pongs)
            assert code == 1008
            # for the session this is a disconnect like any other
            await expect(p, {"type": "participant_left", "role": "driver"})

    asyncio.run(scenario())


def test_rate_limit_counts_every_frame_kind(server) -> None:
    """SPEC §4 precise points: the message rate limit counts every frame, bad and binary ones too."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            try:
                for n in range(200):
                    await d.send(["nope", b"\x00", '{"type": "bogus"}'][n % 3])
            except ConnectionClosed:
                pass
            messages, code = await drain(d)
            assert_error(messages[-1], "rate_limited")
            assert all(m["type"] == "error" for m in messages)
            assert 50 <= len(messages) <= 150, len(messages)
            assert code == 1008

    asyncio.run(scenario())


# -- rule 8: heartbeat ---------------------------------------------------------------


def test_heartbeat_gets_pong(server) -> None:
    """SPEC §4 rule 8: heartbeat → exactly {"type": "pong"}, also with extra fields."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, _ = await clients.join(session, "driver-1")
            await send_json(d, {"type": "heartbeat"})
            assert await asyncio.wait_for(d.recv(), 5) in ('{"type":"pong"}', '{"type": "pong"}')
            await send_json(d, {"type": "heartbeat", "ts": 123, "echo": "me"})
            await expect(d, {"type": "pong"})
            p, _ = await clients.join(session, "passenger-1")
            await expect(d, {"type": "participant_joined", "role": "passenger"})
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await send_json(p, {"type": "participant_joined", "role": "x"})
            assert_error(await recv_json(p), "unknown_type")
            for _ in range(3):
                await send_json(d, {"type": "heartbeat"})
            await expect(d, {"type": "pong"}, {"type": "pong"}, {"type": "pong"})
            assert await until_pong(p) == []

    asyncio.run(scenario())


def test_heartbeat_server_pings_and_drops_silent_client(server_factory) -> None:
    """SPEC §4 rule 8: pings every HEARTBEAT_INTERVAL; answering clients live, silent ones are dropped."""
    server = server_factory(HEARTBEAT_INTERVAL="300ms", HEARTBEAT_TIMEOUT="1s")
    session = new_session(server)
    idle = new_session(server, "driver-2", "passenger-2")

    async def answering(clients: Clients) -> None:
        # answers pings and sends nothing else for 2 × HEARTBEAT_TIMEOUT: stays
        alive = await clients.raw()
        alive.send_json(auth_msg(session, "driver-1"))
        assert (await alive.text())["type"] == "authenticated"
        assert (await alive.text())["type"] == "session_joined"
        pings = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            frame = await alive.frame(timeout=2.0)
            assert frame is not None, "a client answering pings was dropped"
            opcode, payload = frame
            assert opcode == 0x9, frame  # only pings in a quiet session
            pings += 1
            alive.send_frame(0xA, payload)
        assert 4 <= pings <= 10, pings  # about one every 300 ms
        alive.send_json({"type": "heartbeat"})
        assert await alive.text() == {"type": "pong"}

    async def silent(clients: Clients) -> None:
        # never answers: pinged, then dropped after HEARTBEAT_TIMEOUT
        mute = await clients.raw()
        started = time.monotonic()
        pings = 0
        while True:
            frame = await mute.frame(timeout=5.0)
            if frame is None or frame[0] == 0x8:
                break
            assert frame[0] == 0x9, frame
            pings += 1
        elapsed = time.monotonic() - started
        assert pings >= 2, pings
        assert 0.8 <= elapsed <= 4.0, elapsed

    async def websockets_clients(clients: Clients) -> None:
        # real clients idle in a call: their automatic pongs keep them
        d, p = await clients.pair(idle, "driver-2", "passenger-2")
        await asyncio.sleep(2.0)
        assert await until_pong(d) == []
        assert await until_pong(p) == []

    async def scenario() -> None:
        async with Clients(server) as clients:
            await asyncio.gather(answering(clients), silent(clients), websockets_clients(clients))

    asyncio.run(scenario())


def test_heartbeat_timeout_in_call_is_a_disconnect(server_factory) -> None:
    """SPEC §4 rules 6, 8: a peer that stops answering pings is dropped: participant_left, then end."""
    server = server_factory(HEARTBEAT_INTERVAL="300ms", HEARTBEAT_TIMEOUT="1s", RECONNECT_GRACE="500ms")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            p.transport.pause_reading()  # network loss: no pongs any more
            lost = time.monotonic()
            await expect(d, {"type": "participant_left", "role": "passenger"})
            assert time.monotonic() - lost >= 0.8
            messages, code = await drain(d)
            assert messages == [{"type": "call_ended", "reason": "disconnect_passenger"}]
            assert code == 1000

    asyncio.run(scenario())
    assert server.stop() == 0
    assert row_of(server, session)["end_reason"] == "disconnect_passenger"


# -- frames and extensions -------------------------------------------------------------


def test_message_over_max_bytes_closes_1009(server) -> None:
    """SPEC §4: a message of MAX_MESSAGE_BYTES passes; one byte more → close 1009."""
    session = new_session(server)

    def offer_of(size: int) -> str:
        base = '{"type":"offer","sdp":"' + '"}'
        frame = '{"type":"offer","sdp":"' + "a" * (size - len(base)) + '"}'
        assert len(frame.encode()) == size
        return frame

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await d.send(offer_of(4096))
            got = await recv_json(p)
            assert got["type"] == "offer" and len(got["sdp"]) == 4096 - 25
            await d.send(offer_of(4097))
            messages, code = await drain(d)
            assert messages == []
            assert code == 1009
            await expect(p, {"type": "participant_left", "role": "driver"})

    asyncio.run(scenario())


def test_message_limit_follows_max_message_bytes(server_factory) -> None:
    """SPEC §2/§4: MAX_MESSAGE_BYTES sets the limit: over it → close 1009."""
    server = server_factory(MAX_MESSAGE_BYTES="1024")
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await send_json(d, {"type": "offer", "sdp": "a" * 900})
            await expect(p, {"type": "offer", "sdp": "a" * 900})
            await send_json(d, {"type": "offer", "sdp": "a" * 1100})
            assert await drain(d) == ([], 1009)

    asyncio.run(scenario())


def test_binary_frame_after_auth_is_unsupported(server) -> None:
    """SPEC §4: a binary frame after authentication → error unsupported_frame; the socket stays open."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, p = await clients.pair(session)
            await d.send(json.dumps({"type": "offer", "sdp": SDP_OFFER}).encode())
            assert_error(await recv_json(d), "unsupported_frame")
            await d.send(b"\x00\xff")
            assert_error(await recv_json(d), "unsupported_frame")
            assert await until_pong(d) == []
            assert await until_pong(p) == []  # nothing relayed
            await send_json(d, {"type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})

    asyncio.run(scenario())


def test_no_compression_extension_negotiated(server) -> None:
    """SPEC §4: no compression extension, even when the client offers permessage-deflate."""
    session = new_session(server)

    async def scenario() -> None:
        async with Clients(server) as clients:
            ws = await clients.connect(compression="deflate")
            assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
            assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
            assert ws.protocol.extensions == []
            await send_json(ws, auth_msg(session, "driver-1"))
            assert (await recv_json(ws))["type"] == "authenticated"
            raw = await clients.raw(
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n"
            )
            assert b"sec-websocket-extensions" not in raw.head.lower(), raw.head

    asyncio.run(scenario())


def test_server_never_echoes_client_fields(server) -> None:
    """SPEC §4: server messages have only their defined fields, whatever the client added."""
    session = new_session(server)
    extra = {"foo": "bar", "role": "admin", "reason": "x", "code": "y", "sdp": "v=0", "candidate": None}

    async def scenario() -> None:
        async with Clients(server) as clients:
            d, first = await clients.join(session, "driver-1", **extra)
            assert first == [
                {"type": "authenticated", "user_id": "driver-1"},
                {
                    "type": "session_joined",
                    "session_id": session["session_id"],
                    "ride_id": session["ride_id"],
                    "role": "driver",
                },
            ]
            p, first = await clients.join(session, "passenger-1", **extra)
            assert first[0] == {"type": "authenticated", "user_id": "passenger-1"}
            await expect(p, {"type": "participant_joined", "role": "driver"})
            await expect(d, {"type": "participant_joined", "role": "passenger"})
            await send_json(d, {"type": "heartbeat", **extra})
            await expect(d, {"type": "pong"})
            await send_json(d, {**extra, "type": "offer", "sdp": SDP_OFFER})
            await expect(p, {"type": "offer", "sdp": SDP_OFFER})
            await send_json(d, {**extra, "type": "bogus"})
            assert_error(await recv_json(d), "unknown_type")
            await send_json(p, {**extra, "type": "end_call"})
            ended = {"type": "call_ended", "reason": "user_terminated"}
            assert await drain(p) == ([ended], 1000)
            assert await drain(d) == ([ended], 1000)
            bad = await clients.connect()
            await send_json(bad, {**extra, "type": "authenticate", "session_id": "nope", "user_id": "u"})
            await refused(bad, "session_not_found")

    asyncio.run(scenario())
