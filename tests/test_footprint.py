"""Guards against memory regressions per idle connection (docs/performance.md,
"What was done"): counted
with tracemalloc in the daemon, not timed, so the machine's load cannot make
them flaky. Budgets are bytes per authenticated idle connection."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import sys
import time
from pathlib import Path

from conftest import API_KEY, ServerProcess, join, wait_until

HERE = Path(__file__).resolve().parent
CONNECTIONS = 300  # 150 calls
#: Allocated by our own code per connection (Client, lifecycle, token bucket,
#: callbacks, the session's share, and the websockets connection object that
#: the HTTP front creates, ~390 B): measured ~940 B.
OWN_BUDGET = 1152
#: Everything the process holds per connection, websockets and asyncio
#: included, as tracemalloc counts it (measured ~5.9 KiB; was 8.7 KiB before
#: the library's receive queue, logger adapter and shielded close waiter were
#: dropped; the RSS figure of the benchmark adds the allocator's overhead).
TOTAL_BUDGET = 7 * 1024


class FootprintServer(ServerProcess):
    """The daemon run by tests/footprint_server.py."""

    def __init__(self, env: dict[str, str], tmp_path) -> None:
        self.figures = tmp_path / "footprint.jsonl"
        env = {**env, "FOOTPRINT_FILE": str(self.figures)}
        super().__init__(env, tmp_path, command=[sys.executable, str(HERE / "footprint_server.py")])

    def measure(self) -> dict:
        count = len(self.figures.read_text().splitlines()) if self.figures.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.figures.exists():
                lines = self.figures.read_text().splitlines()
                if len(lines) > count:
                    return json.loads(lines[-1])
            time.sleep(0.05)
        raise AssertionError("no footprint report")


def test_memory_per_idle_authenticated_connection(tmp_path) -> None:
    """Per idle authenticated connection, our allocations < 1.125 KiB and all of it < 7 KiB."""
    server = FootprintServer({"LOG_LEVEL": "info", "SESSION_DURATION": "10m"}, tmp_path)
    try:
        sessions = [server.new_session(ride_id=f"ride-fp-{i}") for i in range(CONNECTIONS // 2)]

        async def scenario() -> None:
            warm = [await join(server, s, who) for s in sessions[:10] for who in ("driver-1", "passenger-1")]
            before = server.measure()
            sockets = [
                await join(server, s, who) for s in sessions[10:] for who in ("driver-1", "passenger-1")
            ]
            await asyncio.sleep(0.5)
            after = server.measure()
            opened = after["connections"] - before["connections"]
            assert opened == len(sockets)
            own = (after["own"] - before["own"]) / opened
            total = (after["total"] - before["total"]) / opened
            print(f"per idle connection: own {own:.0f} B, total {total:.0f} B")
            assert own < OWN_BUDGET, own
            assert total < TOTAL_BUDGET, total
            for ws, _ in warm + sockets:
                await ws.close()

        asyncio.run(scenario())
    finally:
        assert server.stop() == 0


#: Kept per live session created by ``POST /sessions`` (the session, its two
#: seats, the registry's entries, its expiry timer; measured 0.95–1.2 KiB,
#: the registry's dicts growing in steps), whether the requests came on one
#: kept-alive connection or each on its own: a connection, head or answer
#: kept per request would show.
SESSION_BUDGET = 2 * 1024
REQUESTS = 200


def test_memory_per_post_sessions_request(tmp_path) -> None:
    """What ``POST /sessions`` leaves behind is its session: a request's
    connection, parsed head, answer and call-log event are gone once it is
    answered and written (counted with tracemalloc, not timed)."""
    server = FootprintServer({"LOG_LEVEL": "info", "SESSION_DURATION": "10m"}, tmp_path)
    try:
        for i in range(20):  # warm-up: first-time allocations (caches, interned strings)
            server.new_session(ride_id=f"ride-warm-{i}")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
        for kept in (True, False):
            before = server.measure()
            for i in range(REQUESTS):
                body = json.dumps({"ride_id": f"ride-{kept}-{i}", "driver_id": "d", "passenger_id": "p"})
                if kept:
                    conn.request("POST", "/sessions", body, headers)
                    answer = conn.getresponse()
                    assert answer.status == 200 and answer.getheader("Connection") != "close"
                    answer.read()
                else:
                    server.new_session(ride_id=f"ride-{kept}-{i}", driver_id="d", passenger_id="p")
            after = wait_until(lambda: (m := server.measure())["pending"] == 0 and m, timeout=10)
            total = (after["total"] - before["total"]) / REQUESTS
            print(
                f"kept per POST /sessions ({'one kept-alive connection' if kept else 'new connections'}):"
                f" {total:.0f} B"
            )
            assert total < SESSION_BUDGET, total
        conn.close()
    finally:
        assert server.stop() == 0
