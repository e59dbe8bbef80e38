"""The ``call_logs`` table and the call-log writes as SQL, once for every
store (``docs/protocol.md``, "Call log").

The table is data here (:data:`COLUMNS`, :data:`INDEXES`), from which both
definitions are generated: :func:`mysql_ddl` (the text of ``call_logs.sql``,
which ``database.sql`` at the top of the repository links to; rewrite it with
``python -m intaleq_signal.calllog.sql`` or ``make schema``) and
:func:`sqlite_ddl`. Columns and indexes added after the first edition of the
table (:data:`ADDED_COLUMNS`, :func:`late_indexes`) are added by each store
to an existing table at start (``Store.prepare``); the table of an earlier
edition is ``mysql_ddl(edition)`` / ``sqlite_ddl(edition)``.

Each event maps to one idempotent statement, so a write replayed after a
broken connection leaves the row as if it had been applied once:

- ``SessionCreated`` inserts the ``created`` row, ignoring a duplicate
  ``session_id`` (the column is unique);
- ``CallActive`` moves ``created`` → ``active`` only;
- ``CallInitiated`` sets ``initiated_by`` only while it is NULL;
- ``CallEnded`` sets the end only on a row not yet ``ended``;
- ``MediaReported`` sets each media time only while it is NULL, a
  candidate type only when the event names one, and ``media_failures``
  only upwards, to the count the engine holds (never an increment);
- ``PreviousRunClosed`` ends, with ``server_restart``, this instance's
  (``node_id``) rows still open that were created before this process
  started; other instances' rows are never touched.

Times are UTC text with milliseconds, which SQLite stores as is and MySQL
reads into ``TIMESTAMP(3)`` (the MySQL session runs at ``time_zone='+00:00'``).
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Any, Literal

from ..media import Media
from .events import (
    CallActive,
    CallEnded,
    CallEvent,
    CallInitiated,
    MediaReported,
    PreviousRunClosed,
    SessionCreated,
)

__all__ = [
    "ADDED_COLUMNS",
    "COLUMNS",
    "EDITION",
    "INDEXES",
    "MYSQL",
    "SQLITE",
    "Column",
    "Dialect",
    "Index",
    "create_index",
    "late_indexes",
    "mysql_ddl",
    "sqlite_ddl",
    "utc_text",
]

#: The two databases the table is defined for.
Database = Literal["mysql", "sqlite"]


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of ``call_logs``.

    Attributes:
        name: the column name.
        mysql: its definition after the name in MySQL (type, ``NULL`` or
            ``NOT NULL``, default).
        sqlite: the same in SQLite, when it differs (times are UTC text
            there; the id and the unique ``session_id`` are declared inline).
        edition: the edition of the table that added it (1: the first);
            an existing table of an earlier edition gets it at start.
    """

    name: str
    mysql: str
    sqlite: str = ""
    edition: int = 1

    def definition(self, dialect: Database) -> str:
        """``name definition`` in ``"mysql"`` or ``"sqlite"``."""
        return f"{self.name} {self.sqlite if dialect == 'sqlite' and self.sqlite else self.mysql}"


@dataclasses.dataclass(frozen=True)
class Index:
    """One index of ``call_logs``: ``name`` over ``columns``, in that order.
    ``in_sqlite`` False: MySQL only (the SQLite table declares its unique
    ``session_id`` inline, and has no index on ``status`` alone)."""

    name: str
    columns: tuple[str, ...]
    unique: bool = False
    in_sqlite: bool = True


