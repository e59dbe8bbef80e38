"""The call-log writes as SQL, once for every store (SPEC §5).

Each event maps to one idempotent statement, so a write replayed after a
broken connection leaves the row as if it had been applied once:

- ``SessionCreated`` inserts the ``created`` row, ignoring a duplicate
  ``session_id`` (the column is unique);
- ``CallActive`` moves ``created`` → ``active`` only;
- ``CallInitiated`` sets ``initiated_by`` only while it is NULL;
- ``CallEnded`` sets the end only on a row not yet ``ended``;
- ``PreviousRunClosed`` ends, with ``server_restart``, this instance's
  (``node_id``) rows still open that were created before this process
  started; other instances' rows are never touched.

Times are UTC text with milliseconds, which SQLite stores as is and MySQL
reads into ``TIMESTAMP(3)`` (the MySQL session runs at ``time_zone='+00:00'``).
"""

from __future__ import annotations

import datetime
from typing import Any

from .events import CallActive, CallEnded, CallEvent, CallInitiated, PreviousRunClosed, SessionCreated

__all__ = ["ADDED_COLUMNS", "MYSQL", "SQLITE", "Dialect", "utc_text"]

_TEMPLATES = {
    SessionCreated: (
        "{insert_ignore} INTO call_logs (session_id, ride_id, driver_id, passenger_id, status,"
        " created_at, node_id) VALUES ({p}, {p}, {p}, {p}, 'created', {p}, {p})"
    ),
    CallActive: (
        "UPDATE call_logs SET status = 'active', connected_at = {p}"
        " WHERE session_id = {p} AND status = 'created'"
    ),
    CallInitiated: "UPDATE call_logs SET initiated_by = {p} WHERE session_id = {p} AND initiated_by IS NULL",
    CallEnded: (
        "UPDATE call_logs SET status = 'ended', end_reason = {p}, ended_at = {p}"
        " WHERE session_id = {p} AND status <> 'ended'"
    ),
    PreviousRunClosed: (
        "UPDATE call_logs SET status = 'ended', end_reason = 'server_restart', ended_at = {p}"
        " WHERE status <> 'ended' AND created_at < {p} AND node_id = {p}"
    ),
}

#: Columns added after the first edition of the table: ``(name, type)``.
#: Each store adds the ones an existing table lacks, at start
#: (``Store.prepare``); new tables have them from their DDL.
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (("node_id", "VARCHAR(255) NULL"),)


def utc_text(at: float) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS.mmm`` in UTC."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _params(event: CallEvent) -> tuple[Any, ...]:
    if isinstance(event, SessionCreated):
        return (
            event.session_id,
            event.ride_id,
            event.driver_id,
            event.passenger_id,
            utc_text(event.at),
            event.node_id,
        )
    if isinstance(event, CallActive):
        return (utc_text(event.at), event.session_id)
    if isinstance(event, CallInitiated):
        return (event.user_id, event.session_id)
    if isinstance(event, PreviousRunClosed):
        return (utc_text(event.at), utc_text(event.at), event.node_id)
    return (event.reason, utc_text(event.at), event.session_id)


class Dialect:
    """How one database spells a placeholder and an insert that ignores
    duplicates; statements are formatted once per dialect."""

    def __init__(self, placeholder: str, insert_ignore: str) -> None:
        self.sql = {
            kind: template.format(p=placeholder, insert_ignore=insert_ignore)
            for kind, template in _TEMPLATES.items()
        }

    def statement(self, event: CallEvent) -> tuple[str, tuple[Any, ...]]:
        """``(sql, parameters)`` for one event; parameterised, never interpolated."""
        return self.sql[type(event)], _params(event)


SQLITE = Dialect("?", "INSERT OR IGNORE")
MYSQL = Dialect("%s", "INSERT IGNORE")
