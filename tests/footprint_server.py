"""The daemon under tracemalloc, for tests/test_footprint.py (not a test).

On SIGUSR1 it writes the memory traced since start, as JSON to
``$FOOTPRINT_FILE``: the total and the part allocated by intaleq_signal's own
code, in bytes, the number of open connections and of call-log events not
yet written.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import tracemalloc

from intaleq_signal.config import config_from_environment
from intaleq_signal.logs import setup_logging
from intaleq_signal.server import Server

OWN = os.path.join("intaleq_signal", "")


def report(server: Server) -> None:
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("filename")
    figures = {
        "total": sum(stat.size for stat in stats),
        "own": sum(stat.size for stat in stats if OWN in stat.traceback[0].filename),
        "connections": len(server.signaling.clients),
        "pending": server.calllog.pending,  # call-log events not yet written
    }
    with open(os.environ["FOOTPRINT_FILE"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(figures) + "\n")


async def main() -> None:
    config = config_from_environment(None)
    setup_logging(config.log_level, config.log_format)
    tracemalloc.start()
    server = Server(config)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report, server)
    await server.run()


if __name__ == "__main__":
    asyncio.run(main())