#: The edition of the table this version writes: 2 added ``node_id``, 3 the
#: media columns (docs/protocol.md, "media_state").
EDITION = 3
#: The columns of ``call_logs``, in table order (new tables; an existing
#: table gets those of later editions at its end).
COLUMNS: tuple[Column, ...] = (
    Column("id", "INT UNSIGNED NOT NULL AUTO_INCREMENT", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    Column("session_id", "VARCHAR(36) NOT NULL", "VARCHAR(36) NOT NULL UNIQUE"),
    Column("ride_id", "VARCHAR(255) NOT NULL"),
    Column("driver_id", "VARCHAR(255) NOT NULL"),
    Column("passenger_id", "VARCHAR(255) NOT NULL"),
    Column("status", "VARCHAR(50) NOT NULL DEFAULT 'created'"),
    Column("initiated_by", "VARCHAR(255) NULL"),
    Column("end_reason", "VARCHAR(255) NULL"),
    # NULL in MySQL: with explicit_defaults_for_timestamp=OFF, a first
    # TIMESTAMP column declared NOT NULL without a default gets DEFAULT
    # CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP, rewritten by every update.
    Column("created_at", "TIMESTAMP(3) NULL", "TEXT NOT NULL"),
    Column("connected_at", "TIMESTAMP(3) NULL", "TEXT NULL"),
    Column("ended_at", "TIMESTAMP(3) NULL", "TEXT NULL"),
    Column("node_id", "VARCHAR(255) NULL", edition=2),
    Column("media_connected_at", "TIMESTAMP(3) NULL", "TEXT NULL", edition=3),
    Column("driver_candidate", "VARCHAR(16) NULL", edition=3),
    Column("passenger_candidate", "VARCHAR(16) NULL", edition=3),
    Column("media_failures", "INT UNSIGNED NOT NULL DEFAULT 0", "INTEGER NOT NULL DEFAULT 0", edition=3),
    Column("driver_media_at", "TIMESTAMP(3) NULL", "TEXT NULL", edition=3),
    Column("passenger_media_at", "TIMESTAMP(3) NULL", "TEXT NULL", edition=3),
)
#: The MySQL primary key (SQLite's is inline: ``INTEGER PRIMARY KEY``).
PRIMARY_KEY = ("id",)
#: The indexes of ``call_logs``.
INDEXES: tuple[Index, ...] = (
    Index("uq_call_logs_session_id", ("session_id",), unique=True, in_sqlite=False),
    Index("idx_call_logs_ride_id", ("ride_id",)),
    Index("idx_call_logs_status", ("status",), in_sqlite=False),
    # A node's open rows, and its rows ended since a time: what a restart
    # restores, by index range, however long the node's history.
    Index("idx_call_logs_node_status", ("node_id", "status", "ended_at")),
)
#: Columns added after the first edition of the table. Each store adds the
#: ones an existing table lacks, at start (``Store.prepare``); new tables
#: have them from their DDL.
ADDED_COLUMNS: tuple[Column, ...] = tuple(column for column in COLUMNS if column.edition > 1)

#: What ``call_logs.sql`` says above the table, for the operators who read it.
MYSQL_HEADER = """\
-- intaleq-signal call log. One row per call session.
-- The server runs this at start (CREATE TABLE IF NOT EXISTS), so the table
-- exists as soon as the daemon has reached the database once.
-- Times are UTC (the server's MySQL sessions use time_zone '+00:00') with
-- milliseconds: the moments the events happened, not the moments of the writes.
-- node_id is the instance (NODE_ID) that owns the row. The media columns tell
-- which calls really connected (what the apps report with media_state):
-- media_connected_at, when both participants had reported "connected";
-- driver_media_at and passenger_media_at, each one's first "connected";
-- driver_candidate and passenger_candidate, each one's latest selected ICE
-- candidate type (host, srflx, prflx, relay); media_failures, the "failed"
-- reports. A table made before a column existed gets it (and its index)
-- added by the server at start.
"""
#: ``call_logs.sql``, next to this module.
MYSQL_DDL_FILE = Path(__file__).with_name("call_logs.sql")


def late_indexes(dialect: Database) -> tuple[Index, ...]:
    """The indexes over an added column, in ``"mysql"`` or ``"sqlite"``:
    created after those columns are added to an existing table."""
    added = {column.name for column in ADDED_COLUMNS}
    return tuple(
        index
        for index in INDEXES
        if added.intersection(index.columns) and (dialect == "mysql" or index.in_sqlite)
    )


def create_index(index: Index, dialect: Database) -> str:
    """The statement that creates ``index`` (SQLite: only when missing;
    MySQL has no ``IF NOT EXISTS`` for indexes)."""
    guard = " IF NOT EXISTS" if dialect == "sqlite" else ""
    unique = "UNIQUE " if index.unique else ""
    return f"CREATE {unique}INDEX{guard} {index.name} ON call_logs ({', '.join(index.columns)})"


def _edition(edition: int) -> tuple[tuple[Column, ...], tuple[Index, ...]]:
    """The columns and indexes of the table as ``edition`` created it."""
    columns = tuple(column for column in COLUMNS if column.edition <= edition)
    names = {column.name for column in columns}
    return columns, tuple(index for index in INDEXES if names.issuperset(index.columns))


def mysql_ddl(edition: int = EDITION) -> str:
    """The text of ``call_logs.sql``: :data:`MYSQL_HEADER`, then the table
    with every column, the primary key and every index (those of an
    earlier ``edition``: what it created, for the tests of the upgrade)."""
    columns, indexes = _edition(edition)
    lines = [column.definition("mysql") for column in columns]
    lines.append(f"PRIMARY KEY ({', '.join(PRIMARY_KEY)})")
    for index in indexes:
        lines.append(f"{'UNIQUE ' if index.unique else ''}KEY {index.name} ({', '.join(index.columns)})")
    body = ",\n".join("    " + line for line in lines)
    return (
        MYSQL_HEADER
        + "CREATE TABLE IF NOT EXISTS call_logs (\n"
        + body
        + "\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;\n"
    )


def sqlite_ddl(edition: int = EDITION) -> str:
    """The SQLite script that creates the table (of ``edition``) and the
    indexes over its first-edition columns, each only when missing (the
    late ones come after the added columns: :func:`late_indexes`)."""
    columns, _ = _edition(edition)
    body = ",\n".join("    " + column.definition("sqlite") for column in columns)
    late = late_indexes("sqlite")
    indexes = "".join(
        create_index(index, "sqlite") + ";\n" for index in INDEXES if index.in_sqlite and index not in late
    )
    return "\nCREATE TABLE IF NOT EXISTS call_logs (\n" + body + "\n);\n" + indexes


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
    MediaReported: (
        "UPDATE call_logs SET media_connected_at = COALESCE(media_connected_at, {p}),"
        " driver_media_at = COALESCE(driver_media_at, {p}),"
        " passenger_media_at = COALESCE(passenger_media_at, {p}),"
        " driver_candidate = COALESCE({p}, driver_candidate),"
        " passenger_candidate = COALESCE({p}, passenger_candidate),"
        " media_failures = CASE WHEN media_failures < {p} THEN {p} ELSE media_failures END"
        " WHERE session_id = {p}"
    ),
    PreviousRunClosed: (
        "UPDATE call_logs SET status = 'ended', end_reason = 'server_restart', ended_at = {p}"
        " WHERE status <> 'ended' AND created_at < {p} AND node_id = {p}"
    ),
}


