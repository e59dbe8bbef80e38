"""The session and connection lifecycles as explicit state machines.

The legal transitions are written down once, as data, in the tables below
(SPEC §4 rules 1–3, 5, 6). The machines hold no sockets and no timers: the
signaling layer asks them to move, and an illegal move is a bug that raises
:class:`LifecycleError` instead of being silently ignored.
"""

from __future__ import annotations

import enum

from .exceptions import LifecycleError

__all__ = [
    "ConnectionLifecycle",
    "ConnectionState",
    "EndReason",
    "LifecycleError",
    "SessionLifecycle",
    "SessionState",
]


class SessionState(enum.Enum):
    CREATED = "created"  # pre-created by the backend, nobody joined yet
    WAITING = "waiting"  # one participant has joined, the other has not yet
    ACTIVE = "active"  # both were connected at least once (the call started)
    ENDED = "ended"  # terminal, with an EndReason


class EndReason(enum.StrEnum):
    """Why a session ended; the value is what the call log and clients see
    (SPEC §5)."""

    USER_TERMINATED = "user_terminated"
    MAX_DURATION_REACHED = "max_duration_reached"
    DISCONNECT_DRIVER = "disconnect_driver"
    DISCONNECT_PASSENGER = "disconnect_passenger"
    EXPIRED = "expired"
    SERVER_SHUTDOWN = "server_shutdown"
    SERVER_RESTART = "server_restart"


_BEFORE_CALL = frozenset({EndReason.EXPIRED, EndReason.USER_TERMINATED, EndReason.SERVER_SHUTDOWN})

#: state -> {next state: end reasons allowed for that move (ENDED only)}.
SESSION_TRANSITIONS: dict[SessionState, dict[SessionState, frozenset[EndReason]]] = {
    SessionState.CREATED: {
        SessionState.WAITING: frozenset(),
        SessionState.ENDED: _BEFORE_CALL,
    },
    SessionState.WAITING: {
        SessionState.ACTIVE: frozenset(),
        SessionState.ENDED: _BEFORE_CALL,
    },
    SessionState.ACTIVE: {
        SessionState.ENDED: frozenset(
            {
                EndReason.USER_TERMINATED,
                EndReason.MAX_DURATION_REACHED,
                EndReason.DISCONNECT_DRIVER,
                EndReason.DISCONNECT_PASSENGER,
                EndReason.SERVER_SHUTDOWN,
            }
        ),
    },
    SessionState.ENDED: {},
}


class SessionLifecycle:
    """created → waiting → active → ended (SPEC §4 rule 3)."""

    __slots__ = ("state", "end_reason")

    def __init__(self) -> None:
        self.state = SessionState.CREATED
        self.end_reason: EndReason | None = None

    @property
    def live(self) -> bool:
        return self.state is not SessionState.ENDED

    def _move(self, target: SessionState, reason: EndReason | None = None) -> None:
        allowed = SESSION_TRANSITIONS[self.state]
        if target not in allowed or (target is SessionState.ENDED and reason not in allowed[target]):
            raise LifecycleError(
                f"session cannot go from {self.state.value} to {target.value}"
                + (f" ({reason.value})" if reason else "")
            )
        self.state = target
        if reason is not None:
            self.end_reason = reason

    def first_join(self) -> None:
        """The first participant joined (CREATED → WAITING)."""
        self._move(SessionState.WAITING)

    def activate(self) -> None:
        """Both participants are connected for the first time (WAITING → ACTIVE)."""
        self._move(SessionState.ACTIVE)

    def end(self, reason: EndReason) -> None:
        """End the session; the reason must be legal for the current state."""
        self._move(SessionState.ENDED, reason)


class ConnectionState(enum.Enum):
    CONNECTED = "connected"  # WebSocket open, authenticate not yet received
    AUTHENTICATED = "authenticated"  # bound to one participant of one session
    REPLACED = "replaced"  # superseded by a newer socket of the same participant
    CLOSED = "closed"  # terminal


CONNECTION_TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    ConnectionState.CONNECTED: frozenset({ConnectionState.AUTHENTICATED, ConnectionState.CLOSED}),
    ConnectionState.AUTHENTICATED: frozenset({ConnectionState.REPLACED, ConnectionState.CLOSED}),
    ConnectionState.REPLACED: frozenset({ConnectionState.CLOSED}),
    ConnectionState.CLOSED: frozenset(),
}


class ConnectionLifecycle:
    """connected → authenticated → (replaced →) closed (SPEC §4 rules 1, 2).

    Only an ``AUTHENTICATED`` connection speaks for its participant; every
    event of a replaced or closed one is ignored by the signaling layer.
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = ConnectionState.CONNECTED

    def _move(self, target: ConnectionState) -> None:
        if target not in CONNECTION_TRANSITIONS[self.state]:
            raise LifecycleError(f"connection cannot go from {self.state.value} to {target.value}")
        self.state = target

    def authenticate(self) -> None:
        self._move(ConnectionState.AUTHENTICATED)

    def replace(self) -> None:
        self._move(ConnectionState.REPLACED)

    def close(self) -> bool:
        """Mark closed; returns False when it already was (closing is idempotent
        because a socket can be closed by both sides at once)."""
        if self.state is ConnectionState.CLOSED:
            return False
        self._move(ConnectionState.CLOSED)
        return True
