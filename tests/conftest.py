"""What the tests share: the real daemon as a child process, and real HTTP
and WebSocket clients to talk to it. One of each:

- the daemon: the ``server_factory`` fixture (``server`` for the default
  settings, or those of the test's ``@pytest.mark.daemon(NAME=value)``)
  starts ``python -m intaleq_signal`` (:class:`ServerProcess`) on a free
  port, with a SQLite call log in the test's temporary directory and
  :func:`daemon_env`'s environment, waits for its "listening on" line and
  stops it (SIGTERM) at the end of the test, asserting a clean exit and no
  traceback in its log. :func:`run_daemon` runs one to completion, for the
  start-up failures.
- HTTP: :meth:`Endpoint.request` and friends, :func:`health`,
  :func:`metric` (parsed as Prometheus text); by hand, :func:`connect_raw`,
  :func:`read_until_closed`, :func:`parse_response`.
- WebSocket, a library client (websockets): :func:`join`,
  :func:`connected_call`, :func:`recv_json` / :func:`send_json`,
  :func:`closed_with`; :class:`Clients` (the ``clients`` fixture) keeps
  track of every socket a test opens, for ``async def`` tests run by
  :func:`in_loop`.
- WebSocket by hand: :class:`RawWebSocket`, :func:`client_frame`,
  :func:`upgrade_head`, for what a library client will not do.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import http.client
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from mysql_support import MYSQL, Database, TCPProxy

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-api-key-0123456789abcdef-0123456789"
#: The columns of the call log's table (database.sql), in order.
CALL_LOG_COLUMNS = [
    "id",
    "session_id",
    "ride_id",
    "driver_id",
    "passenger_id",
    "status",
    "initiated_by",
    "end_reason",
    "created_at",
    "connected_at",
    "ended_at",
    "node_id",
    "media_connected_at",
    "driver_candidate",
    "passenger_candidate",
    "media_failures",
    "driver_media_at",
    "passenger_media_at",
]
#: The variables ``intaleq_signal/config.py`` reads (its quoted upper-case names).
CONFIG_VARIABLES = frozenset(
    set(re.findall(r'"([A-Z][A-Z_]+)"', (ROOT / "intaleq_signal" / "config.py").read_text(encoding="utf-8")))
    - {"EX_CONFIG"}
)
#: What the daemon reads from its environment: those, and what systemd
#: hands a service. :func:`daemon_env` passes none of them on from the
#: environment of the tests, so that a shell's settings never leak into a
#: test's daemon.
DAEMON_VARIABLES = CONFIG_VARIABLES | {
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "daemon(**env): the settings of the test's `server` daemon (environment variables)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ride() -> str:
    """A new ride id."""
    return f"ride-{uuid.uuid4().hex[:12]}"


def utcnow() -> datetime.datetime:
    """Now in UTC, naive, as the call log's columns are."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


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


# -- the daemon -------------------------------------------------------------------------


def daemon_env(tmp_path: Any, **overrides: str | None) -> dict[str, str]:
    """The environment of a test's daemon: this process's environment
    without any of :data:`DAEMON_VARIABLES`, then a free port, the test API
    key, development mode with a SQLite call log and a journal in
    ``tmp_path``, debug logs and a per-IP limit no test reaches by
    accident; then ``overrides`` (``None`` removes a variable)."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name not in DAEMON_VARIABLES}
    env.update(
        SERVER_ADDR=f"127.0.0.1:{port}",
        API_KEY=API_KEY,
        ENVIRONMENT="development",
        SQLITE_PATH=str(tmp_path / f"calls-{port}.sqlite3"),
        JOURNAL_PATH=str(tmp_path / f"journal-{port}.sqlite3"),
        LOG_LEVEL="debug",
        RATE_LIMIT_PER_MIN="1000",
        # Most tests stop their daemon and read what stopping ended; the
        # restart tests (tests/test_restart.py) ask for the default,
        # handoff, with ON_STOP=None.
        ON_STOP="end",
    )
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def run_daemon(
    env: dict[str, str], *args: str, stderr_path: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m intaleq_signal ARGS`` with exactly ``env`` to its end
    (a start-up that fails): its exit status and what it wrote to stderr
    (which is the file ``stderr_path`` when given, as journald's stream is)."""
    command = [sys.executable, "-m", "intaleq_signal", *args]
    if stderr_path is None:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=timeout)
    return subprocess.CompletedProcess(
        command, done.returncode, None, stderr_path.read_text(encoding="utf-8")
    )