def utc_text(at: float) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS.mmm`` in UTC (milliseconds
    truncated; ``isoformat`` is the C formatter, a third cheaper than
    ``strftime`` in the writer thread)."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(" ", "milliseconds")[:23]


def _utc_or_null(at: float | None) -> str | None:
    return None if at is None else utc_text(at)


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
    if isinstance(event, MediaReported):
        return (
            _utc_or_null(event.media_connected_at),
            _utc_or_null(event.driver_media_at),
            _utc_or_null(event.passenger_media_at),
            event.driver_candidate,
            event.passenger_candidate,
            event.media_failures,
            event.media_failures,
            event.session_id,
        )
    if isinstance(event, PreviousRunClosed):
        return (utc_text(event.at), utc_text(event.at), event.node_id)
    return (event.reason, utc_text(event.at), event.session_id)


_RESTORE_COLUMNS = (
    "SELECT session_id, ride_id, driver_id, passenger_id, status, initiated_by, end_reason,"
    " created_at, connected_at, ended_at, media_connected_at, driver_media_at, passenger_media_at,"
    " driver_candidate, passenger_candidate, media_failures FROM call_logs"
)
_RESTORE = (
    f"{_RESTORE_COLUMNS} WHERE node_id = {{p}} AND status IN ('created', 'active')"
    f" UNION ALL {_RESTORE_COLUMNS} WHERE node_id = {{p}} AND status = 'ended' AND ended_at >= {{p}}"
)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionRow:
    """One ``call_logs`` row as a restart restores it: times are epoch
    seconds (UTC), ``None`` where the column is NULL; ``media`` None when
    no media column holds anything."""

    session_id: str
    ride_id: str
    driver_id: str
    passenger_id: str
    status: str
    initiated_by: str | None
    end_reason: str | None
    created_at: float
    connected_at: float | None
    ended_at: float | None
    media: Media | None = None


