"""Unit tests of the state machines: the session and connection lifecycles
(docs/protocol.md, rules 1–3, 5, 6 and "End reasons") and the HTTP front's
request states. Every (state, event) pair of each table is tried: a legal
one moves to its target, any other raises LifecycleError and changes
nothing. Then the tables themselves are checked against the protocol."""

from __future__ import annotations

import itertools

import pytest

from intaleq_signal.front import FRONT_TRANSITIONS, FrontEvent, FrontState
from intaleq_signal.lifecycle import (
    CONNECTION_TRANSITIONS,
    END_EVENTS,
    SESSION_TRANSITIONS,
    ConnectionEvent,
    ConnectionLifecycle,
    ConnectionState,
    EndReason,
    LifecycleError,
    SessionEvent,
    SessionLifecycle,
    SessionState,
    transition,
)

S, SE = SessionState, SessionEvent
C, CE = ConnectionState, ConnectionEvent
F, FE = FrontState, FrontEvent

SESSION_PAIRS = list(itertools.product(S, SE))
CONNECTION_PAIRS = list(itertools.product(C, CE))
FRONT_PAIRS = list(itertools.product(F, FE))


def _id(value: object) -> str:
    return getattr(value, "name", str(value)).lower()


def session_in(state: SessionState) -> SessionLifecycle:
    lifecycle = SessionLifecycle()
    lifecycle.state = state
    return lifecycle


def connection_in(state: ConnectionState) -> ConnectionLifecycle:
    lifecycle = ConnectionLifecycle()
    lifecycle.state = state
    return lifecycle


# -- every (state, event) pair ------------------------------------------------


@pytest.mark.parametrize("state, event", SESSION_PAIRS, ids=_id)
def test_session_pair(state: SessionState, event: SessionEvent) -> None:
    """docs/protocol.md, rule 3: a pair in SESSION_TRANSITIONS moves to its target (an end event
    sets the end reason); any other raises LifecycleError and changes nothing."""
    lifecycle = session_in(state)
    target = SESSION_TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(LifecycleError):
            lifecycle.handle(event)
        assert (lifecycle.state, lifecycle.end_reason) == (state, None)
        return
    lifecycle.handle(event)
    assert lifecycle.state is target
    if target is S.ENDED:
        assert lifecycle.end_reason is EndReason[event.name]
        assert not lifecycle.live
    else:
        assert lifecycle.end_reason is None
        assert lifecycle.live


@pytest.mark.parametrize("state, event", CONNECTION_PAIRS, ids=_id)
def test_connection_pair(state: ConnectionState, event: ConnectionEvent) -> None:
    """docs/protocol.md, rules 1, 2: a pair in CONNECTION_TRANSITIONS moves to its target;
    any other raises LifecycleError and changes nothing."""
    lifecycle = connection_in(state)
    target = CONNECTION_TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(LifecycleError):
            lifecycle.handle(event)
        assert lifecycle.state is state
    else:
        lifecycle.handle(event)
        assert lifecycle.state is target


@pytest.mark.parametrize("state, event", FRONT_PAIRS, ids=_id)
def test_front_pair(state: FrontState, event: FrontEvent) -> None:
    """The HTTP front: a pair in FRONT_TRANSITIONS gives its target; any other raises LifecycleError."""
    target = FRONT_TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(LifecycleError):
            transition(FRONT_TRANSITIONS, state, event)
    else:
        assert transition(FRONT_TRANSITIONS, state, event) is target


def test_error_names_the_state_and_the_event() -> None:
    """LifecycleError says which move was refused (a programming error should be easy to find)."""
    with pytest.raises(LifecycleError, match="SessionState active has no move on expired"):
        session_in(S.ACTIVE).handle(SE.EXPIRED)
    with pytest.raises(LifecycleError, match="ConnectionState connected has no move on replace"):
        ConnectionLifecycle().handle(CE.REPLACE)


# -- the session table against the protocol -----------------------------------


def test_tables_use_only_their_own_states_and_events() -> None:
    for table, states, events in (
        (SESSION_TRANSITIONS, S, SE),
        (CONNECTION_TRANSITIONS, C, CE),
        (FRONT_TRANSITIONS, F, FE),
    ):
        for (state, event), target in table.items():
            assert (type(state), type(event), type(target)) == (states, events, states)


def test_every_state_is_reachable_and_every_event_used() -> None:
    """No dead rows: each state but the initial one is some move's target, each event some move's."""
    for table, initial, events in (
        (SESSION_TRANSITIONS, S.CREATED, set(SE) - {SE.SERVER_RESTART}),
        (CONNECTION_TRANSITIONS, C.CONNECTED, set(CE)),
        (FRONT_TRANSITIONS, F.HEAD, set(FE)),
    ):
        assert set(table.values()) | {initial} == set(type(initial))
        assert {event for _, event in table} == events


def test_new_session_starts_created() -> None:
    """docs/protocol.md, rule 3: a session starts in `created`, live, without end reason."""
    lifecycle = SessionLifecycle()
    assert (lifecycle.state, lifecycle.end_reason, lifecycle.live) == (S.CREATED, None, True)


