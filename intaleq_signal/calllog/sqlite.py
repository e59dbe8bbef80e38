"""Embedded development call log: the ``call_logs`` table in a SQLite file
(SPEC §2: ``ENVIRONMENT=development`` without ``DB_USERNAME``).

Same columns and the same idempotent writes as the MySQL store; times are
stored as UTC ISO-8601 text with milliseconds.
"""

from __future__ import annotations

import datetime
import sqlite3

from .events import CallActive, CallEnded, CallEvent, CallInitiated, SessionCreated

__all__ = ["SQLiteStore", "utc_text"]

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
    ended_at TEXT NULL
);
CREATE INDEX IF NOT EXISTS idx_call_logs_ride_id ON call_logs (ride_id);
"""


def utc_text(at: float) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS.mmm`` in UTC."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


class SQLiteStore:
    """:class:`~intaleq_signal.calllog.store.Store` over one SQLite file."""

    healthy_state = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def prepare(self, conn: sqlite3.Connection) -> None:
        conn.executescript(DDL)

    def apply(self, conn: sqlite3.Connection, event: CallEvent) -> None:
        if isinstance(event, SessionCreated):
            conn.execute(
                "INSERT OR IGNORE INTO call_logs (session_id, ride_id, driver_id, passenger_id,"
                " status, created_at) VALUES (?, ?, ?, ?, 'created', ?)",
                (event.session_id, event.ride_id, event.driver_id, event.passenger_id, utc_text(event.at)),
            )
        elif isinstance(event, CallActive):
            conn.execute(
                "UPDATE call_logs SET status = 'active', connected_at = ?"
                " WHERE session_id = ? AND status = 'created'",
                (utc_text(event.at), event.session_id),
            )
        elif isinstance(event, CallInitiated):
            conn.execute(
                "UPDATE call_logs SET initiated_by = ? WHERE session_id = ? AND initiated_by IS NULL",
                (event.user_id, event.session_id),
            )
        elif isinstance(event, CallEnded):
            conn.execute(
                "UPDATE call_logs SET status = 'ended', end_reason = ?, ended_at = ?"
                " WHERE session_id = ? AND status <> 'ended'",
                (event.reason, utc_text(event.at), event.session_id),
            )

    def close(self, conn: sqlite3.Connection) -> None:
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def is_fatal(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc)