def epoch(value: Any) -> float | None:
    """A time column as epoch seconds: MySQL hands a naive UTC ``datetime``,
    SQLite the text :func:`utc_text` wrote; NULL stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f")
    return value.replace(tzinfo=datetime.UTC).timestamp()


def session_rows(rows: list[tuple[Any, ...]]) -> list[SessionRow]:
    """The restore query's rows as :class:`SessionRow` (its column order)."""
    return [
        SessionRow(*row[:7], epoch(row[7]) or 0.0, epoch(row[8]), epoch(row[9]), _media(row[10:]))  # type: ignore[misc]
        for row in rows
    ]


def _media(values: tuple[Any, ...]) -> Media | None:
    """The media columns of a restored row (the restore query's order)."""
    connected, driver_at, passenger_at, driver_candidate, passenger_candidate, failures = values
    media = Media(
        epoch(connected),
        epoch(driver_at),
        epoch(passenger_at),
        driver_candidate,
        passenger_candidate,
        int(failures),
    )
    return None if media.empty else media


class Dialect:
    """How one database spells a placeholder and an insert that ignores
    duplicates; statements are formatted once per dialect.

    Attributes:
        restore: the query of a node's open rows and of its rows ended
            since a time (parameters: ``node_id``, ``node_id``,
            ``utc_text(since)``), two ranges of ``idx_call_logs_node_status``.
    """

    def __init__(self, placeholder: str, insert_ignore: str) -> None:
        self.sql = {
            kind: template.format(p=placeholder, insert_ignore=insert_ignore)
            for kind, template in _TEMPLATES.items()
        }
        self.restore = _RESTORE.format(p=placeholder)

    def statement(self, event: CallEvent) -> tuple[str, tuple[Any, ...]]:
        """``(sql, parameters)`` for one event; parameterised, never interpolated."""
        return self.sql[type(event)], _params(event)


SQLITE = Dialect("?", "INSERT OR IGNORE")
MYSQL = Dialect("%s", "INSERT IGNORE")


def main(argv: list[str]) -> int:
    """``python -m intaleq_signal.calllog.sql [--check]``: rewrite
    ``call_logs.sql`` from :data:`COLUMNS` and :data:`INDEXES`; with
    ``--check``, only say whether it is up to date (exit 1 when not)."""
    text = mysql_ddl()
    current = MYSQL_DDL_FILE.read_text(encoding="utf-8") if MYSQL_DDL_FILE.exists() else ""
    if current == text:
        print(f"{MYSQL_DDL_FILE}: up to date")
        return 0
    if "--check" in argv:
        print(f"{MYSQL_DDL_FILE}: differs from the table in {__name__}; run python -m {__name__}")
        return 1
    MYSQL_DDL_FILE.write_text(text, encoding="utf-8")
    print(f"{MYSQL_DDL_FILE}: rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
