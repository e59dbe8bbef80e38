"""The first protocol of every accepted connection: HTTP/1.1 requests read
off the byte stream (RFC 9112), answered here or handed to websockets.

websockets' HTTP parser refuses any request with a body (``docs/design.md``,
"Request bodies and the websockets parser"), and its per-connection
machinery (connection object, handler task, handshake coroutine,
flow-control context) is the cost of a WebSocket, not of a
``POST /sessions``. So :class:`HTTPFront` — what
``serve(create_connection=...)`` gets from :class:`FrontFactory` — reads
each request head and its ``Content-Length`` body itself, then:

- a request asking for a WebSocket upgrade (an ``Upgrade`` header naming ``websocket``) with no body
  is handed on: a :class:`~intaleq_signal.wire.HTTPServerConnection` takes
  the transport (``transport.set_protocol``) and the library parses a
  body-less ``GET`` head and runs its opening handshake, calling the
  ``process_request``/``process_response`` hooks as usual
  (``docs/protocol.md``, "WebSocket /ws"); this may follow earlier
  requests on the same connection;
- any other request is answered here by the same two hooks (``POST
  /sessions``, ``/health``, ``/metrics``, refusals), synchronously or, when
  ``process_request`` returns an awaitable (several instances asking
  Redis), once it is done.

After an answer written here the connection is kept for the next request
(persistence, RFC 9112 §9.3;
``docs/protocol.md``, "Persistent connections") unless the request said
``Connection: close`` or was HTTP/1.0, the head was malformed, its body
framing was refused (411, 413, 400: the body was not read, so where the
next request starts is unknown), the hooks failed (500), the server is
stopping (:meth:`FrontFactory.shutdown`), or the connection has served
:data:`KEEPALIVE_REQUESTS` requests. Such an answer says ``Connection:
close``; the connection is half-closed and closed once the client has read
it (RFC 9112 §9.6), or after ``close_timeout``. A kept answer says
``Keep-Alive: timeout=N`` instead. A kept connection with no byte of a next
request for :data:`KEEPALIVE_TIMEOUT` seconds is closed; once its first
byte arrives, the whole request has ``open_timeout`` seconds, as the first.

Requests sent behind one (pipelining, RFC 9112 §9.3.2) are kept and read
in order, each after the answer before it is written, from the event loop
(``loop.call_soon``, one request per pass: a chunk of many small requests
never deepens the stack). While an answer is pending, or the client does
not read its answers (``pause_writing``), input is kept up to
:data:`MAX_PIPELINED_BYTES` and reading is then paused
(``transport.pause_reading``) until it is read.

A malformed head gets 400 (414, 431 past the library's line limits) as a
JSON answer here (``docs/protocol.md``, "Anything else"), then close. Every
refusal is a :class:`~intaleq_signal.exceptions.Refusal`, answered by
:func:`error_response`. The states of a connection and their moves are
data, :data:`FRONT_TRANSITIONS` (as in h11's ``_state.py``)::

    HEAD --head_complete--> BODY --body_complete--> COMPLETE
    HEAD --framing_refused--> COMPLETE           (411, 413, 400: no body read)
    HEAD --answered--> ANSWERED                  (a malformed head: 400, 414, 431)
    COMPLETE --kept_alive--> HEAD                (answered; the next request)
    COMPLETE --answered--> ANSWERED              (answered with Connection: close)
    COMPLETE --upgrade_handed_on--> HANDED_ON    (a WebSocket connection)

Tested on the oldest and newest websockets that ``setup.cfg`` allows
(``make test-compat``).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import math
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
    "KEEPALIVE_REQUESTS",
    "KEEPALIVE_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED_BYTES",
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
#: Seconds a kept connection may wait for the first byte of its next
#: request before it is closed (Node.js's default ``keepAliveTimeout``;
#: ``docs/protocol.md``, "Persistent connections").
KEEPALIVE_TIMEOUT = 5.0
#: Requests one connection serves; the answer to the last says
#: ``Connection: close`` (``docs/protocol.md``, "Persistent connections";
#: Nginx's ``keepalive_requests``).
KEEPALIVE_REQUESTS = 1000
#: Bytes of input kept while they cannot be read yet (an answer pending,
#: earlier answers unread, requests pipelined behind one): past it, reading
#: pauses. Two of the largest requests (head and body limits).
MAX_PIPELINED_BYTES = 2 * (MAX_HEAD_BYTES + MAX_BODY_BYTES)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_END = b"\r\n\r\n"
_NO_BYTES = b""  # the input buffer between requests: nothing allocated
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 9112 §3: method SP request-target SP HTTP-version (origin-form targets).
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) (/[\x21-\x7e]*) HTTP/1\.([01])")
# RFC 9110 §5: field-name is a token; field-value is VCHAR, obs-text, SP, HTAB.
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")
#: One string per common method, not one per request (kept by each connection).
_METHODS = {name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}


class FrontState(enum.Enum):
    """Where a connection's current request is (:data:`FRONT_TRANSITIONS`)."""

    HEAD = "reading a request head, or waiting for the next request on a kept connection"
    BODY = "reading the Content-Length body"
    COMPLETE = "the whole request read; its answer may wait for the shared state (Redis), input kept"
    ANSWERED = "answer written with Connection: close and half-closed, input dropped until the client closes"
    HANDED_ON = "a WebSocket connection owns the transport"


