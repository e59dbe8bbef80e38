"""Call-log events: small plain records of what happened, with the event
time (rows carry the moments events happened, not write times; see
``docs/protocol.md``, "Call log").

``at`` is seconds since the epoch (``time.time()``), turned into a UTC
datetime only in the writer thread, off the event loop. Events cross the
local journal (:mod:`.journal`) as JSON objects: :func:`encode` and
:func:`decode`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..exceptions import EventDecodeError

__all__ = [
    "CallActive",
    "CallEnded",
    "CallEvent",
    "CallInitiated",
    "EventDecodeError",
    "MediaReported",
    "PreviousRunClosed",
    "SessionCreated",
    "decode",
    "encode",
]


@dataclasses.dataclass(frozen=True, slots=True)
class SessionCreated:
    """``POST /sessions`` created a session: insert the ``created`` row,
    owned by the instance ``node_id`` (``NODE_ID``)."""

    session_id: str
    ride_id: str
    driver_id: str
    passenger_id: str
    at: float
    node_id: str = ""


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
class MediaReported:
    """A ``media_state`` report changed the session's media columns
    (docs/protocol.md, "media_state"): their values after it, absolute
    (:class:`~intaleq_signal.media.Media`), so a replay changes nothing.
    Times are epoch seconds; None leaves the column as it is."""

    session_id: str
    media_connected_at: float | None = None
    driver_media_at: float | None = None
    passenger_media_at: float | None = None
    driver_candidate: str | None = None
    passenger_candidate: str | None = None
    media_failures: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class PreviousRunClosed:
    """At start: rows of this instance (``node_id``) that a previous process
    left ``created`` or ``active`` (it was killed) are ended with
    ``server_restart`` at ``at``. Only rows created before ``at`` are
    touched, so it is safe whenever it lands; rows of other instances never
    are. ``session_id`` is empty: it routes like any event, to one writer
    thread."""

    at: float
    node_id: str = ""
    session_id: str = ""


CallEvent = SessionCreated | CallActive | CallInitiated | CallEnded | MediaReported | PreviousRunClosed

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (SessionCreated, CallActive, CallInitiated, CallEnded, MediaReported, PreviousRunClosed)
}


def encode(event: CallEvent) -> str:
    """The event as one JSON object: its fields and ``"event"`` (the type
    name). Strings stay as they are (lone surrogates included, escaped)."""
    fields = dataclasses.asdict(event)
    fields["event"] = type(event).__name__
    return json.dumps(fields, separators=(",", ":"))


def decode(text: str) -> CallEvent:
    """The event :func:`encode` wrote.

    Raises:
        EventDecodeError: not such an object (unknown type, missing or extra
        fields, not JSON).
    """
    try:
        fields = json.loads(text)
        cls = _TYPES[fields.pop("event")]
        return cls(**fields)  # type: ignore[no-any-return]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EventDecodeError(f"not a call-log event: {text[:200]!r} ({exc})") from None
