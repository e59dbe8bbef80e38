"""The session and connection lifecycles as explicit state machines.

As in h11's ``_state.py``, each machine is a table keyed by
``(state, event)`` whose value is the next state: every legal move is one
entry of data, and a pair missing from the table is illegal. The machines
hold no sockets and no timers: the signaling engine decides which event
happened and calls ``handle(event)``; a pair not in the table is a bug and
raises :class:`LifecycleError` instead of being silently ignored
(docs/protocol.md, rules 1–3, 5, 6).

:func:`transition` is the one lookup all tables share (the HTTP front's
``FRONT_TRANSITIONS`` too); :mod:`intaleq_signal.diagrams` draws each table
as the Mermaid diagram of docs/design.md, "State machines".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

from .exceptions import LifecycleError

__all__ = [
    "CONNECTION_TRANSITIONS",
    "END_EVENTS",
    "SESSION_TRANSITIONS",
    "ConnectionEvent",
    "ConnectionLifecycle",
    "ConnectionState",
    "EndReason",
    "LifecycleError",
    "SessionEvent",
    "SessionLifecycle",
    "SessionState",
    "transition",
]

StateT = TypeVar("StateT", bound=enum.Enum)
EventT = TypeVar("EventT", bound=enum.Enum)


def transition(table: Mapping[tuple[StateT, EventT], StateT], state: StateT, event: EventT) -> StateT:
    """The state ``event`` leads to from ``state``.

    Raises:
        LifecycleError: ``(state, event)`` is not in ``table``.
    """
    try:
        return table[state, event]
    except KeyError:
        raise LifecycleError(
            f"{type(state).__name__} {state.name.lower()} has no move on {event.name.lower()}"
        ) from None


# -- sessions -----------------------------------------------------------------


class SessionState(enum.Enum):
    """docs/protocol.md, rule 3."""

    CREATED = "created"  # pre-created by the backend, nobody joined yet
    WAITING = "waiting"  # one participant has joined, the other has not yet
    ACTIVE = "active"  # both were connected at least once (the call started)
    ENDED = "ended"  # terminal, with an EndReason


class EndReason(enum.StrEnum):
    """Why a session ended; the value is what the call log and clients see
    (docs/protocol.md, "End reasons")."""

    USER_TERMINATED = "user_terminated"
    MAX_DURATION_REACHED = "max_duration_reached"
    DISCONNECT_DRIVER = "disconnect_driver"
    DISCONNECT_PASSENGER = "disconnect_passenger"
    EXPIRED = "expired"
    SERVER_SHUTDOWN = "server_shutdown"
    SERVER_RESTART = "server_restart"


class SessionEvent(enum.Enum):
    """What moves a session: a join, the start of the call, and one end
    event per :class:`EndReason` (same names; ``SERVER_RESTART`` is never
    legal: it is written to the call log at start for rows a killed process
    left open, not handled by a live session)."""

    FIRST_JOIN = "the first participant authenticated"
    BOTH_CONNECTED = "both participants are connected for the first time"
    USER_TERMINATED = "a participant sent end_call (rule 5)"
    MAX_DURATION_REACHED = "SESSION_DURATION after connected_at (rule 3)"
    DISCONNECT_DRIVER = "the driver did not come back within RECONNECT_GRACE (rule 6)"
    DISCONNECT_PASSENGER = "the passenger did not come back within RECONNECT_GRACE (rule 6)"
    EXPIRED = "SESSION_DURATION after creation, never active (rule 3)"
    SERVER_SHUTDOWN = "the server is stopping"
    SERVER_RESTART = "call log only: a killed process's open rows, at the next start"


#: The end event of each end reason, and back.
END_EVENTS: dict[EndReason, SessionEvent] = {reason: SessionEvent[reason.name] for reason in EndReason}
_END_REASONS: dict[SessionEvent, EndReason] = {event: reason for reason, event in END_EVENTS.items()}

_S, _E = SessionState, SessionEvent
#: Ended before the call started: by its deadline, ``end_call`` or a shutdown.
_BEFORE_CALL = (_E.EXPIRED, _E.USER_TERMINATED, _E.SERVER_SHUTDOWN)
_DURING_CALL = (
    _E.USER_TERMINATED,
    _E.MAX_DURATION_REACHED,
    _E.DISCONNECT_DRIVER,
    _E.DISCONNECT_PASSENGER,
    _E.SERVER_SHUTDOWN,
)

#: ``(state, event) -> next state`` (docs/protocol.md, rules 3, 5, 6).
SESSION_TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (_S.CREATED, _E.FIRST_JOIN): _S.WAITING,
    **{(_S.CREATED, event): _S.ENDED for event in _BEFORE_CALL},
    (_S.WAITING, _E.BOTH_CONNECTED): _S.ACTIVE,
    **{(_S.WAITING, event): _S.ENDED for event in _BEFORE_CALL},
    **{(_S.ACTIVE, event): _S.ENDED for event in _DURING_CALL},
}


class SessionLifecycle:
    """created → waiting → active → ended (docs/protocol.md, rule 3).

    Attributes:
        state: the current :class:`SessionState`.
        end_reason: the :class:`EndReason` once ended, else None.
    """

    __slots__ = ("state", "end_reason")

    def __init__(self) -> None:
        self.state = SessionState.CREATED
        self.end_reason: EndReason | None = None

    @property
    def live(self) -> bool:
        return self.state is not SessionState.ENDED

    def handle(self, event: SessionEvent) -> None:
        """Move on ``event`` (an end event also sets :attr:`end_reason`).

        Raises:
            LifecycleError: no move for ``event`` in the current state;
            nothing changes.
        """
        self.state = transition(SESSION_TRANSITIONS, self.state, event)
        reason = _END_REASONS.get(event)
        if reason is not None:
            self.end_reason = reason

    def end(self, reason: EndReason) -> None:
        """``handle`` the end event of ``reason``.

        Raises:
            LifecycleError: ``reason`` is not legal in the current state.
        """
        self.handle(END_EVENTS[reason])


# -- connections --------------------------------------------------------------


class ConnectionState(enum.Enum):
    """docs/protocol.md, rules 1 and 2."""

    CONNECTED = "connected"  # WebSocket open, authenticate not yet received
    AUTHENTICATED = "authenticated"  # bound to one participant of one session
    REPLACED = "replaced"  # superseded by a newer socket of the same participant
    CLOSED = "closed"  # terminal


class ConnectionEvent(enum.Enum):
    AUTHENTICATE = "a well-formed authenticate was accepted (rule 1)"
    REPLACE = "a newer socket of the same participant authenticated (rule 2)"
    CLOSE = "the socket stopped being open for sending, or the server closes it"


_C, _CE = ConnectionState, ConnectionEvent

#: ``(state, event) -> next state`` (docs/protocol.md, rules 1, 2). Closing
#: a closed connection is a legal no-op: both sides can close at once.
CONNECTION_TRANSITIONS: dict[tuple[ConnectionState, ConnectionEvent], ConnectionState] = {
    (_C.CONNECTED, _CE.AUTHENTICATE): _C.AUTHENTICATED,
    (_C.CONNECTED, _CE.CLOSE): _C.CLOSED,
    (_C.AUTHENTICATED, _CE.REPLACE): _C.REPLACED,
    (_C.AUTHENTICATED, _CE.CLOSE): _C.CLOSED,
    (_C.REPLACED, _CE.CLOSE): _C.CLOSED,
    (_C.CLOSED, _CE.CLOSE): _C.CLOSED,
}


class ConnectionLifecycle:
    """connected → authenticated → (replaced →) closed (docs/protocol.md,
    rules 1, 2).

    Only an ``AUTHENTICATED`` connection speaks for its participant; every
    event of a replaced or closed one is ignored by the signaling engine.
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = ConnectionState.CONNECTED

    def handle(self, event: ConnectionEvent) -> None:
        """Move on ``event``.

        Raises:
            LifecycleError: no move for ``event`` in the current state;
            nothing changes.
        """
        self.state = transition(CONNECTION_TRANSITIONS, self.state, event)

    def close(self) -> bool:
        """``handle(CLOSE)``; True when this closed it, False when it was
        closed already."""
        was = self.state
        self.handle(ConnectionEvent.CLOSE)
        return was is not ConnectionState.CLOSED
