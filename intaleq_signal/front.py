"""The first protocol of every accepted connection: one HTTP/1.1 request
read off the byte stream (RFC 9112), answered here or handed to websockets.

websockets' HTTP parser refuses any request with a body (``docs/design.md``,
"Request bodies and the websockets parser"), and its per-connection
machinery (connection object, handler task, handshake coroutine,
flow-control context) is the cost of a WebSocket, not of a one-shot
``POST /sessions``. So :class:`HTTPFront` — what
``serve(create_connection=...)`` gets from :class:`FrontFactory` — reads the
request head and its ``Content-Length`` body itself, then:

- a request asking for a protocol upgrade (``Upgrade`` header) with no body
  is handed on: a :class:`~intaleq_signal.wire.HTTPServerConnection` takes
  the transport (``transport.set_protocol``) and the library parses a
  body-less ``GET`` head and runs its opening handshake, calling the
  ``process_request``/``process_response`` hooks as usual
  (``docs/protocol.md``, "WebSocket /ws");
- any other request is answered here, synchronously, by the same two hooks
  (``POST /sessions``, ``/health``, ``/metrics``, refusals), then the
  connection is half-closed and closed once the client has read the answer
  (RFC 9112 §9.6), or after ``close_timeout``.

A malformed head gets 400 (414, 431 past the library's line limits) as a
JSON answer here (``docs/protocol.md``, "Anything else"). Every refusal is
a :class:`~intaleq_signal.exceptions.Refusal`, answered by
:func:`error_response`. Tested on the oldest and newest websockets that
``setup.cfg`` allows (``make test-compat``).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .exceptions import Refusal
from .lifecycle import transition
from .wire import HTTPServerConnection

__all__ = [
    "FRONT_TRANSITIONS",
    "FrontEvent",
    "FrontFactory",
    "FrontState",
    "HTTPFront",
    "error_response",
    "http_response",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
]

log = logging.getLogger("intaleq_signal.http")

#: Largest request body accepted (``docs/protocol.md``, "POST /sessions": larger is 413).
MAX_BODY_BYTES = 16 * 1024
#: Largest request head accepted (431 past it, as a JSON answer).
MAX_HEAD_BYTES = 16 * 1024
#: websockets' own limits (``http11.MAX_LINE_LENGTH``, ``MAX_NUM_HEADERS``),
#: kept for the requests handed on; enforced here so that the answer is JSON.
MAX_LINE_BYTES = 8190  # the library's 8192 counts the CRLF
MAX_HEADERS = 128

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_END = b"\r\n\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 9112 §3: method SP request-target SP HTTP-version (origin-form targets).
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) (/[\x21-\x7e]*) HTTP/1\.([01])")
# RFC 9110 §5: field-name is a token; field-value is VCHAR, obs-text, SP, HTAB.
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")
#: One string per common method, not one per request (kept by each connection).
_METHODS = {name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}


class FrontState(enum.Enum):
    """Where a connection's one request is (:data:`FRONT_TRANSITIONS`)."""

    HEAD = "reading the request head"
    BODY = "reading the Content-Length body"
    COMPLETE = "the whole request read; its answer may wait for the shared state (Redis), input dropped"
    ANSWERED = "answer written and half-closed, input dropped until the client closes"
    HANDED_ON = "a WebSocket connection owns the transport"


class FrontEvent(enum.Enum):
    HEAD_COMPLETE = "the head is read and its body framing accepted"
    FRAMING_REFUSED = "the head is read, its body framing refused (411, 413, 400): no body is read"
    BODY_COMPLETE = "the Content-Length body is read (at once when there is none)"
    UPGRADE_HANDED_ON = "an upgrade request went to a WebSocket connection"
    ANSWERED = "an answer was written and the connection half-closed"


_HEAD, _BODY, _COMPLETE, _ANSWERED, _HANDED_ON = FrontState

