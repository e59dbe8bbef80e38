"""Participant tokens (docs/protocol.md, "Participant tokens"): derivation,
the constant-time check, and the real daemon under each PARTICIPANT_TOKENS
mode."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import API_KEY, closed_with, connected_call, recv_json, send_json
from intaleq_signal.tokens import ROLES, TokenMinter

MINTER = TokenMinter(API_KEY)


def test_tokens_are_256_bit_url_safe_and_deterministic() -> None:
    token = MINTER.token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a10", "driver")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # 43 × 6 bits ≥ 256 bits
    assert TokenMinter(API_KEY).token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a10", "driver") == token
    assert MINTER.token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a10", "passenger") != token
    assert MINTER.token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a11", "driver") != token
    assert TokenMinter(API_KEY + "x").token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a10", "driver") != token
    assert API_KEY not in token
    with pytest.raises(ValueError):
        MINTER.token("s", "observer")


def test_tokens_stay_what_earlier_versions_minted() -> None:
    """A restart or a rolling deploy keeps the tokens the backend already
    handed out: the derivation never changes (a value minted by the first
    version with tokens)."""
    minter = TokenMinter("a" * 32 + "-known-answer")
    token = minter.token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a10", "passenger")
    assert token == "9ld-Gs1ffW6fiBnqkQRmfsP3eqc85mtskb0PTPmr3CE"
    # Its keyed state is copied per token, never used up.
    assert minter.token("0b6f1c1e-2f0a-4d52-9e55-5d3c0c6f7a10", "passenger") == token


@given(
    session_id=st.text(max_size=40),
    role=st.sampled_from(ROLES),
    other_session=st.text(max_size=40),
    other_role=st.sampled_from(ROLES),
    guess=st.text(max_size=60),
)
def test_only_the_right_token_is_ever_accepted(session_id, role, other_session, other_role, guess) -> None:
    """No token but the one of (session, role) passes the check: not a
    guess, not another role's, not another session's."""
    right = MINTER.token(session_id, role)
    assert MINTER.check(session_id, role, right)
    assert MINTER.check(session_id, role, guess) == (guess == right)
    other = MINTER.token(other_session, other_role)
    assert MINTER.check(session_id, role, other) == ((other_session, other_role) == (session_id, role))


def test_leaked_ids_cannot_take_a_participants_place(server_factory) -> None:
    """PARTICIPANT_TOKENS=required: someone with the session id and the
    driver's user id but not the driver's token gets invalid_token (4001);
    the real driver keeps its socket and its call; neither the API key nor a
    token appears in the debug log."""
    server = server_factory(PARTICIPANT_TOKENS="required", LOG_LEVEL="debug")
    session = server.new_session(ride_id="leaked")
    tokens = {role: session[f"{role}_token"] for role in ROLES}

    async def joined(user_id: str, role: str) -> Any:
        ws = await server.ws()
        message = {"type": "authenticate", "session_id": session["session_id"], "user_id": user_id}
        await send_json(ws, {**message, "token": tokens[role]})
        assert (await recv_json(ws))["type"] == "authenticated"
        await recv_json(ws)  # session_joined
        return ws

    async def scenario() -> None:
        d = await joined("driver-1", "driver")
        p = await joined("passenger-1", "passenger")
        assert await recv_json(p) == {"type": "participant_joined", "role": "driver"}
        assert await recv_json(d) == {"type": "participant_joined", "role": "passenger"}
        for attempt in (None, "x" * 43, tokens["passenger"]):
            intruder = await server.ws()
            message = {"type": "authenticate", "session_id": session["session_id"], "user_id": "driver-1"}
            if attempt is not None:
                message["token"] = attempt
            await send_json(intruder, message)
            assert await recv_json(intruder) == {"type": "unauthorized", "reason": "invalid_token"}
            assert await closed_with(intruder) == 4001
        offer = {"type": "offer", "sdp": "v=0 real driver"}
        await send_json(d, offer)
        assert await recv_json(p) == offer  # the real driver was never replaced
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000

    asyncio.run(scenario())
    assert server.stop() == 0
    for secret in (API_KEY, *tokens.values()):
        assert secret not in server.log
    assert "reason=invalid_token" in server.log


@pytest.mark.parametrize("mode", ["off", "optional"])
def test_apps_without_tokens_keep_working(server_factory, mode) -> None:
    """The seed's apps send no token: they join under off and optional."""
    server = server_factory(PARTICIPANT_TOKENS=mode)
    session = server.new_session(ride_id=f"no-token-{mode}")

    async def scenario() -> None:
        d, p = await connected_call(server, session)
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000

    asyncio.run(scenario())
