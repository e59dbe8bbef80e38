"""The call log: events emitted by signaling, written off the event loop.

``events`` are the records, ``store`` the database seam, ``writer`` the
thread pool that applies them in order per session, ``sqlite`` the embedded
development store (and ``mysql`` the production one).
"""

from .events import (
    CallActive,
    CallEnded,
    CallEvent,
    CallInitiated,
    MediaReported,
    PreviousRunClosed,
    SessionCreated,
)
from .writer import CallLogWriter

__all__ = [
    "CallActive",
    "CallEnded",
    "CallEvent",
    "CallInitiated",
    "CallLogWriter",
    "MediaReported",
    "PreviousRunClosed",
    "SessionCreated",
]
