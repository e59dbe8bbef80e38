"""Request bodies on the WebSocket port: the one place that works around the
websockets HTTP parser (SPEC §1 "Known obstacle").

``websockets.http11.Request.parse`` refuses any request with a body
(``Content-Length`` other than 0 raises "unsupported request body"), and
before websockets 17.0 it also refuses every method but GET. So that
``process_request`` can answer ``POST /sessions`` on the same port,
:class:`HTTPServerConnection` — handed to ``serve(create_connection=...)`` —
reads the request head off the byte stream before the library's parser sees
it, answers a malformed head with 400 itself, takes a bounded
``Content-Length`` body off the stream, and feeds the parser a body-less
``GET ... HTTP/1.1`` head. The real method and the body are kept on the
connection as :attr:`http_method` and :attr:`http_body`, and any reason to
refuse the body as :attr:`http_body_error` (411/413/400, answered by
``process_request`` in :mod:`intaleq_signal.http_api`).

Tested with the oldest and newest websockets versions that ``setup.cfg``
allows (``make test-compat``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from http import HTTPStatus
from time import monotonic
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Opcode
from websockets.protocol import State

__all__ = ["HTTPServerConnection", "error_body", "MAX_BODY_BYTES", "MAX_HEAD_BYTES"]

#: Largest request body accepted (SPEC §3: larger is 413).
MAX_BODY_BYTES = 16 * 1024
#: Largest request head accepted (431 past it, as a JSON answer).
MAX_HEAD_BYTES = 16 * 1024
#: websockets' own limits (``http11.MAX_LINE_LENGTH``, ``MAX_NUM_HEADERS``),
#: enforced here first so that the answer is JSON like every other.
MAX_LINE_BYTES = 8190  # the library's 8192 counts the CRLF
#: Unsent output past which a peer is taken as not reading and dropped.
MAX_UNREAD_BYTES = 256 * 1024
MAX_HEADERS = 128

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TEXT, _BINARY, _CONT, _PING = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING
_OPEN, _CONNECTING = State.OPEN, State.CONNECTING
_NO_HEADERS = Headers()  # shared, never written to
_HEAD_END = b"\r\n\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 9112 §3: method SP request-target SP HTTP-version (origin-form targets).
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) (/[\x21-\x7e]*) HTTP/1\.[01]")
# RFC 9110 §5: field-name is a token; field-value is VCHAR, obs-text, SP, HTAB.
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")


class HTTPServerConnection(ServerConnection):
    """A ``ServerConnection`` that lifts a request body off the stream.

    Attributes:
        http_method: the request method as sent (``"GET"``, ``"POST"``, ...).
        http_body: the body bytes, ``b""`` when there was none.
        http_body_error: ``None``, or ``(status, code, message)`` when the
            body framing is refused: 411 without ``Content-Length`` on a
            method that needs one or with ``Transfer-Encoding``; 413 over
            :data:`MAX_BODY_BYTES`; 400 for an invalid ``Content-Length``.
        client_ip: the client address as ``process_request`` resolved it
            (SPEC §4, ``TRUSTED_PROXIES``).
        last_received: ``time.monotonic()`` of the latest bytes received (not
            ``loop.time()``: uvloop's is cached per loop iteration), read by
            the heartbeat sweep (SPEC §4 rule 8).
    """

    # Slots, not the inherited __dict__: a few more keys there would make
    # every connection's attribute dict double in size.
    __slots__ = (
        "http_method",
        "http_body",
        "http_body_error",
        "client_ip",
        "last_received",
        "_pending",
        "_body_length",
        "_head",
        "_upgrade",
        "on_message",
        "on_ping",
        "_fragments",
        "_held",
        "_held_eof",
        "_discarding",
        "_out",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The library only appends to, removes from and iterates over its
        # write-flow-control waiters: a list does that in 56 bytes, an empty
        # deque takes 760 on every idle connection.
        self.drain_waiters = []  # type: ignore[assignment]
        self.client_ip = "?"
        self.http_method = "GET"
        self.http_body = b""
        self.http_body_error: tuple[int, str, str] | None = None
        self.last_received = 0.0
        self._pending: bytearray | None = bytearray()  # None once the head is handed on
        self._body_length = -1
        self._head = b""
        self._upgrade = False  # the request asks for a protocol upgrade
        #: After the upgrade: called with each whole message (str for text,
        #: bytes for binary), and on each ping; set by the signaling layer.
        self.on_message: Callable[[str | bytes], None] | None = None
        self.on_ping: Callable[[], None] | None = None
        self._fragments: list[Any] | None = None  # [opcode, data, ...] of a fragmented message
        self._held: bytearray | None = None  # bytes behind an upgrade request, until start()
        self._held_eof = False  # the client half-closed before its answer was written
        # Past an answered or refused request: what else comes is dropped. A
        # flag, not a rebound data_received: uvloop keeps the method it saw
        # when the transport was made.
        self._discarding = False
        self._out: list[bytes] | None = None  # frames waiting for this loop pass's write

    def data_received(self, data: bytes) -> None:
        self.last_received = monotonic()
        if self._pending is None:
            held = self._held
            if held is not None:  # after an upgrade request: frames wait for the 101 and start()
                held += data
            elif not self._discarding:
                super().data_received(data)
            return
        pending = self._pending
        pending += data
        if self._body_length < 0:
            while pending[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines first
                del pending[:2]
            end = pending.find(_HEAD_END)
            if end < 0 or end > MAX_HEAD_BYTES:
                if _BARE_LF.search(pending):  # LF without CR: never a valid head
                    self._refuse(400, "bad_request", "malformed HTTP request (line endings)")
                elif len(pending) > MAX_HEAD_BYTES:
                    self._refuse(431, "headers_too_large", "request head too large")
                return
            head = bytes(pending[:end])
            del pending[: end + 4]
            if not self._inspect_head(head):
                return
        if len(pending) >= self._body_length:
            self.http_body = bytes(pending[: self._body_length])
            del pending[: self._body_length]
            if self._upgrade:  # frames may follow at once: held until start()
                self._held = bytearray(pending)
                self._hand_on(self._head)
            else:  # one request per connection: what follows is dropped
                self._hand_on(self._head)
                self._discarding = True

    def _inspect_head(self, head: bytes) -> bool:
        """Validate the head (request line and header syntax of RFC 9112
        §3, §5, within the library's own line and count limits) and read its
        body framing; False when it was answered here."""
        lines = head.split(b"\r\n")
        if len(lines[0]) > MAX_LINE_BYTES:
            self._refuse(414, "uri_too_long", "request target too long")
            return False
        if len(lines) > MAX_HEADERS or any(len(line) > MAX_LINE_BYTES for line in lines):
            self._refuse(431, "headers_too_large", "too many or too long header lines")
            return False
        request_line = _REQUEST_LINE.fullmatch(lines[0])
        headers = [_HEADER_LINE.fullmatch(line) for line in lines[1:]]
        if request_line is None or not all(headers):
            self._refuse(400, "bad_request", "malformed HTTP request")
            return False
        self.http_method = request_line[1].decode("ascii")
        # What the library's parser gets: GET, HTTP/1.1 (websockets < 17
        # accepts nothing else), no body framing headers.
        kept = [b"GET " + request_line[2] + b" HTTP/1.1"]
        lengths: set[bytes] = set()
        coded = expect_continue = False
        for match in headers:
            name = match[1].lower()  # type: ignore[index]
            if name == b"content-length":
                lengths.add(match[2])  # type: ignore[index]
            elif name == b"transfer-encoding":
                coded = True
            elif name == b"expect":
                expect_continue = match[2].lower() == b"100-continue"  # type: ignore[index]
            else:
                self._upgrade = self._upgrade or name == b"upgrade"
                kept.append(match[0])  # type: ignore[index]
        self._head = b"\r\n".join(kept) + _HEAD_END
        length = next(iter(lengths)) if len(lengths) == 1 else b""
        if coded:
            error = (411, "length_required", "Transfer-Encoding is not accepted; send Content-Length")
        elif lengths and not _DIGITS.fullmatch(length):
            error = (400, "invalid_request", "invalid Content-Length header")
        elif lengths and (len(length.lstrip(b"0")) > 9 or int(length) > MAX_BODY_BYTES):
            error = (413, "payload_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        elif not lengths and self.http_method == "POST":
            error = (411, "length_required", "Content-Length is required")
        else:
            self._body_length = int(length) if lengths else 0
            if expect_continue and self._body_length:
                self.transport.write(_CONTINUE)
            return True
        # Refused framing: process_request answers from the head alone
        # (the API key is still checked first); whatever follows is dropped.
        self.http_body_error = error
        self._hand_on(self._head)
        self._discarding = True
        return False

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer a head the library must not see, and close (SPEC §3:
        malformed HTTP gets 400 and close; the library would only drop the
        connection)."""
        body = error_body(code, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, HTTPStatus(status).phrase.encode(), len(body), body)
        )
        self._pending = None
        self._discarding = True
        self.transport.close()

    def _hand_on(self, data: bytes) -> None:
        self._pending = None
        self._head = b""
        super().data_received(data)

    def process_event(self, event: Any) -> None:
        """Hand each whole message to :attr:`on_message` as it is parsed,
        instead of queueing it for ``recv()``: the library's frame parser
        still checks every frame (masking, sizes, control frames), but a
        relayed message costs no queue, future or task switch, and messages
        are handled in arrival order. Pings are passed to :attr:`on_ping`
        (SPEC §4: the message rate limit counts every frame)."""
        if self.request is None:
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if event.fin:
                self._deliver(opcode, event.data)
            else:
                self._fragments = [opcode, event.data]
        elif opcode is _CONT:
            fragments = self._fragments
            if fragments is not None:
                fragments.append(event.data)
                if event.fin:
                    self._fragments = None
                    self._deliver(fragments[0], b"".join(fragments[1:]))
        else:
            if opcode is _PING and self.on_ping is not None:
                self.on_ping()
            super().process_event(event)

    def start(self, on_message: Callable[[str | bytes], None], on_ping: Callable[[], None]) -> None:
        """Begin handing messages to ``on_message`` (and pings to
        ``on_ping``). Bytes that came behind the upgrade request were held
        until now, after the 101 (RFC 6455 §4.1): they are parsed first, then
        a held end of stream."""
        self.on_message = on_message
        self.on_ping = on_ping
        held, self._held = self._held, None
        if held:
            self.data_received(bytes(held))
        if self._held_eof:
            self._held_eof = False
            if not super().eof_received():
                self.transport.close()

    def eof_received(self) -> bool | None:
        """A client may half-close once its request is sent (RFC 9112 §9.6):
        the answer must still go out. Until the handshake has an answer (and,
        after a 101, until :meth:`start`), the end of stream waits."""
        if self._pending is None and (self._held is not None or self.protocol.state is _CONNECTING):
            self._held_eof = True
            return True  # keep the transport open for writing
        return super().eof_received()

    def _deliver(self, opcode: Any, data: bytes) -> None:
        if opcode is _BINARY:
            self.on_message(bytes(data))  # type: ignore[misc]
            return
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError as exc:  # RFC 6455 §8.1: fail with 1007
            self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            self.send_data()
            return
        self.on_message(text)  # type: ignore[misc]

    def send_text(self, text: str) -> None:
        """Queue one unfragmented text frame, written without the library's
        frame objects; dropped unless the connection is open.

        Server frames are unmasked (RFC 6455 §5.1): a 2-, 4- or 10-byte
        header and the UTF-8 payload. Frames queued during one pass of the
        event loop go out in one ``transport.write`` (one system call for a
        burst of relayed messages), in order, before anything the library
        writes later (a close frame comes from a task, after this flush).
        A peer that lets :data:`MAX_UNREAD_BYTES` pile up unread is dropped
        like a lost network."""
        if self.protocol.state is not _OPEN:
            return
        data = text.encode()
        size = len(data)
        if size < 126:
            frame = bytes((0x81, size)) + data
        elif size < 65536:
            frame = b"\x81\x7e" + size.to_bytes(2, "big") + data
        else:
            frame = b"\x81\x7f" + size.to_bytes(8, "big") + data
        out = self._out
        if out is None:
            self._out = [frame]
            self.loop.call_soon(self._flush)
        else:
            out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, None
        transport = self.transport
        # Since queueing, the closing handshake may have begun (the peer's
        # close frame was answered): no data frame may follow a close frame.
        if not out or self.protocol.state is not _OPEN or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            transport.abort()

    def forget_handshake(self) -> None:
        """Drop the handshake's headers (a few KiB per idle connection that
        nothing reads after the upgrade)."""
        self.request.headers = _NO_HEADERS  # type: ignore[union-attr]
        if self.response is not None:
            self.response.headers = _NO_HEADERS
            self.response.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_received = monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending = None
        super().connection_lost(exc)


def error_body(code: str, message: str) -> bytes:
    """The JSON error body of every HTTP error answer (SPEC §3)."""
    return json.dumps({"error": code, "message": message}).encode()
