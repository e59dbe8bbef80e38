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
import time
from collections.abc import Callable
from typing import Any, cast

from .signaling import Signaling
from .wire import HTTPServerConnection

__all__ = ["EngineDriver", "LoopClock"]


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

    def __init__(self, engine: Signaling, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    async def handler(self, ws: HTTPServerConnection) -> None:
        """The websockets connection handler for ``/ws``: the connection
        hands each message, frame and the end of sending to the engine by
        callback as it is parsed; this coroutine only waits for the end of
        the TCP connection, then tells the engine."""
        engine = self.engine
        client = engine.connected(ws)
        ws.forget_handshake()
        try:
            ws.start(client.message_received, client.frame_received, client.closing)
            await ws.wait_closed()
        finally:
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
        next_ping = loop.time() + interval
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            ping = now >= next_ping
            if ping:
                next_ping = now + interval
            sweep(ping)

    async def drain(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, for every connection's TCP
        connection to close (after :meth:`Signaling.shutdown`)."""
        closing = [cast(HTTPServerConnection, client.peer).wait_closed() for client in self.engine.clients]
        if closing:
            await asyncio.wait(closing, timeout=timeout)
