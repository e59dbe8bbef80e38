"""Socket activation (docs/operations.md, "systemd"; sd_listen_fds(3),
systemd.socket(5)): a listening socket handed over as file descriptor 3 with
``LISTEN_PID`` and ``LISTEN_FDS`` is served instead of ``SERVER_ADDR``, and
outlives the daemon, so that a client connecting while it restarts is
served by the next one instead of being refused.

The daemons are real processes, started the way systemd starts them: a small
wrapper (:data:`WRAPPER`) puts the test's sockets at descriptors 3, 4, ...,
sets ``LISTEN_PID`` to its own pid and ``LISTEN_FDS``, then execs the daemon
(the pid stays the same).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    ROOT,
    ServerProcess,
    connected_call,
    daemon_env,
    free_port,
    health,
    parse_response,
    read_until_closed,
    relay_and_end,
)
from intaleq_signal.exceptions import ConfigError
from intaleq_signal.systemd import LISTEN_BACKLOG, listen_fds, listening_socket, take_listen_socket

pytestmark = pytest.mark.compat

#: ``python -c WRAPPER FD,FD,... [ARGS]``: the descriptors moved to 3, 4, ...
#: (through high numbers first, so that none is overwritten before it is
#: moved), ``LISTEN_PID`` (this pid, unless set) and ``LISTEN_FDS`` (their
#: count, unless set), then ``exec python -m intaleq_signal ARGS``.
WRAPPER = """\
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for number, fd in enumerate(high, start=3):
    os.dup2(fd, number)
    os.close(fd)
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
os.environ.setdefault("LISTEN_FDS", str(len(fds)))
os.execv(sys.executable, [sys.executable, "-m", "intaleq_signal", *sys.argv[2:]])
"""


def tcp_listener(backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """What ``ListenStream=127.0.0.1:PORT`` makes: a listening TCP socket."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def handing(*socks: socket.socket) -> dict[str, Any]:
    """``server_factory`` arguments starting the daemon with ``socks``
    handed over as systemd does."""
    fds = tuple(sock.fileno() for sock in socks)
    return {
        "command": [sys.executable, "-c", WRAPPER, ",".join(map(str, fds))],
        "pass_fds": fds,
    }


def activated(server_factory: Any, sock: socket.socket, **env: Any) -> ServerProcess:
    """A daemon serving ``sock`` (its ``port`` that of ``sock``; its
    ``SERVER_ADDR`` another, free port)."""
    server = server_factory(**handing(sock), **env)
    server.port = sock.getsockname()[1]
    return server


