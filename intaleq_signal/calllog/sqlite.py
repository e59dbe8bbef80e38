"""Embedded development call log: the ``call_logs`` table in a SQLite file
(``ENVIRONMENT=development`` without ``DB_USERNAME``; ``docs/operations.md``,
"Configuration").

Same columns and the same idempotent writes (:mod:`.sql`, where the table
is defined once for both stores) as the MySQL store; times are stored as
UTC text with milliseconds.
"""

from __future__ import annotations

import sqlite3

from ..exceptions import StoreError
from .events import CallEvent
from .sql import (
    ADDED_COLUMNS,
    SQLITE,
    SessionRow,
    create_index,
    late_indexes,
    session_rows,
    sqlite_ddl,
    utc_text,
)

__all__ = ["SQLiteStore"]

#: The table and its first-edition indexes, each created when missing.
DDL = sqlite_ddl()
#: The indexes over added columns, created once those columns exist.
LATE_INDEXES = tuple(create_index(index, "sqlite") for index in late_indexes("sqlite"))


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
        """Create the table when missing, and add the columns (then the
        indexes over them) a table made by an earlier version lacks
        (:data:`~.sql.ADDED_COLUMNS`, :data:`LATE_INDEXES`)."""
        conn.executescript(DDL)
        have = {row[1] for row in conn.execute("PRAGMA table_info(call_logs)")}
        for column in ADDED_COLUMNS:
            if column.name not in have:
                try:
                    conn.execute(f"ALTER TABLE call_logs ADD COLUMN {column.definition('sqlite')}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
        for statement in LATE_INDEXES:
            conn.execute(statement)

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

    def load(self, conn: sqlite3.Connection, node_id: str, since: float) -> list[SessionRow]:
        return session_rows(conn.execute(SQLITE.restore, (node_id, node_id, utc_text(since))).fetchall())

    def ping(self, conn: sqlite3.Connection) -> None:
        conn.execute("SELECT 1")

    def claim(self, conn: sqlite3.Connection, node_id: str) -> bool:
        """One file, one process in practice: nothing to claim."""
        return True

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