#: ``(state, event) -> next state`` of one connection's request, as
#: :mod:`.lifecycle`'s tables (a pair not here raises ``LifecycleError``).
#: A malformed head is answered at once (400, 414, 431: HEAD → ANSWERED);
#: any other request is read whole, then answered or handed on.
FRONT_TRANSITIONS: dict[tuple[FrontState, FrontEvent], FrontState] = {
    (_HEAD, FrontEvent.HEAD_COMPLETE): _BODY,
    (_HEAD, FrontEvent.FRAMING_REFUSED): _COMPLETE,
    (_HEAD, FrontEvent.ANSWERED): _ANSWERED,
    (_BODY, FrontEvent.BODY_COMPLETE): _COMPLETE,
    (_COMPLETE, FrontEvent.UPGRADE_HANDED_ON): _HANDED_ON,
    (_COMPLETE, FrontEvent.ANSWERED): _ANSWERED,
}

ProcessRequest = Callable[[Any, Request], "Response | None | Awaitable[Response | None]"]
ProcessResponse = Callable[[Any, Request, Response], "Response | None | Awaitable[Response | None]"]


class FrontFactory:
    """``serve(create_connection=FrontFactory(...))``: websockets calls it
    with each accepted connection's sans-I/O ``ServerProtocol``, the server
    and the connection options; it returns the :class:`HTTPFront` that
    becomes the transport's protocol.

    Args:
        process_request, process_response: the hooks also given to
            ``serve``; called here for requests that are not upgrades
            (``process_request`` may return an awaitable of the answer).
        open_timeout: seconds a client has to send its whole request.
    """

    def __init__(
        self, process_request: ProcessRequest, process_response: ProcessResponse, open_timeout: float
    ):
        self.process_request = process_request
        self.process_response = process_response
        self.open_timeout = open_timeout

    def __call__(self, protocol: Any, server: Any, **options: Any) -> HTTPFront:
        return HTTPFront(self, protocol, server, options)


