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
from typing import Any

from websockets.asyncio.server import ServerConnection

__all__ = ["HTTPServerConnection", "error_body", "MAX_BODY_BYTES", "MAX_HEAD_BYTES"]

#: Largest request body accepted (SPEC §3: larger is 413).
MAX_BODY_BYTES = 16 * 1024
#: Largest request head looked at; past it the library's own limits answer.
MAX_HEAD_BYTES = 16 * 1024

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_END = b"\r\n\r\n"
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
        last_received: ``loop.time()`` of the latest bytes received, read by
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
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_ip = "?"
        self.http_method = "GET"
        self.http_body = b""
        self.http_body_error: tuple[int, str, str] | None = None
        self.last_received = 0.0
        self._pending: bytearray | None = bytearray()  # None once the head is handed on
        self._body_length = -1
        self._head = b""

    def data_received(self, data: bytes) -> None:
        self.last_received = self.loop.time()
        if self._pending is None:
            super().data_received(data)
            return
        self._pending += data
        if self._body_length < 0:
            end = self._pending.find(_HEAD_END)
            if end < 0:
                if len(self._pending) > MAX_HEAD_BYTES:
                    self._refuse(
                        431, "Request Header Fields Too Large", "headers_too_large", "request head too large"
                    )
                return
            head = bytes(self._pending[:end])
            del self._pending[: end + 4]
            if not self._inspect_head(head):
                return
        if len(self._pending) >= self._body_length:
            self.http_body = bytes(self._pending[: self._body_length])
            del self._pending[: self._body_length]
            self._hand_on(self._head + bytes(self._pending))

    def _inspect_head(self, head: bytes) -> bool:
        """Validate the head (request line and header syntax of RFC 9112
        §3, §5) and read its body framing; False when it was answered."""
        lines = head.split(b"\r\n")
        request_line = _REQUEST_LINE.fullmatch(lines[0])
        headers = [_HEADER_LINE.fullmatch(line) for line in lines[1:]]
        if request_line is None or not all(headers):
            self._refuse(400, "Bad Request", "bad_request", "malformed HTTP request")
            return False
        self.http_method = request_line[1].decode("ascii")
        # What the library's parser gets: GET, HTTP/1.1 (websockets < 17
        # accepts nothing else), no body framing headers.
        kept = [b"GET " + request_line[2] + b" HTTP/1.1"]
        lengths: set[bytes] = set()
        chunked = expect_continue = False
        for match in headers:
            name = match[1].lower()  # type: ignore[index]
            if name == b"content-length":
                lengths.add(match[2])  # type: ignore[index]
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                expect_continue = match[2].lower() == b"100-continue"  # type: ignore[index]
            else:
                kept.append(match[0])  # type: ignore[index]
        self._head = b"\r\n".join(kept) + _HEAD_END
        length = next(iter(lengths)) if len(lengths) == 1 else b""
        if chunked:
            error = (411, "length_required", "chunked bodies are not accepted; send Content-Length")
        elif lengths and not _DIGITS.fullmatch(length):
            error = (400, "invalid_request", "invalid Content-Length header")
        elif lengths and (len(length) > 9 or int(length) > MAX_BODY_BYTES):
            error = (413, "payload_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        elif not lengths and self.http_method in ("POST", "PUT", "PATCH"):
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
        self.data_received = self._discard  # type: ignore[method-assign]
        return False

    def _refuse(self, status: int, phrase: str, code: str, message: str) -> None:
        """Answer a head the library must not see, and close (SPEC §3:
        malformed HTTP gets 400 and close; the library would only drop the
        connection)."""
        body = error_body(code, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), body)
        )
        self._pending = None
        self.data_received = self._discard  # type: ignore[method-assign]
        self.transport.close()

    def _hand_on(self, data: bytes) -> None:
        self._pending = None
        self._head = b""
        super().data_received(data)

    def _discard(self, data: bytes) -> None:
        self.last_received = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_received = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending = None
        super().connection_lost(exc)


def error_body(code: str, message: str) -> bytes:
    """The JSON error body of every HTTP error answer (SPEC §3)."""
    return json.dumps({"error": code, "message": message}).encode()
