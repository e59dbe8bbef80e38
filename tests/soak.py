"""Soak driver: N concurrent calls churning for M minutes against a
real daemon, every ending path in rotation, while the daemon's memory, file
descriptors and ``/health`` counts are sampled.

As a command::

    .venv/bin/python tests/soak.py --calls 50 --minutes 10

prints a table of samples (elapsed, calls done, RSS KiB, fds, live sessions,
...) and a verdict, and exits non-zero when a call went wrong or the daemon
grew. As a library, :func:`run` does the same and returns a
:class:`SoakReport` (``tests/test_soak.py`` runs a short one).

The daemon is ``python -m intaleq_signal`` in development mode (SQLite call
log in a temporary directory) with short timers (:data:`SOAK_ENV`), so that
every ending happens within seconds. Each call is one scenario of
:data:`SCENARIOS`, taken in rotation: a POST /sessions, both participants
joining, offer/answer, ICE candidates both ways (host candidates, the
end-of-generation ``""`` and the end-of-candidates ``null``), heartbeats, then
one ending. Every message and every close code is checked exactly; anything
else is a call error.

The run is cut into phases; between phases the driver waits until the
daemon is idle (no connections, no live session, nothing pending for the
call log) and takes an *idle* sample. Growth is judged on idle samples only,
where the numbers do not depend on how many calls happen to be in flight:

- file descriptors: every idle sample within :data:`FD_SLACK` of the count
  before the first call;
- memory: RSS growth from the idle sample after the first phase (the end of
  warm-up) to the last one below :data:`RSS_FIXED_KIB` plus
  :data:`RSS_PER_CALL_KIB` per call completed in between;
- ``/health``: 0 connections, 0 live sessions and 0 active calls when idle.
  (Ended sessions stay remembered for ``SESSION_DURATION``, which ``/health``
  does not count; a few seconds' worth is well inside the RSS allowance.)

After the daemon stops (SIGTERM: it must exit 0 and log no error), every
session's call-log row must carry the end reason its scenario produced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, when run as a command
import conftest  # noqa: E402
from conftest import API_KEY, ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# -- the daemon's timers -----------------------------------------------------------------

SESSION_DURATION = 3.0
RECONNECT_GRACE = 1.0
AUTH_TIMEOUT = 1.0
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 1.5

#: Short timers so that every ending of docs/protocol.md ("End reasons") happens within seconds. The
#: grace is 1 s rather than 500 ms: a return "within grace" must fit a
#: reconnect on a loaded CI machine, and the disconnect paths only cost it
#: once. The per-IP upgrade limit is lifted: every client is 127.0.0.1.
SOAK_ENV = {
    "ENVIRONMENT": "development",
    "SESSION_DURATION": f"{SESSION_DURATION:g}s",
    "RECONNECT_GRACE": f"{RECONNECT_GRACE:g}s",
    "AUTH_TIMEOUT": f"{AUTH_TIMEOUT:g}s",
    "HEARTBEAT_INTERVAL": f"{HEARTBEAT_INTERVAL * 1000:g}ms",
    "HEARTBEAT_TIMEOUT": f"{HEARTBEAT_TIMEOUT * 1000:g}ms",
    "RATE_LIMIT_PER_MIN": "1000000000",
    "MAX_MESSAGE_BYTES": "4096",
    "LOG_LEVEL": "info",
}

# -- growth criteria ---------------------------------------------------------------------

#: Idle file descriptors may differ from the count before the first call by
#: this much: the SQLite WAL and shared-memory files come and go with
#: checkpoints. A leaked socket per call would pass it after 3 calls.
FD_SLACK = 2
#: RSS growth allowed per call completed after warm-up. What one call may
#: legitimately leave behind is the SQLite page cache growing with the call
#: log (the daemon's one SQLite connection caches up to 2 MiB of pages): it
#: was measured at 0.3-0.6 KiB a call over the first few thousand calls,
#: flattening to ~0.05 KiB a call past 20,000. What a leak leaves behind is
#: far more: a websockets connection with its buffers is tens of KiB, and
#: each call opens 2 to 4 of them.
RSS_PER_CALL_KIB = 1
#: Fixed allowance for allocator noise: pymalloc arenas are 1 MiB (256 KiB
#: before 3.10) and are only returned when empty; glibc trims its heap in
#: steps; the garbage collector's timing decides how many dead connection
#: cycles are still held at a given sample. 2 MiB is two arenas.
RSS_FIXED_KIB = 2048

# -- what the calls send -----------------------------------------------------------------

SDP_OFFER = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/SAVPF 111\r\n"
SDP_ANSWER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
ICE_RESTART = "a=ice-options:ice2\r\n"
STEP_TIMEOUT = 5.0  # an answer that should come at once
CALL_TIMEOUT = 30.0  # a whole call, the longest being SESSION_DURATION + a few seconds


def candidates(side: str, generation: int = 0) -> list[dict[str, Any]]:
    """What a trickling client sends: 3 host candidates, the end of the
    generation (``""``) and the end of gathering (``null``)."""
    found = [
        {
            "type": "ice_candidate",
            "candidate": {
                "candidate": f"candidate:{n} 1 udp 2122260223 10.0.{generation}.{n} {50000 + n} typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
                "usernameFragment": f"{side}{generation}",
            },
        }
        for n in range(3)
    ]
    found.append(
        {
            "type": "ice_candidate",
            "candidate": {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": side},
        }
    )
    found.append({"type": "ice_candidate", "candidate": None})
    return found


# -- the daemon --------------------------------------------------------------------------


class Daemon(ServerProcess):
    """The daemon under soak (:data:`SOAK_ENV`), its log in a file beside
    its call log, and what the soak samples of it.

    Args:
        workdir: where the SQLite call log and the daemon's log go.
        env: overrides of :data:`SOAK_ENV`.
    """

    def __init__(self, workdir: Path, **env: str) -> None:
        self.log_path = workdir / "soak-daemon.log"
        super().__init__({**SOAK_ENV, **env}, workdir, stderr_path=self.log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident memory now (``VmRSS`` of /proc/PID/status), KiB."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        """Open file descriptors now (/proc/PID/fd)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit status (-9: killed after ``timeout``)."""
        try:
            return super().stop(sig, timeout)
        except subprocess.TimeoutExpired:
            return -9


async def http_request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection (``Connection: close``: the
    daemon closes it after answering), without blocking the event loop:
    ``(status, body)``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), STEP_TIMEOUT)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        raw = await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise CallError(f"{method} {path}: not an HTTP answer: {raw[:200]!r}") from None
    return status, payload


# -- one call ----------------------------------------------------------------------------


class CallError(Exception):
    """A call saw something other than what docs/protocol.md says it must."""


def _joined(role: str) -> dict[str, str]:
    return {"type": "participant_joined", "role": role}


def _left(role: str) -> dict[str, str]:
    return {"type": "participant_left", "role": role}


def _ended(reason: str) -> dict[str, str]:
    return {"type": "call_ended", "reason": reason}


TIMEOUT_NOTICE = {"type": "call_timeout", "reason": "max_duration_reached"}
PONG = {"type": "pong"}


class Call:
    """One call of the soak: its session, its sockets and strict
    expectations. The scenario methods are the ending paths; each returns
    the end reason the call log must show."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.n = n
        self.ride = f"soak-{n}"
        self.driver = f"driver-{n}"
        self.passenger = f"passenger-{n}"
        self.session: dict[str, Any] = {}
        self.sockets: list[ClientConnection] = []
        #: just before the passenger's join: the call went active after this
        self.activating = 0.0

    # -- plumbing --

    async def create(self) -> None:
        body = json.dumps({"ride_id": self.ride, "driver_id": self.driver, "passenger_id": self.passenger})
        status, answer = await http_request(
            self.port,
            "POST",
            "/sessions",
            body.encode(),
            {"X-API-Key": API_KEY, "Content-Type": "application/json"},
        )
        if status != 200:
            raise CallError(f"POST /sessions: {status} {answer!r}")
        session = json.loads(answer)
        fields = {"session_id", "ride_id", "expires_in", "driver_token", "passenger_token"}
        if set(session) != fields or session["ride_id"] != self.ride:
            raise CallError(f"POST /sessions: {session}")
        if session["expires_in"] != math.ceil(SESSION_DURATION):
            raise CallError(f"POST /sessions: expires_in {session['expires_in']}")
        self.session = session

    async def connect(self) -> ClientConnection:
        ws = await connect(
            f"ws://127.0.0.1:{self.port}/ws",
            open_timeout=STEP_TIMEOUT,
            close_timeout=2,
            ping_interval=None,  # the server pings; the client answers by itself
            compression=None,
        )
        self.sockets.append(ws)
        return ws

    def authenticate(self, user: str) -> dict[str, str]:
        return {"type": "authenticate", "session_id": self.session["session_id"], "user_id": user}

    async def join(self, user: str, role: str) -> ClientConnection:
        ws = await self.connect()
        await self.send(ws, self.authenticate(user))
        await self.expect(
            ws,
            {"type": "authenticated", "user_id": user},
            {
                "type": "session_joined",
                "session_id": self.session["session_id"],
                "ride_id": self.ride,
                "role": role,
            },
        )
        return ws

    async def send(self, ws: ClientConnection, message: Any) -> None:
        await ws.send(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, ws: ClientConnection, timeout: float) -> dict[str, Any]:
        try:
            text = await asyncio.wait_for(ws.recv(), timeout)
        except TimeoutError:
            raise CallError(f"nothing received within {timeout:g}s") from None
        except ConnectionClosed:
            raise CallError(f"closed unexpectedly with {ws.close_code}") from None
        return json.loads(text)

    async def expect(self, ws: ClientConnection, *messages: dict[str, Any], timeout: float = STEP_TIMEOUT):
        """The next messages on ``ws`` are exactly ``messages``."""
        for message in messages:
            got = await self.recv(ws, timeout)
            if got != message:
                raise CallError(f"expected {message}, got {got}")

    async def rest(self, ws: ClientConnection, timeout: float) -> tuple[list[dict[str, Any]], int | None]:
        """Every message until the server closes ``ws``, and the close code."""
        messages: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    messages.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
        except TimeoutError:
            raise CallError(f"not closed within {timeout:g}s; received {messages}") from None
        await asyncio.wait_for(ws.wait_closed(), STEP_TIMEOUT)
        return messages, ws.close_code

    async def closes(
        self, ws: ClientConnection, code: int, *messages: dict[str, Any], timeout: float = STEP_TIMEOUT
    ) -> None:
        """``ws`` gets exactly ``messages``, then the server closes it with ``code``."""
        got, closed = await self.rest(ws, timeout)
        if got != list(messages) or closed != code:
            raise CallError(f"expected {list(messages)} and close {code}, got {got} and close {closed}")

    async def quiet(self, ws: ClientConnection) -> None:
        """A heartbeat is answered by a pong with nothing pending before it."""
        await self.send(ws, {"type": "heartbeat"})
        await self.expect(ws, PONG)

    async def refused(self, user: str, reason: str) -> None:
        """A late ``authenticate``: ``unauthorized`` ``reason``, close 4001."""
        ws = await self.connect()
        await self.send(ws, self.authenticate(user))
        await self.closes(ws, 4001, {"type": "unauthorized", "reason": reason})

    def abort(self) -> None:
        """Drop whatever socket is left (after an error)."""
        for ws in self.sockets:
            if ws.transport is not None and not ws.transport.is_closing():
                ws.transport.abort()

    async def connected(self) -> tuple[ClientConnection, ClientConnection]:
        """Session created, both joined, both told about the other."""
        await self.create()
        d = await self.join(self.driver, "driver")
        self.activating = time.monotonic()
        p = await self.join(self.passenger, "passenger")
        await self.expect(p, _joined("driver"))
        await self.expect(d, _joined("passenger"))
        return d, p

    async def negotiate(self, d: ClientConnection, p: ClientConnection, generation: int = 0) -> None:
        """The driver offers (an ICE restart after generation 0), the
        passenger answers, both trickle candidates, both heartbeat."""
        offer = {"type": "offer", "sdp": SDP_OFFER + (ICE_RESTART if generation else "")}
        await self.send(d, offer)
        await self.expect(p, offer)
        answer = {"type": "answer", "sdp": SDP_ANSWER}
        await self.send(p, answer)
        await self.expect(d, answer)
        for sender, receiver, side in ((d, p, "d"), (p, d, "p")):
            trickled = candidates(side, generation)
            for message in trickled:
                await self.send(sender, message)
            await self.expect(receiver, *trickled)
        await self.quiet(d)
        await self.quiet(p)

    async def both_end(self, d: ClientConnection, p: ClientConnection, notice: dict[str, Any], **kw: Any):
        await self.closes(d, 1000, notice, **kw)
        await self.closes(p, 1000, notice, **kw)

    # -- the ending paths (docs/protocol.md, "Rules" 1-8) --

    async def end_by_driver(self) -> str:
        d, p = await self.connected()
        await self.negotiate(d, p)
        await self.send(d, {"type": "end_call"})
        await self.both_end(d, p, _ended("user_terminated"))
        return "user_terminated"

    async def end_by_passenger(self) -> str:
        d, p = await self.connected()
        await self.negotiate(d, p)
        await self.send(p, {"type": "end_call"})
        await self.both_end(d, p, _ended("user_terminated"))
        return "user_terminated"

    async def max_duration(self) -> str:
        d, p = await self.connected()
        await self.negotiate(d, p)
        await self.both_end(d, p, TIMEOUT_NOTICE, timeout=SESSION_DURATION + STEP_TIMEOUT)
        # Lower bounds are measured from a moment before the daemon's timer
        # started, so the driver's own lag (one loop for every call, on a
        # machine it shares with the daemon) cannot make them fail.
        elapsed = time.monotonic() - self.activating
        if not SESSION_DURATION - 0.05 <= elapsed <= SESSION_DURATION + 2.5:
            raise CallError(f"call_timeout after {elapsed:.2f}s")
        await self.refused(self.driver, "session_ended")
        return "max_duration_reached"

    async def expiry(self) -> str:
        started = time.monotonic()
        await self.create()
        d = await self.join(self.driver, "driver")
        offer = {"type": "offer", "sdp": SDP_OFFER}
        await self.send(d, offer)  # held for a passenger who never comes
        await self.quiet(d)
        await self.closes(d, 1000, _ended("expired"), timeout=SESSION_DURATION + STEP_TIMEOUT)
        elapsed = time.monotonic() - started
        if not SESSION_DURATION - 0.05 <= elapsed <= SESSION_DURATION + 2.5:
            raise CallError(f"expired after {elapsed:.2f}s")
        await self.refused(self.passenger, "session_expired")
        return "expired"

    async def disconnect_driver(self) -> str:
        """The driver closes its socket and never comes back."""
        d, p = await self.connected()
        await self.negotiate(d, p)
        left = time.monotonic()  # before: the daemon's grace starts when it sees the close
        await d.close()
        await self.expect(p, _left("driver"))
        await self.closes(p, 1000, _ended("disconnect_driver"), timeout=RECONNECT_GRACE + STEP_TIMEOUT)
        self._check_grace(time.monotonic() - left)
        await self.refused(self.driver, "session_ended")
        return "disconnect_driver"

    async def disconnect_passenger(self) -> str:
        """The passenger's network goes (abort, no closing handshake) for good."""
        d, p = await self.connected()
        await self.negotiate(d, p)
        left = time.monotonic()
        p.transport.abort()
        await self.expect(d, _left("passenger"))
        await self.closes(d, 1000, _ended("disconnect_passenger"), timeout=RECONNECT_GRACE + STEP_TIMEOUT)
        self._check_grace(time.monotonic() - left)
        await self.refused(self.passenger, "session_ended")
        return "disconnect_passenger"

    def _check_grace(self, elapsed: float) -> None:
        if not RECONNECT_GRACE - 0.05 <= elapsed <= RECONNECT_GRACE + 2.5:
            raise CallError(f"call ended {elapsed:.2f}s after the disconnect")

    async def return_within_grace(self) -> str:
        """The driver's network drops; it comes back within the grace, gets
        what was held for it, re-offers with an ICE restart; the passenger
        ends the call."""
        d, p = await self.connected()
        await self.negotiate(d, p)
        d.transport.abort()
        await self.expect(p, _left("driver"))
        held = candidates("p", 1)[0]
        await self.send(p, held)
        await self.quiet(p)  # held, not refused
        d = await self.join(self.driver, "driver")
        await self.expect(d, _joined("passenger"), held)
        await self.expect(p, _joined("driver"))
        await self.negotiate(d, p, generation=1)
        await self.send(p, {"type": "end_call"})
        await self.both_end(d, p, _ended("user_terminated"))
        return "user_terminated"

    async def replacement(self) -> str:
        """A second socket of the driver takes over: the old one gets
        ``replaced`` and 4002, the peer nothing but ``participant_joined``."""
        d, p = await self.connected()
        await self.negotiate(d, p)
        d2 = await self.join(self.driver, "driver")
        await self.expect(d2, _joined("passenger"))
        await self.expect(p, _joined("driver"))
        got, code = await self.rest(d, STEP_TIMEOUT)
        if [(m.get("type"), m.get("code")) for m in got] != [("error", "replaced")] or code != 4002:
            raise CallError(f"replaced socket got {got} and close {code}")
        await self.negotiate(d2, p, generation=1)
        await self.send(d2, {"type": "end_call"})
        await self.both_end(d2, p, _ended("user_terminated"))
        return "user_terminated"

    async def auth_timeout(self) -> str:
        """An extra socket that never authenticates is refused after
        AUTH_TIMEOUT; the call beside it is untouched."""
        d, p = await self.connected()
        opened = time.monotonic()
        silent = await self.connect()
        await self.negotiate(d, p)
        await self.closes(silent, 4001, {"type": "unauthorized", "reason": "auth_timeout"})
        elapsed = time.monotonic() - opened
        if not AUTH_TIMEOUT - 0.05 <= elapsed <= AUTH_TIMEOUT + 2.5:
            raise CallError(f"auth_timeout after {elapsed:.2f}s")
        await self.quiet(d)
        await self.quiet(p)
        await self.send(d, {"type": "end_call"})
        await self.both_end(d, p, _ended("user_terminated"))
        return "user_terminated"

    async def rate_limited(self) -> str:
        """The driver floods heartbeats: pongs while its bucket lasts, then
        ``rate_limited`` and 1008; for the call a disconnect without return."""
        d, p = await self.connected()
        await self.negotiate(d, p)
        flood = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            for _ in range(200):
                await self.send(d, {"type": "heartbeat"})
        got, code = await self.rest(d, STEP_TIMEOUT)
        # at most the burst of 100 plus what 50/s refilled while the flood lasted
        # (a loaded machine takes a while to send 200 frames)
        allowed = 100 + 50 * (time.monotonic() - flood)
        pongs = got[:-1]
        if (
            code != 1008
            or not got
            or any(m != PONG for m in pongs)
            or not 1 <= len(pongs) <= allowed
            or set(got[-1]) != {"type", "code", "message"}
            or (got[-1]["type"], got[-1]["code"]) != ("error", "rate_limited")
        ):
            raise CallError(f"flood got {len(pongs)} pongs then {got[-1:]} and close {code}")
        await self.expect(p, _left("driver"))
        await self.closes(p, 1000, _ended("disconnect_driver"), timeout=RECONNECT_GRACE + STEP_TIMEOUT)
        return "disconnect_driver"

    async def oversize(self) -> str:
        """The passenger sends a message over MAX_MESSAGE_BYTES: close 1009;
        it comes back within the grace and the driver ends the call."""
        d, p = await self.connected()
        await self.negotiate(d, p)
        await self.send(p, {"type": "offer", "sdp": "a" * 4096})
        await self.closes(p, 1009)
        await self.expect(d, _left("passenger"))
        p = await self.join(self.passenger, "passenger")
        await self.expect(p, _joined("driver"))
        await self.expect(d, _joined("passenger"))
        await self.negotiate(d, p, generation=1)
        await self.send(d, {"type": "end_call"})
        await self.both_end(d, p, _ended("user_terminated"))
        return "user_terminated"