class HTTPFront(asyncio.Protocol):
    """One connection until its request is answered or handed on.

    Attributes read by the hooks (as on
    :class:`~intaleq_signal.wire.HTTPServerConnection`):
        http_method: the request method as sent.
        http_version: ``"1.1"``, or ``"1.0"`` (never handed on: a WebSocket
            upgrade needs HTTP/1.1).
        http_body: the body bytes, ``b""`` when there was none.
        http_body_error: ``None``, or the :class:`Refusal` (with its
            ``http_status``) when the body framing is refused: 411 without
            ``Content-Length`` on POST or with ``Transfer-Encoding``; 413
            over :data:`MAX_BODY_BYTES`; 400 for an invalid
            ``Content-Length`` (answered by ``process_request``, the API key
            being checked first).
        remote_address: the TCP peer, ``(host, port, ...)``.
        client_ip: set by ``process_request`` (``docs/protocol.md``,
            "Connecting": ``TRUSTED_PROXIES``).
    """

    __slots__ = (
        "factory",
        "protocol",
        "server",
        "options",
        "transport",
        "remote_address",
        "client_ip",
        "http_method",
        "http_version",
        "http_body",
        "http_body_error",
        "_state",
        "_buffer",
        "_head",
        "_headers",
        "_path",
        "_body_length",
        "_upgrade",
        "_timer",
    )

    def __init__(self, factory: FrontFactory, protocol: Any, server: Any, options: dict[str, Any]) -> None:
        self.factory = factory
        self.protocol = protocol  # websockets' ServerProtocol, for a hand-off
        self.server = server
        self.options = options
        self.transport: Any = None
        self.remote_address: Any = None
        self.client_ip = "?"
        self.http_method = "GET"
        self.http_version = "1.1"
        self.http_body = b""
        self.http_body_error: Refusal | None = None
        self._state = _HEAD
        self._buffer = bytearray()
        self._head = b""  # the body-less GET head the library parses on a hand-off
        self._headers: list[tuple[bytes, bytes]] = []
        self._path = "/"
        self._body_length = 0
        self._upgrade = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.remote_address = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.factory.open_timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _ANSWERED or state is _HANDED_ON or state is _COMPLETE:
            return
        buffer = self._buffer
        buffer += data
        if state is _HEAD:
            while buffer[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines first
                del buffer[:2]
            end = buffer.find(_HEAD_END)
            if end < 0 or end > MAX_HEAD_BYTES:
                if _BARE_LF.search(buffer):  # LF without CR: never a valid head
                    self._refuse(
                        Refusal("bad_request", "malformed HTTP request (line endings)", http_status=400)
                    )
                elif len(buffer) > MAX_HEAD_BYTES:
                    self._refuse(Refusal("headers_too_large", "request head too large", http_status=431))
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            if not self._read_head(head):
                if self._state is _HEAD:  # its framing refused (a malformed head is answered)
                    self._move(FrontEvent.FRAMING_REFUSED)
                    self._complete(b"")
                return
            self._move(FrontEvent.HEAD_COMPLETE)
        if len(buffer) >= self._body_length:
            self.http_body = bytes(buffer[: self._body_length])
            self._move(FrontEvent.BODY_COMPLETE)
            self._complete(bytes(buffer[self._body_length :]))

    def _move(self, event: FrontEvent) -> None:
        """Raises ``LifecycleError`` for a pair not in :data:`FRONT_TRANSITIONS`."""
        self._state = transition(FRONT_TRANSITIONS, self._state, event)

    def eof_received(self) -> bool:
        """The client may half-close once its request is sent (RFC 9112
        §9.6): while its answer is pending (the shared state is asked), the
        connection stays half-open for it. After the answer, its end of
        stream means it has read it: close."""
        return self._state is _COMPLETE

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the request ---------------------------------------------------------

    def _read_head(self, head: bytes) -> bool:
        """Validate the head (request line and header syntax of RFC 9112
        §3, §5, within the library's line and count limits) and read its
        body framing; False when the framing is refused
        (:attr:`http_body_error`). A malformed head is answered at once."""
        lines = head.split(b"\r\n")
        if len(lines[0]) > MAX_LINE_BYTES:
            self._refuse(Refusal("uri_too_long", "request target too long", http_status=414))
            return False
        if len(lines) > MAX_HEADERS or any(len(line) > MAX_LINE_BYTES for line in lines):
            self._refuse(Refusal("headers_too_large", "too many or too long header lines", http_status=431))
            return False
        request_line = _REQUEST_LINE.fullmatch(lines[0])
        matches = [_HEADER_LINE.fullmatch(line) for line in lines[1:]]
        if request_line is None or not all(matches):
            self._refuse(Refusal("bad_request", "malformed HTTP request", http_status=400))
            return False
        method = request_line[1]
        self.http_method = _METHODS.get(method) or method.decode("ascii")
        self._path = request_line[2].decode("ascii")
        # What the library's parser gets on a hand-off: GET, HTTP/1.1
        # (websockets < 17 accepts nothing else), no body framing headers.
        kept = [b"GET " + request_line[2] + b" HTTP/1.1"]
        headers = self._headers
        lengths: set[bytes] = set()
        coded = expect_continue = False
        for match in matches:
            name, value = match[1], match[2]  # type: ignore[index]
            lower = name.lower()
            if lower == b"content-length":
                lengths.add(value)
            elif lower == b"transfer-encoding":
                coded = True
            elif lower == b"expect":
                expect_continue = value.lower() == b"100-continue"
            else:
                self._upgrade = self._upgrade or lower == b"upgrade"
                kept.append(match[0])  # type: ignore[index]
                headers.append((name, value))
        if request_line[3] == b"0":  # HTTP/1.0 has no upgrade (RFC 6455 §4.1): the hooks answer
            self.http_version = "1.0"
            self._upgrade = False
        self._head = b"\r\n".join(kept) + _HEAD_END
        length = next(iter(lengths)) if len(lengths) == 1 else b""
        if coded:
            error = Refusal(
                "length_required", "Transfer-Encoding is not accepted; send Content-Length", http_status=411
            )
        elif lengths and not _DIGITS.fullmatch(length):
            error = Refusal("invalid_request", "invalid Content-Length header", http_status=400)
        elif lengths and (len(length.lstrip(b"0")) > 9 or int(length) > MAX_BODY_BYTES):
            error = Refusal("payload_too_large", f"request body over {MAX_BODY_BYTES} bytes", http_status=413)
        elif not lengths and self.http_method == "POST":
            error = Refusal("length_required", "Content-Length is required", http_status=411)
        else:
            self._body_length = int(length) if lengths else 0
            if expect_continue and self._body_length:
                self.transport.write(_CONTINUE)
            return True
        self.http_body_error = error
        return False

    def _complete(self, rest: bytes) -> None:
        """The whole request is here (``rest``: what the client sent after
        it). An upgrade request whose framing is sound goes to websockets;
        any other is answered here."""
        self._buffer = bytearray()
        if self._upgrade and self.http_body_error is None and not self.http_body:
            self._hand_on(rest)
            return
        headers = Headers()
        for name, value in self._headers:
            headers[name.decode("ascii")] = value.decode("iso-8859-1")
        request = Request(self._path, headers)
        factory = self.factory
        try:
            response = factory.process_request(self, request)
        except Exception:
            log.error("process_request failed", exc_info=True)
            response = None
        if inspect.isawaitable(response):  # POST /sessions asking the shared state (Redis)
            task = asyncio.ensure_future(response)
            task.add_done_callback(lambda done: self._respond(request, done))
            return
        self._respond(request, response)

    def _respond(self, request: Request, response: Any) -> None:
        """Answer with ``response``: a :class:`Response`, a finished task of
        one, or None when ``process_request`` failed (500)."""
        if isinstance(response, asyncio.Future):
            if response.cancelled():
                return
            exc = response.exception()
            if exc is not None:
                log.error("process_request failed", exc_info=exc)
                response = None
            else:
                response = response.result()
            if self.transport is None or self.transport.is_closing():
                return  # the client went away while its answer was pending
        try:
            if not isinstance(response, Response):
                raise TypeError(f"process_request returned {response!r} for a request without upgrade")
            response = self.factory.process_response(self, request, response) or response
        except Exception:
            if response is not None:
                log.error("process_request failed", exc_info=True)
            response = error_response(
                Refusal("internal_error", "the request could not be handled", http_status=500)
            )
        self._answer(response.serialize())

    def _hand_on(self, rest: bytes) -> None:
        """Give the transport to a WebSocket connection: it parses the
        request head and runs the library's opening handshake; bytes that
        came behind the request wait until after its 101 (RFC 6455 §4.1)."""
        self._move(FrontEvent.UPGRADE_HANDED_ON)
        if self._timer is not None:
            self._timer.cancel()  # the library's open_timeout applies from here
            self._timer = None
        connection = HTTPServerConnection(self.protocol, self.server, **self.options)
        connection.http_method = self.http_method
        transport = self.transport
        transport.set_protocol(connection)
        connection.connection_made(transport)
        connection.data_received(self._head)
        connection.hold(rest)
        self.protocol = self.server = self.transport = None

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a head the library must not see (``docs/protocol.md``,
        "Anything else": malformed HTTP gets 400 and close)."""
        self._answer(error_response(refusal).serialize())

    def _answer(self, data: bytes) -> None:
        """Write the answer and half-close; the connection closes when the
        client closes its side, or after ``close_timeout`` (seconds)."""
        self._move(FrontEvent.ANSWERED)
        self._buffer = bytearray()
        transport = self.transport
        transport.write(data)
        if transport.can_write_eof():
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        timeout = self.options.get("close_timeout") or 10.0
        self._timer = asyncio.get_running_loop().call_later(timeout, transport.abort)


def http_response(status: int, content_type: str, body: bytes) -> Response:
    """An answer that closes the connection and is never cached (every
    answer on this port is one request's)."""
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    headers["Cache-Control"] = "no-store"
    return Response(status, HTTPStatus(status).phrase, headers, body)


def error_response(refusal: Refusal) -> Response:
    """The HTTP answer to ``refusal``: its ``http_status``, its ``headers``
    and the JSON body ``{"error": code, "message": message}``
    (``docs/protocol.md``, "HTTP API").

    Raises:
        ValueError: ``refusal`` has no ``http_status`` (a WebSocket one).
    """
    if refusal.http_status is None:
        raise ValueError(f"{refusal.code} is not an HTTP refusal")
    body = json.dumps({"error": refusal.code, "message": refusal.message}).encode()
    response = http_response(refusal.http_status, "application/json", body)
    for name, value in refusal.headers.items():
        response.headers[name] = value
    return response
