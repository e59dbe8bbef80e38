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
    ],
)
def test_ice_servers_parse(text, urls):
    assert parse_ice_servers(text) == urls


@pytest.mark.parametrize(
    "url",
    [
        "http://turn.example.org",
        "turn:",
        "turn:turn.example.org:99999",
        "turn:turn.example.org:0",
        "stun:stun.example.org?transport=udp",
        "turn:turn.example.org?transport=sctp",
        "turn:user@turn.example.org",
        "turn:-bad-.example.org",
    ],
)
def test_bad_ice_server_urls_name_the_variable(url):
    with pytest.raises(ConfigError, match="ICE_SERVERS"):
        parse_ice_servers(url)


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
