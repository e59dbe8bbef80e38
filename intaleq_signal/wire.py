"""The WebSocket connection after the HTTP front (:mod:`.front`) has handed
it an upgrade request: whole messages handed to the signaling layer as they
are parsed, and relayed frames written without the library's send path.

What this subclass changes is the delivery (callbacks instead of
``recv()``), the reading of whole unfragmented text frames (:func:`frame_at`:
the relayed messages, read without the library's generator-based parser),
the writing of text frames (batched per loop pass) and the memory an idle
connection keeps. Every other frame — control frames, fragments, binary,
anything malformed or over the size limit — goes through the library's
sans-I/O parser, whole frames at a time, so its checks and its answers
(1002, 1009, pong, close) are the library's own.

It also tells the signaling layer the moment a connection stops being open
for sending (``on_closing``): a close frame received or sent, a protocol
error (1002, 1007, 1009), the TCP connection lost, or the transport aborted
because the peer stopped reading. For the session that moment is the
disconnect (docs/protocol.md, rule 6), not the end of the TCP teardown,
which can take up to ``CLOSE_TIMEOUT`` (seconds) more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Opcode, apply_mask
from websockets.protocol import State

__all__ = ["HTTPServerConnection", "MAX_UNREAD_BYTES", "frame_at"]

#: Unsent output past which a peer is taken as not reading and dropped.
MAX_UNREAD_BYTES = 256 * 1024

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_OPEN, _CONNECTING = State.OPEN, State.CONNECTING
_NO_HEADERS = Headers()  # shared, never written to
#: While a connection handles a received chunk: the connections it queued
#: frames on, flushed when it is done (the event loop is one thread).
_flush_after: list[HTTPServerConnection] | None = None
#: The connections with frames queued from a timer or a task, flushed at the
#: end of the loop pass or before the next received chunk is handled,
#: whichever comes first: frames queued while a chunk is handled are then
#: always in a batch begun in that chunk (see ``send_text``).
_flush_soon: list[HTTPServerConnection] = []
_LIBRARY_LOGGER = logging.getLogger("websockets.server")
_NO_LIMIT = 1 << 63


#: What :func:`frame_at` finds (see there).
PARTIAL, SIMPLE, OTHER, UNREADABLE = 0, 1, 2, 3


def frame_at(data: bytes, at: int, limit: int) -> tuple[int, int, int]:
    """The client-to-server frame (RFC 6455 §5.2) that starts at offset
    ``at`` of ``data``: ``(kind, mask, end)``.

    ``kind`` is :data:`SIMPLE` for a whole frame this module reads itself —
    FIN set, no RSV bit, opcode text (1), masked, payload at most ``limit``
    bytes: its 4-byte masking key is at ``data[mask:mask + 4]`` and its
    payload runs from ``mask + 4`` to ``end``; :data:`OTHER` for any other
    whole frame (``data[at:end]``, for the library's parser);
    :data:`PARTIAL` when ``data`` ends inside the frame (wait for more);
    :data:`UNREADABLE` when the frame is not masked or its payload is over
    ``limit``: the library's parser refuses it from its header (1002,
    1009) and must read it and all that follows. ``mask`` and ``end`` are 0
    unless whole.

    Pure: no I/O, no state, nothing decoded (UTF-8 is checked where the
    message is delivered).
    """
    size = len(data)
    if size - at < 2:
        return PARTIAL, 0, 0
    second = data[at + 1]
    length = second & 0x7F
    mask = at + 2
    if length >= 126:
        mask += 2 if length == 126 else 8
        if size < mask:
            return PARTIAL, 0, 0
        length = int.from_bytes(data[at + 2 : mask], "big")
    if not second & 0x80 or length > limit:
        return UNREADABLE, 0, 0
    end = mask + 4 + length
    if end > size:
        return PARTIAL, 0, 0
    return (SIMPLE if data[at] == 0x81 else OTHER), mask, end


def _flush_queued() -> None:
    """Write the frames queued from timers and tasks (:data:`_flush_soon`)."""
    global _flush_soon
    pending, _flush_soon = _flush_soon, []
    for connection in pending:
        connection._flush()


class _NoMessages:
    """Stands in for the library's ``Assembler``, the queue behind
    ``recv()``: messages are handed to ``on_message`` as they are parsed,
    so nothing is ever queued. Its ``close()`` is called when the
    connection is lost."""

    __slots__ = ()

    def close(self) -> None:
        pass

    def put(self, frame: Any) -> None:
        raise RuntimeError("messages go to on_message on this connection")


_NO_MESSAGES = _NoMessages()


class HTTPServerConnection(ServerConnection):
    """A ``ServerConnection`` that delivers messages by callback, and the
    signaling engine's :class:`~intaleq_signal.signaling.Peer`:
    :meth:`send_text`, :meth:`close_soon`, :meth:`send_ping`,
    :attr:`is_open`, :attr:`ip` and :attr:`last_received`. (The library's
    ``send``, ``close`` and ``ping`` are coroutines its server awaits;
    these are their synchronous, non-blocking counterparts.)

    Attributes:
        http_method: the request method as sent (``process_request``
            refuses all but ``GET`` on ``/ws``).
        http_version, http_body, http_body_error: always ``"1.1"``, empty,
            ``None`` here (the front answers the other requests itself);
            read by ``process_request``.
        client_ip: the client address as ``process_request`` resolved it
            (docs/protocol.md, "Connecting": ``TRUSTED_PROXIES``); also
            :attr:`ip`.
        last_received: ``time.monotonic()`` seconds of the latest bytes
            received (not ``loop.time()``: uvloop's is cached per loop
            iteration), read by the heartbeat sweep (docs/protocol.md,
            rule 8) and for the relay latency.
    """

    # Slots, not the inherited __dict__: a few more keys there would make
    # every connection's attribute dict double in size.
    __slots__ = (
        "http_method",
        "client_ip",
        "last_received",
        "on_message",
        "on_frame",
        "on_closing",
        "_closing",
        "_fragments",
        "_held",
        "_held_eof",
        "_out",
        "_closed",
        "_close_timer",
        "_partial",
        "_limit",
    )

    http_version = "1.1"  # the front hands on HTTP/1.1 requests only
    http_body = b""
    http_body_error = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The library only appends to, removes from and iterates over its
        # write-flow-control waiters: a list does that in 56 bytes, an empty
        # deque takes 760 on every idle connection.
        self.drain_waiters = []  # type: ignore[assignment]
        self.client_ip = "?"
        self.http_method = "GET"
        self.last_received = 0.0
        #: After the upgrade, set by :meth:`start`: called with each whole
        #: message (str for text, bytes for binary); on every other frame
        #: (see :meth:`process_event`); and once, when the connection stops
        #: being open for sending (see :meth:`_stop_sending`).
        self.on_message: Callable[[str | bytes], None] | None = None
        self.on_frame: Callable[[], None] | None = None
        self.on_closing: Callable[[], None] | None = None
        self._closing = False  # no longer open for sending; on_closing was called
        self._fragments: list[Any] | None = None  # [opcode, data, ...] of a fragmented message
        self._held: bytearray | None = None  # bytes behind the upgrade request, until start()
        self._held_eof = False  # the client half-closed before its answer was written
        self._out: list[bytes] | None = None  # frames waiting for this loop pass's write
        self._closed: asyncio.Future[None] | None = None  # see wait_closed()
        self._close_timer: asyncio.TimerHandle | None = None  # see close_soon()
        self._partial: bytearray | None = None  # the start of a frame not yet whole (see _receive)
        # The largest payload read here: the library's ``max_size``
        # (``max_message_size`` and ``max_fragment_size`` in websockets 15
        # and later, ``max_size`` in 14); None: no limit.
        limit = getattr(self.protocol, "max_message_size", getattr(self.protocol, "max_size", None))
        fragment = getattr(self.protocol, "max_fragment_size", None)
        if fragment is not None:
            limit = fragment if limit is None else min(limit, fragment)
        self._limit = _NO_LIMIT if limit is None else limit

    def hold(self, data: bytes) -> None:
        """Keep ``data`` (what came behind the upgrade request) and what
        arrives next for :meth:`start`: no frame is parsed before the 101."""
        self._held = bytearray(data)

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; the frames it makes any connection send (relayed
        messages, answers) are written as soon as it is handled: one write
        per connection for all of them, not one per frame, and no wait for
        the rest of the loop pass."""
        global _flush_after
        self.last_received = monotonic()
        held = self._held
        if held is not None:  # after the upgrade request: frames wait for the 101 and start()
            held += data
            return
        if _flush_soon:
            # Frames queued from a timer or a task go out before anything
            # these bytes cause: the answer to a close frame, or relayed
            # messages (which then never join a batch begun before).
            _flush_queued()
        if _flush_after is not None:  # already inside a chunk (not expected): theirs flushes
            self._receive(data)
            if self.protocol.state is not _OPEN:
                self._closed_by_chunk()
            return
        touched = _flush_after = []
        try:
            self._receive(data)
            # The chunk held a close frame, or broke the protocol: the state
            # left OPEN as it was parsed, before its messages were handed on
            # (those before the close frame still count: they were sent).
            if self.protocol.state is not _OPEN:
                self._closed_by_chunk()  # the notices it causes go out with the rest below
        finally:
            _flush_after = None
            for connection in touched:
                connection._flush()

    def _receive(self, data: bytes) -> None:
        """Read the whole frames of ``data``; keep the start of a frame not
        yet whole for the next chunk.

        A chunk of whole simple frames only (see :func:`frame_at`: the
        relayed messages) is read here, each message handed to
        :meth:`_deliver` in turn. The whole frames of a chunk with any other
        frame go to the library's parser together, as the chunk would without
        this path: the library
        parses a chunk before handing any message on, so a close frame
        behind an ``authenticate`` in one chunk closes the connection before
        the ``authenticate`` is handled (it could not be answered). Once a
        frame the library cannot take whole arrives (not masked, over the
        size limit), and after the connection has failed, the library reads
        every byte."""
        partial = self._partial
        if partial is not None:
            self._partial = None
            partial += data
            data = partial  # type: ignore[assignment]
        limit = self._limit
        protocol = self.protocol
        size = len(data)
        if size > 6 and data[0] == 0x81 and protocol.state is _OPEN and self._fragments is None:
            # One whole simple frame (most chunks of a call): read without the loop below.
            second = data[1]
            if 0x80 < second < 0xFE:
                length, mask = second & 0x7F, 2
            elif second == 0xFE:
                length, mask = (data[2] << 8) | data[3], 4
            else:
                length, mask = -1, 0
            if 0 <= length <= limit and size == mask + 4 + length:
                self._deliver(_TEXT, apply_mask(data[mask + 4 :], data[mask : mask + 4]))
                return
        library = super().data_received
        if limit < 0 or protocol.state is not _OPEN:  # the handshake request; after a close
            library(data)
            return
        simple: list[tuple[int, int]] = []
        at, others = 0, False
        while at < size:
            kind, mask, end = frame_at(data, at, limit)
            if kind == PARTIAL:
                break
            if kind == UNREADABLE:  # the library reads it, and the rest of this connection
                self._limit = -1
                library(data)
                return
            if kind == SIMPLE:
                simple.append((mask, end))
            else:
                others = True
            at = end
        if at < size:
            self._partial = bytearray(data[at:]) if at or type(data) is bytes else data  # type: ignore[assignment]
        if not at:
            return
        if others or self._fragments is not None or protocol.state is not _OPEN:
            library(data[:at] if at < size else data)
            return
        for mask, end in simple:
            self._deliver(_TEXT, apply_mask(data[mask + 4 : end], data[mask : mask + 4]))
            if protocol.state is not _OPEN:  # failed (1007) or closed by the engine: the library
                if end < at:  # reads what follows, as it would have (or discards it, after 1007)
                    library(data[end:at])
                return

    def _closed_by_chunk(self) -> None:
        """The chunk just handled left the connection not OPEN: bound the
        wait for the client's TCP close when the library expects it, and,
        unless the handshake is still under way (the request head is parsed
        in CONNECTING), tell :attr:`on_closing`."""
        if self.protocol.close_expected():
            self._expect_tcp_close()
        if self.protocol.state is not _CONNECTING:
            self._stop_sending()

    def process_event(self, event: Any) -> None:
        """Hand each whole message to :attr:`on_message` as it is parsed,
        instead of queueing it for ``recv()``: the library's frame parser
        still checks every frame (masking, sizes, control frames), but a
        relayed message costs no queue, future or task switch, and messages
        are handled in arrival order.

        Every frame counts against the message rate limit (docs/protocol.md,
        rule 7): an unfragmented message once, through
        :attr:`on_message`; every other frame through :attr:`on_frame` — a
        fragment (the last one of a message counts through
        :attr:`on_message`, so a message of n fragments counts n), a ping,
        a pong, solicited or not, and a close frame."""
        if self.request is None:
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if event.fin:
                self._deliver(opcode, event.data)
                return
            self._fragments = [opcode, event.data]
        elif opcode is _CONT:
            fragments = self._fragments
            if fragments is not None:  # always: the parser refuses a stray continuation (1002)
                fragments.append(event.data)
                if event.fin:
                    self._fragments = None
                    self._deliver(fragments[0], b"".join(fragments[1:]))
                    return
        else:
            super().process_event(event)  # a pong acknowledges our pings
        if self.on_frame is not None:
            self.on_frame()

    def start(
        self,
        on_message: Callable[[str | bytes], None],
        on_frame: Callable[[], None],
        on_closing: Callable[[], None],
    ) -> None:
        """Begin handing messages to ``on_message``, other frames to
        ``on_frame`` (see :meth:`process_event`), and the end of sending to
        ``on_closing`` (see :meth:`_stop_sending`). Bytes that came behind
        the upgrade request were held until now, after the 101 (RFC 6455
        §4.1): they are parsed first, then a held end of stream."""
        self.on_message = on_message
        self.on_frame = on_frame
        self.on_closing = on_closing
        held, self._held = self._held, None
        if self._closing:  # the TCP connection was lost before there was anyone to tell
            on_closing()
            return
        if held:
            self.data_received(bytes(held))
        if self._held_eof:
            self._held_eof = False
            if not self.eof_received():
                self.transport.close()

    def eof_received(self) -> bool | None:
        """A client may half-close once its request is sent (RFC 9112 §9.6):
        the answer must still go out. Until the handshake has an answer (and,
        after a 101, until :meth:`start`), the end of stream waits."""
        if self._held is not None or self.protocol.state is _CONNECTING:
            self._held_eof = True
            return True  # keep the transport open for writing
        if self._out is not None:  # what was queued goes out before our end of stream
            self._flush()
        partial, self._partial = self._partial, None
        if partial is not None:  # the library sees the frame cut short by the end of stream
            super().data_received(partial)
        keep_open = super().eof_received()
        if self.protocol.state is not _OPEN:  # CLOSED: an end of stream without a close frame
            self._stop_sending()
        return keep_open

    def _deliver(self, opcode: Any, data: bytes) -> None:
        if opcode is _BINARY:
            self.on_message(bytes(data))  # type: ignore[misc]
            return
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError as exc:  # RFC 6455 §8.1: fail with 1007
            if self._out is not None:  # frames queued before this one precede the close frame
                self._flush()
            self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            self.send_data()
            return
        self.on_message(text)  # type: ignore[misc]

    def send_text(self, text: str) -> bool:
        """Queue one unfragmented text frame, written without the library's
        frame objects. True when queued; False, and nothing queued, when the
        connection is no longer open for sending (it is closing, or its
        transport is: the caller holds or refuses what it could not send,
        docs/protocol.md, rule 4).

        Server frames are unmasked (RFC 6455 §5.1): a 2-, 4- or 10-byte
        header and the UTF-8 payload. Frames queued while one received
        chunk is handled (see :meth:`data_received`), or else during one
        pass of the event loop, go out in one ``transport.write`` (one
        system call for a burst of relayed messages), in order, before
        anything the library writes later (:meth:`close_soon` writes them
        first).
        A peer that lets :data:`MAX_UNREAD_BYTES` pile up unread is dropped
        like a lost network."""
        if self._closing or self.protocol.state is not _OPEN:
            return False
        out = self._out
        if out is None and self.transport.is_closing():
            # Lost (a read or write error) but not yet told: connection_lost
            # comes a loop pass later. Checked once per batch: while a chunk
            # is handled, nothing closes a transport but close_soon (which
            # writes the batch first) and _flush (which ends it), and a batch
            # begun from a timer or a task is written before the next chunk.
            return False
        data = text.encode()
        size = len(data)
        if size < 126:
            frame = bytes((0x81, size)) + data
        elif size < 65536:
            frame = b"\x81\x7e" + size.to_bytes(2, "big") + data
        else:
            frame = b"\x81\x7f" + size.to_bytes(8, "big") + data
        if out is not None:
            out.append(frame)
            return True
        self._out = [frame]
        if _flush_after is not None:  # while a received chunk is handled
            _flush_after.append(self)
        else:  # from a timer or a task
            if not _flush_soon:
                self.loop.call_soon(_flush_queued)
            _flush_soon.append(self)
        return True

    def _flush(self) -> None:
        """Write the queued frames in one ``transport.write``; drop the peer
        (:data:`MAX_UNREAD_BYTES`) if it let too much pile up unread."""
        out, self._out = self._out, None
        transport = self.transport
        # Frames queued from a timer or a task (server notices) wait for the
        # end of the loop pass, which may find the TCP connection lost: they
        # are lost with it. Relayed messages are queued while a received
        # chunk is handled and written at its end, with nothing in between
        # that could close the connection.
        if not out or self.protocol.state is not _OPEN or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            transport.abort()
            self._stop_sending()

    def close_soon(self, code: int, reason: str) -> None:
        """Begin the closing handshake (RFC 6455 §7.1.2) without a task:
        the frames queued in this loop pass go out first, then the close
        frame; the library's receive path completes the handshake when the
        peer answers (see :meth:`_expect_tcp_close` for the bound). Does
        nothing unless the connection is open for sending; afterwards it is
        not (:attr:`on_closing` is told)."""
        if self._closing or self.protocol.state is not _OPEN or self.transport.is_closing():
            return
        out, self._out = self._out, None
        self.protocol.send_close(code, reason)
        data = [*(out or ()), *self.protocol.data_to_send()]
        transport = self.transport
        transport.write(b"".join(data))  # queued frames and the close frame: one system call
        if b"" in data:  # end of stream asked for (not after a server's own close frame)
            transport.write_eof() if transport.can_write_eof() else transport.close()
        self._expect_tcp_close()
        self._stop_sending()

    def _stop_sending(self) -> None:
        """The connection is no longer open for sending: tell
        :attr:`on_closing`, the first time only. Called when a received
        chunk takes the protocol out of OPEN (close frame received or
        answered, 1002, 1007, 1009), on an end of stream, when our own close
        frame goes out (:meth:`close_soon`), when the transport is aborted
        (:data:`MAX_UNREAD_BYTES`, the close timeout), and when the TCP
        connection is lost — whichever comes first."""
        if self._closing:
            return
        self._closing = True
        if self.on_closing is not None:
            self.on_closing()

    @property
    def is_open(self) -> bool:
        """Whether a frame queued now could go out: the connection is open
        for sending and its transport is not closing (see :meth:`send_text`)."""
        return not self._closing and self.protocol.state is _OPEN and not self.transport.is_closing()

    @property
    def ip(self) -> str:
        """The client IP (:attr:`client_ip`)."""
        return self.client_ip

    def send_ping(self) -> None:
        """Write a ping with an empty payload now (RFC 6455 §5.5.2); its
        pong, like any bytes received, moves :attr:`last_received`. Only
        while :attr:`is_open`."""
        self.protocol.send_ping(b"")
        self.send_data()

    def _expect_tcp_close(self) -> None:
        """Once a close frame went out — ours, or the answer to the
        client's, or after a protocol error (1002, 1007, 1009) — the client
        has ``close_timeout`` seconds (:data:`CLOSE_TIMEOUT` of the server)
        to close its TCP connection, else it is aborted: a peer that stopped
        reading, never answers, or keeps its socket open after its own close
        frame must not hold a connection (and a call) forever."""
        if self._close_timer is None and not self.connection_lost_waiter.done():
            timeout = self.close_timeout if self.close_timeout is not None else 10.0
            self._close_timer = self.loop.call_later(timeout, self._close_timed_out)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """The library's ``close()``, returning at once when the TCP
        connection is already closed: the library would get there through
        its send context, a timeout, two shielded waits and a raised and
        caught ``ConnectionClosed`` — once per connection, when its handler
        returns."""
        if self.connection_lost_waiter.done():
            return
        await super().close(code, reason)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if not self.connection_lost_waiter.done():
            self.transport.abort()
            self._stop_sending()

    def forget_handshake(self) -> None:
        """Drop what the opening handshake left that nothing reads after the
        upgrade: the handshake's headers (a few KiB with some clients) and
        101 response, its request future, the per-connection logger
        adapter, and the library's receive queue (messages go to
        :attr:`on_message`; ``recv()`` is not used on these connections)."""
        self.request.headers = _NO_HEADERS  # type: ignore[union-attr]
        self.response = None  # type: ignore[assignment]
        self.request_rcvd = None  # type: ignore[assignment]
        self.protocol.logger = self.logger = _LIBRARY_LOGGER
        self.recv_messages = _NO_MESSAGES  # type: ignore[assignment]

    def wait_closed(self) -> asyncio.Future[None]:  # type: ignore[override]
        """A future done when the TCP connection is closed. Unlike the
        library's coroutine (a coroutine and a shielded future per waiter),
        one plain future: cancelling it, as the loop does at exit, leaves
        the library's own ``connection_lost_waiter`` untouched."""
        closed = self._closed
        if closed is None:
            closed = self._closed = self.loop.create_future()
            if self.connection_lost_waiter.done():
                closed.set_result(None)
        return closed

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        super().connection_lost(exc)
        closed = self._closed
        if closed is not None and not closed.done():
            closed.set_result(None)
        self._stop_sending()  # the TCP connection lost without a close frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_received = monotonic()
