"""Guards against memory regressions per idle connection (docs/performance.md,
"What was done"): counted
with tracemalloc in the daemon, not timed, so the machine's load cannot make
them flaky. Budgets are bytes per authenticated idle connection."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from conftest import ServerProcess, join

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
