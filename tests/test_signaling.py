"""The signaling engine, rule by rule (docs/protocol.md, "WebSocket /ws",
rules 1–8 and "Precise points"), driven sans I/O: fake peers that record
what they are sent and how they are closed, a fake clock counting
milliseconds whose timers run only when the test advances it, a call log
collecting events, and the real :class:`~intaleq_signal.metrics.Metrics`.
No socket, no event loop, no sleep.

The real daemon, with real clients, is tested by test_protocol.py,
test_closing.py and test_timeouts.py; this file pins the engine's exact
outputs for every input, including the orders of events that sockets make
hard to arrange (a socket lost in the middle of a relay, a deadline
reached before its timer ran).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections.abc import Callable
from typing import Any

import pytest

from intaleq_signal.calllog import (
    CallActive,
    CallEnded,
    CallEvent,
    CallInitiated,
    MediaReported,
    SessionCreated,
)
from intaleq_signal.calllog.sql import SessionRow
from intaleq_signal.config import Config
from intaleq_signal.lifecycle import ConnectionState, SessionState
from intaleq_signal.media import Media
from intaleq_signal.metrics import Metrics
from intaleq_signal.ratelimit import UpgradeAdmission
from intaleq_signal.sessions import HOLD_MAX_BYTES, HOLD_MAX_MESSAGES, Capacity, RideConflict, Session
from intaleq_signal.signaling import Client, Signaling

DRIVER, PASSENGER = "driver-1", "passenger-1"
START_MS = 5_000_000  # the monotonic clock at the start of each test
WALL_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the wall clock at START_MS
SDP = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"
CANDIDATE = {"candidate": "candidate:1 1 udp 2122260223 10.0.0.5 54321 typ host", "sdpMid": "0"}
#: The defaults of docs/operations.md, "Configuration" (seconds).
SETTINGS = {
    "session_duration": 60.0,
    "reconnect_grace": 15.0,
    "auth_timeout": 10.0,
    "heartbeat_interval": 20.0,
    "heartbeat_timeout": 30.0,
    "max_sessions": 100,
    "node_id": "test-node:1",
}


# -- fakes ----------------------------------------------------------------------


class FakeTimer:
    __slots__ = ("when_ms", "callback", "args", "cancelled")

    def __init__(self, when_ms: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when_ms = when_ms
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """The engine's Clock, in whole milliseconds: timers run, in order, only
    inside :meth:`advance`."""

    def __init__(self) -> None:
        self.ms = START_MS
        self._timers: list[tuple[int, int, FakeTimer]] = []
        self._seq = 0

    def time(self) -> float:
        return self.ms / 1000

    def wall(self) -> float:
        return (self.ms - START_MS + WALL_MS) / 1000

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(round(when * 1000), callback, args)
        self._seq += 1
        heapq.heappush(self._timers, (timer.when_ms, self._seq, timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        return self.call_at((self.ms + round(delay * 1000)) / 1000, callback, *args)

    def advance(self, ms: int) -> None:
        """Let ``ms`` milliseconds pass, running each timer due on the way
        at its own time."""
        target = self.ms + ms
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self.ms = max(self.ms, when)
                timer.callback(*timer.args)
        self.ms = target

    def skip(self, ms: int) -> None:
        """Let time pass without running timers: an event loop handling a
        received chunk before the timers due meanwhile."""
        self.ms += ms

    def pending(self) -> list[str]:
        """The callbacks of the timers still armed, by name."""
        return sorted(t.callback.__name__ for _, _, t in self._timers if not t.cancelled)


class FakePeer:
    """The engine's Peer: what it was sent (decoded), how it was closed.

    Like ``wire.HTTPServerConnection``, it stops being open when it starts
    a close and then tells the engine (``on_closing``); ``lose()`` takes
    its transport away without telling (the lost connection's own
    notification comes a loop pass later)."""

    def __init__(self, clock: FakeClock, ip: str) -> None:
        self.ip = ip
        self.last_received = clock.time()
        self.sent: list[str] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.pings = 0
        self.sending = True  # open for sending, and told so
        self.lost = False  # the transport is gone, nobody told yet
        self.budget: int | None = None  # frames it can still take before it is lost
        self.on_closing: Callable[[], None] | None = None

    @property
    def is_open(self) -> bool:
        return self.sending and not self.lost

    def send_text(self, text: str) -> bool:
        if not self.is_open:
            return False
        if self.budget is not None:
            if self.budget == 0:
                self.lost = True
                return False
            self.budget -= 1
        self.sent.append(text)
        return True

    def close_soon(self, code: int, reason: str) -> None:
        if not self.is_open:
            return
        self.close_code, self.close_reason = code, reason
        self.stop_sending()

    def send_ping(self) -> None:
        self.pings += 1

    def stop_sending(self) -> None:
        if self.sending:
            self.sending = False
            if self.on_closing is not None:
                self.on_closing()

    def lose(self) -> None:
        self.lost = True


class FakeCallLog:
    def __init__(self) -> None:
        self.events: list[CallEvent] = []

    def record(self, event: CallEvent) -> None:
        self.events.append(event)

    def take(self) -> list[CallEvent]:
        events, self.events = self.events, []
        return events


class Conn:
    """One client connection: the fake peer, the engine's Client, and
    the client's side of the protocol."""

    def __init__(self, h: Harness, ip: str) -> None:
        self.h = h
        self.peer = FakePeer(h.clock, ip)
        self.client: Client = h.engine.connected(self.peer)
        self.peer.on_closing = self.client.closing

    def send(self, message: Any) -> None:
        """A whole message: a dict is sent as JSON text, str and bytes as
        they are (bytes: a binary frame)."""
        text = message if isinstance(message, str | bytes) else json.dumps(message)
        self.peer.last_received = self.h.clock.time()
        self.h.engine.message_received(self.client, text)

    def frame(self) -> None:
        """A ping, pong, fragment or close frame received."""
        self.peer.last_received = self.h.clock.time()
        self.h.engine.frame_received(self.client)

    def authenticate(self, session: Session, user_id: str) -> None:
        self.send({"type": "authenticate", "session_id": session.session_id, "user_id": user_id})

    def take(self, count: int | None = None) -> list[dict[str, Any]]:
        """The first ``count`` messages (all by default) sent to it since
        the last take, decoded."""
        sent = self.peer.sent[:count]
        del self.peer.sent[:count]
        return [json.loads(text) for text in sent]

    @property
    def closed(self) -> tuple[int, str] | None:
        code = self.peer.close_code
        return None if code is None else (code, self.peer.close_reason or "")

    @property
    def state(self) -> ConnectionState:
        return self.client.lifecycle.state

    def close_frame(self) -> None:
        """The client's close frame arrives: a frame (rule 7), then the
        socket is no longer open for sending; the TCP close comes later."""
        self.frame()
        self.peer.stop_sending()

    def drop(self) -> None:
        """The TCP connection is lost, then gone."""
        self.peer.stop_sending()
        self.h.engine.closed(self.client)


class FakeAdmission:
    """The engine's Admission: what it was told, in order (``now`` in ms)."""

    def __init__(self) -> None:
        self.told: list[tuple[Any, ...]] = []

    def started(self, ip: str) -> None:
        self.told.append(("started", ip))

    def authenticated(self, ip: str) -> None:
        self.told.append(("authenticated", ip))

    def ended_unauthenticated(self, ip: str, now: float) -> None:
        self.told.append(("ended_unauthenticated", ip, round(now * 1000) - START_MS))

    def take(self) -> list[tuple[Any, ...]]:
        told, self.told = self.told, []
        return told