#: Every ending path, in the rotation the calls take.
SCENARIOS = (
    "end_by_driver",
    "end_by_passenger",
    "max_duration",
    "expiry",
    "disconnect_driver",
    "disconnect_passenger",
    "return_within_grace",
    "replacement",
    "auth_timeout",
    "rate_limited",
    "oversize",
)


# -- the run -----------------------------------------------------------------------------


@dataclass
class Sample:
    elapsed: float
    phase: int
    calls: int
    errors: int
    rss_kib: int
    fds: int
    sessions: int
    active_calls: int
    connections: int
    note: str = ""  # "idle ..." for the samples growth is judged on


@dataclass
class SoakReport:
    concurrency: int
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    done: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    #: session_id → (scenario, end reason the call log must show)
    expected: dict[str, tuple[str, str]] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    exit_code: int | None = None
    log_path: Path | None = None

    @property
    def calls(self) -> int:
        return sum(self.done.values())

    @property
    def idle(self) -> list[Sample]:
        return [s for s in self.samples if s.note.startswith("idle")]

    def judge(self) -> list[str]:
        """The growth and health criteria of the module docstring."""
        problems = []
        idle = self.idle
        baseline = idle[0]
        for sample in idle[1:]:
            if abs(sample.fds - baseline.fds) > FD_SLACK:
                problems.append(
                    f"{sample.note}: {sample.fds} fds, {baseline.fds} before the first call (±{FD_SLACK})"
                )
        for sample in idle:
            if (sample.sessions, sample.active_calls, sample.connections) != (0, 0, 0):
                problems.append(
                    f"{sample.note}: /health shows {sample.sessions} sessions, {sample.active_calls} calls,"
                    f" {sample.connections} connections"
                )
        if len(idle) >= 3:
            warm, last = idle[1], idle[-1]
            span = last.calls - warm.calls
            budget = RSS_FIXED_KIB + RSS_PER_CALL_KIB * span
            growth = last.rss_kib - warm.rss_kib
            if growth > budget:
                problems.append(
                    f"RSS grew {growth} KiB over {span} calls after warm-up"
                    f" ({warm.rss_kib} → {last.rss_kib} KiB; budget {budget} KiB)"
                )
        if self.calls >= len(SCENARIOS):
            missing = [name for name in SCENARIOS if not self.done[name]]
            if missing:
                problems.append(f"scenarios never completed: {', '.join(missing)}")
        if self.errors:
            problems.append(f"{len(self.errors)} call errors, the first: " + "; ".join(self.errors[:5]))
        return problems

    def verdict(self) -> str:
        idle = self.idle
        first, last = idle[0], idle[-1]
        figures = (
            f"{self.calls} calls in {self.seconds / 60:.1f} min at {self.concurrency} concurrent"
            f" ({', '.join(f'{name} {self.done[name]}' for name in SCENARIOS)});"
            f" idle RSS {first.rss_kib} → {idle[min(1, len(idle) - 1)].rss_kib} (after warm-up)"
            f" → {last.rss_kib} KiB; idle fds {first.fds} → {last.fds}"
        )
        if self.problems:
            return "FAIL: " + figures + "\n  " + "\n  ".join(self.problems)
        return "PASS: " + figures


