"""The daemon's TURN credentials against a real coturn (docs/operations.md,
"TURN with coturn"): what ``session_joined`` hands each participant
allocates a relay and carries packets; credentials minted with another
secret, or expired ones, are refused with 401. The real calls through the
relay are in tests/test_webrtc.py."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from conftest import join, recv_json, wait_until
from coturn import Coturn, needs_coturn
from intaleq_signal.ice import IceServers, parse_ice_servers

pytestmark = needs_coturn

SECRET = "turn-secret-" + "x" * 32
OTHER_SECRET = "another-secret-" + "y" * 32


def ice_credentials(server: Any, ride_id: str) -> dict[str, dict[str, Any]]:
    """The TURN entry of ``ice_servers`` each participant got, by role:
    from ``session_joined`` and from ``participant_joined``."""
    session = server.new_session(ride_id=ride_id)
    seen: dict[str, dict[str, Any]] = {}

    async def scenario() -> None:
        d, (_, joined_d) = await join(server, session, "driver-1")
        p, (_, joined_p) = await join(server, session, "passenger-1")
        seen["driver"] = joined_d["ice_servers"][-1]
        seen["passenger"] = joined_p["ice_servers"][-1]
        seen["driver_again"] = (await recv_json(d))["ice_servers"][-1]  # participant_joined
        await d.close()
        await p.close()

    asyncio.run(scenario())
    return seen


def relayed(result: Any) -> bool:
    """turnutils_uclient allocated a relay and got all 10 packets back
    through it."""
    return result.returncode == 0 and "Total lost packets 0 (0.000000%)" in result.stdout + result.stderr


def test_credentials_from_session_joined_allocate_a_relay(server_factory, coturn_factory):
    """Under a time zone west of UTC, where an expiry computed from local
    time would already be past: coturn accepts every credential handed out."""
    turn: Coturn = coturn_factory(SECRET)
    server = server_factory(TZ="America/Los_Angeles", ICE_SERVERS=turn.url, TURN_SECRET=SECRET)
    seen = ice_credentials(server, "ride-turn-ok")
    for role, entry in seen.items():
        assert entry["urls"] == [turn.url], entry
        result = turn.allocate(entry["username"], entry["credential"])
        assert relayed(result), f"{role}: {result.stdout}{result.stderr}\ncoturn:\n{turn.log}"
    assert seen["driver_again"]["username"].endswith(":driver")


def test_credentials_minted_with_another_secret_are_refused(server_factory, coturn_factory):
    turn = coturn_factory(OTHER_SECRET)
    server = server_factory(ICE_SERVERS=turn.url, TURN_SECRET=SECRET)
    entry = ice_credentials(server, "ride-turn-wrong-secret")["driver"]
    result = turn.allocate(entry["username"], entry["credential"])
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Cannot complete Allocation" in output, output
    wait_until(lambda: re.search(r"error 401", turn.log), explain=lambda: turn.log)


def test_expired_credentials_are_refused(coturn_factory):
    """Credentials minted by the daemon's own code (``IceServers``) a
    ``TURN_TTL`` and a minute ago: their expiry is past, coturn refuses
    them (no waiting: ``TURN_TTL`` is at least a minute)."""
    turn = coturn_factory(SECRET)
    ttl = 3600
    servers = IceServers(parse_ice_servers(turn.url), SECRET, ttl)
    [entry] = servers.for_participant("expired-session", "driver", time.time() - ttl - 60)
    assert int(entry["username"].split(":")[0]) < time.time()
    result = turn.allocate(entry["username"], entry["credential"])
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Cannot complete Allocation" in output, output
