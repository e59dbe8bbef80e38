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
import ipaddress
import math
import re

from .exceptions import ConfigError

__all__ = ["IceServers", "parse_ice_servers"]

#: The schemes of ``ICE_SERVERS``, compared without regard to case (RFC
#: 7064 §3.1, RFC 7065 §3.1: URI schemes are case-insensitive).
SCHEMES = ("stun", "stuns", "turn", "turns")
#: What follows the scheme: the host (a bracketed IPv6 address, or anything
#: up to the port or query, checked by :func:`_host_problem`), a port, and
#: one ``?transport=`` parameter (its name and value case-insensitive too).
_REST = re.compile(
    r"(?P<host>\[[^\]]*\]|[^:?\[\]]*)(?::(?P<port>[^?]*))?(?:\?(?P<query>.*))?",
    re.S,
)
_TRANSPORT = re.compile(r"transport=(?P<transport>udp|tcp)", re.I)
_PORT = re.compile(r"[0-9]{1,5}")
#: One label of a host name: letters, digits, ``-`` and ``_`` (Chromium
#: takes underscores, as in some cloud providers' names), no ``-`` first
#: or last. ASCII only: an internationalised name goes in its xn-- form.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")
_NUMERIC = re.compile(r"[0-9]+")
#: The most characters of an item a configuration error line shows.
_SHOWN = 120


def parse_ice_servers(text: str) -> tuple[str, ...]:
    """The URLs of ``ICE_SERVERS`` (empty text: none), as handed to the
    apps: scheme and ``?transport=`` value in lower case (``TURN:host`` and
    ``?transport=UDP`` are accepted), a port without leading zeros, the host
    as written (docs/protocol.md, "ICE servers").

    Raises:
        ConfigError: naming ``ICE_SERVERS``, the item (with anything before
        an ``@``, where a password would be, redacted) and why it is refused:
        an unknown scheme, credentials in the URL, a host that is not a
        host name, IPv4 or bracketed IPv6 address, a port outside
        1–65535, ``?transport`` on STUN, or ``turns:`` over UDP.
    """
    urls = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        url, problem = _normalise(item)
        if problem is not None:
            raise ConfigError(f"ICE_SERVERS: {_shown(item)!r} is refused: {problem}")
        urls.append(url)
    return tuple(urls)


def _normalise(item: str) -> tuple[str, str | None]:
    """``(url, None)`` for a usable item, else ``("", why it is refused)``."""
    scheme, sep, rest = item.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        return "", "the scheme must be stun:, stuns:, turn: or turns:"
    if "@" in rest:
        return "", "no user or password in the URL (TURN credentials are made from TURN_SECRET)"
    if rest.startswith("//"):
        return "", f"write {scheme}:host, without '//'"
    match = _REST.fullmatch(rest)
    if match is None:
        return "", "expected host[:port][?transport=udp|tcp]"
    host, port, query = match.group("host", "port", "query")
    if port is not None and ":" in port:
        return "", f"an IPv6 address goes in brackets: {scheme}:[2001:db8::1]:3478"
    problem = _host_problem(host)
    if problem is not None:
        return "", problem
    url = f"{scheme}:{host}"
    if port is not None:
        if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            return "", "the port is not a number from 1 to 65535"
        url += f":{int(port)}"
    if query is not None:
        transport = _TRANSPORT.fullmatch(query)
        if transport is None:
            return "", "the only query allowed is ?transport=udp or ?transport=tcp"
        if scheme.startswith("stun"):
            return "", "?transport is for turn: and turns: URLs only"
        value = transport.group("transport").lower()
        if scheme == "turns" and value == "udp":
            return "", "turns: runs over TLS, i.e. TCP: ?transport=udp cannot apply"
        url += f"?transport={value}"
    return url, None


def _host_problem(host: str) -> str | None:
    """Why ``host`` is not a bracketed IPv6 address, a dotted-quad IPv4
    address or a host name (labels of 1–63 characters, 253 in all, one
    trailing dot allowed), or None when it is one."""
    if not host:
        return "the host is missing"
    if host.startswith("["):
        inner = host[1:-1]
        try:
            if "%" in inner:  # a zone index means nothing to a remote app
                raise ValueError(inner)
            ipaddress.IPv6Address(inner)
        except ValueError:
            return "the host in brackets is not an IPv6 address"
        return None
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if _NUMERIC.fullmatch(labels[-1]):  # ends in a number: meant as an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return (
                "the host ends in a number, so it must be an IPv4 address: "
                "four numbers 0-255, no leading zeros, no trailing dot"
            )
        return None
    if len(name) > 253:
        return f"the host name is longer than 253 characters ({len(name)})"
    for label in labels:
        if not label:
            return "the host name has an empty label (two dots in a row, or a dot first)"
        if len(label) > 63:
            return f"the host name has a label longer than 63 characters ({len(label)})"
        if not _LABEL.fullmatch(label):
            return (
                "the host is not a host name (letters, digits, '-' and '_' between dots, "
                "no '-' first or last; IPv6 in brackets)"
            )
    return None


def _shown(item: str) -> str:
    """``item`` fit for a log line: everything before the last ``@`` but a
    known scheme (userinfo: a user and maybe a password) replaced by
    ``<redacted>``, and cut at :data:`_SHOWN` characters."""
    if "@" in item:
        head, _, tail = item.rpartition("@")
        scheme, sep, _ = head.partition(":")
        kept = f"{scheme}:" if sep and scheme.lower() in SCHEMES else ""
        item = f"{kept}<redacted>@{tail}"
    return item if len(item) <= _SHOWN else item[: _SHOWN - 1] + "…"


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