class Harness:
    def __init__(self, admission: Any = None, **settings: Any) -> None:
        self.clock = FakeClock()
        self.calllog = FakeCallLog()
        self.metrics = Metrics()
        self.config = Config(api_key="k" * 32, **{**SETTINGS, **settings})
        self.engine = Signaling(self.config, self.calllog, self.metrics, self.clock, admission=admission)
        self._ips = 0

    def session(self, ride_id: str = "ride-1", driver: str = DRIVER, passenger: str = PASSENGER) -> Session:
        session, created = self.engine.create_session(ride_id, driver, passenger)
        assert created
        return session

    def connect(self) -> Conn:
        self._ips += 1
        return Conn(self, f"198.51.100.{self._ips}")

    def join(self, session: Session, user_id: str) -> Conn:
        """Connect and authenticate; the messages up to session_joined are
        checked and taken."""
        conn = self.connect()
        conn.authenticate(session, user_id)
        role = "driver" if user_id == session.driver.user_id else "passenger"
        assert conn.take(2) == [
            {"type": "authenticated", "user_id": user_id},
            {
                "type": "session_joined",
                "session_id": session.session_id,
                "ride_id": session.ride_id,
                "role": role,
            },
        ]
        return conn

    def call(self, ride_id: str = "ride-1") -> tuple[Session, Conn, Conn]:
        """An active call: both joined, their join notices taken."""
        session = self.session(ride_id)
        driver = self.join(session, DRIVER)
        passenger = self.join(session, PASSENGER)
        driver.take()
        passenger.take()
        assert session.state is SessionState.ACTIVE
        self.calllog.take()
        return session, driver, passenger

    def wall(self, ms_after_start: int) -> float:
        return (ms_after_start + WALL_MS) / 1000


@pytest.fixture
def h() -> Harness:
    return Harness()


def unauthorized(reason: str) -> list[dict[str, Any]]:
    return [{"type": "unauthorized", "reason": reason}]


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


PEER_NOT_CONNECTED = error("peer_not_connected", "the other participant is not connected")
RATE_LIMITED = error("rate_limited", "more than 50 messages per second")


def candidate(n: int) -> dict[str, Any]:
    return {"type": "ice_candidate", "candidate": {**CANDIDATE, "candidate": f"{CANDIDATE['candidate']} {n}"}}


# -- rule 1: authentication ---------------------------------------------------------


def test_authenticate_then_session_joined_with_the_role(h: Harness) -> None:
    """docs/protocol.md, rule 1: authenticated {user_id}, then session_joined {session_id, ride_id, role}."""
    session = h.session()
    for user_id, role in ((DRIVER, "driver"), (PASSENGER, "passenger")):
        conn = h.connect()
        conn.authenticate(session, user_id)
        sent = conn.take()
        assert sent[:2] == [
            {"type": "authenticated", "user_id": user_id},
            {"type": "session_joined", "session_id": session.session_id, "ride_id": "ride-1", "role": role},
        ]
        assert conn.state is ConnectionState.AUTHENTICATED
        assert conn.closed is None


def test_ids_of_255_non_ascii_characters_authenticate(h: Harness) -> None:
    """docs/protocol.md, rule 1, "Precise points": lengths count code points, not bytes."""
    session = h.session(driver="é" * 255)
    h.join(session, "é" * 255)


@pytest.mark.parametrize(
    "first",
    [
        {"type": "heartbeat"},
        {"type": "offer", "sdp": SDP},
        {"type": "end_call"},
        {"type": "media_state", "state": "connected", "candidate_type": "host"},
        {"type": "media_state", "state": "nope"},
        {"type": "hello"},
        "not json",
        "NaN",
        "[]",
        '{"type": 1}',
        b"\x00binary",
    ],
    ids=[
        "heartbeat",
        "offer",
        "end_call",
        "media_state",
        "bad_media_state",
        "unknown_type",
        "invalid_json",
        "nan",
        "array",
        "type_int",
        "binary",
    ],
)
def test_anything_but_authenticate_first_is_not_authenticated(h: Harness, first: Any) -> None:
    """docs/protocol.md, rule 1, "Precise points": another type, invalid JSON, a binary frame first →
    unauthorized not_authenticated, close 4001."""
    conn = h.connect()
    conn.send(first)
    assert conn.take() == unauthorized("not_authenticated")
    assert conn.closed == (4001, "not_authenticated")
    assert conn.state is ConnectionState.CLOSED
    assert h.metrics.connections_rejected == {"not_authenticated": 1}


@pytest.mark.parametrize(
    "fields",
    [
        {"user_id": DRIVER},
        {"session_id": "s"},
        {"session_id": "s", "user_id": 7},
        {"session_id": "", "user_id": DRIVER},
        {"session_id": "s", "user_id": "u" * 256},
        {"session_id": None, "user_id": DRIVER},
    ],
    ids=["no_session_id", "no_user_id", "user_id_int", "empty", "256_chars", "null"],
)
def test_malformed_authenticate_is_invalid_message(h: Harness, fields: dict[str, Any]) -> None:
    """docs/protocol.md, rule 1: a malformed authenticate → unauthorized invalid_message, close 4001."""
    conn = h.connect()
    conn.send({"type": "authenticate", **fields})
    assert conn.take() == unauthorized("invalid_message")
    assert conn.closed == (4001, "invalid_message")
    assert h.metrics.connections_rejected == {"invalid_message": 1}


def test_auth_timeout(h: Harness) -> None:
    """docs/protocol.md, rule 1: silence for AUTH_TIMEOUT (10 s) after the upgrade → unauthorized
    auth_timeout, close 4001."""
    conn = h.connect()
    h.clock.advance(9_999)
    assert conn.take() == [] and conn.closed is None
    h.clock.advance(1)
    assert conn.take() == unauthorized("auth_timeout")
    assert conn.closed == (4001, "auth_timeout")
    assert h.metrics.connections_rejected == {"auth_timeout": 1}


def test_auth_timer_is_cancelled_by_authenticate_and_by_a_close(h: Harness) -> None:
    """docs/protocol.md, rule 1: the AUTH_TIMEOUT timer is gone once the socket authenticated or closed."""
    session = h.session()
    joined = h.join(session, DRIVER)
    silent = h.connect()
    silent.drop()
    h.clock.advance(10_000)
    assert joined.take() == [] and joined.closed is None
    assert silent.take() == []
    assert h.clock.pending() == ["_deadline_reached"]
    assert h.metrics.connections_rejected == {}


def test_session_not_found(h: Harness) -> None:
    """docs/protocol.md, rule 1.1: an unknown session_id → session_not_found, close 4001."""
    conn = h.connect()
    conn.send(
        {"type": "authenticate", "session_id": "3b2e7c4f-0000-4000-8000-000000000000", "user_id": DRIVER}
    )
    assert conn.take() == unauthorized("session_not_found")
    assert conn.closed == (4001, "session_not_found")


def test_user_not_in_session(h: Harness) -> None:
    """docs/protocol.md, rule 1.4: a user that is neither driver nor passenger → user_not_in_session, close
    4001."""
    session = h.session()
    conn = h.connect()
    conn.authenticate(session, "somebody-else")
    assert conn.take() == unauthorized("user_not_in_session")
    assert conn.closed == (4001, "user_not_in_session")
    assert session.state is SessionState.CREATED


@pytest.mark.parametrize("user_id", [DRIVER, "somebody-else"])
def test_session_expired_before_user_check(h: Harness, user_id: str) -> None:
    """docs/protocol.md, rule 1.2 (checked before 1.4): a session that expired before it was a call →
    session_expired."""
    session = h.session()
    h.clock.advance(60_000)
    conn = h.connect()
    conn.authenticate(session, user_id)
    assert conn.take() == unauthorized("session_expired")
    assert conn.closed == (4001, "session_expired")


@pytest.mark.parametrize("user_id", [PASSENGER, "somebody-else"])
def test_session_ended_before_user_check(h: Harness, user_id: str) -> None:
    """docs/protocol.md, rule 1.3 (checked before 1.4): a session ended by end_call → session_ended."""
    session = h.session()
    h.join(session, DRIVER).send({"type": "end_call"})
    conn = h.connect()
    conn.authenticate(session, user_id)
    assert conn.take() == unauthorized("session_ended")


@pytest.mark.parametrize("active, reason", [(False, "session_expired"), (True, "session_ended")])
def test_deadline_reached_before_its_timer_ran(h: Harness, active: bool, reason: str) -> None:
    """docs/protocol.md, rule 1.2, 1.3: past the deadline but before its timer ran, a join is refused all the
    same: session_expired for a session never active, session_ended for a call at its time limit."""
    session = h.session()
    driver = h.join(session, DRIVER)
    if active:
        h.join(session, PASSENGER)
    driver.drop()
    h.clock.skip(60_000)
    conn = h.connect()
    conn.authenticate(session, DRIVER)
    assert conn.take() == unauthorized(reason)
    assert session.state is not SessionState.ENDED  # the timer ends it when it runs