class Endpoint:
    """HTTP and WebSocket clients for what listens on 127.0.0.1:``port``:
    the daemon, or Nginx in front of it (``log``: what it logged)."""

    port: int
    log: str

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
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

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
        """A new session (200 asserted), for a new ride unless ``ride_id``."""
        status, body = self.post_session(ride_id or ride(), driver_id, passenger_id)
        assert status == 200, (status, body, self.log)
        return body

    def ws(self, **kwargs: Any) -> Any:
        """``async with server.ws() as ws`` — a real websockets client."""
        return connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=5, **kwargs)


class ServerProcess(Endpoint):
    """A running daemon: its port, its log, and helpers to talk to it.

    Args:
        env: overrides of :func:`daemon_env` (``SERVER_ADDR`` names the port).
        tmp_path: where the call log and the journal go.
        args: arguments after ``python -m intaleq_signal`` (or ``command``).
        command: another program to run (a wrapper of the daemon).
        stderr_path: a file for the daemon's stderr (journald's stream, in
            the tests of its priorities) instead of a pipe; read as it grows.
        pass_fds: descriptors the child inherits (``subprocess.Popen``), for
            a ``command`` that hands them on (socket activation).
    """

    def __init__(
        self,
        env: dict[str, str | None],
        tmp_path: Any,
        *args: str,
        command: list[str] | None = None,
        stderr_path: Path | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.env = daemon_env(tmp_path, **env)
        self.port = int(self.env["SERVER_ADDR"].rpartition(":")[2])
        self.sqlite_path = self.env.get("SQLITE_PATH")
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._read_all = False
        if stderr_path is None:
            stderr: Any = subprocess.PIPE
        else:
            stderr = open(stderr_path, "w", encoding="utf-8")  # noqa: SIM115 - the child's from here on
        try:
            self.proc = subprocess.Popen(
                [*(command or [sys.executable, "-m", "intaleq_signal"]), *args],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                text=True,
                pass_fds=pass_fds,
            )
        finally:
            if stderr_path is not None:
                stderr.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.wait_for_log("listening on", timeout=15)
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            raise

    def _read(self) -> None:
        try:
            if self.stderr_path is None:
                assert self.proc.stderr is not None
                for line in self.proc.stderr:
                    self._logged(line.rstrip("\n"))
                return
            with open(self.stderr_path, encoding="utf-8", errors="replace") as stream:
                pending = ""
                while True:
                    exited = self.proc.poll() is not None
                    *lines, pending = (pending + stream.read()).split("\n")
                    for line in lines:
                        self._logged(line)
                    if exited:
                        if pending:
                            self._logged(pending)
                        return
                    time.sleep(0.02)
        finally:
            with self._cond:
                self._read_all = True
                self._cond.notify_all()

    def _logged(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """The first line of the log containing ``text``, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self._read_all:  # the process is gone, and so is its stderr
                    log = "\n".join(self.lines)
                    raise AssertionError(f"server exited ({self.proc.wait(5)}):\n{log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    log = "\n".join(self.lines)
                    raise AssertionError(f"{text!r} not logged within {timeout}s:\n{log}")
                self._cond.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` if still running; the exit status, once all of the
        log is read."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """``kill -9``: the daemon dies at once (the factory then expects
        no exit status of it)."""
        self.killed = True
        self.proc.kill()
        self.proc.wait(15)
        self._reader.join(5)

    def call_logs(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.sqlite_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute("SELECT * FROM call_logs ORDER BY id")]
        finally:
            conn.close()


@pytest.fixture
def server_factory(tmp_path: Any) -> Iterator[Any]:
    """``server_factory(*args, stderr_path=None, command=None, pass_fds=(),
    **env)``: a started :class:`ServerProcess`, stopped at the end of the
    test (exit 0, no traceback in its log)."""
    started: list[ServerProcess] = []

    def start(
        *args: str,
        stderr_path: Path | None = None,
        command: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        **env: Any,
    ) -> ServerProcess:
        server = ServerProcess(
            {k: None if v is None else str(v) for k, v in env.items()},
            tmp_path,
            *args,
            command=command,
            stderr_path=stderr_path,
            pass_fds=pass_fds,
        )
        started.append(server)
        return server

    yield start
    stopped = [(server.stop(), server.log) for server in started if not getattr(server, "killed", False)]
    for code, log in stopped:
        assert code == 0, f"server exited with {code}:\n{log}"
        assert "Traceback" not in log, log
        assert "connection handler failed" not in log, log


@pytest.fixture
def server(server_factory: Any, request: pytest.FixtureRequest) -> ServerProcess:
    """A daemon with the default settings (bar a lifted per-IP limit), or
    with those of the test's ``@pytest.mark.daemon(NAME=value, ...)``."""
    marker = request.node.get_closest_marker("daemon")
    return server_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def coturn_factory(tmp_path: Any) -> Iterator[Any]:
    """``coturn_factory(secret, **options)``: a started real coturn on
    loopback, from the configuration of docs/operations.md, "TURN with
    coturn" (:class:`coturn.Coturn`, its options), stopped at the end of
    the test."""
    from coturn import Coturn

    started: list[Coturn] = []

    def start(secret: str, **options: Any) -> Coturn:
        turn = Coturn(tmp_path / f"coturn-{len(started)}", secret, **options)
        started.append(turn)
        return turn

    yield start
    for turn in started:
        turn.stop()


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Cluster:
    """Daemons sharing one Redis (a key prefix of their own) and one MySQL
    call-log database: several instances of one deployment.

    ``start(name, **env)`` starts the instance ``NODE_ID=name``;
    ``instances[name]`` is its :class:`ServerProcess`.
    """

    def __init__(self, factory: Any, db: Database) -> None:
        self.factory = factory
        self.db = db
        self.prefix = f"test-{uuid.uuid4().hex[:12]}:"
        self.instances: dict[str, ServerProcess] = {}
        #: Every process started, restarted instances' earlier ones too.
        self.started: list[tuple[str, ServerProcess]] = []

    def env(self, name: str, **env: Any) -> dict[str, Any]:
        return {
            **self.db.server_env(),
            "REDIS_URL": REDIS_URL,
            "REDIS_PREFIX": self.prefix,
            "NODE_ID": name,
            "LOG_LEVEL": "debug",
            **env,
        }

    def start(self, name: str, **env: Any) -> ServerProcess:
        server = self.factory(**self.env(name, **env))
        self.instances[name] = server
        self.started.append((name, server))
        return server

    def keys(self) -> list[str]:
        import redis

        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            return sorted(client.scan_iter(f"{self.prefix}*"))
        finally:
            client.close()

    def clean(self) -> None:
        import redis

        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            keys = list(client.scan_iter(f"{self.prefix}*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


class TwoInstances(Endpoint):
    """Two instances of one deployment (:class:`Cluster`) standing in for one
    daemon, so that the protocol's tests run with the participants on
    different instances: HTTP goes to instance ``a`` (which therefore runs
    every session), WebSocket connections go to ``a`` and ``b`` in turn
    (the first, usually the driver, to ``a``; the second to ``b``; ...)."""

    def __init__(self, cluster: Cluster, env: dict[str, Any]) -> None:
        self.a = cluster.start("a", **env)
        self.b = cluster.start("b", **env)
        self.cluster = cluster
        self.port = self.a.port
        self._turn = 0

    def ws(self, **kwargs: Any) -> Any:
        target = (self.a, self.b)[self._turn % 2]
        self._turn += 1
        return target.ws(**kwargs)

    @property
    def log(self) -> str:
        return self.a.log + "\n" + self.b.log

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        def found() -> str | None:
            return next((line for line in self.log.splitlines() if text in line), None)

        return wait_until(found, timeout, 0.05, explain=lambda: self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop ``a`` (which runs the sessions), then ``b``: the first
        non-zero exit status, else 0."""
        codes = [self.a.stop(sig, timeout), self.b.stop(sig, timeout)]
        return next((code for code in codes if code), 0)

    def call_logs(self) -> list[dict[str, Any]]:
        """The MySQL rows, times as the SQLite call log writes them (text)."""
        return [
            {
                k: v.isoformat(" ", "milliseconds") if isinstance(v, datetime.datetime) else v
                for k, v in row.items()
            }
            for row in self.cluster.db.rows()
        ]


@pytest.fixture
def cluster(server_factory: Any, db: Database) -> Iterator[Cluster]:
    """Instances of one deployment on the machine's Redis and MySQL; their
    Redis keys are removed afterwards (the daemons are stopped first)."""
    group = Cluster(server_factory, db)
    yield group
    for server in group.instances.values():
        server.stop()
    group.clean()


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


# -- HTTP -------------------------------------------------------------------------------


def health(server: Endpoint) -> dict[str, Any]:
    """``GET /health`` (200 asserted), as a document."""
    status, _, body = server.request("GET", "/health")
    assert status == 200, body
    return json.loads(body)


def metric(server: Endpoint, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` in
    ``GET /metrics``, read with Prometheus' own parser."""
    status, _, body = server.request("GET", "/metrics")
    assert status == 200, body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} {labels or ''} not in /metrics:\n{body.decode()}")


def connect_raw(server: Endpoint) -> socket.socket:
    """A TCP connection to ``server`` for bytes by hand (TCP_NODELAY: each
    write leaves at once)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until the server closes: ``(data, closed)``; ``closed`` is False
    when ``timeout`` passed with the connection still open."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 response: ``(status, lower-cased headers, body)``."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


# -- WebSocket: a library client ----------------------------------------------------------


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send_json(ws: ClientConnection, message: Any) -> None:
    await ws.send(json.dumps(message))


def auth_msg(session: dict[str, Any], user_id: str, **extra: Any) -> dict[str, Any]:
    """An ``authenticate`` message (with ``extra`` fields)."""
    return {"type": "authenticate", "session_id": session["session_id"], "user_id": user_id, **extra}


async def authenticate(ws: ClientConnection, session: dict[str, Any], user_id: str, **extra: Any) -> list:
    """Send ``authenticate`` (with ``extra`` fields); the two messages that
    answer it, asserted ``authenticated`` then ``session_joined``."""
    await send_json(ws, auth_msg(session, user_id, **extra))
    first = [await recv_json(ws), await recv_json(ws)]
    assert [m["type"] for m in first] == ["authenticated", "session_joined"], first
    return first


async def join(
    server: Endpoint, session: dict[str, Any], user_id: str, headers: dict[str, str] | None = None
) -> tuple[ClientConnection, list]:
    """Open a socket (``headers`` added to its upgrade request),
    authenticate, return it with the messages up to ``session_joined``."""
    ws = await server.ws(additional_headers=headers or {})
    return ws, await authenticate(ws, session, user_id)


async def connected_call(
    server: Endpoint,
    session: dict[str, Any],
    driver: str = "driver-1",
    passenger: str = "passenger-1",
    headers: dict[str, str] | None = None,
) -> tuple[ClientConnection, ClientConnection]:
    """Both participants joined (the driver first, with ``headers`` added
    to both upgrade requests) and told of each other: an active call."""
    d, _ = await join(server, session, driver, headers)
    p, _ = await join(server, session, passenger, headers)
    assert await recv_json(p) == {"type": "participant_joined", "role": "driver"}
    assert await recv_json(d) == {"type": "participant_joined", "role": "passenger"}
    return d, p


async def attempt(
    endpoint: Endpoint,
    headers: dict[str, str] | None = None,
    session: dict[str, Any] | None = None,
    user_id: str = "driver-1",
) -> int:
    """One WebSocket upgrade attempt: 101, or the HTTP status refusing it.
    Without ``session`` the socket is closed without authenticating (an
    upgrade that counts towards ``RATE_LIMIT_PER_MIN``); with it, it
    authenticates as ``user_id`` first (one that never counts)."""
    try:
        async with endpoint.ws(additional_headers=headers or {}) as ws:
            if session is not None:
                await authenticate(ws, session, user_id)
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Wait for the server to close ``ws``; returns the close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except Exception:  # noqa: BLE001 - ConnectionClosed*, the only way out
        pass
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code


def ice_candidate(n: int) -> dict[str, Any]:
    """The ``n``-th (from 1) of a participant's host candidates, as an app sends it."""
    line = f"candidate:{n} 1 udp 1 10.0.0.{n} {4999 + n} typ host"
    return {"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0}


async def relay_and_end(
    driver: ClientConnection, passenger: ClientConnection, candidates: int = 1, driver_candidates: int = 0
) -> None:
    """The rest of a call once both joined: an offer, an answer, then
    ``candidates`` ICE candidates from the passenger and
    ``driver_candidates`` from the driver (each side's sent back to back),
    all relayed exactly and in order; then ``end_call`` ending it for both
    (1000)."""
    offer = {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"}
    await send_json(driver, offer)
    assert await recv_json(passenger) == offer
    answer = {"type": "answer", "sdp": "v=0\r\nanswer"}
    await send_json(passenger, answer)
    assert await recv_json(driver) == answer
    for sender, receiver, count in ((passenger, driver, candidates), (driver, passenger, driver_candidates)):
        sent = [{"type": "ice_candidate", "candidate": ice_candidate(n)} for n in range(1, count + 1)]
        for message in sent:
            await send_json(sender, message)
        assert [await recv_json(receiver) for _ in sent] == sent
    await send_json(driver, {"type": "end_call"})
    assert await recv_json(driver) == {"type": "call_ended", "reason": "user_terminated"}
    assert await recv_json(passenger) == {"type": "call_ended", "reason": "user_terminated"}
    assert await closed_with(driver) == 1000
    assert await closed_with(passenger) == 1000


class Clients:
    """The WebSocket clients of one test on one daemon, real websockets
    clients and hand-written ones, every one aborted by :meth:`close` (which
    :func:`in_loop` calls), so that no test leaves a socket for the daemon
    to wait on."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.opened: list[ClientConnection] = []
        self.raws: list[RawWebSocket] = []

    async def connect(self, **kwargs: Any) -> ClientConnection:
        ws = await self.server.ws(**kwargs)
        self.opened.append(ws)
        return ws

    async def join(
        self, session: dict[str, Any], user_id: str, **extra: Any
    ) -> tuple[ClientConnection, list[dict[str, Any]]]:
        """A new socket, authenticated as ``user_id`` (with ``extra`` fields):
        it, and its ``authenticated`` and ``session_joined``."""
        ws = await self.connect()
        return ws, await authenticate(ws, session, user_id, **extra)

    async def meet(
        self, session: dict[str, Any], user_id: str, peer: ClientConnection, *held: Any, **extra: Any
    ) -> tuple[ClientConnection, list[dict[str, Any]]]:
        """``user_id`` joins (as :meth:`join`) while ``peer`` is there: it is
        told of the peer, then gets ``held`` (the messages held for it), and
        the peer is told of it."""
        ws, first = await self.join(session, user_id, **extra)
        role = first[1]["role"]
        other = "passenger" if role == "driver" else "driver"
        assert [await recv_json(ws) for _ in range(1 + len(held))] == [
            {"type": "participant_joined", "role": other},
            *held,
        ]
        assert await recv_json(peer) == {"type": "participant_joined", "role": role}
        return ws, first

    async def pair(
        self, session: dict[str, Any], driver: str = "driver-1", passenger: str = "passenger-1"
    ) -> tuple[ClientConnection, ClientConnection]:
        """Both participants connected, the call active, joins consumed."""
        d, _ = await self.join(session, driver)
        p, _ = await self.meet(session, passenger, d)
        return d, p

    def raw(self, *headers: str) -> RawWebSocket:
        """A :class:`RawWebSocket` (upgrade request with ``headers``)."""
        raw = RawWebSocket(self.server, *headers)
        self.raws.append(raw)
        return raw

    async def close(self) -> None:
        """Abort every socket opened so far."""
        for ws in self.opened:
            ws.transport.abort()
        for raw in self.raws:
            raw.close()
        self.opened, self.raws = [], []
        await asyncio.sleep(0)


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run ``async def test_...`` in a fresh event loop; the :class:`Clients`
    it was given (the ``clients`` fixture) are closed in that loop at the end."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            try:
                await test(*args, **kwargs)
            finally:
                for value in (*args, *kwargs.values()):
                    if isinstance(value, Clients):
                        await value.close()

        asyncio.run(main())

    return run


@pytest.fixture
def clients(server: ServerProcess) -> Clients:
    """The test's clients of its ``server`` (for tests run by :func:`in_loop`)."""
    return Clients(server)


# -- WebSocket by hand -----------------------------------------------------------------------


def upgrade_head(*headers: str) -> bytes:
    """A WebSocket upgrade request for ``/ws`` (a new key), with ``headers``
    added."""
    lines = [
        "GET /ws HTTP/1.1",
        "Host: x",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame (RFC 6455 §5.2): ``fin=False`` for all but the last
    fragment of a message; masked, as clients must (``masked=False`` is a
    protocol error, RFC 6455 §5.1)."""
    size = len(payload)
    if size < 126:
        length = bytes((size,))
    elif size < 65536:
        length = bytes((126,)) + size.to_bytes(2, "big")
    else:
        length = bytes((127,)) + size.to_bytes(8, "big")
    first = bytes(((0x80 if fin else 0) | opcode,))
    if not masked:
        return first + length + payload
    mask = os.urandom(4)
    keys = (mask * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(size, "big")
    return first + bytes((0x80 | length[0],)) + length[1:] + mask + body


class RawWebSocket:
    """A WebSocket client written by hand on a blocking TCP socket, for what
    a library client will not do: it sends whatever it is told (fragments,
    control frames, unmasked or invalid frames, bytes pipelined right behind
    the upgrade request), answers a ping only when told to, sends no close
    frame of its own accord, and shows every frame the server sends. Its
    frames leave at once (TCP_NODELAY, no Nagle delay behind an
    unacknowledged earlier frame), so that what two clients send reaches
    the daemon in the order they sent it.

    Args:
        server: the daemon (its ``port``).
        headers: extra header lines of the upgrade request.
        pipelined: bytes sent in the same write as the upgrade request.
        rcvbuf: a small SO_RCVBUF, for a client that stops reading.
        timeout: how long any read waits before TimeoutError.
    """

    def __init__(
        self,
        server: Endpoint,
        *headers: str,
        pipelined: bytes = b"",
        rcvbuf: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.timeout = timeout
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]  # this end's, as /proc/net/tcp shows it
        self.buffer = b""
        self.send(upgrade_head(*headers) + pipelined)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        self.head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert self.head.startswith(b"HTTP/1.1 101 "), f"not a 101 answer first: {self.head!r}"

    # -- sending

    def send(self, data: bytes) -> None:
        """Bytes as they are (frames made with :func:`client_frame`)."""
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> None:
        self.send(client_frame(opcode, payload, fin=fin, masked=masked))

    def send_json(self, message: Any) -> None:
        self.send_frame(0x1, json.dumps(message).encode())

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(0x8, struct.pack("!H", code))

    def join(self, session: dict[str, Any], user_id: str) -> None:
        """Authenticate; ``authenticated`` and ``session_joined`` read."""
        self.send_json(auth_msg(session, user_id))
        assert self.text()["type"] == "authenticated"
        assert self.text()["type"] == "session_joined"

    # -- receiving

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            raise EOFError("the server closed the TCP connection")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return taken

    def frame(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next frame from the server, ``(opcode, payload)``; EOFError
        once the server closed (or reset) the TCP connection."""
        self.sock.settimeout(timeout or self.timeout)
        try:
            first, second = self._take(2)
            assert first & 0x80 and not second & 0x80, "server frames are whole and unmasked"
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._take(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._take(8))
            return first & 0x0F, self._take(length)
        finally:
            self.sock.settimeout(self.timeout)

    def text(self, answer_pings: bool = False) -> dict[str, Any]:
        """The next text message; the pings before it (nothing else may
        come) are answered only if ``answer_pings``."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x1:
                return json.loads(payload)
            assert opcode == 0x9, (opcode, payload)
            if answer_pings:
                self.send_frame(0xA, payload)

    def closing(self) -> tuple[list[dict[str, Any]], int]:
        """The text messages up to the server's close frame, and its code;
        the close frame is not answered."""
        messages = []
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return messages, (struct.unpack("!H", payload[:2])[0] if payload else 1005)
            if opcode == 0x1:
                messages.append(json.loads(payload))

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for bytes from the server."""
        self.sock.settimeout(timeout)
        try:
            self._fill()
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return True

    def wait_eof(self, timeout: float = 15.0) -> float:
        """Read until the server drops the TCP connection; the moment it did."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return time.monotonic()

    # -- ending

    def reset(self) -> None:
        """Drop the TCP connection with a RST (SO_LINGER 0), no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """Tests that run ``intaleq_signal.__main__.main`` in this process set
    up the daemon's logging (a handler on the stream pytest captures for
    that test); the next tests must not log into that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
