"""ICE servers handed to the apps, with TURN credentials in the TURN REST
API convention (docs/protocol.md, "ICE servers"): parsing, credentials, the
engine's messages and the real daemon under a non-UTC time zone."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import pytest

from conftest import join, recv_json
from intaleq_signal.config import Config, ConfigError
from intaleq_signal.ice import IceServers, parse_ice_servers

SECRET = "s" * 40
BASE = {"API_KEY": "k" * 40, "ENVIRONMENT": "development"}


@pytest.mark.parametrize(
    "text, urls",
    [
        ("", ()),
        ("stun:stun.example.org", ("stun:stun.example.org",)),
        (
            " stun:stun.example.org:3478 , turn:turn.example.org:3478?transport=udp,turns:[2001:db8::1]:5349",
            (
                "stun:stun.example.org:3478",
                "turn:turn.example.org:3478?transport=udp",
                "turns:[2001:db8::1]:5349",
            ),
        ),
        ("turn:127.0.0.1:3478?transport=tcp", ("turn:127.0.0.1:3478?transport=tcp",)),
        # Scheme and transport are case-insensitive (RFC 7064, RFC 7065) and
        # handed out in lower case; the host stays as written.
        ("TURN:Turn.Example.org:3478?transport=UDP", ("turn:Turn.Example.org:3478?transport=udp",)),
        ("Stun:stun.example.org", ("stun:stun.example.org",)),
        ("TURNS:t.example.org:5349?TRANSPORT=Tcp", ("turns:t.example.org:5349?transport=tcp",)),
        ("turn:t.example.org:03478", ("turn:t.example.org:3478",)),
        # A fully qualified name with its trailing dot, underscores in
        # labels, IPv4-mapped IPv6, labels of 63 characters.
        ("turn:turn.example.org.:3478", ("turn:turn.example.org.:3478",)),
        ("stun:stun_1.my_cloud.example.org", ("stun:stun_1.my_cloud.example.org",)),
        ("turn:[::ffff:192.0.2.1]", ("turn:[::ffff:192.0.2.1]",)),
        (f"turn:{'a' * 63}.example.org", (f"turn:{'a' * 63}.example.org",)),
        ("turn:255.255.255.255:65535", ("turn:255.255.255.255:65535",)),
    ],
)
def test_ice_servers_parse(text, urls):
    """docs/protocol.md, "ICE servers": the URLs as handed to the apps."""
    assert parse_ice_servers(text) == urls


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://turn.example.org", "scheme"),
        ("turn:", "host is missing"),
        ("turn:turn.example.org:99999", "port"),
        ("turn:turn.example.org:0", "port"),
        ("turn:turn.example.org:", "port"),
        ("stun:stun.example.org?transport=udp", "turn: and turns: URLs only"),
        ("turn:turn.example.org?transport=sctp", "only query"),
        ("turn:turn.example.org?transport=udp&x=1", "only query"),
        ("turn:user@turn.example.org", "no user or password"),
        ("turn:-bad-.example.org", "not a host name"),
        ("turn://turn.example.org", "without '//'"),
        # turns: is TLS, i.e. TCP.
        ("turns:turn.example.org:5349?transport=udp", "turns: runs over TLS"),
        ("TURNS:turn.example.org?transport=UDP", "turns: runs over TLS"),
        # Brackets hold an IPv6 address and nothing else.
        ("turn:[:::::]", "not an IPv6 address"),
        ("turn:[.]", "not an IPv6 address"),
        ("turn:[1.2.3.4]", "not an IPv6 address"),
        ("turn:[]", "not an IPv6 address"),
        ("turn:[fe80::1%eth0]", "not an IPv6 address"),
        ("turn:[::1", "expected host"),
        ("turn:::1", "IPv6 address goes in brackets"),
        ("turn:2001:db8::1", "IPv6 address goes in brackets"),
        # A host ending in a number is an IPv4 address, a valid one.
        ("turn:999.999.999.999", "IPv4 address"),
        ("turn:256.1.1.1:3478", "IPv4 address"),
        ("turn:1.2.3", "IPv4 address"),
        ("turn:01.2.3.4", "IPv4 address"),
        ("turn:1.2.3.4.", "IPv4 address"),
        # Host names: no empty label, none over 63 characters, 253 in all.
        ("turn:a..b", "empty label"),
        ("turn:.example.org", "empty label"),
        ("turn:.", "empty label"),
        ("turn:example.org..", "empty label"),
        (f"turn:{'a' * 64}.example.org", "longer than 63"),
        ("turn:" + ".".join(["a" * 63] * 4) + ".org", "longer than 253"),
        ("turn:tu rn.example.org", "not a host name"),
        ("turn:turn.example.org\n:3478", "not a host name"),
        ("turn:türn.example.org", "not a host name"),
    ],
)
def test_bad_ice_server_urls_name_the_variable_and_the_reason(url, why):
    """One line naming ICE_SERVERS, the item and why it is refused."""
    with pytest.raises(ConfigError, match="ICE_SERVERS") as info:
        parse_ice_servers(f"stun:stun.example.org,{url}")
    line = str(info.value)
    assert why in line and "\n" not in line, line


@pytest.mark.parametrize(
    "url, shown",
    [
        ("turn:user:hunter2-password@turn.example.org:3478", "turn:<redacted>@turn.example.org:3478"),
        ("TURNS:alice:hunter2-password@t.example.org", "TURNS:<redacted>@t.example.org"),
        ("user:hunter2-password@turn.example.org", "<redacted>@turn.example.org"),
        ("turn:a@b:hunter2-password@turn.example.org", "turn:<redacted>@turn.example.org"),
    ],
)
def test_a_password_in_a_url_is_not_echoed(url, shown):
    """The refusal goes to the journal: userinfo (before the last ``@``)
    is redacted, the rest of the item kept."""
    with pytest.raises(ConfigError) as info:
        parse_ice_servers(url)
    line = str(info.value)
    assert "hunter2" not in line and repr(shown) in line, line


def test_an_upper_case_turn_scheme_needs_the_secret_and_is_handed_out_lower_case():
    with pytest.raises(ConfigError, match="TURN_SECRET is required"):
        Config.from_env({**BASE, "ICE_SERVERS": "TURN:turn.example.org"})
    config = Config.from_env(
        {**BASE, "ICE_SERVERS": "TURN:t.example.org?transport=TCP", "TURN_SECRET": SECRET}
    )
    assert config.ice_servers == ("turn:t.example.org?transport=tcp",)
    [turn] = IceServers(config.ice_servers, SECRET, 600).for_participant("s", "driver", 0)
    assert turn["urls"] == ["turn:t.example.org?transport=tcp"]


def test_a_long_item_is_cut_in_the_error_line():
    with pytest.raises(ConfigError) as info:
        parse_ice_servers("turn:" + "x" * 5000 + "..org")
    assert len(str(info.value)) < 300, str(info.value)


def test_turn_needs_a_secret_of_32_characters():
    with pytest.raises(ConfigError, match="TURN_SECRET is required"):
        Config.from_env({**BASE, "ICE_SERVERS": "turn:turn.example.org"})
    with pytest.raises(ConfigError, match="TURN_SECRET is too short"):
        Config.from_env({**BASE, "ICE_SERVERS": "turn:turn.example.org", "TURN_SECRET": "short"})
    with pytest.raises(ConfigError, match="TURN_TTL"):
        Config.from_env({**BASE, "TURN_TTL": "soon"})
    config = Config.from_env({**BASE, "ICE_SERVERS": "stun:stun.example.org"})  # STUN alone needs none
    assert config.ice_servers == ("stun:stun.example.org",) and config.turn_ttl == 3600.0


def test_turn_credentials_follow_the_turn_rest_api():
    servers = IceServers(
        ("stun:s.example.org", "turn:t.example.org", "turns:t.example.org:5349"), SECRET, 600
    )
    stun, turn = servers.for_participant("sess-1", "passenger", 1_700_000_000.9)
    assert stun == {"urls": ["stun:s.example.org"]}
    assert turn["urls"] == ["turn:t.example.org", "turns:t.example.org:5349"]
    assert turn["username"] == "1700000600:sess-1:passenger"
    expected = base64.b64encode(
        hmac.new(SECRET.encode(), b"1700000600:sess-1:passenger", hashlib.sha1).digest()
    )
    assert turn["credential"] == expected.decode()
    assert not IceServers((), None, 600) and IceServers(("stun:s.example.org",), None, 600)


def test_daemon_hands_fresh_credentials_in_utc_whatever_the_time_zone(server_factory):
    """TZ=Asia/Damascus on the daemon: the expiry is still UTC epoch
    seconds; session_joined and participant_joined carry ice_servers for
    their recipient; the credential is never logged."""
    server = server_factory(
        TZ="Asia/Damascus",
        ICE_SERVERS="stun:127.0.0.1:3478,turn:127.0.0.1:3478?transport=udp",
        TURN_SECRET=SECRET,
        TURN_TTL="10m",
        LOG_LEVEL="debug",
    )
    session = server.new_session(ride_id="ice")
    seen = []

    async def scenario() -> None:
        d, (_, joined) = await join(server, session, "driver-1")
        p, (_, joined_p) = await join(server, session, "passenger-1")
        to_p, to_d = await recv_json(p), await recv_json(d)
        seen.extend([joined, joined_p, to_p, to_d])

    before = time.time()
    asyncio.run(scenario())
    roles = ["driver", "passenger", "passenger", "driver"]
    for message, role in zip(seen, roles, strict=True):
        stun, turn = message["ice_servers"]
        assert stun == {"urls": ["stun:127.0.0.1:3478"]}
        expiry, session_id, who = turn["username"].split(":")
        assert (session_id, who) == (session["session_id"], role), message
        assert before + 600 - 2 <= int(expiry) <= time.time() + 600 + 1, (expiry, before)
        digest = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
        assert turn["credential"] == base64.b64encode(digest).decode()
        assert turn["credential"] not in server.log
    assert SECRET not in server.log


def test_no_ice_servers_without_the_setting(server_factory):
    server = server_factory()
    session = server.new_session(ride_id="no-ice")

    async def scenario() -> None:
        _, (_, joined) = await join(server, session, "driver-1")
        assert "ice_servers" not in joined

    asyncio.run(scenario())