def test_already_authenticated(h: Harness) -> None:
    """docs/protocol.md, rule 1: a second authenticate: error already_authenticated, the socket stays open."""
    session = h.session()
    conn = h.join(session, DRIVER)
    conn.authenticate(session, DRIVER)
    assert conn.take() == [error("already_authenticated", "this connection is already authenticated")]
    assert conn.closed is None and conn.state is ConnectionState.AUTHENTICATED


def test_authenticate_from_a_socket_already_closing_joins_nobody(h: Harness) -> None:
    """docs/protocol.md, rules 1, 6: an authenticate whose socket stopped being open in the same chunk is not
    a join: no replacement of the live socket, no participant_joined, the held messages stay held."""
    session = h.session()
    driver = h.join(session, DRIVER)
    driver.send({"type": "offer", "sdp": SDP})
    late = h.connect()
    late.peer.lose()
    late.authenticate(session, PASSENGER)
    assert late.take() == [] and driver.take() == []
    assert session.passenger.conn is None and len(session.passenger.held or ()) == 1
    assert session.state is SessionState.WAITING


# -- rule 2: reconnect and replacement -------------------------------------------


def test_reconnect_after_a_drop_is_a_first_join(h: Harness) -> None:
    """docs/protocol.md, rule 2: back after its socket dropped: authenticated, session_joined,
    participant_joined for the peer; the peer gets participant_joined."""
    session, driver, passenger = h.call()
    driver.drop()
    assert passenger.take() == [{"type": "participant_left", "role": "driver"}]
    h.clock.advance(5_000)
    again = h.join(session, DRIVER)
    assert again.take() == [{"type": "participant_joined", "role": "passenger"}]
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}]
    assert h.calllog.take() == [] and h.metrics.calls_started == 1


def test_replacement_old_socket_gets_replaced_4002_and_peer_sees_nothing(h: Harness) -> None:
    """docs/protocol.md, rule 2: a second socket of the participant wins; the old one gets error replaced and
    close 4002; the peer sees no participant_left, only participant_joined."""
    session, old, passenger = h.call()
    new = h.join(session, DRIVER)
    assert new.take() == [{"type": "participant_joined", "role": "passenger"}]
    assert old.take() == [error("replaced", "a newer connection of this participant took over")]
    assert old.closed == (4002, "replaced")
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}]
    assert session.driver.conn is new.client


def test_a_replaced_socket_speaks_for_nobody(h: Harness) -> None:
    """docs/protocol.md, rule 2: whatever a replaced socket does later — messages, frames, its close, its TCP
    close — is ignored: nothing relayed, no participant_left, no rate limit, no end."""
    session, old, passenger = h.call()
    new = h.join(session, DRIVER)
    for conn in (new, passenger, old):
        conn.take()
    old.send({"type": "offer", "sdp": SDP})
    old.send({"type": "end_call"})
    for _ in range(200):
        old.frame()
    old.drop()
    assert passenger.take() == [] and new.take() == []
    assert old.take() == []
    assert session.state is SessionState.ACTIVE and session.driver.conn is new.client
    assert h.metrics.connections_rejected == {} and h.metrics.messages_relayed == 0
    assert old.client not in h.engine.clients


def test_replacing_a_lone_participant_leaves_the_session_waiting(h: Harness) -> None:
    """docs/protocol.md, rule 2: replacing the only participant's socket changes nothing else."""
    session = h.session()
    old = h.join(session, DRIVER)
    h.join(session, DRIVER)
    assert old.closed == (4002, "replaced")
    assert session.state is SessionState.WAITING
    passenger = h.join(session, PASSENGER)
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}]


# -- rule 3: session lifecycle ------------------------------------------------------


def test_lifecycle_created_waiting_active_ended_and_its_call_log(h: Harness) -> None:
    """docs/protocol.md, rule 3: created → waiting (first join) → active when both are connected
    (connected_at) → ended; each step in the call log with the time it happened."""
    session = h.session()
    assert session.state is SessionState.CREATED
    assert h.calllog.take() == [
        SessionCreated(session.session_id, "ride-1", DRIVER, PASSENGER, h.wall(0), "test-node:1")
    ]
    assert h.metrics.sessions_created == 1
    h.clock.advance(1_000)
    driver = h.join(session, DRIVER)
    assert session.state is SessionState.WAITING and driver.take() == []
    h.clock.advance(2_000)
    passenger = h.join(session, PASSENGER)
    assert session.state is SessionState.ACTIVE
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}]
    assert driver.take() == [{"type": "participant_joined", "role": "passenger"}]
    assert session.connected == (START_MS + 3_000) / 1000
    assert h.calllog.take() == [CallActive(session.session_id, h.wall(3_000))]
    assert h.metrics.calls_started == 1
    h.clock.advance(4_000)
    passenger.send({"type": "end_call"})
    assert session.state is SessionState.ENDED
    assert h.calllog.take() == [CallEnded(session.session_id, "user_terminated", h.wall(7_000))]


def test_repost_returns_the_live_session_conflict_and_capacity() -> None:
    """docs/protocol.md, "POST /sessions": one live session per ride (same ids → the same session; other ids →
    RideConflict); MAX_SESSIONS → Capacity, a matching re-POST still answered."""
    h = Harness(max_sessions=1)
    session = h.session()
    h.calllog.take()
    assert h.engine.create_session("ride-1", DRIVER, PASSENGER) == (session, False)
    with pytest.raises(RideConflict):
        h.engine.create_session("ride-1", DRIVER, "someone-else")
    with pytest.raises(Capacity):
        h.engine.create_session("ride-2", DRIVER, PASSENGER)
    assert h.calllog.take() == [] and h.metrics.sessions_created == 1
    assert h.engine.sessions.live == 1


def test_expiry_of_a_session_never_active(h: Harness) -> None:
    """docs/protocol.md, rule 3: never active, it expires SESSION_DURATION after it was created: a participant
    still connected gets call_ended expired and close 1000; end reason expired."""
    session = h.session()
    h.clock.advance(20_000)
    driver = h.join(session, DRIVER)
    h.clock.advance(39_999)
    assert driver.take() == [] and session.state is SessionState.WAITING
    h.clock.advance(1)
    assert driver.take() == [{"type": "call_ended", "reason": "expired"}]
    assert driver.closed == (1000, "expired")
    assert session.lifecycle.end_reason.value == "expired"  # type: ignore[union-attr]
    assert h.calllog.take()[-1] == CallEnded(session.session_id, "expired", h.wall(60_000))
    assert h.metrics.calls_ended == {"expired": 1}
    assert h.engine.sessions.live == 0


def test_max_duration_counts_from_connected_at(h: Harness) -> None:
    """docs/protocol.md, rule 3: an active call is cut SESSION_DURATION after it started (not after its
    creation): both get call_timeout max_duration_reached and close 1000."""
    session = h.session()
    h.clock.advance(20_000)
    driver = h.join(session, DRIVER)
    passenger = h.join(session, PASSENGER)
    driver.take()
    passenger.take()
    h.calllog.take()
    h.clock.advance(59_999)
    assert driver.take() == [] and session.state is SessionState.ACTIVE
    h.clock.advance(1)
    for conn in (driver, passenger):
        assert conn.take() == [{"type": "call_timeout", "reason": "max_duration_reached"}]
        assert conn.closed == (1000, "max_duration_reached")
    assert h.calllog.take() == [CallEnded(session.session_id, "max_duration_reached", h.wall(80_000))]
    assert h.metrics.calls_ended == {"max_duration_reached": 1}


def test_ended_sessions_are_remembered_for_session_duration(h: Harness) -> None:
    """docs/protocol.md, rule 3: an ended session is remembered SESSION_DURATION after its end
    (session_ended), then forgotten (session_not_found)."""
    session = h.session()
    h.join(session, DRIVER).send({"type": "end_call"})
    h.clock.advance(59_999)
    conn = h.connect()
    conn.authenticate(session, DRIVER)
    assert conn.take() == unauthorized("session_ended")
    h.clock.advance(1)
    conn = h.connect()
    conn.authenticate(session, DRIVER)
    assert conn.take() == unauthorized("session_not_found")
    assert h.clock.pending() == []


# -- rule 4: relay ------------------------------------------------------------------


