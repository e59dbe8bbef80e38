"""HTTP on the WebSocket port, answered from websockets' ``process_request``
hook before any upgrade (``docs/protocol.md``, "HTTP API", and the per-IP
connection limit of "Connecting").

``process_request(connection, request)`` returns a ``Response`` to answer
plain HTTP, or ``None`` to let a ``/ws`` upgrade proceed. The request method
and body come from the connection: the HTTP front
(:class:`~intaleq_signal.front.HTTPFront`, which calls both hooks itself for
requests that are not upgrades) or, for upgrades, the
:class:`~intaleq_signal.wire.HTTPServerConnection` it handed them to.

Every refusal is a :class:`~intaleq_signal.exceptions.Refusal` with its
``http_status``, answered by :func:`~intaleq_signal.front.error_response`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Response

from .config import Config
from .exceptions import Capacity, Refusal
from .front import error_response, http_response
from .metrics import Metrics
from .ratelimit import SlidingWindow, UpgradeAdmission, client_ip, limit_key, peer_address
from .signaling import Signaling

__all__ = ["HTTPAPI", "is_loopback_peer", "upgrade_admission", "validate_session_body"]

log = logging.getLogger("intaleq_signal.http")

MAX_FIELD_LENGTH = 255  # code points (docs/protocol.md, "POST /sessions" and "Precise points")
#: 10 wrong API keys from one IP within a minute → 429 for the minute
#: (``docs/protocol.md``, "POST /sessions").
API_KEY_FAILURES = 10
WINDOW = 60.0

_SESSION_FIELDS = ("ride_id", "driver_id", "passenger_id")
_LIBRARY_REFUSAL = b"Failed to open a WebSocket connection"
_LIBRARY_CODES = {400: "bad_request", 426: "upgrade_required", 500: "internal_error", 503: "shutting_down"}
_LIBRARY_HEADERS = ("Upgrade", "Sec-WebSocket-Version")


def validate_session_body(body: bytes) -> tuple[str, str, str]:
    """Parse a ``POST /sessions`` body into ``(ride_id, driver_id, passenger_id)``.

    Raises:
        Refusal: 400 ``invalid_json`` when the body is not UTF-8 JSON;
        400 ``invalid_request`` naming the field when it is not an object
        of three non-empty strings of at most 255 code points with driver
        and passenger different.
    """
    try:
        data = _BODY_DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise Refusal("invalid_json", "request body is not valid JSON", http_status=400) from None
    if not isinstance(data, dict):
        raise Refusal("invalid_request", "request body must be a JSON object", http_status=400)
    values = []
    for field in _SESSION_FIELDS:
        value = data.get(field)
        if not isinstance(value, str) or not value:
            raise Refusal("invalid_request", f"'{field}' must be a non-empty string", http_status=400)
        if len(value) > MAX_FIELD_LENGTH:
            raise Refusal("invalid_request", f"'{field}' is longer than 255 characters", http_status=400)
        if not value.isprintable() or not _utf8(value):
            raise Refusal("invalid_request", f"'{field}' has control or invalid characters", http_status=400)
        values.append(value)
    if values[1] == values[2]:
        raise Refusal("invalid_request", "'passenger_id' must differ from 'driver_id'", http_status=400)
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
    """The ``process_request`` hook and its per-IP limits.

    ``connects`` admits WebSocket upgrades; the engine must be built with
    it as its ``admission`` (see :func:`upgrade_admission`), so that it
    learns how each upgraded connection's authentication ends.
    """

    def __init__(
        self, config: Config, signaling: Signaling, metrics: Metrics, health: Any, connects: UpgradeAdmission
    ) -> None:
        self.config = config
        self.signaling = signaling
        self.metrics = metrics
        self.health = health  # () -> (status, dict); the server knows the rest
        self.key = config.api_key.encode()
        self.connects = connects
        self.key_failures = SlidingWindow(API_KEY_FAILURES, WINDOW)
        #: The shared state of several instances (``REDIS_URL``), or None.
        self.cluster: Any = None

    def prune(self, now: float) -> None:
        """Forget idle IPs (called periodically)."""
        self.connects.prune(now)
        self.key_failures.prune(now)

    def process_request(self, connection: Any, request: Any) -> Response | Awaitable[Response] | None:
        peer = _peer_host(connection)
        ip = client_ip(peer, _proxy_headers(request.headers), self.config.trusted_proxies)
        connection.client_ip = ip
        method = connection.http_method
        path = request.path.partition("?")[0]
        refused = connection.http_body_error
        if path != "/sessions" and refused is not None and refused.http_status == 400:
            return error_response(refused)  # RFC 9112 §6.3: an invalid Content-Length is 400 anywhere
        if path == "/ws":
            if method != "GET":
                return error_response(_method_not_allowed("use GET with a WebSocket upgrade", "GET"))
            if refused is not None:
                return error_response(refused)
            if connection.http_body:
                return error_response(_bad_request("a WebSocket upgrade request has no body"))
            return self._upgrade(connection, request, ip)
        if path == "/sessions":
            if method != "POST":
                return error_response(_method_not_allowed("use POST", "POST"))
            # The order of docs/protocol.md, "POST /sessions": the API key,
            # then the body (framing refused by the front included), then
            # the session.
            key_refused = self._check_key(request.headers, ip)
            if key_refused is not None:
                return error_response(key_refused)
            if refused is not None:
                return error_response(refused)
            return self._create_session(connection.http_body)
        if path == "/health":
            if method not in ("GET", "HEAD"):
                return error_response(_method_not_allowed("use GET", "GET, HEAD"))
            status, document = self.health()
            return _json(status, document, head=method == "HEAD")
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return error_response(_method_not_allowed("use GET", "GET, HEAD"))
            if (
                not is_loopback_peer(peer)
                or "X-Forwarded-For" in request.headers
                or "X-Real-IP" in request.headers
                or "Forwarded" in request.headers  # RFC 7239
            ):
                return error_response(_not_found())
            return _response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render().encode(),
                head=method == "HEAD",
            )
        return error_response(_not_found())

    def process_response(self, connection: Any, request: Any, response: Response) -> Response | None:
        """Give the library's own refusals (a bad WebSocket handshake: 400,
        426; 500 if ``process_request`` failed; 503 while closing) the JSON
        error body every HTTP answer has (``docs/protocol.md``, "HTTP API")."""
        if connection.http_method == "HEAD" and response.body:
            response.body = b""  # RFC 9110 §9.3.2; Content-Length still tells the size
        if response.status_code == 101 or not response.body.startswith(_LIBRARY_REFUSAL):
            return None
        status = response.status_code
        text = response.body.decode("utf-8", "replace").strip().splitlines()[0]
        kept = {name: response.headers[name] for name in _LIBRARY_HEADERS if name in response.headers}
        return error_response(
            Refusal(_LIBRARY_CODES.get(status, "bad_request"), text, http_status=status, headers=kept)
        )

    def _upgrade(self, connection: Any, request: Any, ip: str) -> Response | None:
        if "websocket" not in ",".join(request.headers.get_all("Upgrade")).lower():
            return error_response(
                Refusal(
                    "upgrade_required",
                    "/ws takes a WebSocket upgrade",
                    http_status=426,
                    headers={"Upgrade": "websocket"},
                )
            )
        if connection.http_version != "1.1":  # RFC 6455 §4.1 (asked for an upgrade: 426 first)
            return error_response(_bad_request("a WebSocket upgrade needs HTTP/1.1"))
        if not self.signaling.accepting:
            return error_response(_shutting_down())
        # Counted from the engine's connected(), not here: a handshake that
        # fails after this answer never waits to authenticate.
        refused = self.connects.admit(ip, time.monotonic())
        if refused is not None:
            self.metrics.connections_rejected[refused] += 1
            log.info("connection refused reason=%s ip=%s", refused, ip)
            if refused == UpgradeAdmission.PENDING_LIMITED:  # one of them is done within AUTH_TIMEOUT
                retry = str(math.ceil(self.config.auth_timeout))
                return error_response(
                    Refusal(
                        "rate_limited",
                        "too many connections waiting to authenticate",
                        http_status=429,
                        headers={"Retry-After": retry},
                    )
                )
            return error_response(
                _rate_limited("too many connections that did not authenticate; retry in a minute")
            )
        return None

    def _check_key(self, headers: Headers, ip: str) -> Refusal | None:
        """None when ``X-API-Key`` is the key, else why the request is refused:
        429 while this IP is locked out, 401 for a missing, wrong or repeated
        key (a failure that counts towards the lock-out)."""
        now = time.monotonic()
        if self.key_failures.full(limit_key(ip), now):
            return _rate_limited("too many wrong API keys; retry in a minute")
        keys = headers.get_all("X-API-Key")  # a repeated header is a wrong key
        given = keys[0].encode("utf-8", "surrogateescape") if len(keys) == 1 else b""
        if not hmac.compare_digest(given, self.key):
            self.key_failures.hit(limit_key(ip), now)
            log.warning("wrong API key on POST /sessions ip=%s", ip)
            return Refusal("unauthorized", "missing or wrong X-API-Key", http_status=401)
        return None

    def _create_session(self, body: bytes) -> Response | Awaitable[Response]:
        try:
            ride_id, driver_id, passenger_id = validate_session_body(body)
            if self.cluster is not None:  # the ride's lock is in Redis: answered when it replies
                return self._create_shared(ride_id, driver_id, passenger_id)
            session, _ = self.signaling.create_session(ride_id, driver_id, passenger_id)
        except Capacity as exc:
            return error_response(exc if self.signaling.accepting else _shutting_down())
        except Refusal as exc:  # the body, or RideConflict
            return error_response(exc)
        return self._session_answer(
            session.session_id, ride_id, session.expires_in(self.signaling.clock.time())
        )

    async def _create_shared(self, ride_id: str, driver_id: str, passenger_id: str) -> Response:
        """``POST /sessions`` with several instances (docs/operations.md,
        "Several instances"): 503 ``unavailable`` while Redis is unreachable."""
        assert self.cluster is not None
        try:
            session_id, deadline = await self.cluster.create_session(ride_id, driver_id, passenger_id)
        except Capacity as exc:
            return error_response(exc if self.signaling.accepting else _shutting_down())
        except Refusal as exc:  # RideConflict, Unavailable
            return error_response(exc)
        return self._session_answer(session_id, ride_id, max(0, math.ceil(deadline - time.time() - 1e-9)))

    def _session_answer(self, session_id: str, ride_id: str, expires_in: int) -> Response:
        tokens = self.signaling.tokens
        return _json(
            200,
            {
                "session_id": session_id,
                "ride_id": ride_id,
                "expires_in": expires_in,
                # docs/protocol.md, "Participant tokens": the backend hands
                # each app its own; the same on every re-POST.
                "driver_token": tokens.token(session_id, "driver"),
                "passenger_token": tokens.token(session_id, "passenger"),
            },
        )


def upgrade_admission(config: Config) -> UpgradeAdmission:
    """The per-IP admission of WebSocket upgrades (docs/protocol.md,
    "Connecting"): ``RATE_LIMIT_PER_MIN`` upgrades that ended without
    authenticating per minute, :data:`~intaleq_signal.ratelimit.MAX_PENDING_PER_IP`
    waiting to authenticate at once."""
    return UpgradeAdmission(config.rate_limit_per_min, WINDOW)


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
    answers (docs/protocol.md, "GET /metrics"): anything in 127.0.0.0/8 (RFC 1122
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


def _not_found() -> Refusal:
    return Refusal("not_found", "no such path", http_status=404)


def _bad_request(message: str) -> Refusal:
    return Refusal("bad_request", message, http_status=400)


def _method_not_allowed(message: str, allow: str) -> Refusal:
    return Refusal("method_not_allowed", message, http_status=405, headers={"Allow": allow})


def _shutting_down() -> Refusal:
    return Refusal("shutting_down", "the server is stopping", http_status=503)


def _rate_limited(message: str) -> Refusal:
    return Refusal("rate_limited", message, http_status=429, headers={"Retry-After": "60"})


def _json(status: int, document: dict[str, Any], *, head: bool = False) -> Response:
    return _response(status, "application/json", json.dumps(document).encode(), head=head)


def _response(status: int, content_type: str, body: bytes, *, head: bool = False) -> Response:
    response = http_response(status, content_type, body)
    if head:  # RFC 9110 §9.3.2: Content-Length still tells the size
        response.body = b""
    return response
