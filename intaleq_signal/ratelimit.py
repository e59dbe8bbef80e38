"""Client identity and rate limits: per-IP windows, the admission of
WebSocket upgrades, and per-connection buckets.

Pure logic with the clock passed in (seconds, any monotonic origin), so the
rules are tested without sleeping.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import deque
from collections.abc import Mapping

__all__ = [
    "MAX_PENDING_PER_IP",
    "limit_key",
    "SlidingWindow",
    "TokenBucket",
    "UpgradeAdmission",
    "client_ip",
    "peer_address",
]

#: WebSocket connections of one client IP waiting to authenticate at once
#: (docs/protocol.md, "Connecting"); each waits at most ``AUTH_TIMEOUT``.
MAX_PENDING_PER_IP = 100


def client_ip(peer: str, headers: Mapping[str, str], trusted: frozenset[str]) -> str:
    """The client IP of a request (docs/protocol.md, "Connecting").

    The TCP peer, unless the peer is in ``TRUSTED_PROXIES``: then
    ``X-Real-IP``, else the last address of ``X-Forwarded-For``. A header
    value that is not an IP address is ignored (the peer is used), so a
    proxy bug cannot merge every client into one bucket named "unknown".
    """
    peer = peer_address(peer)
    if peer not in trusted:
        return peer
    real = headers.get("X-Real-IP")
    if real and _is_ip(real.strip()):
        return real.strip()
    forwarded = headers.get("X-Forwarded-For")
    if forwarded:
        last = forwarded.rsplit(",", 1)[-1].strip()
        if _is_ip(last):
            return last
    return peer


def peer_address(address: str) -> str:
    """``::ffff:127.0.0.1`` (an IPv4 peer on a dual-stack socket) as
    ``127.0.0.1``, so it matches ``TRUSTED_PROXIES`` and loopback checks."""
    if address.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(address).ipv4_mapped
        except ValueError:
            return address
        if mapped is not None:
            return str(mapped)
    return address


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class SlidingWindow:
    """At most ``limit`` events per key in any ``window`` seconds.

    Memory is bounded by ``limit`` timestamps per key; keys whose events all
    left the window are dropped by :meth:`prune`.
    """

    __slots__ = ("limit", "window", "_events")

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is not None:
            horizon = now - self.window
            while events and events[0] <= horizon:
                events.popleft()
        return events

    def full(self, key: str, now: float) -> bool:
        """True when ``key`` already has ``limit`` events in the window."""
        events = self._recent(key, now)
        return events is not None and len(events) >= self.limit

    def hit(self, key: str, now: float) -> None:
        """Record one event (the oldest falls off past ``limit``)."""
        events = self._recent(key, now)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
        events.append(now)

    def allow(self, key: str, now: float) -> bool:
        """Record an event and return True, or False (nothing recorded) when
        the window is full."""
        if self.full(key, now):
            return False
        self.hit(key, now)
        return True

    def prune(self, now: float) -> None:
        """Forget keys with no event in the window (periodic housekeeping)."""
        horizon = now - self.window
        stale = [key for key, events in self._events.items() if not events or events[-1] <= horizon]
        for key in stale:
            del self._events[key]

    def __len__(self) -> int:
        return len(self._events)


@functools.lru_cache(maxsize=4096)
def limit_key(ip: str) -> str:
    """The key per-address limits count ``ip`` under: an IPv4 address as
    itself (also when written IPv4-mapped, ``::ffff:a.b.c.d``); an IPv6
    address as its /64 network, the block one subscriber gets (RFC 6177),
    so a client rotating through its /64 or writing its address another
    way (case, zeros, a zone) is one client; anything else as given.
    Remembered for the last 4,096 addresses (asked on every ``POST
    /sessions`` and upgrade; parsing an address costs more than the rest
    of the check)."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class UpgradeAdmission:
    """Which WebSocket upgrades are let in (docs/protocol.md, "Connecting").

    Per client IP: at most ``limit`` upgrades that *ended without
    authenticating* (refused, closed or timed out before a successful
    ``authenticate``) in any ``window`` seconds, and at most
    ``max_pending`` connections waiting to authenticate at once. An upgrade
    that authenticates never counts, so hundreds of phones behind one
    carrier NAT address, or one phone reconnecting again and again, are
    never refused.

    :meth:`admit` is asked before the upgrade; the engine reports each
    connection once it runs (:meth:`started`), then exactly one of
    :meth:`authenticated` or :meth:`ended_unauthenticated` (it is the
    engine's :class:`~intaleq_signal.signaling.Admission`). The pending
    counts drop an IP at zero; :meth:`prune` forgets the failures that left
    the window.
    """

    __slots__ = ("failures", "max_pending", "_pending")

    #: :meth:`admit`'s refusals: the ``reason`` label of
    #: ``intaleq_connections_rejected_total``.
    RATE_LIMITED = "ip_rate_limited"
    PENDING_LIMITED = "ip_pending_limited"

    def __init__(self, limit: int, window: float = 60.0, max_pending: int = MAX_PENDING_PER_IP) -> None:
        self.failures = SlidingWindow(limit, window)
        self.max_pending = max_pending
        self._pending: dict[str, int] = {}

    def admit(self, ip: str, now: float) -> str | None:
        """None when an upgrade from ``ip`` may proceed, else why not:
        :attr:`RATE_LIMITED` (``limit`` unauthenticated endings in the
        window) or :attr:`PENDING_LIMITED` (``max_pending`` connections
        still waiting to authenticate). Records nothing. Addresses count
        under :func:`limit_key` (an IPv6 client per /64)."""
        ip = limit_key(ip)
        if self.failures.full(ip, now):
            return self.RATE_LIMITED
        if self._pending.get(ip, 0) >= self.max_pending:
            return self.PENDING_LIMITED
        return None

    def started(self, ip: str) -> None:
        """A connection from ``ip`` was upgraded and waits to authenticate."""
        ip = limit_key(ip)
        self._pending[ip] = self._pending.get(ip, 0) + 1

    def authenticated(self, ip: str) -> None:
        """A waiting connection authenticated: it no longer waits, and never
        counts."""
        self._settle(limit_key(ip))

    def ended_unauthenticated(self, ip: str, now: float) -> None:
        """A waiting connection ended without authenticating: it no longer
        waits, and counts towards ``limit``."""
        ip = limit_key(ip)
        self._settle(ip)
        self.failures.hit(ip, now)

    def pending(self, ip: str) -> int:
        """Connections from ``ip`` (its :func:`limit_key`) waiting to authenticate."""
        return self._pending.get(limit_key(ip), 0)

    def _settle(self, ip: str) -> None:
        left = self._pending.get(ip, 0) - 1
        if left > 0:
            self._pending[ip] = left
        else:
            self._pending.pop(ip, None)

    def prune(self, now: float) -> None:
        """Forget IPs with no unauthenticated ending in the window (periodic
        housekeeping; IPs with no waiting connection are already gone)."""
        self.failures.prune(now)


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one token per frame
    (docs/protocol.md, rule 7: 50 msg/s sustained, bursts of 100)."""

    __slots__ = ("tokens", "stamp")

    RATE = 50.0
    BURST = 100.0

    def __init__(self, now: float) -> None:
        self.tokens = self.BURST
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token; False when none is left."""
        tokens = self.tokens + (now - self.stamp) * self.RATE
        self.stamp = now
        if tokens > self.BURST:
            tokens = self.BURST
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
