"""The Nginx blocks of docs/operations.md in front of the real daemon.

The ```nginx blocks are read from docs/operations.md at test time: the one
of section "Nginx and TLS", changed only as far as a loopback test without
TLS needs (the port-80 redirect server is dropped, ``listen 443 ssl``
becomes a free loopback port, the ``ssl_*`` lines go, and ``proxy_pass``
points at the test daemon), and the ``upstream`` of section "Several
instances", whose ``server`` lines become the test instances' ports and
whose name the server block's ``proxy_pass`` then names, as that section
says. The ``map``, every ``location`` directive and every other upstream
directive are kept verbatim, so an edit of the documentation that breaks a
block breaks these tests. A real ``nginx`` binary is required (``.ci/run``
installs it); the tests fail, not skip, without one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    API_KEY,
    Endpoint,
    attempt,
    connected_call,
    free_port,
    health,
    relay_and_end,
    ride,
    wait_until,
)

#: Where the documented Nginx blocks live (they used to be in README.md).
OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
NGINX_SECTION = "## Nginx and TLS"
CLUSTER_SECTION = "## Several instances"
#: The documented upstream; replaced by the test daemon's port.
README_UPSTREAM = "proxy_pass http://127.0.0.1:47880;"
REFUSED = "connection refused reason=ip_rate_limited ip="
#: What Nginx logs of a WebSocket upgrade it proxied (once the socket closed).
UPGRADE = '"GET /ws HTTP/1.1" 101 '


# -- the documented blocks and their loopback variants -------------------------


def docs_nginx_block(section: str) -> str:
    """The one fenced ```nginx block of ``section`` of docs/operations.md.
    Every ```nginx block of the file is in one of the two sections these
    tests read, so none goes untested."""
    text = OPERATIONS.read_text(encoding="utf-8")
    assert re.search(rf"^{section}$", text, re.M), f"docs/operations.md lost its {section!r} section"
    part = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```nginx\n(.*?)^```$", part, flags=re.M | re.S)
    assert len(blocks) == 1, f"expected exactly one ```nginx block in {section!r}, found {len(blocks)}"
    everywhere = re.findall(r"^```nginx\n", text, flags=re.M)
    tested = (NGINX_SECTION, CLUSTER_SECTION)
    assert len(everywhere) == len(tested), (
        f"expected one ```nginx block in each of {tested} and none elsewhere in docs/operations.md: "
        f"found {len(everywhere)}"
    )
    return blocks[0]


def readme_nginx_block() -> str:
    """The block of "Nginx and TLS"."""
    return docs_nginx_block(NGINX_SECTION)


def _code(line: str) -> str:
    """A config line without its comment and surrounding blanks."""
    return line.split("#", 1)[0].strip()


def top_level_blocks(config: str) -> list[str]:
    """Split a config into its top-level ``name ... { ... }`` blocks."""
    blocks: list[str] = []
    current: list[str] = []
    depth = 0
    for line in config.splitlines():
        code = _code(line)
        if depth == 0 and not code:
            continue  # blank lines and comments between blocks
        current.append(line)
        depth += code.count("{") - code.count("}")
        assert depth >= 0, f"unbalanced '}}' in the README nginx block at {line!r}"
        if depth == 0:
            blocks.append("\n".join(current))
            current = []
    assert depth == 0 and not current, "unbalanced '{' in the README nginx block"
    return blocks


def loopback_config(block: str, listen_port: int, upstream: str) -> str:
    """The README block, minimally changed for plain HTTP on loopback,
    proxying to ``upstream`` (``127.0.0.1:<port>``, or an upstream's name)."""
    blocks = top_level_blocks(block)
    maps = [b for b in blocks if _code(b.splitlines()[0]).startswith("map $http_upgrade $connection_upgrade")]
    assert len(maps) == 1, f"README nginx block: expected one map $http_upgrade $connection_upgrade: {blocks}"
    servers = [b for b in blocks if _code(b.splitlines()[0]) == "server {"]
    tls = [b for b in servers if any(_code(line) == "listen 443 ssl;" for line in b.splitlines())]
    assert len(tls) == 1, "README nginx block: expected one server with 'listen 443 ssl;'"
    redirects = [b for b in servers if b not in tls]
    for redirect in redirects:
        assert "return 301 https://$host$request_uri;" in redirect, f"unexpected server block:\n{redirect}"
    assert len(blocks) == len(maps) + len(servers), f"unexpected top-level blocks: {blocks}"

    seen = {"listen": 0, "listen6": 0, "ssl": 0, "proxy_pass": 0}
    lines = []
    for line in tls[0].splitlines():
        code = _code(line)
        indent = line[: len(line) - len(line.lstrip())]
        if code == "listen 443 ssl;":
            seen["listen"] += 1
            lines.append(f"{indent}listen 127.0.0.1:{listen_port};")
        elif code == "listen [::]:443 ssl;":
            seen["listen6"] += 1
        elif code.startswith("ssl_"):
            seen["ssl"] += 1
        elif code == README_UPSTREAM:
            seen["proxy_pass"] += 1
            lines.append(f"{indent}proxy_pass http://{upstream};")
        else:
            lines.append(line)
    assert seen["listen"] == 1 and seen["proxy_pass"] == 1, f"README nginx block changed shape: {seen}"
    assert seen["ssl"] >= 2, f"README nginx block: expected ssl_certificate(_key) lines: {seen}"
    server = "\n".join(lines)
    assert not re.search(r"\bssl\b", "\n".join(_code(line) for line in lines)), server
    kept = ("location /metrics { deny all; }", "location / {", "proxy_set_header X-Real-IP $remote_addr;")
    for directive in kept:
        assert directive in server, f"README nginx block lost {directive!r}"
    return f"{maps[0]}\n\n{server}\n"


def upstream_config(block: str, ports: Sequence[int]) -> tuple[str, str]:
    """The block of "Several instances" with its ``server`` lines on
    ``ports``, in order: ``(the upstream block, its name)``. The section says
    to name the upstream in the server block's ``proxy_pass``: the block
    must spell that line out."""
    blocks = top_level_blocks(block)
    assert len(blocks) == 1, f"{CLUSTER_SECTION!r}: expected one upstream block, found {blocks}"
    lines = blocks[0].splitlines()
    head = re.fullmatch(r"upstream (\w+) \{", _code(lines[0]))
    assert head, f"{CLUSTER_SECTION!r}: not an upstream block:\n{blocks[0]}"
    name = head.group(1)
    assert f"proxy_pass http://{name};" in block, f"{CLUSTER_SECTION!r}: no 'proxy_pass http://{name};'"
    assert "least_conn;" in map(_code, lines), f"{CLUSTER_SECTION!r}: no least_conn:\n{blocks[0]}"
    servers = [n for n, line in enumerate(lines) if re.fullmatch(r"server 127\.0\.0\.1:\d+;", _code(line))]
    assert len(servers) == len(ports), f"{CLUSTER_SECTION!r}: expected {len(ports)} servers:\n{blocks[0]}"
    for n, port in zip(servers, ports, strict=True):
        indent = lines[n][: len(lines[n]) - len(lines[n].lstrip())]
        lines[n] = f"{indent}server 127.0.0.1:{port};"
    return "\n".join(lines) + "\n", name


def http_config(listen_port: int, upstream_ports: Sequence[int]) -> str:
    """What the test puts in Nginx's ``http`` block: the "Nginx and TLS"
    block in front of the one daemon on ``upstream_ports``, or, for
    several, in front of the "Several instances" upstream of them."""
    if len(upstream_ports) == 1:
        return loopback_config(readme_nginx_block(), listen_port, f"127.0.0.1:{upstream_ports[0]}")
    upstream, name = upstream_config(docs_nginx_block(CLUSTER_SECTION), upstream_ports)
    return f"{upstream}\n{loopback_config(readme_nginx_block(), listen_port, name)}"


# -- a real Nginx -------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.fail(
            "nginx not found: install it (Debian/Ubuntu: apt-get install nginx-core); "
            ".ci/run installs it before `make test`",
            pytrace=False,
        )
    return found