HEADER = (
    f"{'elapsed':>8} {'phase':>5} {'calls':>7} {'errors':>6} {'RSS KiB':>8} {'fds':>4}"
    f" {'sessions':>8} {'active':>6} {'conns':>5}  note"
)


def row(sample: Sample) -> str:
    return (
        f"{sample.elapsed:>7.1f}s {sample.phase:>5} {sample.calls:>7} {sample.errors:>6}"
        f" {sample.rss_kib:>8} {sample.fds:>4} {sample.sessions:>8} {sample.active_calls:>6}"
        f" {sample.connections:>5}  {sample.note}"
    )


class Soak:
    """The churn: ``concurrency`` workers, each running calls back to back,
    the scenarios in rotation."""

    def __init__(self, daemon: Daemon, report: SoakReport, out: Callable[[str], None]) -> None:
        self.daemon = daemon
        self.report = report
        self.out = out
        self.numbers = itertools.count()
        self.started = time.monotonic()
        self.phase = 0

    async def sample(self, note: str = "") -> Sample:
        health = await asyncio.to_thread(conftest.health, self.daemon)
        sample = Sample(
            elapsed=time.monotonic() - self.started,
            phase=self.phase,
            calls=self.report.calls,
            errors=len(self.report.errors),
            rss_kib=self.daemon.rss_kib(),
            fds=self.daemon.fds(),
            sessions=health["sessions"],
            active_calls=health["active_calls"],
            connections=health["connections"],
            note=note,
        )
        self.report.samples.append(sample)
        self.out(row(sample))
        return sample

    async def sampler(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.sample()
            except Exception as exc:  # noqa: BLE001 - a failed sample is a finding, not a crash
                self.report.errors.append(f"sample failed: {type(exc).__name__}: {exc}")

    async def worker(self, stop_at: float) -> None:
        report = self.report
        while time.monotonic() < stop_at:
            n = next(self.numbers)
            scenario = SCENARIOS[n % len(SCENARIOS)]
            call = Call(self.daemon.port, n)
            try:
                async with asyncio.timeout(CALL_TIMEOUT):
                    reason = await getattr(call, scenario)()
            except Exception as exc:  # noqa: BLE001 - every failure is counted, the soak goes on
                report.errors.append(f"call {n} ({scenario}): {type(exc).__name__}: {exc}")
            else:
                report.done[scenario] += 1
                report.expected[call.session["session_id"]] = (scenario, reason)
            finally:
                if call.session:
                    report.created.add(call.session["session_id"])
                call.abort()

    async def settle(self, note: str, timeout: float = 15.0) -> Sample:
        """Wait until the daemon is idle, then take an idle sample: no
        connection, no live session, nothing pending for the call log, and
        the descriptors of the last connections closed."""
        deadline = time.monotonic() + timeout
        baseline = self.report.idle[0].fds if self.report.idle else None
        while time.monotonic() < deadline:
            health = await asyncio.to_thread(conftest.health, self.daemon)
            pending = await asyncio.to_thread(conftest.metric, self.daemon, "intaleq_calllog_writes_pending")
            counts = (health["sessions"], health["active_calls"], health["connections"], pending)
            if counts == (0, 0, 0, 0) and (baseline is None or abs(self.daemon.fds() - baseline) <= FD_SLACK):
                break
            await asyncio.sleep(0.2)
        return await self.sample(note)

    async def run(self, concurrency: int, seconds: float, phases: int, every: float) -> None:
        self.out(HEADER)
        await self.settle("idle (before the first call)")
        sampler = asyncio.create_task(self.sampler(every))
        try:
            for phase in range(1, phases + 1):
                self.phase = phase
                stop_at = time.monotonic() + seconds / phases
                await asyncio.gather(*(self.worker(stop_at) for _ in range(concurrency)))
                await self.settle(f"idle after phase {phase}" + (" (warm-up)" if phase == 1 else ""))
        finally:
            sampler.cancel()


def check_call_log(daemon: Daemon, report: SoakReport) -> list[str]:
    """Every session has its row, ended; every completed call's row has the
    end reason its scenario produced, the driver as initiator, and a
    ``connected_at`` unless the session expired (docs/protocol.md, "Call log")."""
    rows = {row["session_id"]: row for row in daemon.call_logs()}
    problems = []
    missing = report.created - set(rows)
    if missing:
        problems.append(f"{len(missing)} sessions have no call-log row")
    open_rows = [sid for sid, r in rows.items() if r["status"] != "ended"]
    if open_rows:
        problems.append(f"{len(open_rows)} call-log rows not ended")
    wrong = []
    for session_id, (scenario, reason) in report.expected.items():
        r = rows.get(session_id)
        if r is None:
            continue
        if (
            r["end_reason"] != reason
            or r["initiated_by"] != r["driver_id"]
            or (r["connected_at"] is None) != (scenario == "expiry")
        ):
            wrong.append(f"{scenario}: {r}")
    if wrong:
        problems.append(f"{len(wrong)} call-log rows wrong, e.g. {wrong[0]}")
    return problems


def check_daemon_log(log: str) -> list[str]:
    bad = [
        line
        for line in log.splitlines()
        if " WARNING " in line
        or " ERROR " in line
        or " CRITICAL " in line
        or "Traceback" in line
        or "connection handler failed" in line
    ]
    return [f"the daemon logged {len(bad)} warnings or errors, the first: {bad[0]}"] if bad else []


def _print(line: str) -> None:
    print(line, flush=True)  # a row as soon as it is sampled, also into a pipe or a file


def run(
    concurrency: int,
    seconds: float,
    *,
    phases: int = 3,
    every: float = 10.0,
    workdir: Path | None = None,
    out: Callable[[str], None] | None = None,
    **env: str,
) -> SoakReport:
    """Start a daemon, churn ``concurrency`` calls for ``seconds`` in
    ``phases``, stop it, and judge. ``report.problems`` is empty when all
    is well."""
    out = out or _print
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="intaleq-soak-")) if workdir is None else workdir
    report = SoakReport(concurrency, seconds)
    daemon = Daemon(workdir, **env)
    report.log_path = daemon.log_path
    try:
        out(f"daemon pid {daemon.pid} on port {daemon.port}; its log: {daemon.log_path}")
        asyncio.run(Soak(daemon, report, out).run(concurrency, seconds, phases, every))
    finally:
        report.exit_code = daemon.stop()
    report.problems = report.judge()
    if report.exit_code != 0:
        report.problems.append(f"the daemon exited with {report.exit_code} after SIGTERM")
    report.problems += check_daemon_log(daemon.log)
    report.problems += check_call_log(daemon, report)
    out(report.verdict())
    if temporary and not report.problems:
        shutil.rmtree(workdir, ignore_errors=True)
    elif temporary:
        out(f"kept {workdir} (the daemon's log and call log)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="concurrent calls (default 50)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long calls churn (default 10)")
    parser.add_argument("--phases", type=int, default=3, help="phases, each ending idle (default 3)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.minutes <= 0 or args.phases < 1:
        parser.error("--calls, --minutes and --phases must be positive")
    report = run(args.calls, args.minutes * 60, phases=args.phases, every=args.every)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
