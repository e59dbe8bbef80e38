"""The signaling engine: authentication, relay, call endings and timers
(docs/protocol.md, "WebSocket /ws", rules 1–8), without I/O.

The engine does no I/O and knows no event loop. Its inputs are plain method
calls: :meth:`Signaling.connected`, :meth:`~Signaling.message_received`,
:meth:`~Signaling.frame_received`, :meth:`~Signaling.closing`,
:meth:`~Signaling.closed`, :meth:`~Signaling.sweep`,
:meth:`~Signaling.create_session` and :meth:`~Signaling.shutdown`, plus the
timers it arms on its :class:`Clock`. Its outputs go through interfaces it
is given: a :class:`Peer` per connection (send a text frame, start a close,
ping), the :class:`Clock` (time and timers), a
:class:`~intaleq_signal.sessions.SessionStore`, a :class:`CallLog` and the
:class:`~intaleq_signal.metrics.Metrics`. :mod:`intaleq_signal.serving`
drives it from asyncio; ``tests/test_signaling.py`` drives it with fake
peers and a fake clock.

Every event is checked against the connection that caused it: only an
``AUTHENTICATED`` connection that is still its seat's connection speaks for
the participant, so a replaced socket's late messages, close and timers are
ignored (docs/protocol.md, rule 2). Sends are synchronous writes to the
peer — no task or coroutine per relayed message.

A participant is present while its socket is open for sending: the moment
the connection stops being open (a close frame either way, a protocol
error, the TCP connection lost, a peer that stopped reading) is its
disconnect, told by :meth:`Signaling.closing`; the TCP teardown that may
follow for up to :data:`CLOSE_TIMEOUT` changes nothing. A message for a
participant that is not present is held or refused, never dropped
(docs/protocol.md, rules 4 and 6).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

from . import messages as msg
from .calllog.events import CallActive, CallEnded, CallEvent, CallInitiated, MediaReported, SessionCreated
from .calllog.sql import SessionRow
from .config import Config
from .exceptions import Capacity, LifecycleError
from .ice import IceServers
from .lifecycle import (
    ConnectionEvent,
    ConnectionLifecycle,
    ConnectionState,
    EndReason,
    SessionEvent,
    SessionState,
)
from .media import Media, MediaChange
from .messages import MessageError
from .metrics import Metrics
from .ratelimit import TokenBucket
from .sessions import Registry, Seat, Session, SessionStore
from .tokens import TokenMinter

__all__ = ["Admission", "CallLog", "Client", "Clock", "Peer", "Signaling", "Timer"]

log = logging.getLogger("intaleq_signal.signaling")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012  # RFC 6455 §7.4.1 (IANA registry): reconnect and carry on
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011  # used for heartbeat timeout, as websockets' keepalive does
CLOSE_UNAUTHORIZED = 4001
CLOSE_REPLACED = 4002

#: Bound on a closing handshake (seconds); past it the TCP connection is
#: aborted (a peer that stopped reading never lets the close frame out).
#: Applied by the connection (``close_timeout``), not by the engine.
CLOSE_TIMEOUT = 2.0

_AUTHENTICATED = ConnectionState.AUTHENTICATED
_CONNECTED = ConnectionState.CONNECTED
_DISCONNECT_REASON = {"driver": EndReason.DISCONNECT_DRIVER, "passenger": EndReason.DISCONNECT_PASSENGER}


class Timer(Protocol):
    """A pending call armed on a :class:`Clock`."""

    def cancel(self) -> None:
        """Do not call it (a no-op once it ran or was cancelled)."""
        ...


class Clock(Protocol):
    """The engine's time and timers.

    ``time`` is monotonic seconds: every timer, deadline, rate-limit bucket,
    :attr:`Peer.last_received` and relay latency is on this clock. ``wall``
    is epoch seconds, for the times of call-log events only.
    """

    def time(self) -> float: ...

    def wall(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call ``callback(*args)`` once :meth:`time` reaches ``when``."""
        ...

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call ``callback(*args)`` ``delay`` seconds from now."""
        ...


class Peer(Protocol):
    """One WebSocket connection as the engine sees it
    (:class:`~intaleq_signal.wire.HTTPServerConnection` in production).

    Attributes:
        ip: the client IP, for logs.
        last_received: :meth:`Clock.time` seconds of the latest bytes
            received (a message, a pong, any byte).
        is_open: whether a frame sent now could go out. Once False, the
            connection tells the engine :meth:`Signaling.closing`.
    """

    @property
    def ip(self) -> str: ...

    @property
    def last_received(self) -> float: ...

    @property
    def is_open(self) -> bool: ...

    def send_text(self, text: str) -> bool:
        """Queue one text frame; True only if it was written to (queued on)
        an open socket, False and nothing sent otherwise."""
        ...

    def close_soon(self, code: int, reason: str) -> None:
        """Start the closing handshake (RFC 6455 §7.1.2) without blocking;
        a no-op unless open. Afterwards the peer is not open."""
        ...

    def send_ping(self) -> None:
        """Send a WebSocket ping (RFC 6455 §5.5.2)."""
        ...


class CallLog(Protocol):
    """Where call-log events go (:class:`~intaleq_signal.calllog.CallLogWriter`):
    ``record`` is O(1) and never blocks."""

    def record(self, event: CallEvent) -> None: ...


class Admission(Protocol):
    """Where the engine tells how each connection's authentication ends, for
    the per-IP upgrade limits (:class:`~intaleq_signal.ratelimit.UpgradeAdmission`,
    docs/protocol.md, "Connecting"): :meth:`started` once per connection,
    then exactly one of :meth:`authenticated` (its first join) or
    :meth:`ended_unauthenticated` (refused, timed out, closed or lost
    before joining)."""

    def started(self, ip: str) -> None: ...

    def authenticated(self, ip: str) -> None: ...

    def ended_unauthenticated(self, ip: str, now: float) -> None:
        """``now``: :meth:`Clock.time`."""
        ...


class _NoAdmission:
    """An :class:`Admission` that keeps nothing (no per-IP limits)."""

    __slots__ = ()

    def started(self, ip: str) -> None:
        pass

    def authenticated(self, ip: str) -> None:
        pass

    def ended_unauthenticated(self, ip: str, now: float) -> None:
        pass


class Client:
    """The engine's state for one connection. ``__slots__`` keeps it to a
    few hundred bytes.

    The three methods below are the engine's connection inputs bound to this
    client, for drivers that deliver by callback (no closure or partial per
    connection).
    """

    __slots__ = ("engine", "peer", "lifecycle", "seat", "session", "bucket", "auth_timer")

    def __init__(self, engine: Signaling, peer: Peer, now: float) -> None:
        self.engine = engine
        self.peer = peer
        self.lifecycle = ConnectionLifecycle()
        self.seat: Seat | None = None
        self.session: Session | None = None
        self.bucket = TokenBucket(now)
        self.auth_timer: Timer | None = None

    @property
    def ip(self) -> str:
        return self.peer.ip

    def send(self, text: str) -> bool:
        """Send one text frame: False, and nothing sent, once the socket is
        no longer open for sending. Server notices to such a socket are not
        kept: :meth:`Signaling.closing` makes the participant absent, and a
        participant that comes back learns the state of the call from its
        join."""
        return self.peer.send_text(text)

    def message_received(self, message: str | bytes) -> None:
        """:meth:`Signaling.message_received` for this client."""
        self.engine.message_received(self, message)

    def frame_received(self) -> None:
        """:meth:`Signaling.frame_received` for this client."""
        self.engine.frame_received(self)

    def closing(self) -> None:
        """:meth:`Signaling.closing` for this client."""
        self.engine.closing(self)


class Signaling:
    """The protocol engine of one process.

    Args:
        config: validated settings (durations in seconds).
        calllog: where call-log events go.
        metrics: counters to bump.
        clock: time and timers (see :class:`Clock`).
        sessions: where sessions live; by default an in-process
            :class:`~intaleq_signal.sessions.Registry`.
        admission: told how each connection's authentication ends (the
            per-IP upgrade limits); by default nobody.
    """

    def __init__(
        self,
        config: Config,
        calllog: CallLog,
        metrics: Metrics,
        clock: Clock,
        sessions: SessionStore | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.calllog = calllog
        self.metrics = metrics
        self.clock = clock
        self.sessions: SessionStore = (
            sessions if sessions is not None else Registry(config.session_duration, config.max_sessions)
        )
        self.admission: Admission = admission if admission is not None else _NoAdmission()
        #: Every connection from :meth:`connected` until :meth:`closed`.
        self.clients: set[Client] = set()
        #: False from :meth:`shutdown` on: no new sessions or connections.
        self.accepting = True
        self._now = clock.time  # read per frame: looked up once
        #: Mints and checks participant tokens (``API_KEY``-derived).
        self.tokens = TokenMinter(config.api_key)
        #: STUN/TURN servers for the apps, TURN credentials per role.
        self.ice = IceServers(config.ice_servers, config.turn_secret, config.turn_ttl)

    # -- sessions (HTTP side) ----------------------------------------------

    def create_session(
        self, ride_id: str, driver_id: str, passenger_id: str, session_id: str | None = None
    ) -> tuple[Session, bool]:
        """``POST /sessions`` after validation: ``(session, created)``, see
        :meth:`SessionStore.create` (``session_id``: the id the shared state
        gave it, with several instances); a new session's expiry timer is
        armed (docs/protocol.md, "POST /sessions" and rule 3).

        Raises:
            RideConflict, Capacity: as :meth:`SessionStore.create`.
        """
        now = self._now()
        session, created = self.sessions.create(
            ride_id, driver_id, passenger_id, now, accepting=self.accepting, session_id=session_id
        )
        if created:
            session.timer = self.clock.call_at(session.deadline, self._deadline_reached, session)
            self.calllog.record(
                SessionCreated(
                    session.session_id,
                    ride_id,
                    driver_id,
                    passenger_id,
                    self.clock.wall(),
                    self.config.node_id,
                )
            )
            self.metrics.sessions_created += 1
            log.info("session created session=%s ride=%s", session.session_id, ride_id)
        return session, created

    def check_capacity(self) -> None:
        """Whether a new session can be taken here now.

        Raises:
            Capacity: ``MAX_SESSIONS`` live sessions, or shutting down.
        """
        if not self.accepting or self.sessions.live >= self.config.max_sessions:
            raise Capacity()

    # -- connection inputs ----------------------------------------------------

    def connected(self, peer: Peer) -> Client:
        """A WebSocket connection was upgraded: its :class:`Client`, with
        the ``AUTH_TIMEOUT`` timer armed (docs/protocol.md, rule 1)."""
        client = Client(self, peer, self._now())
        client.auth_timer = self.clock.call_later(self.config.auth_timeout, self._auth_expired, client)
        self.clients.add(client)
        self.admission.started(peer.ip)
        return client

    def frame_received(self, client: Client) -> None:
        """A frame other than a whole unfragmented message — a fragment, a
        ping, a pong (solicited or not), a close frame: every frame counts
        against the message rate (docs/protocol.md, rule 7)."""
        state = client.lifecycle.state
        if (state is _AUTHENTICATED or state is _CONNECTED) and not client.bucket.take(self._now()):
            self._rate_limited(client)

    def message_received(self, client: Client, message: str | bytes) -> None:
        """One whole message, ``str`` for a text frame, ``bytes`` for a
        binary one (docs/protocol.md, rules 1, 2, 4, 5, 7, 8 and
        "media_state")."""
        state = client.lifecycle.state
        if state is _AUTHENTICATED:
            if not client.bucket.take(self._now()):
                return self._rate_limited(client)
            if type(message) is not str:
                return client.send(msg.UNSUPPORTED_FRAME)
            try:
                kind, obj = msg.decode(message)
                if kind in msg.RELAYED_TYPES:
                    return self._relay(client, kind, obj)
                if kind == "media_state":
                    return self._media_state(client, obj)
            except MessageError as exc:
                return client.send(msg.error(exc.code, exc.message))
            if kind == "heartbeat":
                client.send(msg.PONG)
            elif kind == "end_call":
                self.end(client.session, EndReason.USER_TERMINATED)  # type: ignore[arg-type]
            else:  # authenticate
                client.send(msg.error("already_authenticated", "this connection is already authenticated"))
        elif state is _CONNECTED:
            if not client.bucket.take(self._now()):
                return self._rate_limited(client)
            self._authenticate(client, message)
        # REPLACED or CLOSED: a stale socket speaks for nobody.

    def closing(self, client: Client) -> None:
        """The socket stopped being open for sending, for whatever reason:
        the participant's disconnect. Later calls, and those for a
        connection that never joined or was replaced, change nothing
        (docs/protocol.md, rules 2, 6)."""
        if client.auth_timer is not None:
            client.auth_timer.cancel()
            client.auth_timer = None
        was = client.lifecycle.state
        client.lifecycle.close()
        if was is not _AUTHENTICATED:
            if was is _CONNECTED:  # closed before it joined
                self.admission.ended_unauthenticated(client.ip, self._now())
            return  # never joined, replaced, or already closed
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
                seat.grace = self.clock.call_later(
                    self.config.reconnect_grace, self._grace_over, session, seat
                )

    def handed_over(self, client: Client) -> None:
        """A connection that authenticates for a session another instance
        runs: its messages go there from now on (docs/design.md, "Several
        instances"). This engine forgets it; its authentication is not
        counted as failed here (the instance running the session decides)."""
        if client.auth_timer is not None:
            client.auth_timer.cancel()
            client.auth_timer = None
        if client.lifecycle.state is _CONNECTED:
            client.lifecycle.close()
            self.admission.authenticated(client.ip)
        self.clients.discard(client)

    def closed(self, client: Client) -> None:
        """The TCP connection is gone: the client is forgotten (and, if
        :meth:`closing` was never told, this is its disconnect)."""
        self.clients.discard(client)
        self.closing(client)

    # -- authentication -----------------------------------------------------

    def _authenticate(self, client: Client, message: str | bytes) -> None:
        """The first message (docs/protocol.md, rule 1 and "Precise
        points"): refusals in the rule's order, else the join."""
        if type(message) is not str:
            return self._refuse(client, "not_authenticated")
        try:
            kind, obj = msg.decode(message)
        except MessageError:
            return self._refuse(client, "not_authenticated")
        if kind != "authenticate":
            return self._refuse(client, "not_authenticated")
        try:
            session_id, user_id = msg.parse_authenticate(obj)
            token = msg.parse_token(obj)
        except MessageError:
            return self._refuse(client, "invalid_message")
        session = self.sessions.get(session_id)
        if session is None:
            log.info("unknown session=%s ip=%s", session_id, client.ip)
            return self._refuse(client, "session_not_found")
        if session.state is SessionState.ENDED:
            expired = session.lifecycle.end_reason is EndReason.EXPIRED
            return self._refuse(client, "session_expired" if expired else "session_ended")
        if self._now() >= session.deadline:  # its timer is about to fire
            active = session.state is SessionState.ACTIVE
            return self._refuse(client, "session_ended" if active else "session_expired")
        seat = session.seat_of(user_id)
        if seat is None:
            return self._refuse(client, "user_not_in_session")
        mode = self.config.participant_tokens
        if mode != "off" and (
            (token is None and mode == "required")
            or (token is not None and not self.tokens.check(session.session_id, seat.role, token))
        ):  # docs/protocol.md, "Participant tokens"
            return self._refuse(client, "invalid_token")
        if not client.peer.is_open:
            # Closed in the chunk that carried its authenticate (a close
            # frame or a protocol error right behind it): it cannot be told
            # it joined, and it is absent from the moment it closed, so it
            # never joins — no replacement of a live socket, no
            # participant_joined, the held messages stay held.
            log.info("participant gone before joining session=%s role=%s", session.session_id, seat.role)
            return
        self._join(client, session, seat)

    def _ice(self, session: Session, seat: Seat) -> list[dict[str, Any]] | None:
        """Fresh ``ice_servers`` for ``seat``'s app, or None without
        ``ICE_SERVERS`` (docs/protocol.md, "ICE servers")."""
        if not self.ice:
            return None
        return self.ice.for_participant(session.session_id, seat.role, self.clock.wall())

    def _refuse(self, client: Client, reason: str) -> None:
        """``unauthorized`` with ``reason``, then close 4001 (rule 1)."""
        self.metrics.connections_rejected[reason] += 1
        log.info("connection refused reason=%s ip=%s", reason, client.ip)
        client.send(msg.unauthorized(reason))
        if client.lifecycle.state is _CONNECTED:  # it never joined
            self.admission.ended_unauthenticated(client.ip, self._now())
        client.lifecycle.close()
        self._close(client, CLOSE_UNAUTHORIZED, reason)

    def _auth_expired(self, client: Client) -> None:
        client.auth_timer = None
        if client.lifecycle.state is _CONNECTED:
            self._refuse(client, "auth_timeout")

    def _join(self, client: Client, session: Session, seat: Seat) -> None:
        """Bind the connection to its seat (first join, reconnect or
        replacement) and tell both sides (docs/protocol.md, rules 2, 3)."""
        if client.auth_timer is not None:
            client.auth_timer.cancel()
            client.auth_timer = None
        client.lifecycle.handle(ConnectionEvent.AUTHENTICATE)
        self.admission.authenticated(client.ip)  # from CONNECTED: once per connection
        client.seat, client.session = seat, session
        old = seat.conn
        if old is not None and old.lifecycle.state is _AUTHENTICATED:  # not one closed by a handoff
            old.lifecycle.handle(ConnectionEvent.REPLACE)
            old.send(msg.error("replaced", "a newer connection of this participant took over"))
            self._close(old, CLOSE_REPLACED, "replaced")
        seat.conn = client
        if seat.grace is not None:
            seat.grace.cancel()
            seat.grace = None
        if session.state is SessionState.CREATED:
            session.lifecycle.handle(SessionEvent.FIRST_JOIN)
        log.info("participant joined session=%s role=%s ip=%s", session.session_id, seat.role, client.ip)
        client.send(msg.authenticated(seat.user_id))
        client.send(
            msg.session_joined(session.session_id, session.ride_id, seat.role, self._ice(session, seat))
        )
        peer = session.other(seat)
        if peer.conn is not None:
            client.send(msg.participant_joined(peer.role, self._ice(session, seat)))
            peer.conn.send(msg.participant_joined(seat.role, self._ice(session, peer)))
            if session.state is SessionState.WAITING:
                self._activate(session)
        held = seat.take_held()
        if held:
            self._deliver_held(client, seat, held)

    def _activate(self, session: Session) -> None:
        """Both are connected for the first time: the call starts, and its
        deadline moves to ``SESSION_DURATION`` after now (rule 3)."""
        now = self._now()
        session.lifecycle.handle(SessionEvent.BOTH_CONNECTED)
        session.connected = now
        session.deadline = now + self.config.session_duration
        if session.timer is not None:
            session.timer.cancel()
        session.timer = self.clock.call_at(session.deadline, self._deadline_reached, session)
        self.calllog.record(CallActive(session.session_id, self.clock.wall()))
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
        """Rebuild, then write to the peer's socket, or hold it for the peer
        while the peer is absent (or its socket just stopped being open), or
        refuse it with ``peer_not_connected`` when the hold queue is full.
        Only a message written to an open socket counts as relayed
        (docs/protocol.md, rule 4).

        Raises:
            MessageError: ``invalid_message`` (answered by the caller).
        """
        payload = msg.relay_payload(kind, obj)
        seat, session = client.seat, client.session
        assert seat is not None and session is not None
        if kind == "offer" and session.initiated_by is None:
            session.initiated_by = seat.user_id
            self.calllog.record(CallInitiated(session.session_id, seat.user_id))
        peer = session.other(seat)
        conn = peer.conn
        if conn is not None:
            if conn.peer.send_text(payload):
                metrics = self.metrics
                metrics.relay_latency.observe(self._now() - client.peer.last_received)
                metrics.messages_relayed += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "relayed %s session=%s from=%s: %s", kind, session.session_id, seat.role, payload
                    )
                return
            # Its TCP connection was lost in this loop pass, and its
            # closing is still to come: it is absent from now
            # (participant_left to the sender first, then the hold).
            self.closing(conn)
            if session.state is SessionState.ENDED:  # no reconnect grace: the call ended with it
                return
        if not peer.hold(payload):
            return client.send(msg.error("peer_not_connected", "the other participant is not connected"))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("held %s session=%s from=%s: %s", kind, session.session_id, seat.role, payload)

    # -- media_state ----------------------------------------------------------

    def _media_state(self, client: Client, obj: dict[str, Any]) -> None:
        """A participant's report of its peer connection (docs/protocol.md,
        "media_state"): neither relayed nor answered; what it changes of the
        session's media columns is recorded, with their values after it.

        Raises:
            MessageError: ``invalid_message`` (answered by the caller).
        """
        state, candidate_type = msg.parse_media_state(obj)
        seat, session = client.seat, client.session
        assert seat is not None and session is not None
        media = session.media
        if media is None:
            media = session.media = Media()
        change = media.report(seat.role, state, candidate_type, self.clock.wall())
        if change is None:
            return
        self.calllog.record(MediaReported(session.session_id, **media.columns()))
        self._count_media(session, seat.role, change)

    def _count_media(self, session: Session, role: str, change: MediaChange) -> None:
        """The media metrics (docs/protocol.md, "GET /metrics") and log
        lines of one report's ``change``."""
        metrics = self.metrics
        if change.media_connected:
            metrics.media_connected_calls += 1
            started = session.connected
            if started is not None:  # a call that never became active has no start to count from
                metrics.media_connect_time.observe(max(0.0, self._now() - started))
            log.info("media connected session=%s", session.session_id)
        if change.candidate is not None:
            metrics.media_candidates[change.candidate] += 1
        if change.failures:
            metrics.media_failures += 1
            if change.failures == 1:
                metrics.media_failed_calls += 1
            log.info("media failed session=%s role=%s failures=%d", session.session_id, role, change.failures)

    # -- endings ------------------------------------------------------------

    def end(self, session: Session, reason: EndReason) -> None:
        """End a live session: tell and close both sockets, record the end
        (docs/protocol.md, rules 3, 5, 6 and "End reasons"). It is
        remembered for ``SESSION_DURATION`` afterwards so late joins get a
        precise refusal.

        Raises:
            LifecycleError: ``reason`` is not legal in the session's state.
        """
        now = self._now()
        self.sessions.end(session, reason, now)
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
        self.calllog.record(CallEnded(session.session_id, reason.value, self.clock.wall()))
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
        session.timer = self.clock.call_later(self.config.session_duration, self.sessions.forget, session)

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
        """``error`` ``rate_limited``, then close 1008; for the session this
        is a disconnect like any other (docs/protocol.md, rules 6, 7)."""
        self.metrics.connections_rejected["rate_limited"] += 1
        log.info("connection rate limited ip=%s", client.ip)
        client.send(msg.error("rate_limited", "more than 50 messages per second"))
        self.closing(client)
        self._close(client, CLOSE_POLICY, "rate limited")

    def _close(self, client: Client, code: int, reason: str) -> None:
        """Start the closing handshake without blocking the caller. The
        caller has already moved the connection's lifecycle out of the way,
        so the :meth:`closing` this causes changes nothing."""
        client.peer.close_soon(code, reason)

    # -- heartbeat ----------------------------------------------------------

    def sweep(self, ping: bool) -> None:
        """One heartbeat pass (docs/protocol.md, rule 8): close with 1011 the
        open connections with nothing received for ``HEARTBEAT_TIMEOUT``
        seconds, a network loss for the session (rule 6); ping the other
        open ones when ``ping`` is set."""
        now = self._now()  # the clock of last_received
        timeout = self.config.heartbeat_timeout
        for client in list(self.clients):
            peer = client.peer
            if not peer.is_open:
                continue
            if now - peer.last_received >= timeout:
                log.info("heartbeat timeout ip=%s", client.ip)
                self.closing(client)  # a dead peer is a network loss (rule 6)
                self._close(client, CLOSE_INTERNAL, "heartbeat timeout")
            elif ping:
                peer.send_ping()

    # -- shutdown -----------------------------------------------------------

    def shutdown(self, handoff: bool = False) -> None:
        """Refuse new sessions and upgrades, then either hand the calls to
        the next process (``handoff``: every socket closed with 1012, no
        ``call_ended``, no timer left to fire, sessions left open in the
        call log) or end live calls with ``server_shutdown`` (close 1001)
        and close the other sockets with 1001 (docs/protocol.md, "Close
        codes"; docs/operations.md, "Restarts")."""
        self.accepting = False
        if handoff:
            for session in self.sessions.live_sessions():
                _cancel_timers(session)
            code, reason = CLOSE_SERVICE_RESTART, "service restart"
        else:
            for session in self.sessions.live_sessions():
                self.end(session, EndReason.SERVER_SHUTDOWN)
            code, reason = CLOSE_GOING_AWAY, "server stopping"
        for client in list(self.clients):
            was = client.lifecycle.state
            if client.lifecycle.close():  # closed first: its close is nobody's disconnect
                if was is _CONNECTED:
                    self.admission.ended_unauthenticated(client.ip, self._now())
                self._close(client, code, reason)

    def release(self, session: Session) -> None:
        """Let go of a live session another instance runs now (several
        instances: this one was cut off from the others long enough to be
        taken for dead; docs/design.md, "Several instances"): its sockets
        here close with 1012, so the apps reconnect and reach the session
        where it is run; nothing ends, nothing is recorded."""
        _cancel_timers(session)
        for seat in (session.driver, session.passenger):
            conn = seat.conn
            if conn is not None:
                seat.conn = None
                conn.lifecycle.close()
                self._close(conn, CLOSE_SERVICE_RESTART, "service restart")
        self.sessions.forget(session)
        log.info("session released session=%s", session.session_id)

    def restore(self, rows: list[SessionRow]) -> int:
        """Take back the sessions a previous process of this instance left
        (docs/operations.md, "Restarts"): ``rows`` as the call log holds
        them. A session not yet active is joinable until its expiry; an
        active call keeps ``connected_at`` and its deadline, and each
        participant, absent, has ``RECONNECT_GRACE`` from now to come back
        (messages for it are held meanwhile); an ended one is remembered
        for ``SESSION_DURATION`` after its end, so a late join gets
        ``session_ended`` / ``session_expired``; the media progress goes on
        from the row's (docs/protocol.md, "media_state"). What fell due
        while no process ran ends now, recorded with its own reason at its
        own time (``expired`` at the expiry, ``max_duration_reached`` at
        the deadline). Returns the number of live sessions restored."""
        wall, now = self.clock.wall(), self._now()
        duration = self.config.session_duration
        live = 0
        for row in rows:
            session = Session(row.session_id, row.ride_id, row.driver_id, row.passenger_id, now, duration)
            session.initiated_by = row.initiated_by
            if row.media is not None:
                session.media = dataclasses.replace(row.media)  # its own copy: it changes
            session.created = now + (row.created_at - wall)
            if row.connected_at is not None:
                session.connected = now + (row.connected_at - wall)
                session.lifecycle.handle(SessionEvent.FIRST_JOIN)
                session.lifecycle.handle(SessionEvent.BOTH_CONNECTED)
            due = (row.connected_at if row.connected_at is not None else row.created_at) + duration
            session.deadline = now + (due - wall)
            if row.status == "ended":
                self._restore_ended(session, _end_reason(row.end_reason), row.ended_at or wall)
                continue
            if due <= wall:  # fell due while no process ran
                reason = EndReason.MAX_DURATION_REACHED if row.connected_at is not None else EndReason.EXPIRED
                self._restore_ended(session, reason, due)
                self.calllog.record(CallEnded(session.session_id, reason.value, due))
                self.metrics.calls_ended[reason.value] += 1
                continue
            self.sessions.add(session)
            session.timer = self.clock.call_at(session.deadline, self._deadline_reached, session)
            if session.state is SessionState.ACTIVE:
                for seat in (session.driver, session.passenger):
                    seat.grace = self.clock.call_later(
                        self.config.reconnect_grace, self._grace_over, session, seat
                    )
            live += 1
        log.info("restored %d live sessions (%d rows)", live, len(rows))
        return live

    def _restore_ended(self, session: Session, reason: EndReason, ended_at: float) -> None:
        """Remember an ended session until ``SESSION_DURATION`` after its end."""
        try:
            session.lifecycle.end(reason)
        except LifecycleError:  # server_restart, or a reason the state never allows: ended all the same
            session.lifecycle.state = SessionState.ENDED
            session.lifecycle.end_reason = reason
        session.ended = self._now() + (ended_at - self.clock.wall())
        forget_at = session.ended + self.config.session_duration
        if forget_at <= self._now():
            return
        self.sessions.add(session)
        session.timer = self.clock.call_at(forget_at, self.sessions.forget, session)


def _cancel_timers(session: Session) -> None:
    """No timer of ``session`` left to fire: its deadline (or forget) timer
    and both seats' grace timers."""
    for timer in (session.timer, session.driver.grace, session.passenger.grace):
        if timer is not None:
            timer.cancel()
    session.timer = session.driver.grace = session.passenger.grace = None


def _end_reason(text: str | None) -> EndReason:
    """A row's ``end_reason`` (an unknown one, from a newer version, reads
    as ``server_restart``: ended, for reasons this process cannot tell)."""
    try:
        return EndReason(text or "")
    except ValueError:
        return EndReason.SERVER_RESTART
