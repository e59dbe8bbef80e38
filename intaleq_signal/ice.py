"""ICE servers for the apps, with TURN credentials minted per session and
role (docs/protocol.md, "ICE servers").

``ICE_SERVERS`` is a comma-separated list of ``stun:``/``stuns:`` (RFC 7064)
and ``turn:``/``turns:`` (RFC 7065) URLs. For TURN, credentials follow the
TURN REST API convention that coturn implements (``use-auth-secret``):
``username`` = ``<expiry>:<session_id>:<role>``, the expiry in whole seconds
since the epoch (UTC, whatever the host's time zone), and ``credential`` =
base64(HMAC-SHA1(``TURN_SECRET``, username)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re

from .exceptions import ConfigError

__all__ = ["IceServers", "parse_ice_servers"]

#: scheme:host[:port][?transport=udp|tcp]; host a name, an IPv4 address or
#: a bracketed IPv6 address (RFC 7064 §3.1, RFC 7065 §3.1).
_URL = re.compile(
    r"^(?P<scheme>stuns?|turns?):"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?:\?transport=(?P<transport>udp|tcp))?$"
)


def parse_ice_servers(text: str) -> tuple[str, ...]:
    """The URLs of ``ICE_SERVERS`` (empty text: none).

    Raises:
        ConfigError: naming ``ICE_SERVERS`` for a URL that is not a STUN or
        TURN URL (a bad scheme, host or port, or ``?transport`` on STUN).
    """
    urls = []
    for item in text.split(","):
        url = item.strip()
        if not url:
            continue
        match = _URL.match(url)
        port = match and match.group("port")
        if (
            match is None
            or (port is not None and not 0 < int(port) < 65536)
            or (match.group("transport") and match.group("scheme").startswith("stun"))
        ):
            raise ConfigError(f"ICE_SERVERS: {url!r} is not a stun:, stuns:, turn: or turns: URL")
        urls.append(url)
    return tuple(urls)


class IceServers:
    """What ``session_joined`` and ``participant_joined`` carry as
    ``ice_servers`` (the browser's ``RTCIceServer`` shape).

    Args:
        urls: from :func:`parse_ice_servers`.
        secret: coturn's ``static-auth-secret`` (needed for TURN URLs).
        ttl: credential lifetime, seconds.
    """

    __slots__ = ("stun", "turn", "_secret", "ttl")

    def __init__(self, urls: tuple[str, ...], secret: str | None, ttl: float) -> None:
        self.stun = [url for url in urls if url.startswith("stun")]
        self.turn = [url for url in urls if url.startswith("turn")]
        self._secret = (secret or "").encode()
        self.ttl = ttl

    def __bool__(self) -> bool:
        return bool(self.stun or self.turn)

    def for_participant(self, session_id: str, role: str, now: float) -> list[dict[str, object]]:
        """Fresh entries for ``role`` of ``session_id``; ``now`` is epoch
        seconds (``time.time()``: UTC by definition)."""
        servers: list[dict[str, object]] = []
        if self.stun:
            servers.append({"urls": list(self.stun)})
        if self.turn:
            username = f"{math.floor(now + self.ttl)}:{session_id}:{role}"
            digest = hmac.new(self._secret, username.encode(), hashlib.sha1).digest()
            servers.append(
                {
                    "urls": list(self.turn),
                    "username": username,
                    "credential": base64.b64encode(digest).decode(),
                }
            )
        return servers
