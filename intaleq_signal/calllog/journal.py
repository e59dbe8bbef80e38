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
thread). The file itself is locked (``flock`` on its inode, which SQLite's
own ``fcntl`` locks do not touch) while a process has it open, so two
instances can never share one journal, whatever path (a symbolic link, a
second name) they reach it by. A journal file removed or replaced while the
process runs is noticed at the next write (:meth:`Journal.intact`) and
written anew (:meth:`Journal.recreate`).
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

#: How long a write waits for a lock another process holds on the file
#: (milliseconds): a stuck writer must not hold up a stop.
BUSY_TIMEOUT_MS = 1000

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
            JournalError: the file cannot be opened, is not a journal (an
            SQLite file with other tables, or not SQLite), or another
            process holds it.
        """
        self._lock()
        try:
            conn = self._connect()
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables - {"events"}:
                conn.close()
                raise JournalError(
                    f"JOURNAL_PATH={self.path!r} is an SQLite file with other tables "
                    f"({', '.join(sorted(tables - {'events'}))}), not a journal"
                )
            conn.executescript(_SCHEMA)
            rows = conn.execute("SELECT seq, event FROM events ORDER BY seq").fetchall()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise JournalError(f"JOURNAL_PATH={self.path!r} cannot be used: {exc}") from None
        except JournalError:
            self.close()
            raise
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

    def _lock(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def intact(self) -> bool:
        """Whether ``path`` still names the file this journal locked (not
        removed, not replaced by another file)."""
        if self._lock_fd is None:
            return False
        try:
            named, held = os.stat(self.path), os.fstat(self._lock_fd)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def recreate(self, events: list[tuple[int, CallEvent]]) -> None:
        """Start a new file at ``path`` (the old one was removed or
        replaced) holding ``events``.

        Raises:
            JournalError: the new file cannot be made or locked.
            sqlite3.Error, OSError: writing ``events`` failed.
        """
        self.close()
        self._lock()
        try:
            self._conn = self._connect()
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise JournalError(f"JOURNAL_PATH={self.path!r} cannot be used: {exc}") from None
        self.write(events, [])

    def write(self, appends: list[tuple[int, CallEvent]], removes: list[int]) -> None:
        """Append ``appends`` and delete the ``removes`` sequence numbers in
        one transaction, on disk when it returns.

        Raises:
            sqlite3.Error, OSError: the write failed (nothing of it is kept).
        """
        conn = self._conn
        if conn is None:
            raise sqlite3.OperationalError("the journal is not open")
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