def run_handed(tmp_path: Path, socks: list[socket.socket], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a daemon handed ``socks`` to its end (a start-up that fails), at
    the tests' LOG_LEVEL=debug: still one line."""
    arguments = handing(*socks)
    return subprocess.run(
        arguments["command"],
        pass_fds=arguments["pass_fds"],
        env=daemon_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def listen_backlog(port: int) -> int | None:
    """The backlog of the socket listening on ``port``, as ss(8) shows it
    (Send-Q of a listening socket), or None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    return int(out[2])


def get_health(sock: socket.socket, timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    """The answer to the ``GET /health`` already sent on ``sock``."""
    data, closed = read_until_closed(sock, timeout)
    assert closed, data
    status, _, body = parse_response(data)
    return status, json.loads(body)


# -- real daemons ----------------------------------------------------------------------


def test_serves_http_and_websocket_on_the_socket_from_systemd(server_factory) -> None:
    """docs/operations.md, "systemd": the daemon serves the socket it is handed (HTTP and
    WebSocket), says so, ignores SERVER_ADDR, keeps the socket's backlog, and marks the
    descriptor close-on-exec (sd_listen_fds(3))."""
    with tcp_listener() as sock:
        ignored = free_port()
        server = activated(
            server_factory, sock, SERVER_ADDR=f"127.0.0.1:{ignored}", LISTEN_FDNAMES="intaleq-signal.socket"
        )
        line = server.wait_for_log("listening on")
        assert f"listening on 127.0.0.1:{server.port} (socket from systemd) (" in line, line
        assert health(server)["status"] == "ok"
        session = server.new_session()

        async def call() -> None:
            driver, passenger = await connected_call(server, session)
            await relay_and_end(driver, passenger)

        asyncio.run(call())
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ignored), timeout=2).close()
        flags = (Path(f"/proc/{server.proc.pid}/fdinfo/3").read_text().split("flags:")[1]).split()[0]
        assert int(flags, 8) & os.O_CLOEXEC, flags
        backlog = listen_backlog(server.port)
        if backlog is not None:
            somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
            assert backlog == min(LISTEN_BACKLOG, somaxconn), backlog  # not asyncio's 100
        assert server.stop() == 0, server.log


def test_a_client_connecting_during_a_restart_is_served(server_factory) -> None:
    """docs/operations.md, "systemd": the socket outlives the daemon. A client that
    connects between one daemon's exit and the next one's start waits in the backlog
    and gets its answer from the next daemon instead of a refused connection."""
    with tcp_listener() as sock:
        first = activated(server_factory, sock)
        assert health(first)["status"] == "ok"
        assert first.stop() == 0, first.log
        with socket.create_connection(("127.0.0.1", first.port), timeout=5) as client:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data, closed = read_until_closed(client, 0.3)
            assert (data, closed) == (b"", False)  # nobody serves it yet
            second = activated(server_factory, sock)
            status, document = get_health(client)
        assert (status, document["status"]) == (200, "ok"), document
        assert health(second)["status"] == "ok"
        assert second.stop() == 0, second.log


def test_listen_pid_of_another_process_is_ignored(server_factory) -> None:
    """sd_listen_fds(3): LISTEN_PID naming another process (here the test's own) means
    the descriptors are not this one's: the daemon binds SERVER_ADDR."""
    with tcp_listener() as sock:
        server = server_factory(**handing(sock), LISTEN_PID=str(os.getpid()))
        line = server.wait_for_log("listening on")
        assert f"listening on 127.0.0.1:{server.port} (environment=" in line, line
        assert health(server)["status"] == "ok"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("two listening sockets", r"LISTEN_FDS=2 \(LISTEN_FDNAMES=a:b\): one listening socket expected"),
        ("a UDP socket", r"LISTEN_FDS: file descriptor 3 is an AF_INET SOCK_DGRAM socket"),
        (
            "a TCP socket not listening",
            r"LISTEN_FDS: file descriptor 3 is an AF_INET SOCK_STREAM socket, not listening",
        ),
        ("a Unix stream socket", r"LISTEN_FDS: file descriptor 3 is an AF_UNIX SOCK_STREAM socket"),
        ("nothing at all", r"LISTEN_FDS"),
        ("a malformed count", r"LISTEN_FDS='one' is not a number"),
    ],
)
def test_anything_but_one_listening_tcp_socket_exits_78(tmp_path, case: str, expected: str) -> None:
    """docs/operations.md, "systemd": the daemon takes exactly one listening TCP socket;
    anything else is a configuration error naming LISTEN_FDS (exit 78, one line), before
    the call log is opened."""
    socks: list[socket.socket] = []
    env = {}
    if case == "two listening sockets":
        socks = [tcp_listener(), tcp_listener()]
        env["LISTEN_FDNAMES"] = "a:b"
    elif case == "a UDP socket":
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
        socks[0].bind(("127.0.0.1", 0))
    elif case == "a TCP socket not listening":
        socks = [socket.socket()]
        socks[0].bind(("127.0.0.1", 0))
    elif case == "a Unix stream socket":
        socks = [socket.socket(socket.AF_UNIX)]
        socks[0].bind(str(tmp_path / "unix.sock"))
        socks[0].listen()
    elif case == "nothing at all":
        env["LISTEN_FDS"] = "1"
    else:
        socks = [tcp_listener()]
        env["LISTEN_FDS"] = "one"
    try:
        done = run_handed(tmp_path, socks, **env)
    finally:
        for sock in socks:
            sock.close()
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("intaleq-signal: configuration error: LISTEN_FDS"), lines
    assert re.search(expected, lines[0]), lines
    assert not list(tmp_path.glob("calls-*.sqlite3"))  # the call log not even created


# -- listen_fds, take_listen_socket, listening_socket ----------------------------------------


def test_listen_fds_reads_as_sd_listen_fds() -> None:
    """sd_listen_fds(3): descriptors from 3 on, only for the process LISTEN_PID names."""
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    before = dict(env)
    assert listen_fds(env, 42) == [3, 4]
    assert env == before  # nothing changed
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, 42) == [3]
    assert listen_fds(env, 43) == []  # another process's
    assert listen_fds({}, 42) == []
    assert listen_fds({"LISTEN_FDS": "1"}, 42) == []  # no LISTEN_PID
    assert listen_fds({"LISTEN_PID": "42"}, 42) == []  # no LISTEN_FDS
    assert listen_fds({"LISTEN_PID": "", "LISTEN_FDS": ""}, 42) == []  # empty: unset


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "-42", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1x"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "\u00b2"}, "LISTEN_FDS"),  # '²'.isdigit()
        ({"LISTEN_PID": "42", "LISTEN_FDS": str(10**12)}, "LISTEN_FDS"),
    ],
)
def test_listen_fds_refuses_malformed_values(env: dict[str, str], name: str) -> None:
    """sd_listen_fds(3) returns -EINVAL for these: a configuration error naming the variable."""
    with pytest.raises(ConfigError, match=name):
        listen_fds(env, 42)