def test_relay_in_order_rebuilt_from_defined_fields(h: Harness) -> None:
    """docs/protocol.md, rule 4: offer, answer and ice_candidate reach the other participant in the order
    sent, rebuilt from their defined fields only; both end-of-candidates forms and missing/null optional
    fields relayed as sent."""
    session, driver, passenger = h.call()
    sent = [
        {"type": "offer", "sdp": SDP, "extra": "dropped", "to": "anyone"},
        {
            "type": "ice_candidate",
            "candidate": {**CANDIDATE, "sdpMLineIndex": 0, "usernameFragment": "ab", "x": 1},
        },
        {"type": "ice_candidate", "candidate": {"candidate": "", "sdpMid": None, "sdpMLineIndex": None}},
        {"type": "ice_candidate", "candidate": None, "more": True},
    ]
    for message in sent:
        driver.send(message)
    assert passenger.take() == [
        {"type": "offer", "sdp": SDP},
        {"type": "ice_candidate", "candidate": {**CANDIDATE, "sdpMLineIndex": 0, "usernameFragment": "ab"}},
        {"type": "ice_candidate", "candidate": {"candidate": "", "sdpMid": None, "sdpMLineIndex": None}},
        {"type": "ice_candidate", "candidate": None},
    ]
    passenger.send({"type": "answer", "sdp": "v=0\r\nanswer", "type2": "x"})
    assert driver.take() == [{"type": "answer", "sdp": "v=0\r\nanswer"}]
    assert h.metrics.messages_relayed == 5
    assert driver.take() == [] and passenger.take() == []


def test_relay_latency_is_measured_from_the_bytes_received(h: Harness) -> None:
    """docs/protocol.md, "GET /metrics": intaleq_relay_latency_seconds is message received → written to the
    peer."""
    session, driver, passenger = h.call()
    driver.peer.last_received = h.clock.time() - 0.003
    h.engine.message_received(driver.client, json.dumps({"type": "offer", "sdp": SDP}))
    assert passenger.take() == [{"type": "offer", "sdp": SDP}]
    histogram = h.metrics.relay_latency
    assert histogram.count == 1 and histogram.sum == pytest.approx(0.003)


def test_messages_held_until_the_peer_joins_then_delivered_in_order(h: Harness) -> None:
    """docs/protocol.md, rule 4: held for a participant that has not joined yet, delivered right after its
    authenticated, session_joined and participant_joined; counted as relayed when written."""
    session = h.session()
    driver = h.join(session, DRIVER)
    sent = [{"type": "offer", "sdp": SDP}, candidate(1), candidate(2)]
    for message in sent:
        driver.send(message)
    assert driver.take() == [] and h.metrics.messages_relayed == 0
    passenger = h.join(session, PASSENGER)
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}, *sent]
    assert driver.take() == [{"type": "participant_joined", "role": "passenger"}]
    assert h.metrics.messages_relayed == 3
    assert session.passenger.held is None


def test_hold_bound_64_messages(h: Harness) -> None:
    """docs/protocol.md, rule 4: at most 64 messages held; each one past them gets peer_not_connected."""
    session = h.session()
    driver = h.join(session, DRIVER)
    for n in range(HOLD_MAX_MESSAGES + 2):
        driver.send(candidate(n))
    assert driver.take() == [PEER_NOT_CONNECTED, PEER_NOT_CONNECTED]
    passenger = h.join(session, PASSENGER)
    assert passenger.take()[1:] == [candidate(n) for n in range(HOLD_MAX_MESSAGES)]
    assert h.metrics.messages_relayed == HOLD_MAX_MESSAGES


