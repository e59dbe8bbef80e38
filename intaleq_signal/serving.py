"""The asyncio side of the signaling engine: the clock over the event loop,
the connection handler, the heartbeat task and the drain at shutdown.

:class:`~intaleq_signal.signaling.Signaling` does no I/O; this module is
what feeds it from the event loop: each upgraded
:class:`~intaleq_signal.wire.HTTPServerConnection` is a
:class:`~intaleq_signal.signaling.Peer` whose callbacks call the engine's
inputs, and a task calls :meth:`~intaleq_signal.signaling.Signaling.sweep`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from . import messages as msg
from .exceptions import Unavailable
from .lifecycle import ConnectionState
from .signaling import Client, Signaling
from .wire import HTTPServerConnection

__all__ = ["EngineDriver", "LoopClock", "Route"]


class LoopClock:
    """The engine's :class:`~intaleq_signal.signaling.Clock` on an asyncio
    event loop.

    ``time`` is ``time.monotonic`` itself, not ``loop.time()``: uvloop's
    ``loop.time()`` is cached per loop iteration (and in milliseconds),
    while :attr:`HTTPServerConnection.last_received` and the relay latency
    need the moment itself. The two clocks share their origin on Linux, but
    :meth:`call_at` converts to a delay so that it never depends on that.
    ``time``, ``wall`` and ``call_later`` are the functions themselves, so
    reading the clock on the hot path is one C call.
    """

    __slots__ = ("loop", "time", "wall", "call_later")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.time: Callable[[], float] = time.monotonic
        self.wall: Callable[[], float] = time.time
        self.call_later = loop.call_later

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        """``callback(*args)`` once ``time.monotonic()`` reaches ``when``
        (seconds)."""
        return self.loop.call_later(when - time.monotonic(), callback, *args)


class EngineDriver:
    """Runs one :class:`Signaling` engine on the event loop.

    Args:
        engine: the engine (built with a :class:`LoopClock`).
        loop: the running loop.
    """

    def __init__(self, engine: Signaling, loop: asyncio.AbstractEventLoop, cluster: Any = None) -> None:
        self.engine = engine
        self.loop = loop
        #: The shared state of several instances (``REDIS_URL``), or None.
        self.cluster = cluster

    async def handler(self, ws: HTTPServerConnection) -> None:
        """The websockets connection handler for ``/ws``: the connection
        hands each message, frame and the end of sending to the engine by
        callback as it is parsed; this coroutine only waits for the end of
        the TCP connection, then tells the engine."""
        engine = self.engine
        client = engine.connected(ws)
        ws.forget_handshake()
        route = None
        try:
            if self.cluster is None:
                ws.start(client.message_received, client.frame_received, client.closing)
            else:
                route = Route(self.cluster, client, ws)
                ws.start(route.message, route.frame, route.closing)
            await ws.wait_closed()
        finally:
            if route is not None:
                route.closing()
            engine.closed(client)

    async def heartbeat(self) -> None:
        """Sweep forever (cancel to stop): a ping every
        ``HEARTBEAT_INTERVAL``, and a look for dead connections often enough
        that one is found at most a tick (seconds, at least 0.05) after
        ``HEARTBEAT_TIMEOUT`` (docs/protocol.md, rule 8)."""
        config = self.engine.config
        interval = config.heartbeat_interval
        tick = max(0.05, min(interval, config.heartbeat_timeout - interval))
        loop, sweep = self.loop, self.engine.sweep
        cluster = self.cluster
        next_ping = loop.time() + interval
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            ping = now >= next_ping
            if ping:
                next_ping = now + interval
            sweep(ping)
            if cluster is not None:
                cluster.sweep_edges(ping)

    async def drain(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, for every connection's TCP
        connection to close (after :meth:`Signaling.shutdown`)."""
        closing = [cast(HTTPServerConnection, client.peer).wait_closed() for client in self.engine.clients]
        if closing:
            await asyncio.wait(closing, timeout=timeout)


class Route:
    """Where one socket's input goes when several instances share the
    sessions (docs/design.md, "Several instances"): this instance's engine,
    or the instance running its session. The first ``authenticate`` for a
    session this engine does not hold is looked up in Redis (messages that
    follow wait, in order); a session of a dead or departed instance is
    adopted here; one run elsewhere gets the socket's input from then on.
    While Redis is unreachable the ``authenticate`` gets ``error``
    ``unavailable`` and may be sent again."""

    __slots__ = ("cluster", "client", "ws", "edge", "pending", "task")

    def __init__(self, cluster: Any, client: Client, ws: HTTPServerConnection) -> None:
        self.cluster = cluster
        self.client = client
        self.ws = ws
        self.edge: Any = None
        self.pending: list[str | bytes] | None = None  # input while the lookup runs
        self.task: asyncio.Task[None] | None = None

    def message(self, message: str | bytes) -> None:
        if self.edge is not None:
            return self.cluster.edge_message(self.edge, message)
        if self.pending is not None:
            self.pending.append(message)
            return
        client = self.client
        if client.lifecycle.state is ConnectionState.CONNECTED and type(message) is str:
            session_id = msg.authenticate_session(message)
            if session_id is not None and client.engine.sessions.get(session_id) is None:
                self.pending = [message]
                self.task = asyncio.get_running_loop().create_task(self._locate(session_id))
                return
        client.message_received(message)

    def frame(self) -> None:
        if self.edge is not None:
            self.cluster.edge_frame(self.edge)
        elif self.pending is None:
            self.client.frame_received()

    def closing(self) -> None:
        if self.edge is not None:
            self.cluster.edge_gone(self.edge)
        else:
            self.client.closing()

    async def _locate(self, session_id: str) -> None:
        client = self.client
        try:
            owner = await self.cluster.locate(session_id)
        except Exception as exc:  # Unavailable; anything else is a bug, logged, answered the same
            if not isinstance(exc, Unavailable):
                logging.getLogger("intaleq_signal.cluster").exception("session lookup failed")
            pending, self.pending = self.pending or [], None
            client.send(msg.error_message(Unavailable()))  # the authenticate may be sent again
            for message in pending[1:]:
                self.message(message)
            return
        pending, self.pending = self.pending or [], None
        if owner is None or client.lifecycle.state is not ConnectionState.CONNECTED or not self.ws.is_open:
            for message in pending:  # the engine here holds the session now (or refuses)
                client.message_received(message)
            return
        self.edge = edge = self.cluster.hand_over(client, self.ws, owner, pending[0])
        for message in pending[1:]:
            self.cluster.edge_message(edge, message)
