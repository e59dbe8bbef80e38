"""Which calls really connected: what a session's participants report of
their peer connection with ``media_state`` (docs/protocol.md,
"media_state"), kept per session as the call log's media columns
(docs/protocol.md, "Call log"). Pure bookkeeping, no I/O.

Times are epoch seconds (the engine's ``Clock.wall()``), as the call log
writes them. The values are absolute — the first ``connected`` report of
each participant, the moment both had, the latest candidate types, the
number of ``failed`` reports — so writing them again (a journal replay)
changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

__all__ = ["Media", "MediaChange"]


class MediaChange(NamedTuple):
    """What one report changed.

    Attributes:
        media_connected: both participants have now reported ``connected``
            at least once (``media_connected_at`` was just set).
        candidate: the candidate type the reporting participant selected,
            when it differs from its previous one (its first included).
        failures: after a ``failed`` report, ``media_failures`` now (it went
            up by one); else 0.
    """

    media_connected: bool = False
    candidate: str | None = None
    failures: int = 0


@dataclasses.dataclass(slots=True)
class Media:
    """A session's media progress; the attributes are its call-log columns.

    Attributes:
        media_connected_at: when the second participant's first
            ``connected`` report arrived (None: not yet).
        driver_media_at, passenger_media_at: each participant's first
            ``connected`` report (None: not yet).
        driver_candidate, passenger_candidate: the ``candidate_type`` of
            each participant's latest ``connected`` report that named one.
        media_failures: ``failed`` reports, both participants together.
    """

    media_connected_at: float | None = None
    driver_media_at: float | None = None
    passenger_media_at: float | None = None
    driver_candidate: str | None = None
    passenger_candidate: str | None = None
    media_failures: int = 0

    def report(self, role: str, state: str, candidate_type: str | None, at: float) -> MediaChange | None:
        """Take one report of the participant ``role`` (``driver`` or
        ``passenger``) made at ``at``: what it changed, or None when it
        changed nothing (``connecting``, ``disconnected``, a repeated
        ``connected``)."""
        if state == "failed":
            self.media_failures += 1
            return MediaChange(failures=self.media_failures)
        if state != "connected":
            return None
        first = getattr(self, f"{role}_media_at") is None
        if first:
            setattr(self, f"{role}_media_at", at)
        both = self.driver_media_at is not None and self.passenger_media_at is not None
        media_connected = both and self.media_connected_at is None
        if media_connected:
            self.media_connected_at = at
        selected = None
        if candidate_type is not None and candidate_type != getattr(self, f"{role}_candidate"):
            setattr(self, f"{role}_candidate", candidate_type)
            selected = candidate_type
        if not (first or selected):
            return None
        return MediaChange(media_connected=media_connected, candidate=selected)

    def columns(self) -> dict[str, Any]:
        """The call-log columns, by name."""
        return dataclasses.asdict(self)

    @property
    def empty(self) -> bool:
        """Nothing reported that the call log keeps."""
        return all(value is None or value == 0 for value in self.columns().values())
