"""HTTP on the WebSocket port, answered from websockets' ``process_request``
hook before any upgrade (SPEC §3, and §4's per-IP connection limit).

``process_request(connection, request)`` returns a ``Response`` to answer
plain HTTP, or ``None`` to let a ``/ws`` upgrade proceed. The request method
and body come from the connection: the HTTP front
(:class:`~intaleq_signal.front.HTTPFront`, which calls both hooks itself for
requests that are not upgrades) or, for upgrades, the
:class:`~intaleq_signal.wire.HTTPServerConnection` it handed them to.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Response

from .config import Config
from .front import error_response, http_response
from .metrics import Metrics
from .ratelimit import SlidingWindow, client_ip, peer_address
from .sessions import Capacity, RideConflict
from .signaling import Signaling

__all__ = ["HTTPAPI", "is_loopback_peer", "validate_session_body"]

log = logging.getLogger("intaleq_signal.http")

MAX_FIELD_LENGTH = 255  # code points (SPEC §3, §4 "Precise points")
#: SPEC §3: 10 wrong API keys from one IP within a minute → 429 for the minute.
API_KEY_FAILURES = 10
WINDOW = 60.0

_SESSION_FIELDS = ("ride_id", "driver_id", "passenger_id")
_LIBRARY_REFUSAL = b"Failed to open a WebSocket connection"
_LIBRARY_CODES = {400: "bad_request", 426: "upgrade_required", 500: "internal_error", 503: "shutting_down"}


class BadRequest(ValueError):
    """An HTTP request refused with ``status`` and an error ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def validate_session_body(body: bytes) -> tuple[str, str, str]:
    """Parse a ``POST /sessions`` body into ``(ride_id, driver_id, passenger_id)``.

    Raises:
        BadRequest: 400 ``invalid_json`` when the body is not UTF-8 JSON;
        400 ``invalid_request`` naming the field when it is not an object
        of three non-empty strings of at most 255 code points with driver
        and passenger different.
    """
    try:
        data = _BODY_DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BadRequest(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "invalid_request", "request body must be a JSON object")
    values = []
    for field in _SESSION_FIELDS:
        value = data.get(field)
        if not isinstance(value, str) or not value:
            raise BadRequest(400, "invalid_request", f"'{field}' must be a non-empty string")
        if len(value) > MAX_FIELD_LENGTH:
            raise BadRequest(400, "invalid_request", f"'{field}' is longer than 255 characters")
        if not value.isprintable() or not _utf8(value):
            raise BadRequest(400, "invalid_request", f"'{field}' has control or invalid characters")
        values.append(value)
    if values[1] == values[2]:
        raise BadRequest(400, "invalid_request", "'passenger_id' must differ from 'driver_id'")
    return values[0], values[1], values[2]