def test_hold_bound_16_kib_in_bytes_on_the_wire(h: Harness) -> None:
    """docs/protocol.md, rule 4: at most 16 KiB held (bytes on the wire); the message past it gets
    peer_not_connected."""
    session = h.session()
    driver = h.join(session, DRIVER)
    overhead = len(json.dumps({"type": "offer", "sdp": ""}, separators=(",", ":")))
    offer = {"type": "offer", "sdp": "a" * (1024 - overhead)}  # 1024 bytes relayed
    for _ in range(HOLD_MAX_BYTES // 1024):
        driver.send(offer)
    assert driver.take() == []
    driver.send({"type": "offer", "sdp": "é"})  # 6 bytes escaped: over the bound
    assert driver.take() == [PEER_NOT_CONNECTED]
    assert session.passenger.held_bytes == HOLD_MAX_BYTES


def test_each_direction_has_its_own_bound(h: Harness) -> None:
    """docs/protocol.md, rule 4, "Precise points": held for a participant in its RECONNECT_GRACE as for one
    not yet joined; each direction (each absent participant) has its own 64-message bound."""
    session = h.session()
    driver = h.join(session, DRIVER)
    for n in range(HOLD_MAX_MESSAGES):
        driver.send(candidate(n))
    passenger = h.join(session, PASSENGER)
    assert len(passenger.take()) == 1 + HOLD_MAX_MESSAGES
    driver.take()
    driver.drop()
    passenger.take()
    for n in range(HOLD_MAX_MESSAGES + 1):
        passenger.send(candidate(100 + n))
    assert passenger.take() == [PEER_NOT_CONNECTED]
    assert len(session.driver.held or ()) == HOLD_MAX_MESSAGES
    again = h.join(session, DRIVER)
    assert again.take()[1:] == [candidate(100 + n) for n in range(HOLD_MAX_MESSAGES)]
    assert h.metrics.messages_relayed == 2 * HOLD_MAX_MESSAGES


def test_held_messages_are_dropped_when_the_session_ends(h: Harness) -> None:
    """docs/protocol.md, rule 4: what is held is dropped when the session ends."""
    session = h.session()
    driver = h.join(session, DRIVER)
    driver.send({"type": "offer", "sdp": SDP})
    driver.send({"type": "end_call"})
    assert session.passenger.held is None
    assert h.metrics.messages_relayed == 0


def test_an_invalid_relayed_message_is_refused_not_held(h: Harness) -> None:
    """docs/protocol.md, rules 4, 7: an invalid offer gets invalid_message; it is not held, sets nothing."""
    session = h.session()
    driver = h.join(session, DRIVER)
    driver.send({"type": "offer", "sdp": ""})
    assert driver.take() == [error("invalid_message", "field 'sdp' must be a non-empty string")]
    assert session.passenger.held is None and session.initiated_by is None


def test_first_offer_sets_initiated_by_once(h: Harness) -> None:
    """docs/protocol.md, rule 4: the first offer of the session sets the call log's initiated_by (held or
    relayed)."""
    session = h.session()
    passenger = h.join(session, PASSENGER)
    h.calllog.take()
    passenger.send({"type": "answer", "sdp": SDP})
    passenger.send({"type": "offer", "sdp": SDP})
    driver = h.join(session, DRIVER)
    driver.send({"type": "offer", "sdp": SDP})
    assert session.initiated_by == PASSENGER
    assert [e for e in h.calllog.take() if isinstance(e, CallInitiated)] == [
        CallInitiated(session.session_id, PASSENGER)
    ]


def test_peer_lost_in_this_pass_gets_the_message_held_after_participant_left(h: Harness) -> None:
    """docs/protocol.md, rules 4, 6: the peer's transport is lost but not yet told: the write fails, so the
    peer is absent from now — the sender gets participant_left, the message is held, not counted."""
    session, driver, passenger = h.call()
    passenger.peer.lose()
    driver.send({"type": "offer", "sdp": SDP})
    assert driver.take() == [{"type": "participant_left", "role": "passenger"}]
    assert list(session.passenger.held or ()) == ['{"type":"offer","sdp":' + json.dumps(SDP) + "}"]
    assert h.metrics.messages_relayed == 0
    passenger.peer.stop_sending()  # its own notification, later: nothing more
    h.engine.closed(passenger.client)
    assert driver.take() == []
    again = h.join(session, PASSENGER)
    assert again.take() == [{"type": "participant_joined", "role": "driver"}, {"type": "offer", "sdp": SDP}]
    assert h.metrics.messages_relayed == 1


def test_peer_lost_in_this_pass_without_grace_ends_the_call() -> None:
    """docs/protocol.md, rules 4, 6: with RECONNECT_GRACE=0 that failed write ends the call; nothing held."""
    h = Harness(reconnect_grace=0.0)
    session, driver, passenger = h.call()
    passenger.peer.lose()
    driver.send({"type": "offer", "sdp": SDP})
    assert driver.take() == [
        {"type": "participant_left", "role": "passenger"},
        {"type": "call_ended", "reason": "disconnect_passenger"},
    ]
    assert session.passenger.held is None and driver.closed == (1000, "disconnect_passenger")


def test_held_messages_not_written_go_back_in_order(h: Harness) -> None:
    """docs/protocol.md, rule 4: a held message is never dropped: if the joining socket is lost while they are
    delivered, the rest is held again, in order, and only what was written counts."""
    session = h.session()
    driver = h.join(session, DRIVER)
    for n in range(5):
        driver.send(candidate(n))
    passenger = h.connect()
    passenger.peer.budget = 5  # authenticated, session_joined, participant_joined, 2 held
    passenger.authenticate(session, PASSENGER)
    assert passenger.take()[3:] == [candidate(0), candidate(1)]
    assert list(session.passenger.held or ()) == [
        json.dumps(candidate(n), separators=(",", ":")) for n in (2, 3, 4)
    ]
    assert h.metrics.messages_relayed == 2
    passenger.drop()
    again = h.join(session, PASSENGER)
    assert again.take()[1:] == [candidate(2), candidate(3), candidate(4)]
    assert h.metrics.messages_relayed == 5


# -- rule 5: end_call ---------------------------------------------------------------


def test_end_call_ends_it_for_both(h: Harness) -> None:
    """docs/protocol.md, rule 5: end_call → both get call_ended user_terminated and close 1000; end reason
    user_terminated."""
    session, driver, passenger = h.call()
    h.clock.advance(3_000)
    driver.send({"type": "end_call"})
    for conn in (driver, passenger):
        assert conn.take() == [{"type": "call_ended", "reason": "user_terminated"}]
        assert conn.closed == (1000, "user_terminated")
    assert h.calllog.take() == [CallEnded(session.session_id, "user_terminated", h.wall(3_000))]
    assert h.metrics.calls_ended == {"user_terminated": 1}
    assert h.engine.sessions.active_calls() == 0
    assert h.clock.pending() == ["forget"]


def test_end_call_before_the_peer_ever_joined(h: Harness) -> None:
    """docs/protocol.md, rule 5, "Precise points": end_call before the other participant joined ends the
    session: the sender alone gets call_ended user_terminated, close 1000; the peer later gets session_ended.
    """
    session = h.session()
    driver = h.join(session, DRIVER)
    driver.send({"type": "end_call"})
    assert driver.take() == [{"type": "call_ended", "reason": "user_terminated"}]
    assert driver.closed == (1000, "user_terminated")
    passenger = h.connect()
    passenger.authenticate(session, PASSENGER)
    assert passenger.take() == unauthorized("session_ended")


# -- rule 6: disconnect -------------------------------------------------------------


def test_disconnect_then_grace_over_ends_with_disconnect_role(h: Harness) -> None:
    """docs/protocol.md, rule 6: the other gets participant_left; past RECONNECT_GRACE it gets call_ended
    disconnect_driver and close 1000; a later authenticate gets session_ended."""
    session, driver, passenger = h.call()
    driver.drop()
    assert passenger.take() == [{"type": "participant_left", "role": "driver"}]
    h.clock.advance(14_999)
    assert passenger.take() == []
    h.clock.advance(1)
    assert passenger.take() == [{"type": "call_ended", "reason": "disconnect_driver"}]
    assert passenger.closed == (1000, "disconnect_driver")
    assert h.calllog.take() == [CallEnded(session.session_id, "disconnect_driver", h.wall(15_000))]
    late = h.connect()
    late.authenticate(session, DRIVER)
    assert late.take() == unauthorized("session_ended")


def test_disconnect_with_zero_grace_ends_at_once() -> None:
    """docs/protocol.md, rule 6: with RECONNECT_GRACE=0 a call ends as soon as a participant drops."""
    h = Harness(reconnect_grace=0.0)
    session, driver, passenger = h.call()
    passenger.drop()
    assert driver.take() == [
        {"type": "participant_left", "role": "passenger"},
        {"type": "call_ended", "reason": "disconnect_passenger"},
    ]
    assert driver.closed == (1000, "disconnect_passenger")
    assert h.metrics.calls_ended == {"disconnect_passenger": 1}


def test_back_within_grace_keeps_the_call(h: Harness) -> None:
    """docs/protocol.md, rules 2, 6: back within RECONNECT_GRACE, the call goes on: no end when the grace
    would have run out, and what was sent meanwhile is delivered."""
    session, driver, passenger = h.call()
    passenger.drop()
    driver.take()
    driver.send({"type": "offer", "sdp": SDP})
    h.clock.advance(14_000)
    again = h.join(session, PASSENGER)
    assert again.take() == [{"type": "participant_joined", "role": "driver"}, {"type": "offer", "sdp": SDP}]
    h.clock.advance(10_000)
    assert driver.take() == [{"type": "participant_joined", "role": "passenger"}]
    assert session.state is SessionState.ACTIVE
    assert h.clock.pending() == ["_deadline_reached"]


def test_disconnect_before_the_call_ends_nothing(h: Harness) -> None:
    """docs/protocol.md, rule 6: before the call is active a disconnect ends nothing; the session stays
    joinable."""
    session = h.session()
    driver = h.join(session, DRIVER)
    driver.drop()
    h.clock.advance(30_000)
    assert session.state is SessionState.WAITING
    h.join(session, DRIVER)
    passenger = h.join(session, PASSENGER)
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}]
    assert session.state is SessionState.ACTIVE


def test_a_closing_socket_is_absent_at_once(h: Harness) -> None:
    """docs/protocol.md, rule 6, "When a participant is absent": from the moment its socket stops being open
    for sending (its close frame), before the TCP close: participant_left at once, what the other sends is
    held (never dropped, not counted), and the TCP close later changes nothing."""
    session, driver, passenger = h.call()
    passenger.close_frame()
    assert driver.take() == [{"type": "participant_left", "role": "passenger"}]
    assert passenger.state is ConnectionState.CLOSED
    driver.send({"type": "offer", "sdp": SDP})
    assert driver.take() == [] and h.metrics.messages_relayed == 0
    assert len(session.passenger.held or ()) == 1
    h.clock.advance(2_000)
    h.engine.closed(passenger.client)
    assert driver.take() == [] and passenger.take() == []
    assert passenger.client not in h.engine.clients


# -- rule 7: bad messages and the rate limit ----------------------------------------------

STATE_ERROR = "field 'state' must be one of connecting, connected, disconnected, failed"
TYPE_ERROR = "field 'candidate_type' must be one of host, srflx, prflx, relay"
RTT_ERROR = "field 'rtt_ms' must be a number from 0 to 60000"


@pytest.mark.parametrize(
    "message, code, text",
    [
        ("{not json", "invalid_json", "message is not valid JSON"),
        ('{"type": "offer", "sdp": NaN}', "invalid_json", "message is not valid JSON"),
        ("[1, 2]", "invalid_message", "message must be a JSON object"),
        ('{"sdp": "x"}', "invalid_message", "field 'type' must be a string"),
        ('{"type": "offer"}', "invalid_message", "field 'sdp' must be a non-empty string"),
        ('{"type": "ice_candidate"}', "invalid_message", "field 'candidate' is required"),
        ('{"type": "media_state"}', "invalid_message", STATE_ERROR),
        (
            '{"type": "media_state", "state": "connected", "candidate_type": "tcp"}',
            "invalid_message",
            TYPE_ERROR,
        ),
        ('{"type": "media_state", "state": "failed", "rtt_ms": -5}', "invalid_message", RTT_ERROR),
        ("[" * 100_000, "invalid_message", "message is nested too deeply"),
        ('{"type": "hangup"}', "unknown_type", "unknown message type"),
        (b"\x01\x02", "unsupported_frame", "binary frames are not supported"),
    ],
    ids=[
        "invalid_json",
        "nan",
        "array",
        "no_type",
        "no_sdp",
        "no_candidate",
        "media_no_state",
        "media_bad_type",
        "media_bad_rtt",
        "deep",
        "unknown",
        "binary",
    ],
)
def test_bad_messages_get_an_error_and_the_socket_stays_open(
    h: Harness, message: Any, code: str, text: str
) -> None:
    """docs/protocol.md, rule 7: invalid_json, invalid_message, unknown_type, unsupported_frame; the socket
    stays open."""
    session, driver, passenger = h.call()
    driver.send(message)
    assert driver.take() == [error(code, text)]
    assert driver.closed is None and driver.state is ConnectionState.AUTHENTICATED
    assert passenger.take() == []