class FrontEvent(enum.Enum):
    """What moves a connection from one :class:`FrontState` to the next."""

    HEAD_COMPLETE = "the head is read and its body framing accepted"
    FRAMING_REFUSED = "the head is read, its body framing refused (411, 413, 400): no body is read"
    BODY_COMPLETE = "the Content-Length body is read (at once when there is none)"
    UPGRADE_HANDED_ON = "an upgrade request went to a WebSocket connection"
    KEPT_ALIVE = "an answer was written and the connection kept for the next request (RFC 9112 §9.3)"
    ANSWERED = "an answer was written with Connection: close and the connection half-closed"


_HEAD, _BODY, _COMPLETE, _ANSWERED, _HANDED_ON = FrontState

#: ``(state, event) -> next state`` of a connection's current request, as
#: :mod:`.lifecycle`'s tables (a pair not here raises ``LifecycleError``).
#: A malformed head is answered at once (400, 414, 431: HEAD → ANSWERED);
#: any other request is read whole, then answered (the connection kept:
#: back to HEAD for the next request; or closed: ANSWERED) or handed on.
FRONT_TRANSITIONS: dict[tuple[FrontState, FrontEvent], FrontState] = {
    (_HEAD, FrontEvent.HEAD_COMPLETE): _BODY,
    (_HEAD, FrontEvent.FRAMING_REFUSED): _COMPLETE,
    (_HEAD, FrontEvent.ANSWERED): _ANSWERED,
    (_BODY, FrontEvent.BODY_COMPLETE): _COMPLETE,
    (_COMPLETE, FrontEvent.UPGRADE_HANDED_ON): _HANDED_ON,
    (_COMPLETE, FrontEvent.KEPT_ALIVE): _HEAD,
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
        open_timeout: seconds a client has to send a whole request, from
            its first byte (from the connection for the first request).
        keepalive_timeout: seconds a kept connection waits for the first
            byte of its next request (:data:`KEEPALIVE_TIMEOUT`).
        keepalive_requests: requests one connection serves
            (:data:`KEEPALIVE_REQUESTS`).
    """

    def __init__(
        self,
        process_request: ProcessRequest,
        process_response: ProcessResponse,
        open_timeout: float,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        keepalive_requests: int = KEEPALIVE_REQUESTS,
    ):
        self.process_request = process_request
        self.process_response = process_response
        self.open_timeout = open_timeout
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_requests = keepalive_requests
        #: The ``Keep-Alive`` header of a kept answer (RFC 2068 §19.7.1.1):
        #: a client closing an idle connection before the server does never
        #: sends a request into a connection being closed.
        self.keep_alive = f"timeout={math.floor(keepalive_timeout)}"
        #: True once the server is stopping: every answer closes.
        self.stopping = False
        #: The connections kept after an answer, for :meth:`shutdown`.
        self.kept: set[HTTPFront] = set()

    def __call__(self, protocol: Any, server: Any, **options: Any) -> HTTPFront:
        return HTTPFront(self, protocol, server, options)

    def shutdown(self) -> int:
        """The server is stopping (``docs/operations.md``, "Shutdown";
        ``docs/protocol.md``, "Persistent connections"):
        from now on every answer says ``Connection: close``, and the kept
        connections waiting for a next request are closed at once, so that
        none holds the stop. Returns how many were closed."""
        self.stopping = True
        closed = 0
        for front in list(self.kept):
            closed += front.close_if_idle()
        return closed


class HTTPFront(asyncio.Protocol):
    """One connection until it is closed or handed on.

    Attributes read by the hooks (as on
    :class:`~intaleq_signal.wire.HTTPServerConnection`), those of the
    current request, reset after each answer:
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
        client_ip: set by ``process_request`` (``docs/protocol.md``,
            "Connecting": ``TRUSTED_PROXIES``).
        remote_address: the TCP peer, ``(host, port, ...)`` (the connection's).
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
        "_keep",
        "_answered",
        "_timer",
        "_idle",
        "_next",
        "_eof",
        "_paused",
        "_blocked",
    )

    def __init__(self, factory: FrontFactory, protocol: Any, server: Any, options: dict[str, Any]) -> None:
        self.factory = factory
        self.protocol = protocol  # websockets' ServerProtocol, for a hand-off
        self.server = server
        self.options = options
        self.transport: Any = None
        self.remote_address: Any = None
        self._buffer: bytearray | bytes = _NO_BYTES  # input not read yet
        self._answered = 0  # requests answered on this connection
        self._timer: asyncio.TimerHandle | None = None
        self._idle = False  # kept, and no byte of a next request yet
        self._next: asyncio.Handle | None = None  # the reading of a pipelined request, scheduled
        self._eof = False  # the client half-closed while requests were left to answer
        self._paused = False  # reading paused: input over MAX_PIPELINED_BYTES
        self._blocked = False  # writing paused: the client does not read its answers
        self._state = _HEAD
        self._reset()

    def _reset(self) -> None:
        """The per-request attributes, as before a request."""
        self.client_ip = "?"
        self.http_method = "GET"
        self.http_version = "1.1"
        self.http_body = b""
        self.http_body_error: Refusal | None = None
        self._head = b""  # the body-less GET head the library parses on a hand-off
        self._headers: list[tuple[bytes, bytes]] | tuple[()] = ()
        self._path = "/"
        self._body_length = 0
        self._upgrade = False
        self._keep = True  # the request allows persistence (HTTP/1.1, no Connection: close)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.remote_address = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.factory.open_timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _ANSWERED or state is _HANDED_ON:
            return
        buffer = self._buffer
        if buffer:
            buffer += data  # type: ignore[operator]  # a bytearray once it holds bytes
        else:
            self._buffer = bytearray(data)
        if self._idle:  # the first byte of the next request on a kept connection
            self._idle = False
            self._restart_timer(self.factory.open_timeout, self.transport.abort)
        if state is _COMPLETE or self._next is not None or self._blocked:
            # Behind a request not answered yet, or answers the client has
            # not read: kept for later, within a bound.
            self._flow()
            return
        self._read()

    def _read(self) -> None:
        """Read the current request from the input: its head, then its body;
        once it is whole, answer it or hand it on (:meth:`_complete`)."""
        buffer: Any = self._buffer
        if self._state is _HEAD:
            while buffer[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines first
                del buffer[:2]
            end = buffer.find(_HEAD_END)
            if end < 0 or end > MAX_HEAD_BYTES:
                if _BARE_LF.search(buffer, 0, end if end >= 0 else len(buffer)):
                    # LF without CR: never a valid head
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
                    self._complete()
                return
            self._move(FrontEvent.HEAD_COMPLETE)
        length = self._body_length
        if len(buffer) >= length:
            if length:
                self.http_body = bytes(buffer[:length])
                del buffer[:length]
            self._move(FrontEvent.BODY_COMPLETE)
            self._complete()

    def _move(self, event: FrontEvent) -> None:
        """Raises ``LifecycleError`` for a pair not in :data:`FRONT_TRANSITIONS`."""
        self._state = transition(FRONT_TRANSITIONS, self._state, event)

    def eof_received(self) -> bool:
        """The client may half-close once its requests are sent (RFC 9112
        §9.6): while an answer is pending (the shared state is asked) or
        requests it sent wait to be read, the connection stays half-open for
        their answers, then closes. Otherwise (between requests, in the
        middle of one, or after an answer that closes) close now."""
        if self._state is _COMPLETE or (self._buffer and (self._next is not None or self._blocked)):
            self._eof = True
            return True
        return False

    def pause_writing(self) -> None:
        """The client does not read its answers: no further pipelined
        request is read until it does (its input is then bounded by
        :data:`MAX_PIPELINED_BYTES`)."""
        self._blocked = True

    def resume_writing(self) -> None:
        self._blocked = False
        if self._state is _HEAD and self._buffer and self._next is None:
            self._next = asyncio.get_running_loop().call_soon(self._read_next)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self.factory.kept.discard(self)
        self._buffer = _NO_BYTES

    def close_if_idle(self) -> bool:
        """Close a kept connection that waits for the first byte of its
        next request (:meth:`FrontFactory.shutdown`); True if it did."""
        if not self._idle:
            return False
        self._expire()
        return True

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
        headers: list[tuple[bytes, bytes]] = []
        self._headers = headers
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
                if lower == b"upgrade" and b"websocket" in value.lower():
                    # Only a WebSocket upgrade is handed on; another one
                    # (h2c, say) is ignored as RFC 9110 §7.8 allows.
                    self._upgrade = True
                elif lower == b"connection" and _closes(value):
                    self._keep = False
                kept.append(match[0])  # type: ignore[index]
                headers.append((name, value))
        if request_line[3] == b"0":  # HTTP/1.0 has no upgrade (RFC 6455 §4.1): the hooks answer
            self.http_version = "1.0"
            self._upgrade = self._keep = False  # and no persistence here
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

    def _complete(self) -> None:
        """The whole request is here (what the client sent after it stays
        in the input). An upgrade request whose framing is sound goes to
        websockets; any other is answered here."""
        if self._upgrade and self.http_body_error is None and not self.http_body:
            self._hand_on()
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
        keep = True
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
            keep = False  # the hooks failed: start afresh on a new connection
        self._answer(response, keep)

    def _hand_on(self) -> None:
        """Give the transport to a WebSocket connection: it parses the
        request head and runs the library's opening handshake; bytes that
        came behind the request wait until after its 101 (RFC 6455 §4.1)."""
        self._move(FrontEvent.UPGRADE_HANDED_ON)
        if self._timer is not None:
            self._timer.cancel()  # the library's open_timeout applies from here
            self._timer = None
        self.factory.kept.discard(self)
        rest = bytes(self._buffer)
        self._buffer = _NO_BYTES
        connection = HTTPServerConnection(self.protocol, self.server, **self.options)
        connection.http_method = self.http_method
        transport = self.transport
        transport.set_protocol(connection)
        connection.connection_made(transport)
        connection.data_received(self._head)
        connection.hold(rest)
        if self._paused:  # the connection reads from here
            self._paused = False
            transport.resume_reading()
        self.protocol = self.server = self.transport = None

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a head the library must not see (``docs/protocol.md``,
        "Anything else": malformed HTTP gets 400 and close)."""
        self._answer(error_response(refusal), keep=False)

    def _answer(self, response: Response, keep: bool) -> None:
        """Write the answer. The connection is kept for the next request
        when ``keep`` and the rules of :mod:`this module <.front>` allow it;
        else the answer says ``Connection: close`` and the connection is
        half-closed, then closed when the client closes its side, or after
        ``close_timeout`` (seconds)."""
        factory = self.factory
        self._answered += 1
        keep = (
            keep
            and self._keep
            and self.http_body_error is None
            and not factory.stopping
            and self._answered < factory.keepalive_requests
            and not (self._eof and not self._buffer)
        )
        headers = response.headers
        if keep:
            if "Connection" in headers:
                del headers["Connection"]
            headers["Keep-Alive"] = factory.keep_alive
        elif headers.get_all("Connection") != ["close"]:
            if "Connection" in headers:
                del headers["Connection"]
            headers["Connection"] = "close"
        transport = self.transport
        transport.write(response.serialize())
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        if not keep:
            self._move(FrontEvent.ANSWERED)
            factory.kept.discard(self)
            self._buffer = _NO_BYTES
            if self._eof:  # the client has half-closed already
                self._timer = None
                transport.close()
                return
            if transport.can_write_eof():
                transport.write_eof()
            if self._paused and not transport.is_closing():  # see the client's close
                self._paused = False
                transport.resume_reading()
            timeout = self.options.get("close_timeout") or 10.0
            self._timer = loop.call_later(timeout, transport.abort)
            return
        self._move(FrontEvent.KEPT_ALIVE)
        self._reset()
        factory.kept.add(self)
        if self._buffer:  # the next request has begun: open_timeout applies to it
            self._timer = loop.call_later(factory.open_timeout, transport.abort)
            self._next = loop.call_soon(self._read_next)
            self._flow()
        else:
            self._buffer = _NO_BYTES
            self._idle = True
            self._timer = loop.call_later(factory.keepalive_timeout, self._expire)

    def _read_next(self) -> None:
        """Read a request that came behind the one just answered (one per
        pass of the event loop: ``loop.call_soon``, never recursion)."""
        self._next = None
        transport = self.transport
        if self._state is not _HEAD or transport is None or transport.is_closing() or self._blocked:
            return  # resume_writing() calls again
        self._read()
        state = self._state
        if state is _ANSWERED or state is _HANDED_ON:
            return
        if self._eof and self._next is None and state is not _COMPLETE:
            transport.close()  # half-closed by the client: no further request will complete
            return
        self._flow()

    def _flow(self) -> None:
        """Pause reading while the input kept is over
        :data:`MAX_PIPELINED_BYTES`; resume once it is under again."""
        over = len(self._buffer) > MAX_PIPELINED_BYTES
        if over is not self._paused and not self.transport.is_closing():
            self._paused = over
            if over:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _restart_timer(self, delay: float, callback: Callable[[], object]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _expire(self) -> None:
        """Close a kept connection that waited for a next request for
        :data:`KEEPALIVE_TIMEOUT` seconds, or whose server is stopping."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle = False
        self.factory.kept.discard(self)
        self.transport.close()


def _closes(value: bytes) -> bool:
    """Whether a ``Connection`` header value lists the ``close`` option
    (RFC 9110 §7.6.1: a comma-separated list of case-insensitive tokens)."""
    return any(token.strip(b" \t").lower() == b"close" for token in value.split(b","))


def http_response(status: int, content_type: str, body: bytes) -> Response:
    """An answer that is never cached (every answer on this port is one
    request's) and says ``Connection: close``: what it is when websockets
    writes it (a refused upgrade). :class:`HTTPFront` replaces that header
    with ``Keep-Alive`` when it keeps the connection for a next request
    (``docs/protocol.md``, "Persistent connections")."""
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