def _utf8(value: str) -> bool:
    """False for a lone surrogate (a ``"\ud800"`` escape): no database or
    log line can store it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Number:
    """Stands for any JSON number: no field of the body is one, so they are
    never converted (a 5000-digit integer is valid JSON, just not a string)."""


def _number(text: str) -> Any:
    return _Number


def _no_constant(name: str) -> Any:
    raise ValueError(name)


_BODY_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_int=_number, parse_float=_number)


class HTTPAPI:
    """The ``process_request`` hook and its per-IP limits."""

    def __init__(self, config: Config, signaling: Signaling, metrics: Metrics, health: Any) -> None:
        self.config = config
        self.signaling = signaling
        self.metrics = metrics
        self.health = health  # () -> (status, dict); the server knows the rest
        self.key = config.api_key.encode()
        self.connects = SlidingWindow(config.rate_limit_per_min, WINDOW)
        self.key_failures = SlidingWindow(API_KEY_FAILURES, WINDOW)

    def prune(self, now: float) -> None:
        """Forget idle IPs (called periodically)."""
        self.connects.prune(now)
        self.key_failures.prune(now)

    def process_request(self, connection: Any, request: Any) -> Response | None:
        peer = _peer_host(connection)
        ip = client_ip(peer, _proxy_headers(request.headers), self.config.trusted_proxies)
        connection.client_ip = ip
        method = connection.http_method
        path = request.path.partition("?")[0]
        if path != "/sessions" and connection.http_body_error is not None:
            status, _, _ = connection.http_body_error
            if status == 400:  # RFC 9112 §6.3: an invalid Content-Length is 400 anywhere
                return respond(*connection.http_body_error)
        if path == "/ws":
            if method != "GET":
                return respond(405, "method_not_allowed", "use GET with a WebSocket upgrade", allow="GET")
            if connection.http_body_error is not None:
                return respond(*connection.http_body_error)
            if connection.http_body:
                return respond(400, "bad_request", "a WebSocket upgrade request has no body")
            if connection.http_version != "1.1":  # RFC 6455 §4.1
                return respond(400, "bad_request", "a WebSocket upgrade needs HTTP/1.1")
            return self._upgrade(connection, request, ip)
        if path == "/sessions":
            if method != "POST":
                return respond(405, "method_not_allowed", "use POST", allow="POST")
            # SPEC §3 order: the API key, then the body (framing refused by
            # the wire layer included), then the session.
            refused = self._check_key(request.headers, ip)
            if refused is not None:
                return refused
            if connection.http_body_error is not None:
                return respond(*connection.http_body_error)
            return self._create_session(connection.http_body)
        if path == "/health":
            if method not in ("GET", "HEAD"):
                return respond(405, "method_not_allowed", "use GET", allow="GET, HEAD")
            status, document = self.health()
            return _json(status, document, head=method == "HEAD")
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return respond(405, "method_not_allowed", "use GET", allow="GET, HEAD")
            if (
                not is_loopback_peer(peer)
                or "X-Forwarded-For" in request.headers
                or "X-Real-IP" in request.headers
            ):
                return respond(404, "not_found", "no such path")
            return _response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render().encode(),
                head=method == "HEAD",
            )
        return respond(404, "not_found", "no such path")

    def process_response(self, connection: Any, request: Any, response: Response) -> Response | None:
        """Give the library's own refusals (a bad WebSocket handshake: 400,
        426; 500 if ``process_request`` failed; 503 while closing) the JSON
        error body every HTTP answer has (SPEC §3)."""
        if connection.http_method == "HEAD" and response.body:
            response.body = b""  # RFC 9110 §9.3.2; Content-Length still tells the size
        if response.status_code == 101 or not response.body.startswith(_LIBRARY_REFUSAL):
            return None
        status = response.status_code
        text = response.body.decode("utf-8", "replace").strip().splitlines()[0]
        code = _LIBRARY_CODES.get(status, "bad_request")
        refused = respond(status, code, text)
        for name in ("Upgrade", "Sec-WebSocket-Version"):
            if name in response.headers:
                refused.headers[name] = response.headers[name]
        return refused

    def _upgrade(self, connection: Any, request: Any, ip: str) -> Response | None:
        if "websocket" not in ",".join(request.headers.get_all("Upgrade")).lower():
            return respond(
                426, "upgrade_required", "/ws takes a WebSocket upgrade", extra={"Upgrade": "websocket"}
            )
        if not self.signaling.accepting:
            return respond(503, "shutting_down", "the server is stopping")
        if not self.connects.allow(ip, time.monotonic()):
            self.metrics.connections_rejected["ip_rate_limited"] += 1
            log.info("connection refused reason=ip_rate_limited ip=%s", ip)
            return respond(
                429,
                "rate_limited",
                "too many connection attempts; retry in a minute",
                extra={"Retry-After": "60"},
            )
        return None

    def _check_key(self, headers: Headers, ip: str) -> Response | None:
        now = time.monotonic()
        if self.key_failures.full(ip, now):
            return respond(
                429, "rate_limited", "too many wrong API keys; retry in a minute", extra={"Retry-After": "60"}
            )
        keys = headers.get_all("X-API-Key")  # a repeated header is a wrong key
        given = keys[0].encode("utf-8", "surrogateescape") if len(keys) == 1 else b""
        if not hmac.compare_digest(given, self.key):
            self.key_failures.hit(ip, now)
            log.warning("wrong API key on POST /sessions ip=%s", ip)
            return respond(401, "unauthorized", "missing or wrong X-API-Key")
        return None

    def _create_session(self, body: bytes) -> Response:
        try:
            ride_id, driver_id, passenger_id = validate_session_body(body)
            session, _ = self.signaling.create_session(ride_id, driver_id, passenger_id)
        except BadRequest as exc:
            return respond(exc.status, exc.code, exc.message)
        except RideConflict:
            return respond(409, "ride_conflict", "this ride has a live session with other participants")
        except Capacity:
            if not self.signaling.accepting:
                return respond(503, "shutting_down", "the server is stopping")
            return respond(503, "capacity", "too many live sessions; retry later")
        return _json(
            200,
            {
                "session_id": session.session_id,
                "ride_id": session.ride_id,
                "expires_in": session.expires_in(self.signaling.loop.time()),
            },
        )


def _proxy_headers(headers: Headers) -> dict[str, str]:
    """The client-address headers as one value each: a repeated
    ``X-Real-IP`` is not believed; repeated ``X-Forwarded-For`` headers form
    one list (RFC 9110 §5.3)."""
    found = {}
    real = headers.get_all("X-Real-IP")
    if len(real) == 1:
        found["X-Real-IP"] = real[0]
    forwarded = headers.get_all("X-Forwarded-For")
    if forwarded:
        found["X-Forwarded-For"] = ", ".join(forwarded)
    return found


def is_loopback_peer(address: str) -> bool:
    """Whether a TCP peer address is loopback, the only peers ``/metrics``
    answers (README "GET /metrics"): anything in 127.0.0.0/8 (RFC 1122
    §3.2.1.3), ``::1`` (RFC 4291 §2.5.3), and those IPv4 addresses mapped
    into IPv6 (``::ffff:127.0.0.2``, RFC 4291 §2.5.5.2; Python before 3.13
    calls a mapped address not loopback, so it is unmapped first). Anything
    that is not an address (``"?"``, no peer) is not loopback."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _peer_host(connection: Any) -> str:
    address = connection.remote_address
    return peer_address(str(address[0])) if address else "?"


def respond(
    status: int, code: str, message: str, *, allow: str | None = None, extra: dict[str, str] | None = None
) -> Response:
    """An error answer with the SPEC §3 body ``{"error", "message"}``."""
    response = error_response(status, code, message)
    if allow is not None:
        response.headers["Allow"] = allow
    for name, value in (extra or {}).items():
        response.headers[name] = value
    return response


def _json(status: int, document: dict[str, Any], *, head: bool = False) -> Response:
    return _response(status, "application/json", json.dumps(document).encode(), head=head)


def _response(status: int, content_type: str, body: bytes, *, head: bool = False) -> Response:
    response = http_response(status, content_type, body)
    if head:  # RFC 9110 §9.3.2: Content-Length still tells the size
        response.body = b""
    return response