def test_rate_limit_burst_of_100_then_1008(h: Harness) -> None:
    """docs/protocol.md, rule 7: a burst of 100 frames (its authenticate included) passes; the 101st gets
    error rate_limited, close 1008 — for the session a disconnect (participant_left to the peer)."""
    session, driver, passenger = h.call()
    for _ in range(99):
        driver.send({"type": "heartbeat"})
    assert driver.take() == [{"type": "pong"}] * 99
    driver.send({"type": "heartbeat"})
    assert driver.take() == [RATE_LIMITED]
    assert driver.closed == (1008, "rate limited")
    assert passenger.take() == [{"type": "participant_left", "role": "driver"}]
    assert h.metrics.connections_rejected == {"rate_limited": 1}
    assert session.driver.grace is not None


def test_rate_limit_sustained_50_per_second() -> None:
    """docs/protocol.md, rule 7: refilled at 50 per second: a steady 47.6/s never runs out; 62.5/s does, after
    the burst is spent (100 / (1 - 50/62.5) = 500 frames)."""
    h = Harness(session_duration=3600.0)
    session, driver, _ = h.call()
    for _ in range(1000):
        h.clock.advance(21)
        driver.send({"type": "heartbeat"})
    assert driver.closed is None and driver.take() == [{"type": "pong"}] * 1000
    session2 = h.session("ride-2")
    fast = h.join(session2, DRIVER)
    sent = 0
    while fast.closed is None:
        h.clock.advance(16)
        fast.send({"type": "heartbeat"})
        sent += 1
    assert 495 <= sent <= 505
    assert fast.take()[-1] == RATE_LIMITED


@pytest.mark.parametrize("authenticated", [True, False])
def test_every_frame_counts_against_the_rate_limit(h: Harness, authenticated: bool) -> None:
    """docs/protocol.md, rule 7, "Precise points": pings, pongs, fragments and close frames count, before
    authentication too; bad and binary messages count."""
    session = h.session()
    if authenticated:
        conn = h.join(session, DRIVER)  # 1 frame
        for _ in range(48):
            conn.send(b"binary")
        conn.send("{bad")
    else:
        conn = h.connect()
    for _ in range(50 if authenticated else 100):
        conn.frame()
    assert conn.closed is None
    conn.frame()
    assert conn.take()[-1] == RATE_LIMITED
    assert conn.closed == (1008, "rate limited")


def test_media_state_counts_against_the_rate_limit(h: Harness) -> None:
    """docs/protocol.md, "media_state" and rule 7: each report is a frame like any other."""
    session, driver, passenger = h.call()
    for _ in range(99):
        driver.send({"type": "media_state", "state": "connecting"})
    assert driver.closed is None and driver.take() == []
    driver.send({"type": "media_state", "state": "connected"})
    assert driver.take() == [RATE_LIMITED]
    assert driver.closed == (1008, "rate limited")


# -- rule 8: heartbeats ---------------------------------------------------------------


def test_heartbeat_gets_pong(h: Harness) -> None:
    """docs/protocol.md, rule 8: heartbeat → exactly {"type": "pong"}, extra fields or not."""
    session, driver, _ = h.call()
    driver.send({"type": "heartbeat"})
    driver.send({"type": "heartbeat", "id": 7})
    assert [json.dumps(m) for m in driver.take()] == ['{"type": "pong"}'] * 2
    assert driver.peer.sent == []


def test_sweep_pings_open_sockets_only(h: Harness) -> None:
    """docs/protocol.md, rule 8: a ping every HEARTBEAT_INTERVAL to each open socket; none to one already
    closing, and none on a pass without ping."""
    session, driver, passenger = h.call()
    lone = h.connect()
    passenger.close_frame()
    h.engine.sweep(ping=False)
    h.engine.sweep(ping=True)
    assert (driver.peer.pings, lone.peer.pings, passenger.peer.pings) == (1, 1, 0)


def test_sweep_closes_silent_sockets_1011_as_a_network_loss(h: Harness) -> None:
    """docs/protocol.md, rules 8, 6: nothing received for HEARTBEAT_TIMEOUT → close 1011; for the session a
    network loss (participant_left, then the grace)."""
    session, driver, passenger = h.call()
    h.clock.advance(10_000)
    passenger.frame()  # a pong: anything received counts
    h.clock.advance(19_999)
    h.engine.sweep(ping=True)
    assert driver.closed is None and passenger.closed is None
    h.clock.advance(1)
    h.engine.sweep(ping=False)
    assert driver.closed == (1011, "heartbeat timeout")
    assert passenger.closed is None
    assert passenger.take() == [{"type": "participant_left", "role": "driver"}]
    h.clock.advance(15_000)
    assert passenger.take() == [{"type": "call_ended", "reason": "disconnect_driver"}]


# -- media_state (docs/protocol.md, "media_state") ---------------------------------------------


def media(state: str, candidate_type: str | None = None, **extra: Any) -> dict[str, Any]:
    """A ``media_state`` message."""
    message = {"type": "media_state", "state": state, **extra}
    if candidate_type is not None:
        message["candidate_type"] = candidate_type
    return message


def test_media_state_is_neither_relayed_nor_answered(h: Harness) -> None:
    """docs/protocol.md, "media_state": the peer gets nothing, the sender gets nothing, nothing counts as
    relayed; the socket stays open."""
    session, driver, passenger = h.call()
    for state in ("connecting", "connected", "disconnected", "failed"):
        driver.send(media(state, "relay", rtt_ms=42))
        passenger.send(media(state))
    assert driver.take() == [] and passenger.take() == []
    assert driver.closed is None and passenger.closed is None
    assert h.metrics.messages_relayed == 0
    driver.send({"type": "offer", "sdp": SDP})  # the peer's socket still gets what is relayed
    assert passenger.take() == [{"type": "offer", "sdp": SDP}]


def test_media_connected_at_is_the_second_participants_first_connected(h: Harness) -> None:
    """docs/protocol.md, "Call log": media_connected_at is the moment the second participant's first
    connected report arrived; each one's first connected is kept; repeated, connecting and disconnected
    reports change nothing; counted once per call, with the time from the call's start."""
    session, driver, passenger = h.call()  # active at 0 ms
    h.clock.advance(400)
    driver.send(media("connecting"))
    passenger.send(media("connecting"))
    assert h.calllog.take() == []
    h.clock.advance(300)
    driver.send(media("connected"))
    assert h.calllog.take() == [MediaReported(session.session_id, driver_media_at=h.wall(700))]
    assert h.metrics.media_connected_calls == 0
    h.clock.advance(500)
    driver.send(media("disconnected"))
    driver.send(media("connected"))  # not its first
    assert h.calllog.take() == []
    h.clock.advance(800)
    passenger.send(media("connected"))
    assert h.calllog.take() == [
        MediaReported(
            session.session_id,
            media_connected_at=h.wall(2_000),
            driver_media_at=h.wall(700),
            passenger_media_at=h.wall(2_000),
        )
    ]
    assert h.metrics.media_connected_calls == 1
    histogram = h.metrics.media_connect_time
    assert histogram.count == 1 and histogram.sum == pytest.approx(2.0)
    h.clock.advance(5_000)
    for conn in (driver, passenger):
        conn.send(media("disconnected"))
        conn.send(media("connected"))
    assert h.calllog.take() == [] and h.metrics.media_connected_calls == 1 and histogram.count == 1


def test_one_participant_connected_is_no_media_connected_at(h: Harness) -> None:
    """docs/protocol.md, "Call log": media_connected_at stays NULL until both reported connected, however
    often one of them does."""
    session, driver, passenger = h.call()
    for _ in range(3):
        driver.send(media("connected", "host"))
        passenger.send(media("connecting"))
    assert session.media == Media(driver_media_at=h.wall(0), driver_candidate="host")
    assert h.metrics.media_connected_calls == 0 and h.metrics.media_connect_time.count == 0
    driver.send({"type": "end_call"})
    assert [type(event).__name__ for event in h.calllog.take()] == ["MediaReported", "CallEnded"]