class NginxProcess(Endpoint):
    """Nginx in the foreground with the documented blocks, proxying to the
    daemons on ``upstream_ports`` (:func:`http_config`), with ``workers``
    worker processes. Its access log names the upstream of each request."""

    def __init__(self, upstream_ports: Sequence[int], prefix: Path, workers: int = 1) -> None:
        self.binary = nginx_binary()
        self.prefix = prefix
        prefix.mkdir()
        self.port = free_port()
        self.error_log = prefix / "error.log"
        self.access_log = prefix / "access.log"
        self.conf = prefix / "nginx.conf"
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in kinds)
        http_block = http_config(self.port, upstream_ports)
        self.conf.write_text(
            f"daemon off;\n"
            f"master_process on;\n"
            f"worker_processes {workers};\n"
            f"worker_shutdown_timeout 2s;\n"
            f"pid {prefix / 'nginx.pid'};\n"
            f"error_log {self.error_log} notice;\n"
            f"events {{ worker_connections 64; }}\n"
            f"http {{\n"
            f"    log_format upstream '[$time_local] \"$request\" $status upstream=$upstream_addr';\n"
            f"    access_log {self.access_log} upstream;\n"
            f"{temp}\n\n"
            f"{http_block}"
            f"}}\n",
            encoding="utf-8",
        )
        args = [self.binary, "-p", f"{prefix}/", "-e", str(self.error_log), "-c", str(self.conf)]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=15)
        assert check.returncode == 0, (
            f"nginx -t rejects the docs' blocks:\n{check.stderr}\n--- {self.conf}:\n{self.conf.read_text()}"
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_listening(timeout=10)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nginx did not start listening on {self.port}:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def upgrades(self, count: int) -> list[str]:
        """The upstreams (``127.0.0.1:<port>``) of the ``count`` WebSocket
        upgrades Nginx proxied (101), waiting for them: it logs each once
        its socket closed, and there must be no more."""

        def logged() -> list[str]:
            access = self.access_log.read_text() if self.access_log.exists() else ""
            return [line for line in access.splitlines() if UPGRADE in line]

        wait_until(lambda: len(logged()) >= count, timeout=15, explain=logged)
        lines = logged()
        assert len(lines) == count, lines
        return [line.rpartition(" upstream=")[2] for line in lines]

    def stop(self) -> int:
        """Graceful stop (SIGQUIT), then fast (SIGTERM), then kill."""
        for sig, wait in ((signal.SIGQUIT, 5), (signal.SIGTERM, 5)):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                return self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self.proc.kill()
        return self.proc.wait(5)


@pytest.fixture
def nginx_factory(tmp_path: Path, server_factory: Any) -> Iterator[Any]:
    """``nginx_factory(server, ..., workers=1)`` starts Nginx in front of
    one daemon, or of several instances through the documented upstream;
    stopped before the daemons are."""
    started: list[NginxProcess] = []

    def start(*servers: Any, workers: int = 1) -> NginxProcess:
        nginx = NginxProcess([server.port for server in servers], tmp_path / f"nginx-{len(started)}", workers)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        code = nginx.stop()
        assert code == 0, f"nginx exited with {code}:\n{nginx.log}"
        assert "[emerg]" not in nginx.log and "[alert]" not in nginx.log, nginx.log


# -- tests --------------------------------------------------------------------


def test_readme_block_is_loopback_testable() -> None:
    """docs/operations.md, "Nginx and TLS": the block keeps the map, the upgrade headers and X-Real-IP."""
    config = loopback_config(readme_nginx_block(), 12345, "127.0.0.1:23456")
    assert "listen 127.0.0.1:12345;" in config
    assert "proxy_pass http://127.0.0.1:23456;" in config
    assert "proxy_set_header Upgrade $http_upgrade;" in config
    assert "proxy_set_header Connection $connection_upgrade;" in config
    assert "47880" not in config and "ssl_certificate" not in config


def test_upstream_block_is_loopback_testable() -> None:
    """docs/operations.md, "Several instances": the upstream keeps least_conn and
    the zone its worker processes share; its servers become the test instances'."""
    upstream, name = upstream_config(docs_nginx_block(CLUSTER_SECTION), [12345, 23456])
    assert name == "intaleq_signal"
    assert "server 127.0.0.1:12345;" in upstream and "server 127.0.0.1:23456;" in upstream
    assert "4788" not in upstream
    assert re.search(rf"^\s*zone {name} \d+k;", upstream, re.M), upstream
    assert f"proxy_pass http://{name};" in http_config(34567, [12345, 23456])


def test_post_sessions_through_nginx(server_factory, nginx_factory) -> None:
    """docs/protocol.md, "POST /sessions": with the API key it works through the documented Nginx block."""
    server = server_factory()
    nginx = nginx_factory(server)
    body = {"ride_id": "ride-nginx", "driver_id": "driver-1", "passenger_id": "passenger-1"}
    status, headers, data = nginx.request(
        "POST", "/sessions", body, {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    )
    assert status == 200, (status, data)
    assert headers.get("content-type", "").startswith("application/json"), headers
    session = json.loads(data)
    assert session["session_id"] and session["ride_id"] == "ride-nginx", session
    status, _, data = nginx.request("POST", "/sessions", body, {"X-API-Key": "wrong"})
    assert status == 401, (status, data)
    server.wait_for_log("wrong API key on POST /sessions ip=127.0.0.1")


def test_full_call_through_nginx(server_factory, nginx_factory) -> None:
    """docs/operations.md, "Nginx and TLS": a whole call (join, offer/answer/ICE relay,
    end_call, close 1000) through Nginx."""
    server = server_factory()
    nginx = nginx_factory(server)
    session = nginx.new_session("ride-nginx-call")

    async def scenario() -> None:
        driver, passenger = await connected_call(nginx, session)
        await relay_and_end(driver, passenger)

    asyncio.run(scenario())
    # Both sockets really went through Nginx: it logs the two upgrades (101) once they close.
    assert nginx.upgrades(2) == [f"127.0.0.1:{server.port}"] * 2
    server.wait_for_log("call ended")


def test_metrics_denied_by_nginx_but_served_on_loopback(server_factory, nginx_factory) -> None:
    """docs/protocol.md, "GET /metrics": Nginx denies it (403); a direct loopback client gets 200."""
    server = server_factory()
    nginx = nginx_factory(server)
    status, _, data = nginx.request("GET", "/metrics")
    assert status == 403, (status, data)
    status, headers, data = server.request("GET", "/metrics")
    assert status == 200, (status, data)
    assert headers.get("content-type", "").startswith("text/plain"), headers


def test_connection_limit_counts_nginx_x_real_ip(server_factory, nginx_factory) -> None:
    """docs/protocol.md, "Connecting": behind Nginx the per-IP limit counts X-Real-IP, which
    Nginx overwrites; upgrades that authenticate through it never count."""
    server = server_factory(RATE_LIMIT_PER_MIN="3")
    nginx = nginx_factory(server)
    session = server.new_session()

    async def scenario() -> None:
        # Every test client is 127.0.0.1, so Nginx sends X-Real-IP: 127.0.0.1 for all of them.
        for n in range(3):
            assert await attempt(nginx, session=session) == 101, f"join {n + 1} through Nginx refused"
            assert await attempt(nginx) == 101, f"upgrade {n + 1} through Nginx refused"
        assert await attempt(nginx, session=session) == 429
        # Counted per X-Real-IP value, not per TCP peer: another client IP from the same
        # trusted peer (a direct connection to the daemon) still gets in.
        assert await attempt(server, {"X-Real-IP": "203.0.113.9"}) == 101
        # Nginx replaces a client-supplied X-Real-IP with $remote_addr, so spoofing does not escape the limit.
        assert await attempt(nginx, {"X-Real-IP": "198.51.100.1"}) == 429

    asyncio.run(scenario())
    # both refusals were logged before their 429s went out; wait until both are read
    wait_until(lambda: server.log.count(REFUSED) >= 2, timeout=5, explain=lambda: server.log)
    refused = [line for line in server.log.splitlines() if REFUSED in line]
    assert len(refused) == 2, refused
    assert all(line.endswith(REFUSED + "127.0.0.1") for line in refused), refused
    assert "198.51.100.1" not in server.log


@pytest.mark.cluster
def test_call_through_nginx_upstream_on_two_instances(cluster, nginx_factory) -> None:
    """docs/operations.md, "Several instances": the documented upstream
    (``least_conn``) in front of two instances, behind the block of
    docs/operations.md, "Nginx and TLS": POST /sessions, then a call whose
    driver and passenger land on different instances (the offer, the
    answer and ICE candidates both ways relayed in order, ``end_call``
    reaching both), its row ended ``user_terminated``; every address the
    instances log is the X-Real-IP Nginx sets, never one a client sent.

    Where the sockets land is up to ``least_conn`` alone, and certain: the
    driver's socket is open (joined) before the passenger's upgrade, so the
    instance without it has fewer connections and gets the passenger's
    (which instance takes the driver's, both being idle, is Nginx's
    choice; the test finds out). Nginx runs two worker processes, as
    ``worker_processes auto`` does on two cores: either may accept either
    upgrade, and the counts ``least_conn`` goes by are the ones they share
    through the block's ``zone``.
    """
    a, b = cluster.start("a"), cluster.start("b")
    nginx = nginx_factory(a, b, workers=2)
    spoofed = {"X-Real-IP": "198.51.100.7"}  # Nginx replaces it with $remote_addr
    status, session = nginx.post_session(ride(), headers=spoofed)
    assert status == 200, (status, session, a.log, b.log)
    sid = session["session_id"]
    owner = wait_until(
        lambda: [n for n, s in cluster.instances.items() if f"session created session={sid}" in s.log]
    )
    assert len(owner) == 1, owner
    (other,) = set(cluster.instances) - set(owner)

    async def scenario() -> None:
        driver, passenger = await connected_call(nginx, session, headers=spoofed)
        # One socket on each: the instance that does not run the session
        # holds exactly one, whose messages it relays to the owner.
        assert health(cluster.instances[other])["connections"] == 1
        await relay_and_end(driver, passenger, candidates=4, driver_candidates=3)

    asyncio.run(scenario())
    # Nginx's own account of where it sent the two upgrades: one to each instance.
    assert sorted(nginx.upgrades(2)) == sorted(f"127.0.0.1:{s.port}" for s in (a, b))
    wait_until(lambda: [row["status"] for row in cluster.db.rows()] == ["ended"], explain=cluster.db.rows)
    [row] = cluster.db.rows()
    assert (row["session_id"], row["end_reason"], row["initiated_by"]) == (
        sid,
        "user_terminated",
        "driver-1",
    ), row
    assert row["node_id"] == owner[0] and row["connected_at"] is not None, row
    # The owner logs both joins, the relayed one with the address the other
    # instance took from X-Real-IP; the address a client sent is nowhere.
    lines = cluster.instances[owner[0]].log.splitlines()
    for role in ("driver", "passenger"):
        joined = [line for line in lines if f"participant joined session={sid} role={role} ip=" in line]
        assert [line.rpartition(" ip=")[2] for line in joined] == ["127.0.0.1"], lines
    assert "198.51.100.7" not in a.log + b.log
    assert "[error]" not in nginx.log, nginx.log
