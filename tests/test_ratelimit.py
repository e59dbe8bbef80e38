"""Unit tests of client identity and rate limits (the wrong API keys of
docs/protocol.md, "POST /sessions"; "Connecting"; rule 7). The clock is
passed in explicitly."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from intaleq_signal.ratelimit import (
    MAX_PENDING_PER_IP,
    SlidingWindow,
    TokenBucket,
    UpgradeAdmission,
    client_ip,
    limit_key,
)

TRUSTED = frozenset({"127.0.0.1", "::1"})


# -- client_ip ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Real-IP": "203.0.113.9"}, {"X-Forwarded-For": "203.0.113.9"}],
)
def test_untrusted_peer_ignores_headers(headers):
    """docs/protocol.md, "Connecting": the client IP is the TCP peer unless the peer is in TRUSTED_PROXIES."""
    assert client_ip("198.51.100.7", headers, TRUSTED) == "198.51.100.7"


def test_trust_nobody():
    """docs/protocol.md, "Connecting": an empty TRUSTED_PROXIES believes no header, even from loopback."""
    assert client_ip("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, frozenset()) == "127.0.0.1"


def test_trusted_peer_uses_x_real_ip():
    """docs/protocol.md, "Connecting": from a trusted proxy, X-Real-IP is the client."""
    headers = {"X-Real-IP": "203.0.113.9", "X-Forwarded-For": "192.0.2.1, 192.0.2.2"}
    assert client_ip("127.0.0.1", headers, TRUSTED) == "203.0.113.9"


def test_trusted_ipv6_peer_uses_x_real_ip():
    """docs/protocol.md, "Connecting": IPv6 proxies and clients work the same."""
    assert client_ip("::1", {"X-Real-IP": "2001:db8::7"}, TRUSTED) == "2001:db8::7"


@pytest.mark.parametrize(
    "forwarded, expected",
    [
        ("203.0.113.9", "203.0.113.9"),
        ("192.0.2.1, 203.0.113.9", "203.0.113.9"),
        ("192.0.2.1,203.0.113.9", "203.0.113.9"),
        ("spoofed, 192.0.2.1 , 2001:db8::1 ", "2001:db8::1"),
    ],
)
def test_trusted_peer_falls_back_to_last_forwarded_for(forwarded, expected):
    """docs/protocol.md, "Connecting": without X-Real-IP, the last address of X-Forwarded-For
    (the one the proxy added)."""
    assert client_ip("127.0.0.1", {"X-Forwarded-For": forwarded}, TRUSTED) == expected


def test_ipv4_mapped_loopback_peer_is_trusted():
    """docs/protocol.md, "Connecting": a trusted proxy seen as an IPv4-mapped address
    (::ffff:127.0.0.1) is still trusted."""
    # With SERVER_ADDR=[::]:port (dual-stack), Nginx on 127.0.0.1 shows up as ::ffff:127.0.0.1;
    # not trusting it puts every phone in one rate-limit bucket.
    assert client_ip("::ffff:127.0.0.1", {"X-Real-IP": "203.0.113.9"}, TRUSTED) == "203.0.113.9"


def test_x_real_ip_whitespace_is_stripped():
    """docs/protocol.md, "Connecting": a header value with surrounding spaces is still the address."""
    assert client_ip("127.0.0.1", {"X-Real-IP": " 203.0.113.9 "}, TRUSTED) == "203.0.113.9"


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"X-Real-IP": "unknown"}, "127.0.0.1"),
        ({"X-Real-IP": ""}, "127.0.0.1"),
        ({"X-Real-IP": "203.0.113.9:5555"}, "127.0.0.1"),
        ({"X-Real-IP": "garbage", "X-Forwarded-For": "203.0.113.9"}, "203.0.113.9"),
        ({"X-Forwarded-For": "203.0.113.9, unknown"}, "127.0.0.1"),
        ({"X-Forwarded-For": ""}, "127.0.0.1"),
        ({"X-Forwarded-For": "203.0.113.9,"}, "127.0.0.1"),
        ({"X-Real-IP": "999.1.1.1", "X-Forwarded-For": "not-an-ip"}, "127.0.0.1"),
    ],
)
def test_invalid_header_values_ignored(headers, expected):
    """docs/protocol.md, "Connecting": a header value that is not an IP address is ignored (the
    next source, then the peer)."""
    assert client_ip("127.0.0.1", headers, TRUSTED) == expected


def test_header_names_case_insensitive_with_websockets_headers():
    """docs/protocol.md, "Connecting": real requests carry websockets Headers; the header
    name's case does not matter."""
    headers = Headers([("x-real-ip", "203.0.113.9")])
    assert client_ip("127.0.0.1", headers, TRUSTED) == "203.0.113.9"
    headers = Headers([("x-forwarded-for", "192.0.2.1, 203.0.113.10")])
    assert client_ip("127.0.0.1", headers, TRUSTED) == "203.0.113.10"


