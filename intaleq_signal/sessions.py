"""The session registry: live and recently ended sessions, one per ride.

Pure bookkeeping with the clock passed in (``loop.time()`` seconds); the
signaling layer owns sockets and timers and attaches its timer handles to the
records here. Rules: SPEC §3 (one live session per ride, ``MAX_SESSIONS``,
``expires_in``) and §4 "Precise points" (ended sessions are remembered).
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from .exceptions import Capacity, RideConflict
from .lifecycle import EndReason, SessionLifecycle, SessionState

if TYPE_CHECKING:  # pragma: no cover
    from asyncio import TimerHandle

__all__ = ["Capacity", "RideConflict", "Registry", "Seat", "Session"]

#: SPEC §4 rule 4: messages held for an absent participant, per direction.
HOLD_MAX_MESSAGES = 64
HOLD_MAX_BYTES = 16 * 1024


class Seat:
    """One participant's place in a session: who it is, its current
    connection (or None while absent), and what is held for it."""

    __slots__ = ("role", "user_id", "conn", "joined", "held", "held_bytes", "grace")

    def __init__(self, role: str, user_id: str) -> None:
        self.role = role
        self.user_id = user_id
        self.conn: Any = None  # the signaling layer's connection object
        self.joined = False  # has authenticated at least once
        self.held: deque[str] | None = None  # created on first use: most calls never hold
        self.held_bytes = 0
        self.grace: TimerHandle | None = None  # RECONNECT_GRACE timer while absent

    def hold(self, text: str) -> bool:
        """Queue a message for this absent participant; False when the
        64-message / 16 KiB bound is reached (SPEC §4 rule 4)."""
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

    ``created``, ``connected`` and ``ended`` are ``loop.time()`` seconds;
    ``deadline`` is when it expires (never active) or is cut (active).
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
        self.timer: TimerHandle | None = None  # the deadline (or, once ended, purge) timer

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
        """SPEC §3: whole seconds left, rounded up, never negative."""
        return max(0, math.ceil(self.deadline - now - 1e-9))


class Registry:
    """Sessions by id and live sessions by ride.

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

    def create(
        self, ride_id: str, driver_id: str, passenger_id: str, now: float, *, accepting: bool = True
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
        session = Session(str(uuid.uuid4()), ride_id, driver_id, passenger_id, now, self.duration)
        self.by_id[session.session_id] = session
        self.by_ride[ride_id] = session
        return session, True

    def end(self, session: Session, reason: EndReason, now: float) -> None:
        """Move the session to ``ended``; it stays findable by id (SPEC §4
        "an ended or expired session is remembered") until :meth:`forget`.

        Raises:
            LifecycleError: when the session already ended or ``reason`` is
            not legal for its state.
        """
        session.lifecycle.end(reason)
        session.ended = now
        if self.by_ride.get(session.ride_id) is session:
            del self.by_ride[session.ride_id]

    def forget(self, session: Session) -> None:
        self.by_id.pop(session.session_id, None)
