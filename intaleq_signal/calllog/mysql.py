"""Production call log: MySQL through PyMySQL (``docs/operations.md``,
"Call log and journal").

One PyMySQL connection per writer thread (PyMySQL connections are not
thread-safe). Every network wait is bounded (connect, read, write timeouts)
so a database that stops answering cannot hang a writer forever; the writer
then reconnects and replays the write, which the statements of :mod:`.sql`
make idempotent.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pymysql

from .events import CallEvent
from .sql import (
    ADDED_COLUMNS,
    MYSQL,
    SessionRow,
    create_index,
    late_indexes,
    mysql_ddl,
    session_rows,
    utc_text,
)

__all__ = ["DDL", "MySQLStore"]

#: The table definition: the text of ``call_logs.sql`` (the repository's
#: ``database.sql``), generated from the table in :mod:`.sql`.
DDL = mysql_ddl()

CONNECT_TIMEOUT = 5  # seconds
IO_TIMEOUT = 10  # seconds, each read or write on the socket

# Errors retrying cannot fix soon: bad credentials (1045, 1698), host not
# allowed (1130), no such database (1049), no rights (1044, 1142).
_FATAL_CODES = frozenset({1044, 1045, 1049, 1130, 1142, 1698})
_DUPLICATE_COLUMN = 1060
_DUPLICATE_KEY_NAME = 1061


def _ddl_statements(ddl: str) -> list[str]:
    lines = [line for line in ddl.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


class MySQLStore:
    """:class:`~intaleq_signal.calllog.store.Store` over MySQL/MariaDB.

    Args:
        host, port: the server (``DB_HOST``, ``DB_PORT``).
        user, password: credentials (``DB_USERNAME``, ``DB_PASSWORD``).
        database: the database holding ``call_logs`` (``DB_DATABASE``).
    """

    healthy_state = "ok"

    def __init__(self, *, host: str, port: int, user: str, password: str, database: str) -> None:
        self.params: dict[str, Any] = {
            "host": host,
            "port": port,
            "user": user,
            "password": password,
            "database": database,
            "charset": "utf8mb4",
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": IO_TIMEOUT,
            "write_timeout": IO_TIMEOUT,
            "init_command": "SET time_zone = '+00:00'",
        }

    def connect(self) -> pymysql.connections.Connection:
        return pymysql.connect(**self.params)

    def prepare(self, conn: pymysql.connections.Connection) -> None:
        """Create the table when missing, and add the columns (then the
        indexes over them) a table made by an earlier version lacks
        (:data:`~.sql.ADDED_COLUMNS`, :func:`~.sql.late_indexes`). Safe when several instances start at
        once: a column another one just added is taken as added."""
        with conn.cursor() as cursor:
            for statement in _ddl_statements(DDL):
                cursor.execute(statement)
            cursor.execute(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'call_logs'"
            )
            have = {row[0] for row in cursor.fetchall()}
            for column in ADDED_COLUMNS:
                if column.name in have:
                    continue
                try:
                    cursor.execute(f"ALTER TABLE call_logs ADD COLUMN {column.definition('mysql')}")
                except pymysql.err.OperationalError as exc:
                    if exc.args[0] != _DUPLICATE_COLUMN:
                        raise
            for index in late_indexes("mysql"):
                cursor.execute(
                    "SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()"
                    " AND TABLE_NAME = 'call_logs' AND INDEX_NAME = %s",
                    (index.name,),
                )
                if cursor.fetchall():
                    continue
                try:
                    cursor.execute(create_index(index, "mysql"))
                except pymysql.err.OperationalError as exc:
                    if exc.args[0] != _DUPLICATE_KEY_NAME:
                        raise

    def apply(self, conn: pymysql.connections.Connection, event: CallEvent) -> None:
        with conn.cursor() as cursor:
            cursor.execute(*MYSQL.statement(event))

    def apply_batch(self, conn: pymysql.connections.Connection, events: list[CallEvent]) -> None:
        conn.begin()
        try:
            with conn.cursor() as cursor:
                for event in events:
                    cursor.execute(*MYSQL.statement(event))
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - a broken connection: the writer reconnects
                pass
            raise

    def load(self, conn: pymysql.connections.Connection, node_id: str, since: float) -> list[SessionRow]:
        with conn.cursor() as cursor:
            cursor.execute(MYSQL.restore, (node_id, node_id, utc_text(since)))
            return session_rows(list(cursor.fetchall()))

    def ping(self, conn: pymysql.connections.Connection) -> None:
        conn.ping(reconnect=False)

    def claim(self, conn: pymysql.connections.Connection, node_id: str) -> bool:
        """A named lock (``GET_LOCK``, not waited for) held by ``conn``;
        MySQL releases it when the connection ends, a killed process's
        included. Lock names are at most 64 characters and server-wide: the
        database and the node id are hashed into it (another database on
        the same server, with the same ``NODE_ID``, is another call log)."""
        key = f"{self.params['database']}\0{node_id}".encode()
        name = "intaleq-signal node " + hashlib.sha1(key).hexdigest()
        with conn.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(%s, 0)", (name,))
            (held,) = cursor.fetchone()
        return held == 1

    def close(self, conn: pymysql.connections.Connection) -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - already broken; nothing to do
            pass

    def is_permanent(self, exc: BaseException) -> bool:
        return isinstance(exc, (pymysql.err.DataError, pymysql.err.IntegrityError, ValueError))

    def is_fatal(self, exc: BaseException) -> bool:
        return isinstance(exc, pymysql.err.MySQLError) and bool(exc.args) and exc.args[0] in _FATAL_CODES