def test_full_call_path() -> None:
    """docs/protocol.md, rule 3: created → first join → active → ended (max_duration_reached)."""
    lifecycle = SessionLifecycle()
    for event, state in (
        (SE.FIRST_JOIN, S.WAITING),
        (SE.BOTH_CONNECTED, S.ACTIVE),
        (SE.MAX_DURATION_REACHED, S.ENDED),
    ):
        lifecycle.handle(event)
        assert lifecycle.state is state
    assert lifecycle.end_reason is EndReason.MAX_DURATION_REACHED


@pytest.mark.parametrize(
    "reason, legal_from",
    [
        (EndReason.MAX_DURATION_REACHED, {S.ACTIVE}),
        (EndReason.DISCONNECT_DRIVER, {S.ACTIVE}),
        (EndReason.DISCONNECT_PASSENGER, {S.ACTIVE}),
        (EndReason.EXPIRED, {S.CREATED, S.WAITING}),
        (EndReason.USER_TERMINATED, {S.CREATED, S.WAITING, S.ACTIVE}),
        (EndReason.SERVER_SHUTDOWN, {S.CREATED, S.WAITING, S.ACTIVE}),
        (EndReason.SERVER_RESTART, set()),
    ],
    ids=_id,
)
def test_end_reason_legal_only_in_its_states(reason: EndReason, legal_from: set[SessionState]) -> None:
    """docs/protocol.md, rules 3, 5, 6 and "End reasons": max_duration and disconnects only while active,
    expired only before, end_call and shutdown from any live state, server_restart never (call log only)."""
    assert {state for state in S if (state, END_EVENTS[reason]) in SESSION_TRANSITIONS} == legal_from
    for state in S:
        lifecycle = session_in(state)
        if state in legal_from:
            lifecycle.end(reason)
            assert (lifecycle.state, lifecycle.end_reason) == (S.ENDED, reason)
        else:
            with pytest.raises(LifecycleError):
                lifecycle.end(reason)


def test_ended_is_terminal() -> None:
    """docs/protocol.md, rule 3: an ended session never moves again and keeps its first reason."""
    lifecycle = session_in(S.ACTIVE)
    lifecycle.end(EndReason.USER_TERMINATED)
    for event in SE:
        with pytest.raises(LifecycleError):
            lifecycle.handle(event)
    assert (lifecycle.state, lifecycle.end_reason) == (S.ENDED, EndReason.USER_TERMINATED)


def test_one_end_event_per_reason() -> None:
    """docs/protocol.md, "End reasons": each end reason has its event of the same name."""
    assert {reason: event.name for reason, event in END_EVENTS.items()} == {r: r.name for r in EndReason}
    assert {r.value for r in EndReason} == {
        "user_terminated",
        "max_duration_reached",
        "disconnect_driver",
        "disconnect_passenger",
        "expired",
        "server_shutdown",
        "server_restart",
    }


# -- the connection table against the protocol ---------------------------------


def test_connection_path() -> None:
    """docs/protocol.md, rules 1, 2: connected → authenticated → replaced → closed."""
    lifecycle = ConnectionLifecycle()
    assert lifecycle.state is C.CONNECTED
    lifecycle.handle(CE.AUTHENTICATE)
    lifecycle.handle(CE.REPLACE)
    assert lifecycle.state is C.REPLACED
    assert lifecycle.close() is True
    assert lifecycle.state is C.CLOSED


@pytest.mark.parametrize("state", list(C), ids=_id)
def test_close_is_idempotent(state: ConnectionState) -> None:
    """docs/protocol.md, rule 2: closing twice (both sides at once) is fine; the first close() says True."""
    lifecycle = connection_in(state)
    assert lifecycle.close() is (state is not C.CLOSED)
    assert lifecycle.close() is False
    assert lifecycle.state is C.CLOSED


# -- the HTTP front's table ------------------------------------------------------


def test_front_paths() -> None:
    """docs/protocol.md, "Anything else": a request is read whole then answered or handed on; a malformed
    head is answered at once; refused body framing skips the body."""

    def walk(*events: FrontEvent) -> FrontState:
        state = F.HEAD
        for event in events:
            state = transition(FRONT_TRANSITIONS, state, event)
        return state

    assert walk(FE.HEAD_COMPLETE, FE.BODY_COMPLETE, FE.UPGRADE_HANDED_ON) is F.HANDED_ON
    assert walk(FE.HEAD_COMPLETE, FE.BODY_COMPLETE, FE.ANSWERED) is F.ANSWERED
    assert walk(FE.FRAMING_REFUSED, FE.ANSWERED) is F.ANSWERED
    assert walk(FE.ANSWERED) is F.ANSWERED
    with pytest.raises(LifecycleError):  # an upgrade with a refused framing is answered, never handed on
        walk(FE.FRAMING_REFUSED, FE.UPGRADE_HANDED_ON, FE.ANSWERED)
    for final in (F.ANSWERED, F.HANDED_ON):
        assert not [event for state, event in FRONT_TRANSITIONS if state is final]
