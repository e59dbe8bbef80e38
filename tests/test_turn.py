"""The daemon's TURN credentials against a real coturn configured as
docs/operations.md, "TURN with coturn" says (tests/coturn.py builds its
configuration from that section's block): coturn reads the block without
an error; the documented check relays over UDP, TCP and TLS; what
``session_joined`` hands each participant allocates a relay and carries
packets; credentials minted with another secret, or expired ones, are
refused, and coturn logs what the section says it logs; two
``static-auth-secret`` lines both work (a rotation); SIGUSR2 loads a renewed
certificate. The real calls through the relay are in tests/test_webrtc.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from typing import Any

import pytest

from conftest import join, recv_json, wait_until
from coturn import Coturn, documented_config, needs_coturn
from intaleq_signal.ice import IceServers, parse_ice_servers

SECRET = "turn-secret-" + "x" * 32
OTHER_SECRET = "another-secret-" + "y" * 32
#: What coturn logs once its configuration is read and its servers run.
STARTED = "Total General servers:"
#: What turnutils_uclient prints when every packet came back through the relay.
ALL_BACK = "Total lost packets 0 (0.000000%)"


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
    return result.returncode == 0 and ALL_BACK in result.stdout + result.stderr


def refused(result: Any) -> bool:
    return result.returncode != 0 and "Cannot complete Allocation" in result.stdout + result.stderr


def mint(secret: str, url: str, expiry_from_now: float, ttl: float = 3600) -> dict[str, Any]:
    """TURN credentials made by the daemon's own code (``IceServers``) for
    ``url``, expiring ``expiry_from_now`` seconds from now."""
    servers = IceServers(parse_ice_servers(url), secret, ttl)
    [entry] = servers.for_participant("minted-session", "driver", time.time() + expiry_from_now - ttl)
    return entry


def test_the_documented_configuration_has_no_comment_after_a_value():
    """coturn takes ``#`` as a comment only at the start of a line:
    ``listening-ip=203.0.113.10 # this host`` is not an address (coturn
    then listens on every address). Every comment has its own line."""
    bad = [line for line in documented_config().splitlines() if "#" in line and not line.startswith("#")]
    assert not bad, "a comment after a value in the coturn block of docs/operations.md:\n" + "\n".join(bad)


@needs_coturn
def test_coturn_reads_the_documented_configuration_and_the_documented_check_passes(coturn_factory):
    """The block as documented (loopback changes only) starts coturn on the
    configured addresses alone, TLS included, with no "error" or "Cannot"
    in what it logs up to the end of its start (the clients' own sessions
    may log a TCP reset later); the check of the section, run as written,
    relays over UDP, TCP (``-t``) and TLS (``-S``)."""
    turn: Coturn = coturn_factory(SECRET)
    wait_until(lambda: STARTED in turn.log, explain=lambda: turn.log)
    assert turn.problems() == [], turn.log
    assert turn.served_certificate() == turn.certificate
    result = turn.run_documented_check(SECRET)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and output.count(ALL_BACK) == 3, f"{output}\ncoturn:\n{turn.log}"
    assert "NO EXPLICIT LISTENER" not in turn.log and "NO EXPLICIT RELAY" not in turn.log, turn.log
    assert "Listener address to use: 127.0.0.1" in turn.log, turn.log


@needs_coturn
def test_credentials_from_session_joined_allocate_a_relay(server_factory, coturn_factory):
    """Under a time zone west of UTC, where an expiry computed from local
    time would already be past: coturn accepts every credential handed out
    (over TCP and TLS too: the documented check above)."""
    turn: Coturn = coturn_factory(SECRET)
    server = server_factory(TZ="America/Los_Angeles", ICE_SERVERS=turn.url, TURN_SECRET=SECRET)
    seen = ice_credentials(server, "ride-turn-ok")
    results = allocate_each(*((turn, entry) for entry in seen.values()))
    for (role, entry), result in zip(seen.items(), results, strict=True):
        assert entry["urls"] == [turn.url], entry
        assert relayed(result), f"{role}: {result.stdout}{result.stderr}\ncoturn:\n{turn.log}"
    assert seen["driver_again"]["username"].endswith(":driver")


@needs_coturn
@pytest.mark.parametrize("verbose", [False, True], ids=["documented", "verbose"])
def test_credentials_minted_with_another_secret_are_refused(server_factory, coturn_factory, verbose):
    """docs/operations.md, "TURN with coturn": without ``verbose`` coturn
    logs ``check_stun_auth: Cannot find credentials of user <...>``; with it,
    also ``error 401`` for that user."""
    turn = coturn_factory(OTHER_SECRET, verbose=verbose)
    server = server_factory(ICE_SERVERS=turn.url, TURN_SECRET=SECRET)
    entry = ice_credentials(server, "ride-turn-wrong-secret")["driver"]
    assert refused(result := turn.allocate(entry["username"], entry["credential"])), result
    user = re.escape(f"<{entry['username']}>")
    wait_until(lambda: re.search(rf"check_stun_auth: Cannot find credentials of user {user}", turn.log),
               explain=lambda: turn.log)  # fmt: skip
    if verbose:
        answer = rf"user {user}: incoming packet message processed, error 401"
        wait_until(lambda: re.search(answer, turn.log), explain=lambda: turn.log)
    else:
        assert "error 401" not in turn.log, turn.log


def allocate_each(*jobs: tuple[Coturn, dict[str, Any]]) -> list[Any]:
    """``Coturn.allocate`` for each ``(coturn, ice_servers entry)``, all at
    once: a relayed run takes seconds of turnutils_uclient's own pacing."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: job[0].allocate(job[1]["username"], job[1]["credential"]), jobs))


