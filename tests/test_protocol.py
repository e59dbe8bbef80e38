"""The WebSocket protocol of docs/protocol.md ("WebSocket /ws"), rule by
rule, with real clients against the real daemon process.

Every test names the rule it covers in its docstring and asserts something
that fails when the daemon breaks that rule. Each is an ``async def`` run by
:func:`conftest.in_loop` with the ``clients`` of its ``server`` and, mostly,
a ``session`` of driver-1 and passenger-1. Timers are shortened with
``@pytest.mark.daemon(...)`` (``SESSION_DURATION``, ``RECONNECT_GRACE``,
``AUTH_TIMEOUT``, ``HEARTBEAT_*``); waits are on events with generous
timeouts, and the few sleeps only make sure that a timer which must *not*
fire has had its chance.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from conftest import Clients, RawWebSocket, TwoInstances, auth_msg, in_loop, recv_json, send_json

SDP_OFFER = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/SAVPF 111\r\n"
SDP_ANSWER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
CANDIDATE_LINE = "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 0.0.0.0 rport 0"
OFFER = {"type": "offer", "sdp": SDP_OFFER}
ANSWER = {"type": "answer", "sdp": SDP_ANSWER}
HEARTBEAT = {"type": "heartbeat"}
PONG = {"type": "pong"}
END_CALL = {"type": "end_call"}
ENDED = {"type": "call_ended", "reason": "user_terminated"}

# The whole protocol also runs against the oldest websockets allowed (make test-compat).
pytestmark = pytest.mark.compat


# -- helpers -----------------------------------------------------------------


#: The rules between the two participants of a call (relay, holds,
#: replacement, lifecycle and its timers, endings, disconnects): their tests
#: also run with the participants on two instances.
BETWEEN_PARTICIPANTS = (
    "test_reconnect_",
    "test_lifecycle_",
    "test_relay_",
    "test_end_call_",
    "test_disconnect_",
    "test_heartbeat_timeout_in_call",
    "test_auth_session_ended_after_end_call",
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" not in metafunc.fixturenames:
        return
    topologies: list[Any] = ["one instance"]
    if metafunc.function.__name__.startswith(BETWEEN_PARTICIPANTS):
        topologies.append(pytest.param("two instances", marks=pytest.mark.cluster))
    metafunc.parametrize("server", topologies, indirect=True)


@pytest.fixture
def server(request: pytest.FixtureRequest, server_factory: Any) -> Any:
    """The daemon of docs/protocol.md, with ``@pytest.mark.daemon(...)``
    settings: one process, or (for the rules between the participants) two
    instances sharing the sessions through Redis with the participants on
    different instances (:class:`conftest.TwoInstances`; docs/operations.md,
    "Several instances"): every rule holds the same."""
    marker = request.node.get_closest_marker("daemon")
    env = {k: str(v) for k, v in (marker.kwargs if marker else {}).items()}
    if request.param == "one instance":
        return server_factory(**env)
    return TwoInstances(request.getfixturevalue("cluster"), env)


@pytest.fixture
def session(server: Any) -> dict[str, Any]:
    """A new session of driver-1 and passenger-1."""
    return server.new_session()


def candidate(n: int) -> dict[str, Any]:
    return {"candidate": f"{CANDIDATE_LINE} generation {n}", "sdpMid": "0", "sdpMLineIndex": 0}


def ice(n: int) -> dict[str, Any]:
    return {"type": "ice_candidate", "candidate": candidate(n)}


def joined(role: str) -> dict[str, Any]:
    return {"type": "participant_joined", "role": role}


def left(role: str) -> dict[str, Any]:
    return {"type": "participant_left", "role": role}


def welcome(session: dict[str, Any], user_id: str, role: str) -> list[dict[str, Any]]:
    """What a join is answered with: ``authenticated``, ``session_joined``."""
    return [
        {"type": "authenticated", "user_id": user_id},
        {
            "type": "session_joined",
            "session_id": session["session_id"],
            "ride_id": session["ride_id"],
            "role": role,
        },
    ]


def utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def assert_error(message: dict[str, Any], code: str) -> None:
    """An ``error`` has exactly ``type``, ``code`` and a text ``message``."""
    assert set(message) == {"type", "code", "message"}, message
    assert message["type"] == "error" and message["code"] == code, message
    assert isinstance(message["message"], str) and message["message"], message


async def expect(ws: ClientConnection, *messages: dict[str, Any], timeout: float = 5.0) -> None:
    """The next messages on ``ws`` are exactly ``messages``, in order."""
    got = [await recv_json(ws, timeout) for _ in messages]
    assert got == list(messages)


async def relayed(sender: ClientConnection, receiver: ClientConnection, *messages: dict[str, Any]) -> None:
    """``messages``, sent by ``sender``, reach ``receiver`` as sent, in order."""
    for message in messages:
        await send_json(sender, message)
    await expect(receiver, *messages)


async def until_pong(ws: ClientConnection, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send a ``heartbeat``; return every message received before its ``pong``
    (proves the socket is open and shows what else was pending)."""
    await send_json(ws, HEARTBEAT)
    before = []
    while True:
        message = await recv_json(ws, timeout)
        if message == PONG:
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


async def ended(message: dict[str, Any], *sockets: ClientConnection, code: int = 1000) -> None:
    """Each of ``sockets`` gets exactly ``message``, then close ``code``."""
    for ws in sockets:
        assert await drain(ws) == ([message], code)


