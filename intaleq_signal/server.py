"""The process: start-up, serving, signals and graceful shutdown in one place
(docs/operations.md, "Configuration" and "Shutdown"). It wires the pieces:
the call log, the signaling engine with its asyncio driver
(:mod:`.serving`), the HTTP API and websockets' server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import serve

from .calllog import CallLogWriter, PreviousRunClosed
from .calllog.journal import Journal
from .calllog.sqlite import SQLiteStore
from .config import Config
from .exceptions import ConfigError, ListenError
from .front import FrontFactory
from .http_api import HTTPAPI, upgrade_admission
from .metrics import Metrics
from .serving import EngineDriver, LoopClock
from .signaling import CLOSE_SERVICE_RESTART, CLOSE_TIMEOUT, Signaling
from .systemd import LISTEN_BACKLOG, Notifier, take_listen_socket

__all__ = ["ListenError", "run", "run_event_loop", "Server"]

log = logging.getLogger("intaleq_signal")

#: Bound on the opening handshake, HTTP request bodies included (seconds):
#: slow or idle HTTP clients are dropped after it (docs/protocol.md,
#: "Anything else"); on a kept connection it runs from the first byte of
#: each later request (front.KEEPALIVE_TIMEOUT bounds the wait for it).
OPEN_TIMEOUT = 10.0
#: Bound on reading the sessions to restore at start (seconds), the
#: journal's events reaching the database included.
RESTORE_WAIT = 5.0
#: Bound on flushing the call log at shutdown (seconds).
FLUSH_TIMEOUT = 5.0


def make_store(config: Config) -> Any:
    """The call-log store the configuration asks for (docs/operations.md,
    "Call log and journal").

    Nothing is opened here: the SQLite file is checked by
    :meth:`Server.startup`, once the address is bound.
    """
    if config.uses_mysql:
        from .calllog.mysql import MySQLStore

        return MySQLStore(
            host=config.db_host,
            port=config.db_port,
            user=config.db_username or "",
            password=config.db_password or "",
            database=config.db_database,
        )
    return SQLiteStore(config.sqlite_path)


class Server:
    """One daemon instance: call :meth:`run` and it serves until stopped."""

    def __init__(self, config: Config, store: Any = None) -> None:
        """``store`` replaces the configured call-log store (benchmarks)."""
        self.config = config
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.stopping = False
        self.notifier = Notifier()
        store = store if store is not None else make_store(config)
        threads = config.db_pool_size if config.uses_mysql else 1
        # The journal keeps what a network database has not taken yet; the
        # development SQLite call log is a local file itself.
        journal = Journal(config.journal_path) if config.uses_mysql else None
        self.calllog = CallLogWriter(store, threads=threads, journal=journal)
        #: The shared state of several instances (``REDIS_URL``), or None.
        self.cluster: Any = None

    def connections(self) -> int:
        """Open WebSocket connections of this process: the engine's, but
        for sockets of other instances in sessions run here, plus this
        process's sockets whose sessions other instances run."""
        cluster = self.cluster
        count = len(self.signaling.clients)
        if cluster is not None:
            count += cluster.edges - cluster.remote_connections
        return count

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``: 200 with figures while serving, 503 while stopping."""
        if self.stopping:
            return 503, {"status": "shutting_down"}
        signaling = self.signaling
        document = {
            "status": "ok",
            "uptime_seconds": int(time.monotonic() - self.started),
            "sessions": signaling.sessions.live,
            "active_calls": signaling.sessions.active_calls(),
            "connections": self.connections(),
            "database": self.calllog.health(),
            "journal": self.calllog.journal_backlog,
            "journal_writable": self.calllog.journal_writable,
        }
        cluster = self.cluster
        if cluster is not None:
            document["redis"] = "ok" if cluster.available else "unavailable"
        return 200, document

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down.
        Three phases, as uvicorn's server: :meth:`startup` (the listening
        socket, then the call log), :meth:`main_loop`, :meth:`shutdown`; the
        signal handlers it installs are removed on the way out.

        Raises:
            ConfigError: the journal file cannot be used.
            StartError: the call-log threads could not be started.
            ListenError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        installed = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                continue
            installed.append(signum)
        try:
            server = await self.startup()
            tasks = [
                loop.create_task(self.driver.heartbeat()),
                loop.create_task(self._housekeeping()),
            ]
            if self.notifier.watchdog_interval is not None:
                tasks.append(loop.create_task(self._watchdog(self.notifier.watchdog_interval)))
            try:
                await self.main_loop(server, stop)
            finally:
                for task in tasks:
                    task.cancel()
                await self.shutdown(server)
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    async def startup(self) -> Any:
        """Bind (not yet accepting; or take the socket systemd hands over),
        then open the call log (the journal's events queued first), start its
        threads, queue the start-up work, and only then accept connections;
        returns the websockets server. Nothing is opened or written when the
        address cannot be bound."""
        config = self.config
        loop = asyncio.get_running_loop()
        admission = upgrade_admission(config)
        calllog: Any = self.calllog
        if config.redis_url is not None:
            calllog = _Mirrored(self.calllog)
        self.signaling = Signaling(config, calllog, self.metrics, LoopClock(loop), admission=admission)
        if config.redis_url is not None:
            try:
                from .cluster.node import Cluster  # the [redis] extra: imported only with REDIS_URL
            except ImportError as exc:
                raise ConfigError("REDIS_URL needs redis-py: pip install 'intaleq-signal[redis]'") from exc

            self.cluster = calllog.cluster = Cluster(config, self.signaling, self.calllog)
        self.driver = EngineDriver(self.signaling, loop, self.cluster)
        self.api = HTTPAPI(config, self.signaling, self.metrics, self.health, admission)
        self.api.cluster = self.cluster
        # A socket systemd hands over (intaleq-signal.socket) is served
        # instead of SERVER_ADDR (docs/operations.md, "systemd"); ConfigError
        # (exit 78) when it is not one listening TCP socket.
        handed = take_listen_socket()
        self.socket_from_systemd = handed is not None
        if handed is not None:
            where: dict[str, Any] = {"sock": handed, "backlog": LISTEN_BACKLOG}
            place = _address(handed.getsockname())
        else:
            where = {"host": config.host, "port": config.port}
            place = f"{config.host}:{config.port}"
        # Every accepted connection's first protocol; told when stopping.
        self.front = FrontFactory(self.api.process_request, self.api.process_response, OPEN_TIMEOUT)
        try:
            server = await serve(
                self.driver.handler,
                **where,
                process_request=self.api.process_request,
                process_response=self.api.process_response,
                create_connection=self.front,
                compression=None,
                max_size=config.max_message_bytes,
                ping_interval=None,  # our own heartbeat sweep (docs/protocol.md, "Heartbeats")
                open_timeout=OPEN_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                server_header=None,
                max_queue=4,
                start_serving=False,  # accepted once the call log is ready (below)
            )
        except OSError as exc:
            raise ListenError(f"cannot listen on {place}: {exc}") from exc
        try:
            if isinstance(self.calllog.store, SQLiteStore):
                self.calllog.store.check()  # StoreError (a ConfigError): exit 78
            self.calllog.open()  # JournalError (a StoreError) likewise
            self.calllog.claim_node(config.node_id)
            self.calllog.start()
        except BaseException:
            server.close()
            raise
        self._gauges()
        started = time.time()
        rows = None
        if self.cluster is not None:
            try:
                await self._start_cluster(loop, started)
            except BaseException:
                server.close()
                raise
        elif config.on_stop == "handoff":
            # The sessions and calls a previous process of this instance
            # left, restarted or killed, go on (docs/operations.md, "Restarts").
            rows = await loop.run_in_executor(
                None,
                self.calllog.load_sessions,
                config.node_id,
                started - config.session_duration,
                RESTORE_WAIT,
            )
        if rows is not None:
            self.signaling.restore(rows)
        elif self.cluster is None and self.calllog.node_claimed is not False:
            # Nothing restored (ON_STOP=end, or the call log could not be
            # read): the rows this instance's predecessor left open end as
            # server_restart, once the database takes writes again (after
            # the journal's events: see CallLogWriter), so that a later
            # restart never brings back calls the apps were told are gone.
            # Not while another live instance holds this NODE_ID.
            self.calllog.record(PreviousRunClosed(started, config.node_id))
        await server.server.start_serving()
        return server

    async def _start_cluster(self, loop: asyncio.AbstractEventLoop, started: float) -> None:
        """Join the instances sharing ``REDIS_URL`` (docs/operations.md,
        "Several instances"): take this instance's lease, take back the
        sessions Redis says it runs, and restore from the call log those of
        its sessions Redis lost (a Redis restart while this instance was
        down), writing them to Redis again.

        Raises:
            RedisError: Redis unreachable, or ``NODE_ID`` in use there.
        """
        config, cluster = self.config, self.cluster
        records = await cluster.start()
        self.signaling.restore([record.row() for record in records])
        rows = await loop.run_in_executor(
            None, self.calllog.load_sessions, config.node_id, started - config.session_duration, RESTORE_WAIT
        )
        lost = []
        for row in rows or ():
            if row.status != "ended" and await cluster.record(row.session_id) is None:
                lost.append(row)
        if lost:
            self.signaling.restore(lost)
            wall, now = time.time(), self.signaling.clock.time()
            for row in lost:
                session = self.signaling.sessions.get(row.session_id)
                if session is not None and session.ended is None:
                    await cluster.publish(session, wall, now)

    async def main_loop(self, server: Any, stop: asyncio.Event) -> None:
        """Say where it listens, tell systemd it is ready, wait for ``stop``."""
        config, loop = self.config, asyncio.get_running_loop()
        addresses = ", ".join(_address(sock.getsockname()) for sock in server.sockets)
        if self.socket_from_systemd:
            addresses += " (socket from systemd)"
        log.info(
            "listening on %s (environment=%s, node=%s, call log=%s, event loop=%s)",
            addresses,
            config.environment,
            config.node_id,
            "mysql" if config.uses_mysql else config.sqlite_path,
            type(loop).__module__.partition(".")[0],
        )
        self.sockets = server.sockets
        # What start-up built lives as long as the process: kept out of
        # the collector's sight, a full collection during calls has tens
        # of thousands fewer objects to walk (its pause delays every socket).
        gc.freeze()
        self.notifier.ready(f"listening on {addresses}")
        await stop.wait()

    async def shutdown(self, server: Any) -> None:
        """Close the idle kept-alive HTTP connections (every HTTP answer
        from now on closes its connection); refuse new sessions; hand the
        calls over (``ON_STOP=handoff``: close 1012, nothing ends) or end
        them (``end``: ``server_shutdown``, close 1001); close the sockets;
        flush the call log (to the database, else to the journal)."""
        handoff = self.config.on_stop == "handoff"
        if handoff:
            # Accept nothing more: connections made from now on wait for the
            # next process (in the socket's backlog under socket activation)
            # instead of getting 503 from this one.
            server.server.close()
        # Kept-alive connections waiting for their next request are closed
        # now (RFC 9112 §9.6): the client sends that request on a new
        # connection (to the next process) instead of getting 503 here, and
        # none is left for wait_closed() below to wait for.
        self.front.shutdown()
        log.info("stopping: %s", "handing the calls over (close 1012)" if handoff else "ending live calls")
        self.notifier.stopping()
        self.stopping = True
        try:
            cluster = self.cluster
            if cluster is not None and handoff:
                await cluster.depart()  # the others take the sessions over from now
            self.signaling.shutdown(handoff)
            if cluster is not None:
                # Their sessions go on where they are run: the apps reconnect
                # (1012), with ON_STOP=end too.
                cluster.close_edges(CLOSE_SERVICE_RESTART, "service restart")
                if not handoff:
                    await cluster.depart()
                await cluster.stop()
            await self.driver.drain(CLOSE_TIMEOUT + 1)
            server.close(close_connections=True)
            try:
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT + 1)
            except TimeoutError:
                # Connections still in their opening handshake (a half-sent
                # HTTP request) would hold us until OPEN_TIMEOUT; they are
                # dropped when the loop ends.
                log.info("stopping: not waiting for unfinished HTTP requests")
        finally:
            loop = asyncio.get_running_loop()
            left = await loop.run_in_executor(None, self.calllog.close, FLUSH_TIMEOUT)
            log.info("stopped (%d call-log events not yet in the database)", left)
            self.notifier.close()

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` from the event loop itself: if the loop wedges,
        the pings stop and systemd restarts the service (``WatchdogSec=``)."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(30)
            self.api.prune(time.monotonic())

    def _gauges(self) -> None:
        """Where the scraped metrics come from (their names: ``metrics.py``)."""
        signaling = self.signaling
        self.metrics.bind(
            sessions_live=lambda: signaling.sessions.live,
            calls_active=signaling.sessions.active_calls,
            connections_open=self.connections,
            calllog=self.calllog,
        )


class _Mirrored:
    """The engine's call log with several instances: every event goes to
    the call-log writer, and the session's record in Redis follows it."""

    __slots__ = ("writer", "cluster")

    def __init__(self, writer: CallLogWriter) -> None:
        self.writer = writer
        self.cluster: Any = None

    def record(self, event: Any) -> None:
        self.writer.record(event)
        self.cluster.mirror(event)


def _address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` in a fresh event loop: uvloop's when it is installed
    (``pip install .[fast]``), else asyncio's. ``INTALEQ_EVENT_LOOP=asyncio``
    forces the standard loop.

    The loop is chosen first and run outside the ``except ImportError``
    block: an exception escaping ``main`` on the standard loop would otherwise
    be chained to the missing uvloop ("During handling of the above
    exception, another exception occurred", PEP 3134's implicit chaining)."""
    run_loop = asyncio.run
    if os.environ.get("INTALEQ_EVENT_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass  # the standard loop
        else:
            run_loop = uvloop.run
    run_loop(main)


def run(config: Config) -> None:
    """Run a server until it is stopped by a signal (:func:`run_event_loop`)."""
    server = Server(config)
    run_event_loop(server.run())
    if server.calllog.busy():
        # A writer thread still inside a database call (past the flush
        # deadline, its events already counted as unwritten) must not meet
        # interpreter finalization: that can crash the process (a signal
        # instead of exit 0). Leave now; the logs are flushed first.
        logging.shutdown()
        os._exit(0)