def test_take_listen_socket_unsets_the_variables(monkeypatch) -> None:
    """sd_listen_fds(3) with unset_environment: LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES
    are gone afterwards, whatever they said, so that no child inherits them."""
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert take_listen_socket(env, pid=42) is None
    assert env == {"OTHER": "kept"}
    env = {"LISTEN_PID": "abc", "LISTEN_FDS": "1"}
    with pytest.raises(ConfigError, match="LISTEN_PID"):
        take_listen_socket(env, pid=42)
    assert env == {}
    for name, value in {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}.items():
        monkeypatch.setenv(name, value)
    assert take_listen_socket() is None  # LISTEN_PID=1 is not this process
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if k.startswith('LISTEN_')))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "[]"


def test_listening_socket_takes_a_listening_tcp_socket() -> None:
    """systemd.socket(5), ListenStream=host:port: the descriptor becomes a socket object
    on the same listening socket."""
    with tcp_listener(16) as original:
        sock = listening_socket(os.dup(original.fileno()))
        try:
            assert sock.getsockname() == original.getsockname()
            assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
        finally:
            sock.close()
    if socket.has_ipv6:
        try:
            original = socket.create_server(("::1", 0), family=socket.AF_INET6)
        except OSError:
            return  # no IPv6 loopback here
        with original:
            sock = listening_socket(os.dup(original.fileno()))
            sock.close()


def test_listening_socket_refuses_anything_else_and_leaves_it_open(tmp_path) -> None:
    """docs/operations.md, "systemd": a UDP socket, a TCP socket not listening, a Unix
    socket or no socket at all is a ConfigError naming LISTEN_FDS; the descriptor is
    not closed."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    idle = socket.socket()
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "unix.sock"))
    unix.listen()
    read_end, write_end = os.pipe()
    try:
        for fd, what in (
            (udp.fileno(), "SOCK_DGRAM socket"),
            (idle.fileno(), "SOCK_STREAM socket, not listening"),
            (unix.fileno(), "AF_UNIX SOCK_STREAM socket"),
            (read_end, "not a socket"),
        ):
            with pytest.raises(ConfigError, match=f"LISTEN_FDS: file descriptor {fd} is .*{what}"):
                listening_socket(fd)
            os.fstat(fd)  # still open
    finally:
        for sock in (udp, idle, unix):
            sock.close()
        os.close(read_end)
        os.close(write_end)


# -- the socket unit ----------------------------------------------------------------------


def socket_unit_setting(name: str) -> list[str]:
    unit = (ROOT / "intaleq-signal.socket").read_text()
    return [value.strip() for value in re.findall(rf"^{name}=(.*)$", unit, re.M)]


def test_socket_unit_directives() -> None:
    """docs/operations.md, "systemd": one TCP ListenStream= on the daemon's default address,
    NoDelay, the backlog the daemon keeps (LISTEN_BACKLOG), and enabled by sockets.target.
    Without Service= it pairs with intaleq-signal.service by name."""
    assert socket_unit_setting("ListenStream") == ["127.0.0.1:47880"]
    assert socket_unit_setting("ListenDatagram") == []
    assert socket_unit_setting("NoDelay") == ["true"]
    assert socket_unit_setting("Backlog") == [str(LISTEN_BACKLOG)]
    assert socket_unit_setting("WantedBy") == ["sockets.target"]
    assert socket_unit_setting("Service") == []
    assert socket_unit_setting("Accept") in ([], ["no"])


def test_the_service_does_not_require_the_socket() -> None:
    """docs/operations.md, "systemd": the service runs with or without its socket unit,
    so it neither requires nor binds to it."""
    unit = (ROOT / "intaleq-signal.service").read_text()
    for directive in ("Requires", "BindsTo", "Requisite", "Sockets"):
        assert not re.search(rf"^{directive}=.*intaleq-signal\.socket", unit, re.M), directive