# -- SlidingWindow ------------------------------------------------------------


def test_sliding_window_limit():
    """docs/protocol.md, "Connecting": at most RATE_LIMIT_PER_MIN attempts per IP in any minute."""
    window = SlidingWindow(limit=3, window=60.0)
    assert [window.allow("ip", t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert window.allow("ip", 3.0) is False
    assert window.allow("ip", 59.9) is False
    assert window.allow("ip", 60.1) is True  # the attempt at 0.0 left the window
    assert window.allow("ip", 60.2) is False
    assert window.allow("ip", 61.1) is True  # the one at 1.0 left


def test_sliding_window_refusals_are_not_recorded():
    """docs/protocol.md, "Connecting": a refused attempt does not push the window further (the
    minute passes anyway)."""
    window = SlidingWindow(limit=2, window=60.0)
    window.allow("ip", 0.0)
    window.allow("ip", 0.0)
    for t in range(1, 60):
        assert window.allow("ip", float(t)) is False
    assert window.allow("ip", 60.5) is True


def test_sliding_window_keys_are_independent():
    """docs/protocol.md, "Connecting": one abusive client does not lock out the others."""
    window = SlidingWindow(limit=1, window=60.0)
    assert window.allow("a", 0.0)
    assert not window.allow("a", 1.0)
    assert window.allow("b", 1.0)
    assert window.allow("c", 1.0)


def test_sliding_window_full_and_hit():
    """docs/protocol.md, "POST /sessions": 10 wrong keys within a minute → 429 until the minute
    passes (hit records, full checks)."""
    window = SlidingWindow(limit=10, window=60.0)
    for t in range(10):
        assert not window.full("ip", float(t))
        window.hit("ip", float(t))
    assert window.full("ip", 10.0)
    assert window.full("ip", 59.9)
    assert not window.full("ip", 60.5)
    assert not window.full("other", 10.0)


def test_sliding_window_hits_beyond_limit_keep_the_latest():
    """docs/protocol.md, "POST /sessions": failures keep counting past the limit, so a client
    that keeps failing stays blocked."""
    window = SlidingWindow(limit=3, window=60.0)
    for t in range(10):
        window.hit("ip", float(t))  # events 0..9; only the last 3 matter
    assert window.full("ip", 66.9)  # 7, 8, 9 still inside
    assert not window.full("ip", 67.5)  # 7 left


def test_sliding_window_prune():
    """docs/protocol.md, "Connecting": keys whose events all left the window are forgotten
    (bounded memory)."""
    window = SlidingWindow(limit=5, window=60.0)
    window.allow("old", 0.0)
    window.allow("recent", 50.0)
    assert len(window) == 2
    window.prune(59.0)
    assert len(window) == 2
    window.prune(70.0)
    assert len(window) == 1
    assert window.allow("recent", 70.0)
    window.prune(200.0)
    assert len(window) == 0
    assert window.allow("old", 200.0)


# -- UpgradeAdmission -------------------------------------------------------------


def test_admission_authenticated_upgrades_never_count():
    """docs/protocol.md, "Connecting": upgrades that authenticate never count towards
    RATE_LIMIT_PER_MIN: a carrier NAT address with thousands of phones, or one phone reconnecting
    again and again, is never refused."""
    admission = UpgradeAdmission(limit=10, window=60.0)
    for n in range(5000):
        now = n / 100
        assert admission.admit("nat", now) is None
        admission.started("nat")
        admission.authenticated("nat")
    assert admission.pending("nat") == 0


def test_admission_counts_upgrades_ended_unauthenticated():
    """docs/protocol.md, "Connecting": RATE_LIMIT_PER_MIN upgrades that ended without authenticating
    within a minute → the next upgrade from that IP is refused (ip_rate_limited) until the oldest of
    them is a minute old; other IPs are unaffected; refusals are not recorded."""
    admission = UpgradeAdmission(limit=3, window=60.0)
    for t in (0.0, 1.0, 2.0):
        assert admission.admit("ip", t) is None
        admission.started("ip")
        admission.ended_unauthenticated("ip", t)
    assert admission.admit("ip", 3.0) == "ip_rate_limited"
    assert admission.admit("ip", 59.9) == "ip_rate_limited"
    assert admission.admit("other", 3.0) is None
    assert admission.admit("ip", 60.1) is None  # the ending at 0.0 left the window
    admission.started("ip")
    admission.authenticated("ip")  # does not count
    assert admission.admit("ip", 60.2) is None
    assert admission.pending("ip") == 0


def test_admission_bounds_upgrades_waiting_to_authenticate():
    """docs/protocol.md, "Connecting": at most 100 connections per IP wait to authenticate at once;
    the 101st upgrade is refused (ip_pending_limited) until one of them authenticates or ends."""
    assert MAX_PENDING_PER_IP == 100
    admission = UpgradeAdmission(limit=10, window=60.0)
    for _ in range(100):
        assert admission.admit("ip", 0.0) is None
        admission.started("ip")
    assert admission.pending("ip") == 100
    assert admission.admit("ip", 0.0) == "ip_pending_limited"
    assert admission.admit("other", 0.0) is None
    admission.authenticated("ip")
    assert admission.admit("ip", 0.0) is None
    admission.started("ip")
    assert admission.admit("ip", 0.0) == "ip_pending_limited"
    admission.ended_unauthenticated("ip", 1.0)
    assert admission.admit("ip", 1.0) is None


def test_admission_rate_limit_is_checked_first():
    """docs/protocol.md, "Connecting": an IP both over RATE_LIMIT_PER_MIN and at the pending bound is
    told it is rate limited (retry in a minute)."""
    admission = UpgradeAdmission(limit=1, window=60.0, max_pending=2)
    admission.started("ip")
    admission.ended_unauthenticated("ip", 0.0)
    admission.started("ip")
    admission.started("ip")
    assert admission.admit("ip", 1.0) == "ip_rate_limited"
    assert admission.admit("ip", 61.0) == "ip_pending_limited"


def test_admission_prune_forgets_idle_ips():
    """docs/protocol.md, "Connecting": failures that left the window are forgotten (bounded memory);
    an IP with no waiting connection keeps no count."""
    admission = UpgradeAdmission(limit=2, window=60.0)
    admission.started("a")
    admission.ended_unauthenticated("a", 0.0)
    admission.started("b")
    admission.authenticated("b")
    assert admission._pending == {}
    assert len(admission.failures) == 1
    admission.prune(59.0)
    assert len(admission.failures) == 1
    admission.prune(61.0)
    assert len(admission.failures) == 0


# -- TokenBucket --------------------------------------------------------------


def test_token_bucket_burst_of_100():
    """docs/protocol.md, rule 7: bursts of 100 messages are allowed, the 101st is refused."""
    bucket = TokenBucket(now=0.0)
    assert all(bucket.take(0.0) for _ in range(100))
    assert bucket.take(0.0) is False
    assert bucket.take(0.0) is False


def test_token_bucket_refills_at_50_per_second():
    """docs/protocol.md, rule 7: 50 messages per second sustained."""
    bucket = TokenBucket(now=0.0)
    for _ in range(100):
        bucket.take(0.0)
    assert bucket.take(0.0) is False
    granted = sum(bucket.take(1.0) for _ in range(60))
    assert granted == 50
    assert bucket.take(1.01) is False  # half a token
    assert bucket.take(1.02) is True  # one token after 20 ms


def test_token_bucket_sustained_50_per_second_is_fine():
    """docs/protocol.md, rule 7: a client steadily at 50 msg/s (after a burst of 90) is never refused."""
    bucket = TokenBucket(now=0.0)
    for _ in range(90):
        assert bucket.take(0.0)
    assert all(bucket.take(i / 50) for i in range(1, 5000))


def test_token_bucket_above_rate_is_eventually_refused():
    """docs/protocol.md, rule 7: more than 50 msg/s sustained runs out (60/s: after ~10 s)."""
    bucket = TokenBucket(now=0.0)
    refused_at = next(i / 60 for i in range(1, 6000) if not bucket.take(i / 60))
    assert 9.0 < refused_at < 11.0


def test_token_bucket_caps_at_burst():
    """docs/protocol.md, rule 7: a long idle period still allows only a burst of 100."""
    bucket = TokenBucket(now=0.0)
    assert sum(bucket.take(3600.0) for _ in range(150)) == 100


@pytest.mark.parametrize(
    "ip, key",
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::/64"),
        ("2001:db8::2", "2001:db8::/64"),
        ("2001:db8::1%eth0", "2001:db8::/64"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("unknown", "unknown"),
    ],
)
def test_limit_key(ip, key):
    """docs/protocol.md, "Connecting": an IPv6 client counts per /64 (one
    subscriber's block), whatever address of it and however written."""
    assert limit_key(ip) == key


def test_an_ipv6_client_rotating_through_its_64_is_one_client():
    admission = UpgradeAdmission(limit=3)
    for n in range(3):
        admission.started(f"2001:db8::{n + 1}")
        admission.ended_unauthenticated(f"2001:db8::{n + 1}", 0.0)
    assert admission.admit("2001:db8::99", 1.0) == UpgradeAdmission.RATE_LIMITED
    assert admission.admit("2001:DB8:0:0:0:0:0:99", 1.0) == UpgradeAdmission.RATE_LIMITED
    assert admission.admit("2001:db8:0:1::1", 1.0) is None  # the next /64: another subscriber
