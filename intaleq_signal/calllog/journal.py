"""The local journal: call-log events not yet committed to the database,
kept on disk so that a stop or a crash while the database is down, frozen or
slow loses nothing (``docs/operations.md``, "Call log and journal").

The file is an SQLite database in WAL mode with ``synchronous=FULL`` (every
commit is on disk when it returns), used as an append-only queue: one row
per event, keyed by the event's sequence number, which is the order events
were accepted in. Rows are deleted as their events commit in the database.
At start the rows left by the previous process are read back in order and
written first (:class:`~intaleq_signal.calllog.writer.CallLogWriter`).

A :class:`Journal` is used by one thread at a time (the writer's journal
thread); the file is locked (``flock``) while a process has it open, so two
instances can never share one journal.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3

from ..exceptions import JournalError
from .events import CallEvent, EventDecodeError, decode, encode

__all__ = ["Journal", "JournalError"]

log = logging.getLogger("intaleq_signal.calllog")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    event TEXT NOT NULL
);
"""


class Journal:
    """The journal file at ``path``.

    Args:
        path: the SQLite file (created when missing; its directory must exist).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def open(self) -> list[tuple[int, CallEvent]]:
        """Lock and open the file; return the events it holds, oldest first
        (an entry this version cannot read is logged and dropped).

        Raises:
            JournalError: the file cannot be opened, is not an SQLite
            database, or another process holds it.
        """
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"JOURNAL_PATH={self.path!r} cannot be used: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(
                f"JOURNAL_PATH={self.path!r} is in use by another process (each instance needs its own)"
            ) from None
        self._lock_fd = fd
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            rows = conn.execute("SELECT seq, event FROM events ORDER BY seq").fetchall()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise JournalError(f"JOURNAL_PATH={self.path!r} cannot be used: {exc}") from None
        self._conn = conn
        backlog: list[tuple[int, CallEvent]] = []
        unreadable: list[int] = []
        for seq, text in rows:
            try:
                backlog.append((seq, decode(text)))
            except EventDecodeError as exc:
                log.error("call-log journal: entry %d dropped: %s", seq, exc)
                unreadable.append(seq)
        if unreadable:
            self.write([], unreadable)
        return backlog

    def write(self, appends: list[tuple[int, CallEvent]], removes: list[int]) -> None:
        """Append ``appends`` and delete the ``removes`` sequence numbers in
        one transaction, on disk when it returns.

        Raises:
            sqlite3.Error, OSError: the write failed (nothing of it is kept).
        """
        conn = self._conn
        assert conn is not None, "open() first"
        conn.execute("BEGIN IMMEDIATE")
        try:
            if appends:
                conn.executemany(
                    "INSERT OR REPLACE INTO events (seq, event) VALUES (?, ?)",
                    [(seq, encode(event)) for seq, event in appends],
                )
            if removes:
                conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in removes])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def count(self) -> int:
        """Events in the file."""
        conn = self._conn
        assert conn is not None, "open() first"
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])

    def close(self) -> None:
        """Close the file and release the lock; safe to call twice."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
