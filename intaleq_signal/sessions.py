"""Where session state lives: the :class:`SessionStore` interface the
signaling engine talks to, and :class:`Registry`, its in-process
implementation (live and recently ended sessions, one live session per ride).

Pure bookkeeping with the clock passed in (the engine's ``Clock.time()``,
monotonic seconds); the engine owns the timers and attaches their handles to
the records here. Rules: docs/protocol.md, "POST /sessions" (one live
session per ride, ``MAX_SESSIONS``, ``expires_in``) and rule 3 (ended
sessions are remembered for ``SESSION_DURATION``).

A store kept elsewhere (restored from the call log after a restart, or
shared through Redis) implements :class:`SessionStore` and is passed to the
engine instead of a :class:`Registry`.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import TYPE_CHECKING, Protocol

from .exceptions import Capacity, RideConflict
from .lifecycle import EndReason, SessionLifecycle, SessionState

if TYPE_CHECKING:  # pragma: no cover
    from .media import Media
    from .signaling import Client, Timer

__all__ = ["Capacity", "RideConflict", "Registry", "Seat", "Session", "SessionStore", "new_session_id"]

#: docs/protocol.md, rule 4: messages held for an absent participant, per
#: direction (bytes on the wire for the size).
HOLD_MAX_MESSAGES = 64
HOLD_MAX_BYTES = 16 * 1024


def new_session_id() -> str:
    """A random UUID (version 4, RFC 9562 §5.4) in its 36-character text
    form, from 122 random bits of ``os.urandom``: what ``str(uuid.uuid4())``
    gives, in a third of its time (one per ``POST /sessions``)."""
    digits = os.urandom(16).hex()
    variant = "89ab"[int(digits[16], 16) & 3]  # the variant bits 10xx
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


class Seat:
    """One participant's place in a session: who it is, its current
    connection (or None while absent), and what is held for it."""

    __slots__ = ("role", "user_id", "conn", "held", "held_bytes", "grace")

    def __init__(self, role: str, user_id: str) -> None:
        self.role = role
        self.user_id = user_id
        self.conn: Client | None = None  # the engine's connection object, None while absent
        self.held: deque[str] | None = None  # created on first use: most calls never hold
        self.held_bytes = 0
        self.grace: Timer | None = None  # RECONNECT_GRACE timer while absent

    def hold(self, text: str) -> bool:
        """Queue a message for this absent participant; False when the
        64-message / 16 KiB bound is reached (docs/protocol.md, rule 4)."""
        held = self.held
        if held is None:
            held = self.held = deque()
        size = len(text.encode())  # bytes on the wire (holding is the rare path)
        if len(held) >= HOLD_MAX_MESSAGES or self.held_bytes + size > HOLD_MAX_BYTES:
            return False
        held.append(text)
        self.held_bytes += size
        return True

    def take_held(self) -> list[str]:
        """Everything held, oldest first, emptying the queue."""
        held = self.held
        if not held:
            return []
        self.held = None
        self.held_bytes = 0
        return list(held)


class Session:
    """A call session: the two seats, its lifecycle and its times.

    ``created``, ``connected`` and ``ended`` are the engine's clock
    (monotonic seconds); ``deadline`` is when it expires (never active) or
    is cut (active, ``SESSION_DURATION`` after ``connected``). ``media``
    is what the participants reported of their peer connection
    (docs/protocol.md, "media_state"), None until the first report.
    """

    __slots__ = (
        "session_id",
        "ride_id",
        "driver",
        "passenger",
        "lifecycle",
        "created",
        "connected",
        "ended",
        "deadline",
        "initiated_by",
        "timer",
        "media",
    )

    def __init__(
        self, session_id: str, ride_id: str, driver_id: str, passenger_id: str, now: float, duration: float
    ) -> None:
        self.session_id = session_id
        self.ride_id = ride_id
        self.driver = Seat("driver", driver_id)
        self.passenger = Seat("passenger", passenger_id)
        self.lifecycle = SessionLifecycle()
        self.created = now
        self.connected: float | None = None
        self.ended: float | None = None
        self.deadline = now + duration
        self.initiated_by: str | None = None
        self.timer: Timer | None = None  # the deadline (or, once ended, forget) timer
        self.media: Media | None = None

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    def seat_of(self, user_id: str) -> Seat | None:
        if user_id == self.driver.user_id:
            return self.driver
        if user_id == self.passenger.user_id:
            return self.passenger
        return None

    def other(self, seat: Seat) -> Seat:
        return self.passenger if seat is self.driver else self.driver

    def expires_in(self, now: float) -> int:
        """Whole seconds left before ``deadline``, rounded up, never
        negative (docs/protocol.md, "POST /sessions")."""
        return max(0, math.ceil(self.deadline - now - 1e-9))


class SessionStore(Protocol):
    """Where the engine keeps its sessions: everything it asks of session
    state goes through these methods. Times are the engine's clock
    (monotonic seconds)."""

    def create(
        self,
        ride_id: str,
        driver_id: str,
        passenger_id: str,
        now: float,
        *,
        accepting: bool = True,
        session_id: str | None = None,
    ) -> tuple[Session, bool]:
        """``(session, created)``: the ride's live session when the
        participants match (``created`` False), else a new ``created`` one
        with ``deadline`` ``SESSION_DURATION`` after ``now`` (its id
        ``session_id`` when given: chosen by the shared state, else a new
        UUID).

        Raises:
            RideConflict: the ride's live session has other participants.
            Capacity: ``MAX_SESSIONS`` live sessions, or ``accepting`` is
                False; a matching re-POST is never refused.
        """
        ...

    def get(self, session_id: str) -> Session | None:
        """The session with that id, live or ended and not yet forgotten."""
        ...

    def end(self, session: Session, reason: EndReason, now: float) -> None:
        """Move a live session to ``ended``: no longer its ride's live
        session, still found by :meth:`get` until :meth:`forget`.

        Raises:
            LifecycleError: ``reason`` is not legal in the session's state
            (docs/protocol.md, rule 3), or it ended already.
        """
        ...

    def forget(self, session: Session) -> None:
        """Drop a session: its id becomes unknown (an ended one, or a live
        one another instance runs now)."""
        ...

    def add(self, session: Session) -> None:
        """Take in a session restored after a restart, live or ended (its
        ride's live session when live; never refused for capacity)."""
        ...

    @property
    def live(self) -> int:
        """How many sessions are neither ended nor expired."""
        ...

    def live_sessions(self) -> list[Session]:
        """The live sessions (a copy: ending them while iterating is fine)."""
        ...

    def active_calls(self) -> int:
        """How many live sessions are ``active``."""
        ...


class Registry:
    """The in-process :class:`SessionStore`: sessions by id and live
    sessions by ride, in two dicts.

    Args:
        duration: ``SESSION_DURATION`` in seconds.
        max_sessions: ``MAX_SESSIONS``.
    """

    def __init__(self, duration: float, max_sessions: int) -> None:
        self.duration = duration
        self.max_sessions = max_sessions
        self.by_id: dict[str, Session] = {}
        self.by_ride: dict[str, Session] = {}  # live sessions only

    @property
    def live(self) -> int:
        return len(self.by_ride)

    def live_sessions(self) -> list[Session]:
        return list(self.by_ride.values())

    def active_calls(self) -> int:
        active = SessionState.ACTIVE
        return sum(1 for session in self.by_ride.values() if session.state is active)

    def get(self, session_id: str) -> Session | None:
        return self.by_id.get(session_id)

    def create(
        self,
        ride_id: str,
        driver_id: str,
        passenger_id: str,
        now: float,
        *,
        accepting: bool = True,
        session_id: str | None = None,
    ) -> tuple[Session, bool]:
        """Return ``(session, created)``: the ride's live session when the
        participants match (``created`` False), else a new one.

        Raises:
            RideConflict: the ride's live session has other participants.
            Capacity: ``MAX_SESSIONS`` reached, or ``accepting`` is False
                (shutting down). A matching re-POST is never refused.
        """
        existing = self.by_ride.get(ride_id)
        if existing is not None:
            if now < existing.deadline:
                if existing.driver.user_id == driver_id and existing.passenger.user_id == passenger_id:
                    return existing, False
                raise RideConflict(ride_id)
            # Past its deadline, its timer not fired yet: no longer the ride's
            # live session, and not counted against MAX_SESSIONS.
            del self.by_ride[ride_id]
        if not accepting or self.live >= self.max_sessions:
            raise Capacity()
        session = Session(
            session_id or new_session_id(), ride_id, driver_id, passenger_id, now, self.duration
        )
        self.by_id[session.session_id] = session
        self.by_ride[ride_id] = session
        return session, True

    def end(self, session: Session, reason: EndReason, now: float) -> None:
        """Move the session to ``ended``; it stays findable by id until
        :meth:`forget` (docs/protocol.md, rule 3: an ended or expired
        session is remembered).

        Raises:
            LifecycleError: when the session already ended or ``reason`` is
            not legal for its state.
        """
        session.lifecycle.end(reason)
        session.ended = now
        if self.by_ride.get(session.ride_id) is session:
            del self.by_ride[session.ride_id]

    def add(self, session: Session) -> None:
        self.by_id[session.session_id] = session
        if session.state is not SessionState.ENDED:
            self.by_ride[session.ride_id] = session

    def forget(self, session: Session) -> None:
        self.by_id.pop(session.session_id, None)
        if self.by_ride.get(session.ride_id) is session:
            del self.by_ride[session.ride_id]