def test_candidate_type_from_connected_reports_that_name_one_latest_wins(h: Harness) -> None:
    """docs/protocol.md, "Call log": each participant's candidate is the type in its latest connected report
    that named one; a report without it, or another state naming one, changes nothing; each participant's
    first type and each change count in intaleq_media_candidates_total."""
    session, driver, passenger = h.call()
    sid = session.session_id
    driver.send(media("connected"))
    assert h.calllog.take() == [MediaReported(sid, driver_media_at=h.wall(0))]
    driver.send(media("connected", "host"))
    assert h.calllog.take() == [MediaReported(sid, driver_media_at=h.wall(0), driver_candidate="host")]
    for message in (media("connected"), media("connected", "host"), media("connecting", "srflx")):
        driver.send(message)
    driver.send(media("disconnected", "prflx"))
    assert h.calllog.take() == []
    driver.send(media("failed", "srflx"))
    assert h.calllog.take() == [
        MediaReported(sid, driver_media_at=h.wall(0), driver_candidate="host", media_failures=1)
    ]
    h.clock.advance(1_000)
    driver.send(media("connected", "relay"))  # after an ICE restart, through TURN
    passenger.send(media("connected", "srflx"))
    assert h.calllog.take()[-1] == MediaReported(
        sid, h.wall(1_000), h.wall(0), h.wall(1_000), "relay", "srflx", 1
    )
    assert session.media is not None
    assert (session.media.driver_candidate, session.media.passenger_candidate) == ("relay", "srflx")
    assert h.metrics.media_candidates == {"host": 1, "relay": 1, "srflx": 1}


def test_failures_are_counted_as_absolute_numbers(h: Harness) -> None:
    """docs/protocol.md, "Call log": media_failures counts the failed reports of both participants; each
    event carries the count the engine holds (a replay cannot count twice); the call counts once in
    intaleq_media_failed_calls_total, every report in intaleq_media_failures_total."""
    session, driver, passenger = h.call()
    other, d2, p2 = h.call("ride-2")
    for conn in (driver, passenger, driver, d2):
        conn.send(media("failed"))
    assert [event.media_failures for event in h.calllog.take()] == [1, 2, 3, 1]  # type: ignore[union-attr]
    assert session.media is not None and session.media.media_failures == 3
    assert (h.metrics.media_failures, h.metrics.media_failed_calls) == (4, 2)
    assert h.metrics.media_connected_calls == 0


def test_media_state_of_a_replaced_socket_counts_for_nobody(h: Harness) -> None:
    """docs/protocol.md, rule 2: a replaced socket's late reports are ignored like its other messages."""
    session, driver, passenger = h.call()
    newer = h.join(session, DRIVER)
    newer.take()
    passenger.take()
    driver.send(media("connected", "relay"))
    driver.send(media("failed"))
    assert session.media is None and h.calllog.take() == []


# -- connections and shutdown -----------------------------------------------------------


def test_connections_are_counted_until_their_tcp_close(h: Harness) -> None:
    """docs/protocol.md, "GET /health" connections: from the upgrade until the TCP connection is gone."""
    a, b = h.connect(), h.connect()
    assert h.engine.clients == {a.client, b.client}
    a.close_frame()
    assert len(h.engine.clients) == 2
    h.engine.closed(a.client)
    assert h.engine.clients == {b.client}


def test_shutdown(h: Harness) -> None:
    """docs/protocol.md, "End reasons" and "Close codes": stopping ends every live session with
    server_shutdown (close 1001), closes unauthenticated sockets with 1001 and no message, and refuses new
    sessions."""
    session, driver, passenger = h.call()
    waiting = h.session("ride-2")
    alone = h.join(waiting, DRIVER)
    stranger = h.connect()
    h.clock.advance(1_000)
    h.engine.shutdown()
    for conn in (driver, passenger, alone):
        assert conn.take() == [{"type": "call_ended", "reason": "server_shutdown"}]
        assert conn.closed == (1001, "server_shutdown")
    assert stranger.take() == [] and stranger.closed == (1001, "server stopping")
    assert h.calllog.take()[-2:] == [
        CallEnded(session.session_id, "server_shutdown", h.wall(1_000)),
        CallEnded(waiting.session_id, "server_shutdown", h.wall(1_000)),
    ]
    assert h.metrics.calls_ended == {"server_shutdown": 2}
    assert not h.engine.accepting and h.engine.sessions.live == 0
    with pytest.raises(Capacity):
        h.engine.create_session("ride-3", DRIVER, PASSENGER)


# -- the per-IP upgrade limits (docs/protocol.md, "Connecting") ------------------------------------


@pytest.fixture
def told() -> FakeAdmission:
    return FakeAdmission()


def test_auth_timeout_ends_unauthenticated(told: FakeAdmission) -> None:
    """docs/protocol.md, "Connecting": an upgrade that times out before authenticate counts (once) towards
    RATE_LIMIT_PER_MIN; it waits to authenticate from the upgrade until then."""
    h = Harness(told)
    conn = h.connect()
    assert told.take() == [("started", conn.peer.ip)]
    h.clock.advance(10_000)
    assert conn.closed == (4001, "auth_timeout")
    assert told.take() == [("ended_unauthenticated", conn.peer.ip, 10_000)]
    conn.close_frame()
    h.engine.closed(conn.client)
    assert told.take() == []  # closing and closed after the refusal: still once


def test_auth_timeout_counts_against_the_ip() -> None:
    """docs/protocol.md, "Connecting": with the real admission, an auth timeout is an upgrade that ended
    without authenticating: with RATE_LIMIT_PER_MIN=1, the IP's next upgrade is refused for the minute."""
    admission = UpgradeAdmission(limit=1, window=60.0)
    h = Harness(admission)
    conn = h.connect()
    ip = conn.peer.ip
    assert admission.pending(ip) == 1 and admission.admit(ip, h.clock.time()) is None
    h.clock.advance(10_000)
    h.engine.closed(conn.client)
    assert admission.pending(ip) == 0
    assert admission.admit(ip, h.clock.time()) == "ip_rate_limited"
    h.clock.advance(60_000)
    assert admission.admit(ip, h.clock.time()) is None


def test_join_then_close_counts_nothing(told: FakeAdmission) -> None:
    """docs/protocol.md, "Connecting": an upgrade that authenticates never counts, however it ends later
    (closed, lost, replaced, its call ended)."""
    h = Harness(told)
    session = h.session()
    driver = h.join(session, DRIVER)
    assert told.take() == [("started", driver.peer.ip), ("authenticated", driver.peer.ip)]
    driver.close_frame()
    h.engine.closed(driver.client)
    again = h.join(session, DRIVER)  # a reconnect
    replacing = h.join(session, DRIVER)  # replaces it (4002)
    assert again.closed == (4002, "replaced")
    passenger = h.join(session, PASSENGER)
    passenger.send({"type": "end_call"})
    for conn in (again, replacing, passenger):
        conn.drop()
    h.clock.advance(120_000)
    assert [event for event, *_ in told.take()] == ["started", "authenticated"] * 3


@pytest.mark.parametrize(
    "ending",
    ["refused", "close_frame", "tcp_lost", "auth_timeout", "heartbeat", "message_rate", "gone", "shutdown"],
)
def test_every_unauthenticated_ending_counts_once(told: FakeAdmission, ending: str) -> None:
    """docs/protocol.md, "Connecting": a connection that never authenticated is told ended_unauthenticated
    exactly once, whatever closed it (refusal, auth timeout, close, TCP loss, heartbeat, message rate,
    shutdown), then nothing more for its closing and closed."""
    h = Harness(told, heartbeat_timeout=5.0, heartbeat_interval=2.0)
    session = h.session()
    conn = h.connect()
    ip = conn.peer.ip
    if ending == "refused":
        conn.send({"type": "heartbeat"})
        assert conn.closed == (4001, "not_authenticated")
    elif ending == "close_frame":
        conn.close_frame()
    elif ending == "tcp_lost":
        conn.drop()
    elif ending == "auth_timeout":
        h.clock.advance(10_000)
    elif ending == "heartbeat":
        h.clock.advance(5_000)
        h.engine.sweep(ping=False)
        assert conn.closed == (1011, "heartbeat timeout")
    elif ending == "message_rate":
        for _ in range(101):
            conn.frame()
        assert conn.closed == (1008, "rate limited")
    elif ending == "gone":  # closed in the chunk that carried its authenticate
        conn.peer.lost = True
        conn.authenticate(session, DRIVER)
        conn.peer.stop_sending()
    else:
        h.engine.shutdown()
    assert [event for event, *_ in told.told] == ["started", "ended_unauthenticated"], told.told
    conn.peer.stop_sending()
    h.engine.closed(conn.client)
    h.clock.advance(60_000)
    assert [event for event, *_ in told.take()] == ["started", "ended_unauthenticated"]
    assert told.told == [] and ip