@needs_coturn
def test_expired_credentials_are_refused(coturn_factory):
    """Credentials minted by the daemon's own code a minute past their
    expiry: refused, and logged as a wrong secret is (no waiting:
    ``TURN_TTL`` is at least a minute)."""
    turn = coturn_factory(SECRET)
    entry = mint(SECRET, turn.url, expiry_from_now=-60)
    assert int(entry["username"].split(":")[0]) < time.time()
    assert refused(result := turn.allocate(entry["username"], entry["credential"])), result
    user = re.escape(f"<{entry['username']}>")
    wait_until(
        lambda: re.search(rf"Cannot find credentials of user {user}", turn.log), explain=lambda: turn.log
    )


@needs_coturn
def test_rotating_the_secret_both_secrets_work(server_factory, coturn_factory):
    """docs/operations.md, "TURN with coturn", rotating the secret: with
    the old and the new ``static-auth-secret`` lines, credentials made with
    either allocate; with the old line gone, the old ones are refused."""
    new_secret = "new-secret-" + "z" * 32
    turn = coturn_factory(SECRET, more_secrets=(new_secret,))
    server = server_factory(ICE_SERVERS=turn.url, TURN_SECRET=new_secret)
    entry = ice_credentials(server, "ride-turn-rotation")["driver"]
    old = mint(SECRET, turn.url, expiry_from_now=600)
    after = coturn_factory(new_secret)
    new_before, old_before, new_after, old_after = allocate_each(
        (turn, entry), (turn, old), (after, entry), (after, old)
    )
    assert relayed(new_before) and relayed(old_before), (new_before, old_before)
    assert relayed(new_after) and refused(old_after), (new_after, old_after)


@needs_coturn
def test_sigusr2_loads_a_renewed_certificate(coturn_factory):
    """The documented certbot deploy hook replaces cert and pkey and sends
    SIGUSR2: coturn presents the new certificate, keeps running, and TLS
    allocations go on."""
    turn = coturn_factory(SECRET)
    assert turn.served_certificate() == turn.certificate
    renewed = turn.reload_certificate("renewed.intaleq.test")
    assert renewed != turn.certificate
    wait_until(lambda: turn.served_certificate() == renewed, explain=lambda: turn.log)
    assert turn.proc.poll() is None, turn.log
    entry = mint(SECRET, turn.url, expiry_from_now=600)
    assert relayed(result := turn.allocate(entry["username"], entry["credential"], "tls")), result
