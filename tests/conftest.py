"""Shared fixtures: the real daemon as a child process, real HTTP and real
WebSocket clients.

``server_factory(**env)`` starts ``python -m intaleq_signal`` on a free port
with a SQLite call log in a temporary directory and the given environment
overrides, waits for its "listening on" line and stops it (SIGTERM) at the
end of the test, asserting a clean exit and no traceback in its log.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from mysql_support import MYSQL, Database, TCPProxy

API_KEY = "test-api-key-0123456789abcdef-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running daemon: its port, its log, and helpers to talk to it."""

    def __init__(self, env: dict[str, str], tmp_path: Any, argv: list[str] | None = None) -> None:
        self.port = free_port()
        self.sqlite_path = str(tmp_path / f"calls-{self.port}.sqlite3")
        self.env = {
            **os.environ,
            "SERVER_ADDR": f"127.0.0.1:{self.port}",
            "API_KEY": API_KEY,
            "ENVIRONMENT": "development",
            "SQLITE_PATH": self.sqlite_path,
            "JOURNAL_PATH": str(tmp_path / f"journal-{self.port}.sqlite3"),
            "LOG_LEVEL": "debug",
            "RATE_LIMIT_PER_MIN": "1000",
            **env,
        }
        if "DB_USERNAME" not in env:
            self.env.pop("DB_USERNAME", None)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-m", "intaleq_signal"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_log("listening on", timeout=15)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.log_unlocked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log_unlocked()}")
                self._cond.wait(left)

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    # -- HTTP ---------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request on a new connection: ``(status, headers, body)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        result = response.status, {k.lower(): v for k, v in response.getheaders()}, data
        conn.close()
        return result

    def post_session(
        self,
        ride_id: str = "ride-1",
        driver_id: str = "driver-1",
        passenger_id: str = "passenger-1",
        key: str = API_KEY,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        status, _, data = self.request(
            "POST",
            "/sessions",
            {"ride_id": ride_id, "driver_id": driver_id, "passenger_id": passenger_id},
            {"X-API-Key": key, "Content-Type": "application/json", **(headers or {})},
        )
        return status, json.loads(data)

    def new_session(
        self, ride_id: str | None = None, driver_id: str = "driver-1", passenger_id: str = "passenger-1"
    ) -> dict[str, Any]:
        status, body = self.post_session(ride_id or f"ride-{time.monotonic_ns()}", driver_id, passenger_id)
        assert status == 200, body
        return body

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes, return everything read until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    # -- WebSocket ----------------------------------------------------------

    def ws(self, **kwargs: Any) -> Any:
        """``async with server.ws() as ws`` — a real websockets client."""
        return connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=5, **kwargs)

    def call_logs(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.sqlite_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute("SELECT * FROM call_logs ORDER BY id")]
        finally:
            conn.close()


def wait_until(predicate: Any, timeout: float = 15.0, step: float = 0.1, explain: Any = None) -> Any:
    """Poll ``predicate`` until it returns something true (returned), or
    fail after ``timeout`` seconds, with ``explain()`` in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f":\n{explain()}" if explain is not None else ""
            raise AssertionError(f"condition not reached within {timeout}s{detail}")
        time.sleep(step)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send_json(ws: ClientConnection, message: Any) -> None:
    await ws.send(json.dumps(message))


async def join(server: ServerProcess, session: dict[str, Any], user_id: str) -> tuple[ClientConnection, list]:
    """Open a socket, authenticate, return it with the messages up to
    ``session_joined``."""
    ws = await server.ws().__aenter__()
    await send_json(ws, {"type": "authenticate", "session_id": session["session_id"], "user_id": user_id})
    first = [await recv_json(ws), await recv_json(ws)]
    assert [m["type"] for m in first] == ["authenticated", "session_joined"], first
    return ws, first


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Wait for the server to close ``ws``; returns the close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except Exception:  # noqa: BLE001 - ConnectionClosed*, the only way out
        pass
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code


async def relay_and_end(driver: ClientConnection, passenger: ClientConnection) -> None:
    """The rest of a call once both joined: an offer, an answer and a
    candidate relayed exactly, then ``end_call`` ending it for both (1000)."""
    offer = {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"}
    await send_json(driver, offer)
    assert await recv_json(passenger) == offer
    answer = {"type": "answer", "sdp": "v=0\r\nanswer"}
    await send_json(passenger, answer)
    assert await recv_json(driver) == answer
    candidate = {"candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
    await send_json(passenger, {"type": "ice_candidate", "candidate": candidate})
    assert await recv_json(driver) == {"type": "ice_candidate", "candidate": candidate}
    await send_json(driver, {"type": "end_call"})
    assert await recv_json(driver) == {"type": "call_ended", "reason": "user_terminated"}
    assert await recv_json(passenger) == {"type": "call_ended", "reason": "user_terminated"}
    assert await closed_with(driver) == 1000
    assert await closed_with(passenger) == 1000


@pytest.fixture
def server_factory(tmp_path: Any) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess({k: str(v) for k, v in env.items()}, tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        code = server.stop()
        log = server.log
        assert code == 0, f"server exited with {code}:\n{log}"
        assert "Traceback" not in log, log
        assert "connection handler failed" not in log, log


@pytest.fixture
def db() -> Iterator[Database]:
    """A MySQL database with a random name, dropped afterwards."""
    database = Database()
    yield database
    database.drop()


@pytest.fixture
def proxy() -> Iterator[TCPProxy]:
    """A TCP proxy to MySQL the test can cut, freeze and restore."""
    tcp = TCPProxy((MYSQL["host"], MYSQL["port"]))
    yield tcp
    tcp.close()


@pytest.fixture
def server(server_factory: Any) -> ServerProcess:
    """A daemon with the default settings (bar a lifted per-IP limit)."""
    return server_factory()
