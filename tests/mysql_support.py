"""MySQL test support: a random database per test and a TCP proxy the tests
control, to cut the daemon off from the database and restore it.

Connection settings come from the environment with the local defaults
(``DB_HOST=127.0.0.1``, ``DB_PORT=3306``, ``DB_USERNAME=root``, empty
``DB_PASSWORD``), so the tests also run against another MySQL.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Any

import pymysql

MYSQL = {
    "host": os.environ.get("DB_HOST", "127.0.0.1"),
    "port": int(os.environ.get("DB_PORT", "3306")),
    "user": os.environ.get("DB_USERNAME", "root"),
    "password": os.environ.get("DB_PASSWORD", ""),
}


def mysql_available() -> bool:
    try:
        pymysql.connect(connect_timeout=2, **MYSQL).close()
    except pymysql.err.MySQLError:
        return False
    return True


class Database:
    """A database with a random name, dropped by :meth:`drop`."""

    def __init__(self) -> None:
        self.name = f"test_intaleq_{uuid.uuid4().hex[:12]}"
        with self.connect(database=None) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")

    def connect(self, database: str | None = "") -> Any:
        return pymysql.connect(
            database=self.name if database == "" else database,
            autocommit=True,
            cursorclass=pymysql.cursors.DictCursor,
            init_command="SET time_zone = '+00:00'",
            **MYSQL,
        )

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self.connect() as conn, conn.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())

    def rows(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM call_logs ORDER BY id")

    def drop(self) -> None:
        with self.connect(database=None) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{self.name}`")

    def store(self) -> Any:
        """The daemon's MySQL call-log store on this database (no daemon)."""
        from intaleq_signal.calllog.mysql import MySQLStore

        return MySQLStore(
            host=MYSQL["host"],
            port=MYSQL["port"],
            user=MYSQL["user"],
            password=MYSQL["password"],
            database=self.name,
        )

    def server_env(self, port: int | None = None) -> dict[str, str]:
        """Environment for a daemon logging to this database."""
        return {
            "ENVIRONMENT": "production",
            "DB_HOST": MYSQL["host"],
            "DB_PORT": str(port or MYSQL["port"]),
            "DB_USERNAME": MYSQL["user"],
            "DB_PASSWORD": MYSQL["password"],
            "DB_DATABASE": self.name,
        }


class TCPProxy:
    """Forwards a local port to MySQL until :meth:`cut`: then every open
    connection is closed and new ones are closed at once, until
    :meth:`restore`.

    :meth:`freeze` is the other kind of outage, a database that stops
    answering without closing anything (a hung server, a partition that
    drops packets): open connections stay open but no byte moves either
    way, and new connections are accepted but get no answer (not even
    MySQL's greeting). :meth:`restore` lets the bytes sent meanwhile through,
    in order, and connects the waiting connections, as a network that heals
    does."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self._cut = threading.Event()
        self._flowing = threading.Event()  # cleared by freeze()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            if not self._flowing.is_set():  # frozen: accepted, never answered
                with self._lock:
                    self._sockets.add(client)
                threading.Thread(target=self._connect_when_restored, args=(client,), daemon=True).start()
                continue
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._drop(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets |= {client, upstream}
        self.connected.set()
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _connect_when_restored(self, client: socket.socket) -> None:
        self._flowing.wait()
        with self._lock:
            held = client in self._sockets  # not closed by cut() or close() meanwhile
        if held and not self._closed and not self._cut.is_set():
            self._connect(client)
        else:
            self._drop(client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()  # frozen: what is sent stays in the kernel's buffers
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # frozen while receiving: held until restore()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._drop(sock)

    def freeze(self) -> None:
        """Blackhole: keep every connection open, forward nothing, accept
        new connections without ever answering them, until :meth:`restore`."""
        self._flowing.clear()

    def restore(self) -> None:
        """End a :meth:`cut` or a :meth:`freeze`."""
        self._cut.clear()
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._flowing.set()  # wake the frozen pumps: their sockets are closed, they exit
        self.listener.close()