# -- restarts: handoff and restore (docs/operations.md, "Restarts") -------------------------------


def test_handoff_closes_with_1012_and_ends_nothing(h: Harness) -> None:
    """Stopping with ON_STOP=handoff: every socket closes with 1012 and no
    message, nothing is recorded, no timer is left to end a call during the
    drain, and the sessions stay live."""
    session, driver, passenger = h.call()
    waiting = h.session("ride-2")
    alone = h.join(waiting, DRIVER)
    stranger = h.connect()
    h.calllog.take()
    h.engine.shutdown(handoff=True)
    for conn in (driver, passenger, alone, stranger):
        assert conn.take() == [] and conn.closed == (1012, "service restart")
    for conn in (driver, passenger, alone, stranger):
        conn.drop()
    h.clock.advance(3_600_000)  # no deadline, grace or expiry fires any more
    assert h.calllog.take() == [] and h.metrics.calls_ended == {}
    assert session.state is SessionState.ACTIVE and h.engine.sessions.live == 2
    assert h.clock.pending() == []


def row(
    session_id: str,
    status: str,
    created_at: int,
    connected_at: int | None = None,
    ended_at: int | None = None,
    end_reason: str | None = None,
) -> SessionRow:
    """A call-log row, times in ms after the harness start (None: NULL)."""

    def wall(ms: int | None) -> float | None:
        return None if ms is None else (ms + WALL_MS) / 1000

    return SessionRow(
        session_id,
        f"ride-{session_id}",
        DRIVER,
        PASSENGER,
        status,
        None,
        end_reason or ("user_terminated" if status == "ended" else None),
        (created_at + WALL_MS) / 1000,
        wall(connected_at),
        wall(ended_at),
    )


def test_restore_takes_back_sessions_calls_and_tombstones(h: Harness) -> None:
    """A pending session is joinable until its expiry; an active call keeps
    its deadline, both seats absent with RECONNECT_GRACE from now, messages
    held; tombstones answer session_ended / session_expired; what fell due
    while down is recorded at its own time."""
    rows = [
        row("pending", "created", created_at=-10_000),
        row("call", "active", created_at=-30_000, connected_at=-20_000),
        row("done", "ended", created_at=-50_000, connected_at=-45_000, ended_at=-40_000),
        row("expired", "ended", created_at=-90_000, ended_at=-30_000, end_reason="expired"),
        row("overdue", "active", created_at=-200_000, connected_at=-100_000),
        row("stale", "created", created_at=-70_000),
    ]
    assert h.engine.restore(rows) == 2
    assert h.calllog.take() == [
        CallEnded("overdue", "max_duration_reached", h.wall(-40_000)),
        CallEnded("stale", "expired", h.wall(-10_000)),
    ]
    call = h.engine.sessions.get("call")
    assert call is not None and call.state is SessionState.ACTIVE
    assert call.deadline == pytest.approx(h.clock.time() + 40.0)
    # the driver comes back, sends; held for the absent passenger
    driver = h.join(call, DRIVER)
    driver.send({"type": "offer", "sdp": SDP})
    assert driver.take() == []
    passenger = h.join(call, PASSENGER)
    assert passenger.take() == [
        {"type": "participant_joined", "role": "driver"},
        {"type": "offer", "sdp": SDP},
    ]
    assert driver.take() == [{"type": "participant_joined", "role": "passenger"}]
    pending = h.engine.sessions.get("pending")
    assert pending is not None and pending.state is SessionState.CREATED
    for session_id, reason in (
        ("done", "session_ended"),
        ("expired", "session_expired"),
        ("overdue", "session_ended"),
        ("stale", "session_expired"),
    ):
        conn = h.connect()
        conn.send({"type": "authenticate", "session_id": session_id, "user_id": DRIVER})
        assert conn.take() == unauthorized(reason), session_id
    h.clock.advance(40_000)  # the restored call's own deadline
    assert passenger.take() == [{"type": "call_timeout", "reason": "max_duration_reached"}]


def test_restored_call_ends_when_nobody_comes_back(h: Harness) -> None:
    h.engine.restore([row("call", "active", created_at=-3_000, connected_at=-2_000)])
    h.clock.advance(15_000)
    assert h.calllog.take() == [CallEnded("call", "disconnect_driver", h.wall(15_000))]


def test_restore_goes_on_from_the_rows_media_progress(h: Harness) -> None:
    """docs/operations.md, "Restarts": a restored call keeps its media progress (docs/protocol.md,
    "media_state"): the driver's connected before the restart and the passenger's after it give
    media_connected_at; the failures go on from the row's count (absolute, never restarted at 0)."""
    media = Media(driver_media_at=h.wall(-2_500), driver_candidate="relay", media_failures=2)
    restored = dataclasses.replace(row("call", "active", created_at=-3_000, connected_at=-2_000), media=media)
    h.engine.restore([restored])
    call = h.engine.sessions.get("call")
    assert call is not None and call.media == media and call.media is not media
    driver, passenger = h.join(call, DRIVER), h.join(call, PASSENGER)
    h.clock.advance(1_000)
    passenger.send({"type": "media_state", "state": "connected", "candidate_type": "host"})
    driver.send({"type": "media_state", "state": "failed"})
    assert driver.take() == [{"type": "participant_joined", "role": "passenger"}]
    assert passenger.take() == [{"type": "participant_joined", "role": "driver"}]
    assert h.calllog.take() == [
        MediaReported("call", h.wall(1_000), h.wall(-2_500), h.wall(1_000), "relay", "host", 2),
        MediaReported("call", h.wall(1_000), h.wall(-2_500), h.wall(1_000), "relay", "host", 3),
    ]
    assert (h.metrics.media_connected_calls, h.metrics.media_failures, h.metrics.media_failed_calls) == (
        1,
        1,
        0,
    )
    assert h.metrics.media_connect_time.sum == pytest.approx(3.0)  # from the row's connected_at


# -- participant tokens (docs/protocol.md, "Participant tokens") ---------------------------------

_CASES = ("none", "wrong", "right", "other_role", "other_session")
_ACCEPTED = {
    "off": set(_CASES),
    "optional": {"none", "right"},
    "required": {"right"},
}


@pytest.mark.parametrize("case", _CASES)
@pytest.mark.parametrize("mode", ["off", "optional", "required"])
def test_participant_tokens(mode: str, case: str) -> None:
    """Every mode × {no token, a wrong one, the right one, the other role's,
    another session's}: accepted, or unauthorized invalid_token and 4001
    (checked after the session and the user)."""
    h = Harness(participant_tokens=mode)
    session, other = h.session("ride-1"), h.session("ride-2")
    tokens = h.engine.tokens
    token = {
        "none": None,
        "wrong": "A" * 43,
        "right": tokens.token(session.session_id, "driver"),
        "other_role": tokens.token(session.session_id, "passenger"),
        "other_session": tokens.token(other.session_id, "driver"),
    }[case]
    conn = h.connect()
    message: dict[str, Any] = {"type": "authenticate", "session_id": session.session_id, "user_id": DRIVER}
    if token is not None:
        message["token"] = token
    conn.send(message)
    if case in _ACCEPTED[mode]:
        assert conn.take(1) == [{"type": "authenticated", "user_id": DRIVER}]
    else:
        assert conn.take() == unauthorized("invalid_token")
        assert conn.closed == (4001, "invalid_token")
        assert h.metrics.connections_rejected["invalid_token"] == 1


def test_a_token_that_is_not_a_string_is_invalid_message(h: Harness) -> None:
    session = h.session()
    conn = h.connect()
    conn.send({"type": "authenticate", "session_id": session.session_id, "user_id": DRIVER, "token": 7})
    assert conn.take() == unauthorized("invalid_message")