async def refused(ws: ClientConnection, reason: str) -> None:
    """``ws`` gets exactly ``unauthorized`` ``reason`` and close 4001."""
    messages, code = await drain(ws)
    assert messages == [{"type": "unauthorized", "reason": reason}]
    assert code == 4001


async def refused_first(clients: Clients, frames: list[str | bytes], reason: str) -> None:
    """Each of ``frames`` (a text or a binary frame), the first frame of a
    new socket, is refused: ``unauthorized`` ``reason``, close 4001."""
    for frame in frames:
        ws = await clients.connect()
        await ws.send(frame)
        await refused(ws, reason)


async def join_refused(clients: Clients, session: dict[str, Any], user_id: str, reason: str) -> None:
    """An ``authenticate`` as ``user_id`` is refused with ``reason``."""
    await refused_first(clients, [json.dumps(auth_msg(session, user_id))], reason)


async def errors_then_relay(
    d: ClientConnection, p: ClientConnection, answers: list[tuple[str | bytes, str]]
) -> None:
    """Each frame of ``answers`` sent by ``d`` gets exactly an ``error`` with
    its code, and the socket stays open (a heartbeat is answered at once);
    none of them reached ``p``, and an offer from ``d`` still does."""
    for frame, code in answers:
        await d.send(frame)
        message = await recv_json(d)
        assert message.get("code") == code, (frame, message)
        assert_error(message, code)
        assert await until_pong(d) == [], frame
    assert await until_pong(p) == []
    await relayed(d, p, OFFER)


