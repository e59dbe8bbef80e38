"""WebSocket signaling: authentication, relay, call endings and timers
(SPEC §4). The I/O glue between sockets and the pure state in
:mod:`~intaleq_signal.sessions` and :mod:`~intaleq_signal.lifecycle`.

Every event is checked against the connection that caused it: only an
``AUTHENTICATED`` connection that is still its seat's connection speaks for
the participant, so a replaced socket's late messages, close and timers are
ignored (SPEC §4 rule 2). Sends are synchronous writes to the transport —
no task or coroutine per relayed message.

A participant is present while its socket is open for sending: the moment
the connection stops being open (a close frame either way, a protocol
error, the TCP connection lost, a peer that stopped reading) is its
disconnect, told by the connection's ``on_closing``; the TCP teardown that
may follow for up to :data:`CLOSE_TIMEOUT` changes nothing. A message for a
participant that is not present is held or refused, never dropped
(docs/protocol.md, rules 4 and 6).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from websockets.protocol import State

from . import messages as msg
from .calllog import CallActive, CallEnded, CallInitiated, CallLogWriter, SessionCreated
from .config import Config
from .lifecycle import (
    ConnectionEvent,
    ConnectionLifecycle,
    ConnectionState,
    EndReason,
    SessionEvent,
    SessionState,
)
from .messages import MessageError
from .metrics import Metrics
from .ratelimit import TokenBucket
from .sessions import Registry, Seat, Session

__all__ = ["Client", "Signaling"]

log = logging.getLogger("intaleq_signal.signaling")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011  # used for heartbeat timeout, as websockets' keepalive does
CLOSE_UNAUTHORIZED = 4001
CLOSE_REPLACED = 4002

_OPEN = State.OPEN
_AUTHENTICATED = ConnectionState.AUTHENTICATED
_CONNECTED = ConnectionState.CONNECTED
_DISCONNECT_REASON = {"driver": EndReason.DISCONNECT_DRIVER, "passenger": EndReason.DISCONNECT_PASSENGER}


#: Bound on a closing handshake (seconds); past it the TCP connection is
#: aborted (a peer that stopped reading never lets the close frame out).
CLOSE_TIMEOUT = 2.0


class Client:
    """Our state for one WebSocket connection (the websockets connection
    object holds the rest). ``__slots__`` keeps it to a few hundred bytes."""

    __slots__ = ("engine", "ws", "ip", "lifecycle", "seat", "session", "bucket", "auth_timer")

    def __init__(self, engine: Signaling, ws: Any, ip: str, now: float) -> None:
        self.engine = engine
        self.ws = ws
        self.ip = ip
        self.lifecycle = ConnectionLifecycle()
        self.seat: Seat | None = None
        self.session: Session | None = None
        self.bucket = TokenBucket(now)
        self.auth_timer: asyncio.TimerHandle | None = None

    def send(self, text: str) -> bool:
        """Queue one text frame (see ``HTTPServerConnection.send_text``):
        False, and nothing sent, once the socket is no longer open for
        sending. Server notices to such a socket are not kept: its
        ``on_closing`` makes the participant absent, and a participant that
        comes back learns the state of the call from its join."""
        return self.ws.send_text(text)

    def receive(self, message: str | bytes) -> None:
        """Each whole message received (the connection's ``on_message``)."""
        self.engine.on_message(self, message)

    def frame_received(self) -> None:
        """Each other frame received (the connection's ``on_frame``)."""
        self.engine.on_frame(self)

    def closing(self) -> None:
        """The socket stopped being open for sending (the connection's
        ``on_closing``)."""
        self.engine.on_closed(self)


class Signaling:
    """The protocol engine of one process.

    Args:
        config: validated settings.
        calllog: where call-log events go.
        metrics: counters to bump.
    """

    def __init__(self, config: Config, calllog: CallLogWriter, metrics: Metrics) -> None:
        self.config = config
        self.calllog = calllog
        self.metrics = metrics
        self.registry = Registry(config.session_duration, config.max_sessions)
        self.clients: set[Client] = set()
        self.accepting = True
        self.loop = asyncio.get_running_loop()

    # -- sessions (HTTP side) ----------------------------------------------

    def create_session(self, ride_id: str, driver_id: str, passenger_id: str) -> tuple[Session, bool]:
        """``POST /sessions`` after validation: see :meth:`Registry.create`.

        Raises:
            RideConflict, Capacity: as :meth:`Registry.create`.
        """
        now = self.loop.time()
        session, created = self.registry.create(
            ride_id, driver_id, passenger_id, now, accepting=self.accepting
        )
        if created:
            session.timer = self.loop.call_at(session.deadline, self._deadline_reached, session)
            self.calllog.record(
                SessionCreated(
                    session.session_id, ride_id, driver_id, passenger_id, time.time(), self.config.node_id
                )
            )
            self.metrics.sessions_created += 1
            log.info("session created session=%s ride=%s", session.session_id, ride_id)
        return session, created

    def active_calls(self) -> int:
        return sum(1 for s in self.registry.by_ride.values() if s.state is SessionState.ACTIVE)

    # -- connection lifetime ------------------------------------------------

    async def handler(self, ws: Any) -> None:
        """The websockets connection handler for ``/ws``: messages arrive
        through ``ws.start`` callbacks; this coroutine only waits for the
        end of the connection."""
        client = Client(self, ws, ws.client_ip, self.loop.time())
        client.auth_timer = self.loop.call_later(self.config.auth_timeout, self._auth_expired, client)
        self.clients.add(client)
        ws.forget_handshake()
        try:
            ws.start(client.receive, client.frame_received, client.closing)
            await ws.wait_closed()
        finally:
            self.clients.discard(client)
            self.on_closed(client)

    def on_frame(self, client: Client) -> None:
        """A frame other than a whole unfragmented message — a fragment, a
        ping, a pong (solicited or not), a close frame: every frame counts
        against the message rate (docs/protocol.md, rule 7)."""
        state = client.lifecycle.state
        if (state is _AUTHENTICATED or state is _CONNECTED) and not client.bucket.take(self.loop.time()):
            self._rate_limited(client)

    def on_message(self, client: Client, message: str | bytes) -> None:
        """One received frame (SPEC §4 rules 1, 2, 4, 5, 7, 8)."""
        state = client.lifecycle.state
        if state is _AUTHENTICATED:
            if not client.bucket.take(self.loop.time()):
                return self._rate_limited(client)
            if type(message) is not str:
                return client.send(msg.error("unsupported_frame", "binary frames are not supported"))
            try:
                kind, obj = msg.decode(message)
                if kind in msg.RELAYED_TYPES:
                    return self._relay(client, kind, obj)
            except MessageError as exc:
                return client.send(msg.error(exc.code, exc.message))
            if kind == "heartbeat":
                client.send(msg.PONG)
            elif kind == "end_call":
                self.end(client.session, EndReason.USER_TERMINATED)  # type: ignore[arg-type]
            else:  # authenticate
                client.send(msg.error("already_authenticated", "this connection is already authenticated"))
        elif state is _CONNECTED:
            if not client.bucket.take(self.loop.time()):
                return self._rate_limited(client)
            self._authenticate(client, message)
        # REPLACED or CLOSED: a stale socket speaks for nobody.

    def on_closed(self, client: Client) -> None:
        """The socket stopped being open for sending, for whatever reason,
        or its TCP connection closed: whichever comes first is the
        participant's disconnect, the rest is ignored (SPEC §4 rules 2, 6;
        docs/protocol.md, rule 6)."""
        if client.auth_timer is not None:
            client.auth_timer.cancel()
            client.auth_timer = None
        was = client.lifecycle.state
        client.lifecycle.close()
        if was is not _AUTHENTICATED:
            return  # never joined, replaced, or already closed by the server
        seat, session = client.seat, client.session
        assert seat is not None and session is not None
        seat.conn = None
        log.info("participant left session=%s role=%s", session.session_id, seat.role)
        peer = session.other(seat)
        if peer.conn is not None:
            peer.conn.send(msg.participant_left(seat.role))
        if session.state is SessionState.ACTIVE:
            if self.config.reconnect_grace <= 0:
                self.end(session, _DISCONNECT_REASON[seat.role])
            else:
                seat.grace = self.loop.call_later(
                    self.config.reconnect_grace, self._grace_over, session, seat
                )

    # -- authentication -----------------------------------------------------

    def _authenticate(self, client: Client, message: str | bytes) -> None:
        """SPEC §4 rule 1 and "Precise points": the first message."""
        try:
            if type(message) is not str:
                raise MessageError("not_authenticated", "binary frame")
            kind, obj = msg.decode(message)
        except MessageError:
            return self._refuse(client, "not_authenticated")
        if kind != "authenticate":
            return self._refuse(client, "not_authenticated")
        try:
            session_id, user_id = msg.parse_authenticate(obj)
        except MessageError:
            return self._refuse(client, "invalid_message")
        session = self.registry.by_id.get(session_id)
        if session is None:
            return self._refuse(client, "session_not_found")
        if session.state is SessionState.ENDED:
            expired = session.lifecycle.end_reason is EndReason.EXPIRED
            return self._refuse(client, "session_expired" if expired else "session_ended")
        if self.loop.time() >= session.deadline:  # its timer is about to fire
            active = session.state is SessionState.ACTIVE
            return self._refuse(client, "session_ended" if active else "session_expired")
        seat = session.seat_of(user_id)
        if seat is None:
            return self._refuse(client, "user_not_in_session")
        if not client.ws.can_send():
            # Closed in the chunk that carried its authenticate (a close
            # frame or a protocol error right behind it): it cannot be told
            # it joined, and it is absent from the moment it closed, so it
            # never joins — no replacement of a live socket, no
            # participant_joined, the held messages stay held.
            log.info("participant gone before joining session=%s role=%s", session.session_id, seat.role)
            return
        self._join(client, session, seat)

    def _refuse(self, client: Client, reason: str) -> None:
        self.metrics.connections_rejected[reason] += 1
        log.info("connection refused reason=%s ip=%s", reason, client.ip)
        client.send(msg.unauthorized(reason))
        client.lifecycle.close()
        self._close(client, CLOSE_UNAUTHORIZED, reason)

    def _auth_expired(self, client: Client) -> None:
        client.auth_timer = None
        if client.lifecycle.state is _CONNECTED:
            self._refuse(client, "auth_timeout")

    def _join(self, client: Client, session: Session, seat: Seat) -> None:
        """Bind the connection to its seat (first join, reconnect or
        replacement) and tell both sides (SPEC §4 rules 2, 3)."""
        if client.auth_timer is not None:
            client.auth_timer.cancel()
            client.auth_timer = None
        client.lifecycle.handle(ConnectionEvent.AUTHENTICATE)
        client.seat, client.session = seat, session
        old = seat.conn
        if old is not None:
            old.lifecycle.handle(ConnectionEvent.REPLACE)
            old.send(msg.error("replaced", "a newer connection of this participant took over"))
            self._close(old, CLOSE_REPLACED, "replaced")
        seat.conn = client
        seat.joined = True
        if seat.grace is not None:
            seat.grace.cancel()
            seat.grace = None
        if session.state is SessionState.CREATED:
            session.lifecycle.handle(SessionEvent.FIRST_JOIN)
        log.info("participant joined session=%s role=%s ip=%s", session.session_id, seat.role, client.ip)
        client.send(msg.authenticated(seat.user_id))
        client.send(msg.session_joined(session.session_id, session.ride_id, seat.role))
        peer = session.other(seat)
        if peer.conn is not None:
            client.send(msg.participant_joined(peer.role))
            peer.conn.send(msg.participant_joined(seat.role))
            if session.state is SessionState.WAITING:
                self._activate(session)
        held = seat.take_held()
        if held:
            self._deliver_held(client, seat, held)

    def _activate(self, session: Session) -> None:
        now = self.loop.time()
        session.lifecycle.handle(SessionEvent.BOTH_CONNECTED)
        session.connected = now
        session.deadline = now + self.config.session_duration
        if session.timer is not None:
            session.timer.cancel()
        session.timer = self.loop.call_at(session.deadline, self._deadline_reached, session)
        self.calllog.record(CallActive(session.session_id, time.time()))
        self.metrics.calls_started += 1
        log.info("call active session=%s", session.session_id)

    def _deliver_held(self, client: Client, seat: Seat, held: list[str]) -> None:
        """Send what was held for a participant that just joined, in order;
        what cannot be written goes back to the hold queue, ahead of
        anything held later (docs/protocol.md, rule 4)."""
        delivered = 0
        for text in held:
            if not client.send(text):
                break
            delivered += 1
        self.metrics.messages_relayed += delivered
        # The queue was emptied by take_held() and nothing was held since:
        # holding the rest again keeps the order and fits the bound.
        for text in held[delivered:]:
            seat.hold(text)

    # -- relay --------------------------------------------------------------

    def _relay(self, client: Client, kind: str, obj: dict[str, Any]) -> None:
        """SPEC §4 rule 4: rebuild, then write to the peer's socket, or hold
        it for the peer while the peer is absent (or its socket just stopped
        being open), or refuse it with ``peer_not_connected`` when the hold
        queue is full. Only a message written to an open socket counts as
        relayed (docs/protocol.md, rule 4)."""
        payload = msg.relay_payload(kind, obj)
        seat, session = client.seat, client.session
        assert seat is not None and session is not None
        if kind == "offer" and session.initiated_by is None:
            session.initiated_by = seat.user_id
            self.calllog.record(CallInitiated(session.session_id, seat.user_id))
        peer = session.other(seat)
        conn = peer.conn
        if conn is not None:
            if conn.ws.send_text(payload):
                metrics = self.metrics
                metrics.relay_latency.observe(time.monotonic() - client.ws.last_received)
                metrics.messages_relayed += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "relayed %s session=%s from=%s: %s", kind, session.session_id, seat.role, payload
                    )
                return
            # Its TCP connection was lost in this loop pass, and its
            # connection_lost is still to come: it is absent from now
            # (participant_left to the sender first, then the hold).
            self.on_closed(conn)
            if session.state is SessionState.ENDED:  # no reconnect grace: the call ended with it
                return
        if not peer.hold(payload):
            return client.send(msg.error("peer_not_connected", "the other participant is not connected"))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("held %s session=%s from=%s: %s", kind, session.session_id, seat.role, payload)

    # -- endings ------------------------------------------------------------

    def end(self, session: Session, reason: EndReason) -> None:
        """End a live session: tell and close both sockets, record the end
        (SPEC §4 rules 3, 5, 6; §6 shutdown). Remembered for
        ``SESSION_DURATION`` afterwards so late joins get a precise refusal."""
        now = self.loop.time()
        self.registry.end(session, reason, now)
        if session.timer is not None:
            session.timer.cancel()
        if reason is EndReason.MAX_DURATION_REACHED:
            notice = msg.CALL_TIMEOUT
        else:
            notice = msg.call_ended(reason.value)
        code = CLOSE_GOING_AWAY if reason is EndReason.SERVER_SHUTDOWN else CLOSE_NORMAL
        for seat in (session.driver, session.passenger):
            if seat.grace is not None:
                seat.grace.cancel()
                seat.grace = None
            seat.held = None
            conn = seat.conn
            if conn is not None:
                seat.conn = None
                conn.send(notice)
                conn.lifecycle.close()
                self._close(conn, code, reason.value)
        self.calllog.record(CallEnded(session.session_id, reason.value, time.time()))
        self.metrics.calls_ended[reason.value] += 1
        started = session.connected
        if started is None:  # it never became a call (expired, or ended before both were there)
            log.info("session ended session=%s reason=%s", session.session_id, reason.value)
        else:
            log.info(
                "call ended session=%s reason=%s duration=%.1fs",
                session.session_id,
                reason.value,
                now - started,
            )
        session.timer = self.loop.call_later(self.config.session_duration, self.registry.forget, session)

    def _deadline_reached(self, session: Session) -> None:
        session.timer = None
        if session.state is SessionState.ACTIVE:
            self.end(session, EndReason.MAX_DURATION_REACHED)
        elif session.state is not SessionState.ENDED:
            self.end(session, EndReason.EXPIRED)

    def _grace_over(self, session: Session, seat: Seat) -> None:
        seat.grace = None
        if seat.conn is None and session.state is SessionState.ACTIVE:
            self.end(session, _DISCONNECT_REASON[seat.role])

    def _rate_limited(self, client: Client) -> None:
        """SPEC §4 rule 7: error, then close 1008; for the session this is a
        disconnect like any other (rule 6)."""
        self.metrics.connections_rejected["rate_limited"] += 1
        log.info("connection rate limited ip=%s", client.ip)
        client.send(msg.error("rate_limited", "more than 50 messages per second"))
        self.on_closed(client)
        self._close(client, CLOSE_POLICY, "rate limited")

    def _close(self, client: Client, code: int, reason: str) -> None:
        """Start the closing handshake without blocking the caller (bounded
        by :data:`CLOSE_TIMEOUT`). The caller has already moved the
        connection's lifecycle out of the way."""
        client.ws.close_soon(code, reason)

    # -- heartbeat ----------------------------------------------------------

    def sweep(self, ping: bool) -> None:
        """One heartbeat pass (SPEC §4 rule 8): close the connections with
        nothing received for ``HEARTBEAT_TIMEOUT``; ping the others when
        ``ping`` is set."""
        now = time.monotonic()  # the clock of last_received
        timeout = self.config.heartbeat_timeout
        for client in list(self.clients):
            ws = client.ws
            if ws.protocol.state is not _OPEN:
                continue
            if now - ws.last_received >= timeout:
                log.info("heartbeat timeout ip=%s", client.ip)
                self.on_closed(client)  # a dead peer is a network loss (rule 6)
                self._close(client, CLOSE_INTERNAL, "heartbeat timeout")
            elif ping:
                ws.protocol.send_ping(b"")
                ws.send_data()

    async def heartbeat(self) -> None:
        """Ping every ``HEARTBEAT_INTERVAL``; look for dead connections often
        enough that one is found at most a tick after ``HEARTBEAT_TIMEOUT``."""
        interval = self.config.heartbeat_interval
        tick = max(0.05, min(interval, self.config.heartbeat_timeout - interval))
        next_ping = self.loop.time() + interval
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            ping = now >= next_ping
            if ping:
                next_ping = now + interval
            self.sweep(ping)

    # -- shutdown -----------------------------------------------------------

    def shutdown(self) -> None:
        """SPEC §6: refuse new sessions, end live calls with
        ``server_shutdown`` (close 1001), close unauthenticated sockets."""
        self.accepting = False
        for session in list(self.registry.by_ride.values()):
            self.end(session, EndReason.SERVER_SHUTDOWN)
        for client in list(self.clients):
            if client.lifecycle.close():
                self._close(client, CLOSE_GOING_AWAY, "server stopping")

    async def drain(self, timeout: float) -> None:
        """Wait (bounded, seconds) for the connections to close."""
        closing = [client.ws.wait_closed() for client in self.clients]
        if closing:
            await asyncio.wait(closing, timeout=timeout)
