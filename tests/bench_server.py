"""The daemon with a chosen call-log store and an event-loop lag probe, for
the call-log benchmark (``make bench-calllog``); not a test.

    python tests/bench_server.py --store none|sqlite|mysql

Configuration comes from the environment as for ``python -m intaleq_signal``
(``--store mysql`` needs ``DB_USERNAME``). On exit it writes the lag figures
(milliseconds by which a 5 ms sleep overshot: p50, p99, max) as JSON to
``$BENCH_LAG_FILE`` when set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics

from intaleq_signal.calllog.sqlite import SQLiteStore
from intaleq_signal.config import config_from_environment
from intaleq_signal.logs import setup_logging
from intaleq_signal.server import Server, make_store, run_event_loop


class NullStore:
    """Accepts every event and writes nothing: the "no store" baseline."""

    healthy_state = "ok"

    def connect(self) -> object:
        return object()

    def prepare(self, conn: object) -> None:
        pass

    def apply(self, conn: object, event: object) -> None:
        pass

    def apply_batch(self, conn: object, events: list[object]) -> None:
        pass

    def close(self, conn: object) -> None:
        pass

    def is_fatal(self, exc: BaseException) -> bool:
        return False

    def is_permanent(self, exc: BaseException) -> bool:
        return False


async def probe(lags: list[float], period: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(period)
        lags.append((loop.time() - started - period) * 1000)


def report(store_name: str, lags: list[float]) -> None:
    path = os.environ.get("BENCH_LAG_FILE")
    if not path or not lags:
        return
    lags = sorted(lags)
    figures = {
        "store": store_name,
        "samples": len(lags),
        "p50_ms": round(statistics.median(lags), 3),
        "p99_ms": round(lags[int(len(lags) * 0.99)], 3),
        "max_ms": round(lags[-1], 3),
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(figures) + "\n")


async def main(store_name: str) -> None:
    config = config_from_environment(None)
    setup_logging(config.log_level, config.log_format)
    if store_name == "none":
        store = NullStore()
    elif store_name == "sqlite":
        store = SQLiteStore(config.sqlite_path)
    else:
        store = make_store(config)
    lags: list[float] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    measuring = loop.create_task(probe(lags))

    async def report_on_stop() -> None:
        await stop.wait()  # the figures cover serving, not the shutdown flush
        measuring.cancel()
        report(store_name, lags)

    reporter = loop.create_task(report_on_stop())
    await Server(config, store=store).run(stop)
    await reporter


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=("none", "sqlite", "mysql"), required=True)
    run_event_loop(main(parser.parse_args().store))