async def hold(sender: ClientConnection, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``messages`` while the peer is absent: the answers they got
    before a heartbeat's pong, each an ``error`` ``peer_not_connected`` (a
    message not held)."""
    for message in messages:
        await send_json(sender, message)
    refusals = await until_pong(sender)
    for error in refusals:
        assert_error(error, "peer_not_connected")
    return refusals


async def logged(server: Any, *sessions: dict[str, Any]) -> list[dict[str, Any]]:
    """Stop the daemon (exit 0; the clients still answer its closing
    handshakes) and return the call-log rows of ``sessions``."""
    assert await asyncio.to_thread(server.stop) == 0
    rows = {row["session_id"]: row for row in server.call_logs()}
    return [rows[session["session_id"]] for session in sessions]


def assert_ended(row: dict[str, Any], reason: str, *, connected: bool) -> None:
    """A call-log row ended with ``reason``; ``connected``: whether it was a call."""
    assert row["status"] == "ended", row
    assert row["end_reason"] == reason, row
    assert row["ended_at"] is not None, row
    assert (row["connected_at"] is not None) == connected, row


# -- rule 1: authentication ------------------------------------------------------


@in_loop
async def test_auth_other_message_first_is_refused(clients, session) -> None:
    """docs/protocol.md, rule 1: any message but authenticate first gets unauthorized
    not_authenticated, close 4001."""
    firsts: list[Any] = [
        HEARTBEAT,
        OFFER,
        ANSWER,
        ice(0),
        END_CALL,
        {"type": "no_such_type"},
        {"type": "offer", "session_id": session["session_id"], "user_id": "driver-1", "sdp": "x"},
        [],
        "authenticate",
        {"session_id": session["session_id"], "user_id": "driver-1"},
    ]
    await refused_first(clients, [json.dumps(first) for first in firsts], "not_authenticated")
    # the session was not touched by any of them: the driver still joins
    await clients.join(session, "driver-1")


@in_loop
async def test_auth_invalid_json_or_binary_first_is_refused(clients, session) -> None:
    """docs/protocol.md, rule 1 and "Precise points": invalid JSON or a binary frame before
    authenticate → 4001."""
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
    await refused_first(clients, frames, "not_authenticated")


@in_loop
async def test_auth_malformed_authenticate_is_invalid_message(clients, session) -> None:
    """docs/protocol.md, rule 1: a malformed authenticate (missing or non-string ids) →
    invalid_message, 4001."""
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
    await refused_first(clients, [json.dumps(message) for message in malformed], "invalid_message")
    await clients.join(session, "driver-1")


@pytest.mark.daemon(AUTH_TIMEOUT="500ms")
@in_loop
async def test_auth_timeout_closes_silent_socket(clients, session) -> None:
    """docs/protocol.md, rule 1: silence past AUTH_TIMEOUT → unauthorized auth_timeout,
    close 4001."""
    joined_ws, _ = await clients.join(session, "driver-1")
    started = time.monotonic()
    silent = await clients.connect()
    await refused(silent, "auth_timeout")
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 4.0, elapsed
    # the authenticated socket, older than AUTH_TIMEOUT, is untouched
    assert await until_pong(joined_ws) == []


@in_loop
async def test_auth_unknown_session_is_session_not_found(clients) -> None:
    """docs/protocol.md, rule 1: an unknown session_id → unauthorized session_not_found,
    close 4001."""
    unknown = [{"session_id": session_id} for session_id in (str(uuid.uuid4()), "not-a-uuid")]
    await refused_first(clients, [json.dumps(auth_msg(s, "driver-1")) for s in unknown], "session_not_found")


@in_loop
async def test_auth_user_not_in_session(server, clients) -> None:
    """docs/protocol.md, rule 1: a user that is neither driver nor passenger →
    user_not_in_session, close 4001."""
    session = server.new_session(driver_id="driver-7", passenger_id="passenger-7")
    other = server.new_session(driver_id="driver-8", passenger_id="passenger-8")
    strangers = ("stranger", "driver-8", "DRIVER-7", "driver-7 ")
    await refused_first(
        clients, [json.dumps(auth_msg(session, user)) for user in strangers], "user_not_in_session"
    )
    _, first = await clients.join(other, "passenger-8")
    assert first[1]["role"] == "passenger"


@in_loop
async def test_auth_roles_come_from_session_ids(server, clients) -> None:
    """docs/protocol.md, rule 1: authenticated {user_id} then session_joined {session_id,
    ride_id, role}."""
    session = server.new_session(driver_id="d-42", passenger_id="p-42")
    _, first = await clients.join(session, "p-42")
    assert first == welcome(session, "p-42", "passenger")
    _, first = await clients.join(session, "d-42")
    assert first[1]["role"] == "driver"


@in_loop
async def test_auth_ids_counted_in_characters(server, clients) -> None:
    """docs/protocol.md, rule 1 and "Precise points": ids of 255 non-ASCII characters (over
    255 bytes) authenticate."""
    driver, passenger = "د" * 255, "😀" * 255
    session = server.new_session(driver_id=driver, passenger_id=passenger)
    d, first = await clients.join(session, driver)
    assert first[0] == {"type": "authenticated", "user_id": driver}
    assert first[1]["role"] == "driver"
    _, first = await clients.meet(session, passenger, d)
    assert first[0] == {"type": "authenticated", "user_id": passenger}


@pytest.mark.daemon(SESSION_DURATION="3s")
@in_loop
async def test_auth_session_ended_after_end_call(clients, session) -> None:
    """docs/protocol.md, rule 1 and "Precise points": an ended session is remembered →
    session_ended."""
    d, p = await clients.pair(session)
    await send_json(d, END_CALL)
    await ended(ENDED, d, p)
    for user in ("driver-1", "passenger-1"):
        await join_refused(clients, session, user, "session_ended")
    # still remembered well into SESSION_DURATION after the end
    await asyncio.sleep(1.5)
    await join_refused(clients, session, "driver-1", "session_ended")


@in_loop
async def test_auth_second_authenticate_is_already_authenticated(server, clients, session) -> None:
    """docs/protocol.md, rule 1: a second authenticate → error already_authenticated; the
    socket stays open, still the driver of the first session."""
    other = server.new_session(driver_id="driver-9", passenger_id="passenger-9")
    d, p = await clients.pair(session)
    again = [auth_msg(session, "driver-1"), auth_msg(session, "passenger-1"), auth_msg(other, "driver-9")]
    await errors_then_relay(d, p, [(json.dumps(message), "already_authenticated") for message in again])


# -- rule 2: replace on reconnect ------------------------------------------------


@pytest.mark.daemon(RECONNECT_GRACE="300ms")
@in_loop
async def test_reconnect_replaces_old_socket(clients, session) -> None:
    """docs/protocol.md, rule 2: new socket wins; old gets error replaced + 4002; peer sees no
    participant_left."""
    d1, p = await clients.pair(session)
    d2, first = await clients.meet(session, "driver-1", p)
    assert first[1]["role"] == "driver"
    messages, code = await drain(d1)
    assert len(messages) == 1, messages
    assert_error(messages[0], "replaced")
    assert code == 4002
    # the replaced socket's close is ignored: no participant_left, and
    # nothing ends once RECONNECT_GRACE has passed
    await asyncio.sleep(0.8)
    assert await until_pong(p) == []
    assert await until_pong(d2) == []
    await relayed(d2, p, OFFER)
    await relayed(p, d2, ANSWER)
    # the new socket's own close still counts
    await d2.close()
    await expect(p, left("driver"))


@pytest.mark.daemon(RECONNECT_GRACE="300ms")
@in_loop
async def test_reconnect_replaced_socket_late_messages_ignored(clients, session) -> None:
    """docs/protocol.md, rule 2: messages a replaced socket sends after replacement are
    neither relayed nor acted on."""
    d1, p = await clients.pair(session)
    # d1 stops reading: it does not see its replacement and keeps talking
    d1.transport.pause_reading()
    d2, _ = await clients.meet(session, "driver-1", p)
    await send_json(d1, {"type": "offer", "sdp": "v=0\r\nstale offer"})
    await send_json(d1, ice(1))
    await send_json(d1, END_CALL)
    await asyncio.sleep(0.3)
    await relayed(d2, p, {"type": "offer", "sdp": "v=0\r\nfresh offer"})
    assert await until_pong(p) == []
    assert await until_pong(d2) == []
    d1.transport.resume_reading()
    messages, code = await drain(d1)
    assert [m.get("code") for m in messages] == ["replaced"], messages
    assert code == 4002
    await asyncio.sleep(0.6)  # past RECONNECT_GRACE: still nothing ended
    assert await until_pong(p) == []
    await relayed(p, d2, ANSWER)


@in_loop
async def test_reconnect_replacement_before_peer_joined(clients, session) -> None:
    """docs/protocol.md, rule 2: replacing a lone participant's socket leaves the session
    joinable."""
    d1, _ = await clients.join(session, "driver-1")
    d2, _ = await clients.join(session, "driver-1")
    messages, code = await drain(d1)
    assert [m.get("code") for m in messages] == ["replaced"] and code == 4002
    assert await until_pong(d2) == []
    p, _ = await clients.meet(session, "passenger-1", d2)
    await relayed(p, d2, ice(3))


# -- rule 3: session lifecycle ---------------------------------------------------


@pytest.mark.daemon(SESSION_DURATION="1s")
@in_loop
async def test_lifecycle_never_active_session_expires(server, clients, session) -> None:
    """docs/protocol.md, rules 1 and 3: a never-active session expires: call_ended expired,
    1000; then session_expired."""
    nobody = server.new_session()
    d, _ = await clients.join(session, "driver-1")
    assert await drain(d) == ([{"type": "call_ended", "reason": "expired"}], 1000)
    await join_refused(clients, session, "passenger-1", "session_expired")
    # docs/protocol.md, rule 1: also for a session nobody ever joined
    await join_refused(clients, nobody, "driver-1", "session_expired")
    rows = await logged(server, session, nobody)
    for row in rows:
        assert_ended(row, "expired", connected=False)
    # sessions of 1s: each expired about 1s after it was created (from the
    # call log's own times: no clock of the test), not at shutdown
    for row in rows:
        lived = (utc(row["ended_at"]) - utc(row["created_at"])).total_seconds()
        assert 0.8 <= lived <= 3.0, lived


@pytest.mark.daemon(SESSION_DURATION="1500ms")
@in_loop
async def test_lifecycle_active_call_cut_after_duration_from_connected_at(server, clients, session) -> None:
    """docs/protocol.md, rule 3: an active call is cut SESSION_DURATION after connected_at:
    call_timeout, 1000."""
    d, _ = await clients.join(session, "driver-1")
    await asyncio.sleep(0.9)  # the call starts well after the session was created
    activated = time.monotonic()
    p, _ = await clients.meet(session, "passenger-1", d)
    timeout = {"type": "call_timeout", "reason": "max_duration_reached"}
    assert await drain(d, timeout=6) == ([timeout], 1000)
    elapsed = time.monotonic() - activated
    assert await drain(p) == ([timeout], 1000)
    # measured from connected_at (1.5s), not from creation (0.6s left then)
    assert 1.25 <= elapsed <= 4.5, elapsed
    await join_refused(clients, session, "driver-1", "session_ended")
    [row] = await logged(server, session)
    assert_ended(row, "max_duration_reached", connected=True)
    created, connected, ended_at = utc(row["created_at"]), utc(row["connected_at"]), utc(row["ended_at"])
    assert 0.8 <= (connected - created).total_seconds() <= 3.0
    assert 1.3 <= (ended_at - connected).total_seconds() <= 4.5


@pytest.mark.daemon(SESSION_DURATION="1s")
@in_loop
async def test_lifecycle_sessions_that_never_became_calls_are_logged_as_sessions(server, clients) -> None:
    """docs/protocol.md, rule 3: a session that ends before it
    became a call (expired with nobody or one participant, or ended by
    end_call before the other joined) is logged as "session ended" with its
    reason and no duration — not as a call of 0.0s; a call that was active
    keeps its "call ended … duration=" line."""
    nobody, lone, early, call = (server.new_session() for _ in range(4))
    await clients.join(lone, "driver-1")
    d, _ = await clients.join(early, "driver-1")
    await send_json(d, END_CALL)
    await ended(ENDED, d)
    d, _ = await clients.pair(call)
    assert await drain(d, timeout=6) == ([{"type": "call_timeout", "reason": "max_duration_reached"}], 1000)
    await clients.close()
    for session, reason in ((nobody, "expired"), (lone, "expired"), (early, "user_terminated")):
        line = server.wait_for_log(f"session ended session={session['session_id']} reason={reason}")
        assert "duration" not in line, line
    server.wait_for_log(f"call ended session={call['session_id']} reason=max_duration_reached duration=")
    for session in (nobody, lone, early):
        assert f"call ended session={session['session_id']}" not in server.log
    assert f"session ended session={call['session_id']}" not in server.log


# -- rule 4: relay ---------------------------------------------------------------


@in_loop
async def test_relay_order_preserved_both_ways(clients, session) -> None:
    """docs/protocol.md, rule 4: offer, answer and ice_candidate reach the other participant
    in the order sent."""
    d, p = await clients.pair(session)
    from_driver = [OFFER] + [ice(n) for n in range(30)]
    from_driver.insert(15, {"type": "offer", "sdp": SDP_OFFER + "a=ice-options:trickle\r\n"})
    from_passenger = [ice(100 + n) for n in range(20)]
    from_passenger.insert(3, ANSWER)
    for message in from_driver:
        await send_json(d, message)
    for message in from_passenger:
        await send_json(p, message)
    await expect(p, *from_driver)
    await expect(d, *from_passenger)
    # never echoed to the sender
    assert await until_pong(d) == []
    assert await until_pong(p) == []


@in_loop
async def test_relay_rebuilds_defined_fields_only(clients, session) -> None:
    """docs/protocol.md, rule 4: relayed messages are rebuilt from defined fields; extra
    fields are dropped."""
    d, p = await clients.pair(session)
    extra = {"session_id": "forged", "user_id": "passenger-1", "role": "passenger", "x": [1, 2]}
    await send_json(d, {**OFFER, **extra})
    await expect(p, OFFER)
    await send_json(p, {**ANSWER, "from": "driver-1", **extra})
    await expect(d, ANSWER)
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


@in_loop
async def test_relay_candidate_forms_as_given(clients, session) -> None:
    """docs/protocol.md, rule 4: candidate null / "" and missing or null
    sdpMid/sdpMLineIndex relayed as given."""
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
    d, p = await clients.pair(session)
    for form in forms:
        await send_json(d, {"type": "ice_candidate", "candidate": form})
    for form in forms:
        raw = await asyncio.wait_for(p.recv(), 5)
        got = json.loads(raw)
        assert got == {"type": "ice_candidate", "candidate": form}, raw
        if form is not None:  # missing stays missing, null stays null
            assert set(got["candidate"]) == set(form), raw


@in_loop
async def test_relay_held_until_peer_joins(clients, session) -> None:
    """docs/protocol.md, rule 4: messages sent before the peer joins are held, delivered
    after participant_joined."""
    d, _ = await clients.join(session, "driver-1")
    held = [OFFER] + [ice(n) for n in range(5)]
    held.append({"type": "ice_candidate", "candidate": None})
    assert await hold(d, held) == []  # held, no error
    p, _ = await clients.meet(session, "passenger-1", d, *held)
    assert await until_pong(p) == []  # delivered once
    await relayed(p, d, ANSWER)


@in_loop
async def test_relay_hold_bound_64_messages(clients, session) -> None:
    """docs/protocol.md, rule 4: at most 64 messages are held; each one past that gets error
    peer_not_connected."""
    d, _ = await clients.join(session, "driver-1")
    messages = [ice(n) for n in range(66)]
    assert len(await hold(d, messages)) == 2
    p, _ = await clients.meet(session, "passenger-1", d, *messages[:64])
    assert await until_pong(p) == []
    # once the peer is there nothing is refused
    await relayed(d, p, ice(99))


@in_loop
async def test_relay_hold_bound_16_kib(clients, session) -> None:
    """docs/protocol.md, rule 4: held messages are bounded to 16 KiB; the message past it
    gets peer_not_connected."""
    d, _ = await clients.join(session, "driver-1")
    # ~3.9 KB each: four fit in 16 KiB, a fifth does not
    offers = [{"type": "offer", "sdp": f"v={n}\r\n" + "a" * 3900} for n in range(5)]
    assert len(await hold(d, offers)) == 1
    p, _ = await clients.meet(session, "passenger-1", d, *offers[:4])
    assert await until_pong(p) == []


@in_loop
async def test_relay_hold_bound_counts_bytes_not_characters(clients, session) -> None:
    """docs/protocol.md, rule 4: the 16 KiB hold bound is in bytes on the wire, not
    characters."""
    d, _ = await clients.join(session, "driver-1")
    # 1900 × "é" is 1900 characters but several KB once sent, however encoded
    offers = [{"type": "offer", "sdp": f"v={n}\r\n" + "é" * 1900} for n in range(5)]
    for offer in offers:
        frame = json.dumps(offer, ensure_ascii=False)
        assert len(frame.encode()) < 4096
        await d.send(frame)
    refusals = await until_pong(d)
    for message in refusals:
        assert_error(message, "peer_not_connected")
    held = len(offers) - len(refusals)
    assert 1 <= held < len(offers), "5 offers of 1900 characters each were all held (over 16 KiB)"
    p, _ = await clients.meet(session, "passenger-1", d)
    frames = [await asyncio.wait_for(p.recv(), 5) for _ in range(held)]
    assert [json.loads(f) for f in frames] == offers[:held]
    sizes = [len(f.encode()) for f in frames]
    assert sum(sizes) <= 16 * 1024 < sum(sizes) + sizes[0], sizes


@pytest.mark.daemon(RECONNECT_GRACE="5s")
@in_loop
async def test_relay_hold_each_direction_has_its_own_bound(clients, session) -> None:
    """docs/protocol.md, rule 4 and "Precise points": held for a participant in grace, each
    direction its own bound."""
    d, p = await clients.pair(session)
    # driver away: the passenger fills the driver's queue
    await d.close()
    await expect(p, left("driver"))
    to_driver = [ice(n) for n in range(65)]
    assert len(await hold(p, to_driver)) == 1
    d, _ = await clients.meet(session, "driver-1", p, *to_driver[:64])
    # passenger away: the driver has a full bound of its own
    await p.close()
    await expect(d, left("passenger"))
    to_passenger = [ice(1000 + n) for n in range(65)]
    assert len(await hold(d, to_passenger)) == 1
    p, _ = await clients.meet(session, "passenger-1", d, *to_passenger[:64])
    assert await until_pong(p) == []
    assert await until_pong(d) == []


@in_loop
async def test_relay_initiated_by_is_first_offerer(server, clients) -> None:
    """docs/protocol.md, rule 4: the first participant to send an offer is recorded as
    initiated_by."""
    first = server.new_session(driver_id="drv-a", passenger_id="pas-a")
    second = server.new_session(driver_id="drv-b", passenger_id="pas-b")
    d, p = await clients.pair(first, "drv-a", "pas-a")
    await send_json(d, ice(1))
    await send_json(d, ANSWER)
    await relayed(p, d, OFFER)
    await send_json(d, OFFER)
    await expect(p, ice(1), ANSWER, OFFER)
    # second session: the driver offers before the passenger is there
    d2, _ = await clients.join(second, "drv-b")
    await send_json(d2, OFFER)
    p2, _ = await clients.meet(second, "pas-b", d2, OFFER)
    await relayed(p2, d2, OFFER)
    first_row, second_row = await logged(server, first, second)
    assert first_row["initiated_by"] == "pas-a"
    assert second_row["initiated_by"] == "drv-b"


@in_loop
async def test_relay_stays_inside_the_session(server, clients, session) -> None:
    """docs/protocol.md, rule 4: SDP and candidates go only to the other participant of the
    same session, never elsewhere."""
    two = server.new_session(driver_id="driver-2", passenger_id="passenger-2")
    d1, p1 = await clients.pair(session)
    d2, p2 = await clients.pair(two, "driver-2", "passenger-2")
    await relayed(d1, p1, OFFER, ice(7))
    for ws in (d1, d2, p2):
        assert await until_pong(ws) == []


# -- rule 5: end_call --------------------------------------------------------------


@in_loop
async def test_end_call_by_passenger_ends_for_both(server, clients, session) -> None:
    """docs/protocol.md, rule 5: end_call → both get call_ended user_terminated, both closed
    1000."""
    d, p = await clients.pair(session)
    await send_json(p, {"type": "end_call", "reason": "bogus", "extra": 1})
    await ended(ENDED, p, d)
    [row] = await logged(server, session)
    assert_ended(row, "user_terminated", connected=True)


@in_loop
async def test_end_call_before_peer_joined_ends_session(server, clients, session) -> None:
    """docs/protocol.md, rule 5 and "Precise points": end_call before the peer ever joined
    ends the session (close 1000)."""
    d, _ = await clients.join(session, "driver-1")
    await send_json(d, OFFER)
    await send_json(d, END_CALL)
    await ended(ENDED, d)
    await join_refused(clients, session, "passenger-1", "session_ended")
    [row] = await logged(server, session)
    assert_ended(row, "user_terminated", connected=False)


# -- rule 6: disconnect --------------------------------------------------------------


@pytest.mark.daemon(RECONNECT_GRACE="600ms")
@pytest.mark.parametrize(
    ("leaver", "how"),
    [("driver", "close"), ("passenger", "network_loss")],
)
@in_loop
async def test_disconnect_without_return_ends_call(server, clients, session, leaver: str, how: str) -> None:
    """docs/protocol.md, rule 6: participant_left, then after RECONNECT_GRACE call_ended
    disconnect_<role>."""
    d, p = await clients.pair(session)
    gone, other = (d, p) if leaver == "driver" else (p, d)
    if how == "close":
        await gone.close()
    else:
        gone.transport.abort()
    await expect(other, left(leaver))
    went = time.monotonic()
    assert await drain(other) == ([{"type": "call_ended", "reason": f"disconnect_{leaver}"}], 1000)
    assert time.monotonic() - went >= 0.45
    await join_refused(clients, session, f"{leaver}-1", "session_ended")
    [row] = await logged(server, session)
    assert_ended(row, f"disconnect_{leaver}", connected=True)


@pytest.mark.daemon(RECONNECT_GRACE="0")
@in_loop
async def test_disconnect_with_zero_grace_ends_at_once(clients, session) -> None:
    """docs/protocol.md, rule 6: with RECONNECT_GRACE=0 the call ends as soon as an active
    participant drops."""
    d, p = await clients.pair(session)
    await d.close()
    assert await drain(p) == ([left("driver"), {"type": "call_ended", "reason": "disconnect_driver"}], 1000)


@pytest.mark.daemon(RECONNECT_GRACE="1s")
@in_loop
async def test_disconnect_return_within_grace_continues_call(server, clients, session) -> None:
    """docs/protocol.md, rules 2 and 6: back within RECONNECT_GRACE: joins as a first join,
    held messages delivered."""
    d, p = await clients.pair(session)
    await relayed(d, p, OFFER)
    await d.close()
    await expect(p, left("driver"))
    held = [ANSWER, ice(1), ice(2)]
    assert await hold(p, held) == []  # held, not refused
    d, first = await clients.meet(session, "driver-1", p, *held)
    assert first == welcome(session, "driver-1", "driver")
    await relayed(d, p, {"type": "offer", "sdp": SDP_OFFER + "a=ice-options:ice2\r\n"})
    await asyncio.sleep(1.3)  # past the grace the driver came back within
    assert await until_pong(d) == []
    assert await until_pong(p) == []
    # the call is still live: the shutdown is what ends it
    stopped = asyncio.create_task(asyncio.to_thread(server.stop))
    await ended({"type": "call_ended", "reason": "server_shutdown"}, d, p, code=1001)
    assert await stopped == 0
    [row] = await logged(server, session)
    assert_ended(row, "server_shutdown", connected=True)


@pytest.mark.daemon(RECONNECT_GRACE="300ms")
@in_loop
async def test_disconnect_before_active_ends_nothing(server, clients, session) -> None:
    """docs/protocol.md, rule 6: before the call is active a disconnect ends nothing; the
    session stays joinable."""
    d, _ = await clients.join(session, "driver-1")
    await d.close()
    await asyncio.sleep(0.6)  # well past RECONNECT_GRACE
    p, _ = await clients.join(session, "passenger-1")
    assert await until_pong(p) == []  # no participant_joined: the driver is away
    p.transport.abort()
    await asyncio.sleep(0.6)
    d, _ = await clients.join(session, "driver-1")
    assert await until_pong(d) == []
    p, _ = await clients.meet(session, "passenger-1", d)
    await relayed(d, p, OFFER)
    [row] = await logged(server, session)
    assert_ended(row, "server_shutdown", connected=True)


# -- rule 7: bad messages and the message rate ------------------------------------------

BAD_MESSAGES: list[tuple[str | bytes, str]] = [
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


@in_loop
async def test_bad_messages_get_errors_and_socket_stays_open(clients, session) -> None:
    """docs/protocol.md, rule 7: invalid_json / invalid_message / unknown_type; the socket
    stays open."""
    d, p = await clients.pair(session)
    await errors_then_relay(d, p, BAD_MESSAGES)


@in_loop
async def test_bad_messages_also_before_peer_joined(clients, session) -> None:
    """docs/protocol.md, rule 7: an invalid relayed message is refused, not held for the
    absent peer."""
    d, _ = await clients.join(session, "driver-1")
    for invalid in ({"type": "offer", "sdp": ""}, {"type": "ice_candidate", "candidate": {"candidate": 1}}):
        await send_json(d, invalid)
        assert_error(await recv_json(d), "invalid_message")
    p, _ = await clients.meet(session, "passenger-1", d)
    assert await until_pong(p) == []


@in_loop
async def test_rate_limit_burst_allowed_then_flood_closed_1008(clients, session) -> None:
    """docs/protocol.md, rule 7: bursts of 100 pass; a heartbeat flood → error rate_limited,
    close 1008."""
    d, p = await clients.pair(session)
    # a burst just under 100 frames (the authenticate took one) passes
    for _ in range(95):
        await send_json(d, HEARTBEAT)
    for _ in range(95):
        assert await recv_json(d) == PONG
    await asyncio.sleep(1.0)  # ~50 frames' worth refills
    for _ in range(40):
        await send_json(d, HEARTBEAT)
    for _ in range(40):
        assert await recv_json(d) == PONG
    # a flood of heartbeats only
    flood_started = time.monotonic()
    try:
        for _ in range(200):
            await send_json(d, HEARTBEAT)
    except ConnectionClosed:
        pass
    assert time.monotonic() - flood_started < 1.0
    messages, code = await drain(d)
    pongs = [m for m in messages if m == PONG]
    assert messages == pongs + [messages[-1]], messages[-3:]
    assert_error(messages[-1], "rate_limited")
    # what was left of the bucket (~15 frames), far from the 200 sent
    assert 1 <= len(pongs) <= 90, len(pongs)
    assert code == 1008
    # for the session this is a disconnect like any other
    await expect(p, left("driver"))


@in_loop
async def test_rate_limit_counts_every_frame_kind(clients, session) -> None:
    """docs/protocol.md, rule 7 and "Precise points": the message rate limit counts every
    frame, bad and binary ones too."""
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


# -- rule 8: heartbeat ---------------------------------------------------------------


@in_loop
async def test_heartbeat_gets_pong(clients, session) -> None:
    """docs/protocol.md, rule 8: heartbeat → exactly {"type": "pong"}, also with extra
    fields."""
    d, _ = await clients.join(session, "driver-1")
    await send_json(d, HEARTBEAT)
    assert await asyncio.wait_for(d.recv(), 5) in ('{"type":"pong"}', '{"type": "pong"}')
    await send_json(d, {"type": "heartbeat", "ts": 123, "echo": "me"})
    await expect(d, PONG)
    p, _ = await clients.meet(session, "passenger-1", d)
    await send_json(p, {"type": "participant_joined", "role": "x"})
    assert_error(await recv_json(p), "unknown_type")
    for _ in range(3):
        await send_json(d, HEARTBEAT)
    await expect(d, PONG, PONG, PONG)
    assert await until_pong(p) == []


@pytest.mark.daemon(HEARTBEAT_INTERVAL="300ms", HEARTBEAT_TIMEOUT="1s")
@in_loop
async def test_heartbeat_server_pings_and_drops_silent_client(server, clients, session) -> None:
    """docs/protocol.md, rule 8: pings every HEARTBEAT_INTERVAL; answering clients live,
    silent ones are dropped."""
    idle = server.new_session(driver_id="driver-2", passenger_id="passenger-2")

    def answering(alive: RawWebSocket) -> None:
        # answers pings and sends nothing else for 2 × HEARTBEAT_TIMEOUT: stays
        alive.send_json(auth_msg(session, "driver-1"))
        assert alive.text(answer_pings=True)["type"] == "authenticated"
        assert alive.text(answer_pings=True)["type"] == "session_joined"
        pings = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                opcode, payload = alive.frame(timeout=2.0)
            except EOFError:
                raise AssertionError("a client answering pings was dropped") from None
            assert opcode == 0x9, (opcode, payload)  # only pings in a quiet session
            pings += 1
            alive.send_frame(0xA, payload)
        assert 4 <= pings <= 10, pings  # about one every 300 ms
        alive.send_json(HEARTBEAT)
        assert alive.text(answer_pings=True) == PONG

    def silent(mute: RawWebSocket) -> None:
        # never answers: pinged, then dropped after HEARTBEAT_TIMEOUT
        started = time.monotonic()
        pings = 0
        while True:
            try:
                opcode, payload = mute.frame(timeout=5.0)
            except EOFError:
                break
            if opcode == 0x8:
                break
            assert opcode == 0x9, (opcode, payload)
            pings += 1
        elapsed = time.monotonic() - started
        assert pings >= 2, pings
        assert 0.8 <= elapsed <= 4.0, elapsed

    async def websockets_clients() -> None:
        # real clients idle in a call: their automatic pongs keep them
        d, p = await clients.pair(idle, "driver-2", "passenger-2")
        await asyncio.sleep(2.0)
        assert await until_pong(d) == []
        assert await until_pong(p) == []

    await asyncio.gather(
        asyncio.to_thread(answering, clients.raw()),
        asyncio.to_thread(silent, clients.raw()),
        websockets_clients(),
    )


@pytest.mark.daemon(HEARTBEAT_INTERVAL="300ms", HEARTBEAT_TIMEOUT="1s", RECONNECT_GRACE="500ms")
@in_loop
async def test_heartbeat_timeout_in_call_is_a_disconnect(server, clients, session) -> None:
    """docs/protocol.md, rules 6 and 8: a peer that stops answering pings is dropped:
    participant_left, then end."""
    d, p = await clients.pair(session)
    p.transport.pause_reading()  # network loss: no pongs any more
    lost = time.monotonic()
    await expect(d, left("passenger"))
    assert time.monotonic() - lost >= 0.8
    assert await drain(d) == ([{"type": "call_ended", "reason": "disconnect_passenger"}], 1000)
    [row] = await logged(server, session)
    assert_ended(row, "disconnect_passenger", connected=True)


# -- frames and extensions -------------------------------------------------------------


def offer_of(size: int) -> str:
    """An offer of exactly ``size`` bytes."""
    base = '{"type":"offer","sdp":"' + '"}'
    frame = '{"type":"offer","sdp":"' + "a" * (size - len(base)) + '"}'
    assert len(frame.encode()) == size
    return frame


@in_loop
async def test_message_over_max_bytes_closes_1009(clients, session) -> None:
    """docs/protocol.md, rule 7: a message of MAX_MESSAGE_BYTES passes; one byte more →
    close 1009."""
    d, p = await clients.pair(session)
    await d.send(offer_of(4096))
    got = await recv_json(p)
    assert got["type"] == "offer" and len(got["sdp"]) == 4096 - 25
    await d.send(offer_of(4097))
    assert await drain(d) == ([], 1009)
    await expect(p, left("driver"))


@pytest.mark.daemon(MAX_MESSAGE_BYTES="1024")
@in_loop
async def test_message_limit_follows_max_message_bytes(clients, session) -> None:
    """docs/operations.md, "Configuration", and docs/protocol.md, rule 7: MAX_MESSAGE_BYTES
    sets the limit: over it → close 1009."""
    d, p = await clients.pair(session)
    await relayed(d, p, {"type": "offer", "sdp": "a" * 900})
    await send_json(d, {"type": "offer", "sdp": "a" * 1100})
    assert await drain(d) == ([], 1009)


@in_loop
async def test_binary_frame_after_auth_is_unsupported(clients, session) -> None:
    """docs/protocol.md, rule 7: a binary frame after authentication → error
    unsupported_frame; the socket stays open, nothing is relayed."""
    d, p = await clients.pair(session)
    await errors_then_relay(
        d, p, [(json.dumps(OFFER).encode(), "unsupported_frame"), (b"\x00\xff", "unsupported_frame")]
    )


@in_loop
async def test_no_compression_extension_negotiated(clients, session) -> None:
    """docs/protocol.md, "Connecting": no compression extension, even when the client offers
    permessage-deflate."""
    ws = await clients.connect(compression="deflate")
    assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
    assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
    assert ws.protocol.extensions == []
    await send_json(ws, auth_msg(session, "driver-1"))
    assert (await recv_json(ws))["type"] == "authenticated"
    raw = clients.raw(
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Extensions: x-webkit-deflate-frame",
    )
    assert b"sec-websocket-extensions" not in raw.head.lower(), raw.head


@in_loop
async def test_server_never_echoes_client_fields(clients, session) -> None:
    """docs/protocol.md, "Connecting": server messages have only their defined fields,
    whatever the client added."""
    extra = {"foo": "bar", "role": "admin", "reason": "x", "code": "y", "sdp": "v=0", "candidate": None}
    d, first = await clients.join(session, "driver-1", **extra)
    assert first == welcome(session, "driver-1", "driver")
    p, first = await clients.meet(session, "passenger-1", d, **extra)
    assert first[0] == {"type": "authenticated", "user_id": "passenger-1"}
    await send_json(d, {**HEARTBEAT, **extra})
    await expect(d, PONG)
    await send_json(d, {**extra, **OFFER})
    await expect(p, OFFER)
    await send_json(d, {**extra, "type": "bogus"})
    assert_error(await recv_json(d), "unknown_type")
    await send_json(p, {**extra, **END_CALL})
    await ended(ENDED, p, d)
    bogus = {**extra, "type": "authenticate", "session_id": "nope", "user_id": "u"}
    await refused_first(clients, [json.dumps(bogus)], "session_not_found")
