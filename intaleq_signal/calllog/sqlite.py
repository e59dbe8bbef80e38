"""Embedded development call log: the ``call_logs`` table in a SQLite file
(SPEC §2: ``ENVIRONMENT=development`` without ``DB_USERNAME``).

Same columns and the same idempotent writes (:mod:`.sql`) as the MySQL
store; times are stored as UTC text with milliseconds.
"""

from __future__ import annotations

import sqlite3

from .events import CallEvent
from .sql import ADDED_COLUMNS, SQLITE
from .store import StoreError

__all__ = ["SQLiteStore"]

DDL = """
CREATE TABLE IF NOT EXISTS call_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id VARCHAR(36) NOT NULL UNIQUE,
    ride_id VARCHAR(255) NOT NULL,
    driver_id VARCHAR(255) NOT NULL,
    passenger_id VARCHAR(255) NOT NULL,
    status VARCHAR(50) NOT NULL DEFAULT 'created',
    initiated_by VARCHAR(255) NULL,
    end_reason VARCHAR(255) NULL,
    created_at TEXT NOT NULL,
    connected_at TEXT NULL,
    ended_at TEXT NULL,
    node_id VARCHAR(255) NULL
);
CREATE INDEX IF NOT EXISTS idx_call_logs_ride_id ON call_logs (ride_id);
"""
INDEXES = "CREATE INDEX IF NOT EXISTS idx_call_logs_node_status ON call_logs (node_id, status);"


class SQLiteStore:
    """:class:`~intaleq_signal.calllog.store.Store` over one SQLite file."""

    healthy_state = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path

    def check(self) -> None:
        """Open the file and create the table once, at start-up.

        Raises:
            StoreError: naming ``SQLITE_PATH`` when the file cannot be used
            (a missing directory, a directory, a file that is not SQLite).
        """
        try:
            conn = self.connect()
            try:
                self.prepare(conn)
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"SQLITE_PATH={self.path!r} cannot be used: {exc}") from None

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def prepare(self, conn: sqlite3.Connection) -> None:
        """Create the table when missing, and add the columns a table made
        by an earlier version lacks (:data:`~.sql.ADDED_COLUMNS`)."""
        conn.executescript(DDL)
        have = {row[1] for row in conn.execute("PRAGMA table_info(call_logs)")}
        for name, kind in ADDED_COLUMNS:
            if name not in have:
                try:
                    conn.execute(f"ALTER TABLE call_logs ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
        conn.executescript(INDEXES)

    def apply(self, conn: sqlite3.Connection, event: CallEvent) -> None:
        conn.execute(*SQLITE.statement(event))

    def apply_batch(self, conn: sqlite3.Connection, events: list[CallEvent]) -> None:
        try:
            conn.execute("BEGIN")
            for event in events:
                conn.execute(*SQLITE.statement(event))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self, conn: sqlite3.Connection) -> None:
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def is_permanent(self, exc: BaseException) -> bool:
        return isinstance(
            exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError, ValueError)
        )

    def is_fatal(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc)
