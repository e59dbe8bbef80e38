"""The seam between the call-log writer and a database (``docs/design.md``,
"Call-log writer and journal").

A :class:`Store` knows one database's connections and SQL; the
:class:`~intaleq_signal.calllog.writer.CallLogWriter` owns threads, queues,
ordering and retries. Every ``apply`` must be idempotent, because after a
broken connection the writer cannot know whether the last write landed and
sends it again.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..exceptions import StoreError
from .events import CallEvent
from .sql import SessionRow

__all__ = ["Store", "StoreError"]


class Store(Protocol):
    #: Reported by ``/health`` as the database state while writes succeed.
    healthy_state: str

    def connect(self) -> Any:
        """Open one connection (called in a writer thread, which owns it).

        Raises:
            Exception: any error; the writer retries with backoff unless
            :meth:`is_fatal` says retrying cannot help.
        """

    def prepare(self, conn: Any) -> None:
        """Create the table when missing (once, at start)."""

    def apply(self, conn: Any, event: CallEvent) -> None:
        """Write one event idempotently and commit."""

    def apply_batch(self, conn: Any, events: list[CallEvent]) -> None:
        """Write ``events`` in order in one transaction: all of them, or
        (rolled back, then raised) none."""

    def load(self, conn: Any, node_id: str, since: float) -> list[SessionRow]:
        """The rows of ``node_id`` still open, and those ended at or after
        ``since`` (epoch seconds), oldest first: what a restart restores."""
        ...

    def ping(self, conn: Any) -> None:
        """Check that an idle connection still works.

        Raises:
            Exception: it does not (the writer reconnects).
        """

    def claim(self, conn: Any, node_id: str) -> bool:
        """Hold, for as long as ``conn`` lives, the database's claim that
        this process is the live instance ``node_id``; False when another
        live connection holds it. A store without such a notion says True."""

    def close(self, conn: Any) -> None:
        """Close a connection, ignoring errors."""

    def is_fatal(self, exc: BaseException) -> bool:
        """True for connection errors a retry cannot fix soon (bad
        credentials): retried, but slowly."""

    def is_permanent(self, exc: BaseException) -> bool:
        """True when ``apply`` failed on a working connection because of the
        event's data: the writer logs and skips that event."""
