"""Call-log events: small plain records of what happened, with the event
time (SPEC §5: rows carry the moments events happened, not write times).

``at`` is seconds since the epoch (``time.time()``), turned into a UTC
datetime only in the writer thread, off the event loop.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class SessionCreated:
    """``POST /sessions`` created a session: insert the ``created`` row."""

    session_id: str
    ride_id: str
    driver_id: str
    passenger_id: str
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class CallActive:
    """Both participants connected for the first time: ``connected_at``."""

    session_id: str
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class CallInitiated:
    """The first ``offer`` of the session: ``initiated_by`` (set once)."""

    session_id: str
    user_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallEnded:
    """The session ended: ``status='ended'``, ``end_reason``, ``ended_at``."""

    session_id: str
    reason: str
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PreviousRunClosed:
    """At start: rows a previous process left ``created`` or ``active`` (it
    was killed) are ended with ``server_restart`` at ``at`` (SPEC §5). Only
    rows created before ``at`` are touched, so it is safe whenever it lands.
    ``session_id`` is empty: it routes like any event, to one writer thread."""

    at: float
    session_id: str = ""


CallEvent = SessionCreated | CallActive | CallInitiated | CallEnded | PreviousRunClosed
