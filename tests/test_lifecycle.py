"""Unit tests of the session and connection state machines (SPEC §4 rules 1–3,
5, 6; end reasons SPEC §5). Legal and illegal moves are derived from the
transition tables, then the tables themselves are checked against the SPEC."""

from __future__ import annotations

import itertools

import pytest

from intaleq_signal.lifecycle import (
    CONNECTION_TRANSITIONS,
    SESSION_TRANSITIONS,
    ConnectionLifecycle,
    ConnectionState,
    EndReason,
    LifecycleError,
    SessionLifecycle,
    SessionState,
)

S = SessionState
C = ConnectionState


def session_in(state: SessionState) -> SessionLifecycle:
    lifecycle = SessionLifecycle()
    lifecycle.state = state
    return lifecycle


def connection_in(state: ConnectionState) -> ConnectionLifecycle:
    lifecycle = ConnectionLifecycle()
    lifecycle.state = state
    return lifecycle


def move_session(lifecycle: SessionLifecycle, target: SessionState, reason: EndReason | None) -> None:
    """Request ``target`` through the public method that leads there."""
    if target is S.WAITING:
        lifecycle.first_join()
    elif target is S.ACTIVE:
        lifecycle.activate()
    elif target is S.ENDED:
        lifecycle.end(reason)  # type: ignore[arg-type]
    else:  # nothing leads back to CREATED: only the internal move can ask for it
        lifecycle._move(target)


def move_connection(lifecycle: ConnectionLifecycle, target: ConnectionState) -> None:
    if target is C.AUTHENTICATED:
        lifecycle.authenticate()
    elif target is C.REPLACED:
        lifecycle.replace()
    elif target is C.CLOSED:
        lifecycle.close()
    else:
        lifecycle._move(target)


LEGAL_SESSION_MOVES = [
    (source, target, reason)
    for source, targets in SESSION_TRANSITIONS.items()
    for target, reasons in targets.items()
    for reason in (sorted(reasons) if target is S.ENDED else [None])
]

ILLEGAL_SESSION_MOVES = [
    (source, target, reason)
    for source, target in itertools.product(S, S)
    for reason in (list(EndReason) if target is S.ENDED else [None])
    if target not in SESSION_TRANSITIONS[source]
    or (target is S.ENDED and reason not in SESSION_TRANSITIONS[source][target])
]


def _id(value: object) -> str:
    return getattr(value, "value", str(value))


# -- session: derived from the table ------------------------------------------


def test_tables_cover_every_state():
    """SPEC §4 rule 3: every state has a row in the transition tables."""
    assert set(SESSION_TRANSITIONS) == set(S)
    assert set(CONNECTION_TRANSITIONS) == set(C)


@pytest.mark.parametrize("source, target, reason", LEGAL_SESSION_MOVES, ids=_id)
def test_legal_session_transition(source, target, reason):
    """SPEC §4 rule 3: every move in the session table is allowed."""
    lifecycle = session_in(source)
    move_session(lifecycle, target, reason)
    assert lifecycle.state is target
    assert lifecycle.end_reason is reason
    assert lifecycle.live is (target is not S.ENDED)


@pytest.mark.parametrize("source, target, reason", ILLEGAL_SESSION_MOVES, ids=_id)
def test_illegal_session_transition(source, target, reason):
    """SPEC §4 rule 3: every move not in the table raises LifecycleError and changes nothing."""
    lifecycle = session_in(source)
    with pytest.raises(LifecycleError):
        move_session(lifecycle, target, reason)
    assert lifecycle.state is source
    assert lifecycle.end_reason is None


def test_illegal_moves_were_enumerated():
    """SPEC §4 rule 3: the illegal set is not empty and disjoint from the legal one."""
    assert ILLEGAL_SESSION_MOVES
    assert not set(LEGAL_SESSION_MOVES) & set(ILLEGAL_SESSION_MOVES)
    every = {(s, t, r) for s, t in itertools.product(S, S) for r in (EndReason if t is S.ENDED else [None])}
    assert set(LEGAL_SESSION_MOVES) | set(ILLEGAL_SESSION_MOVES) == every


@pytest.mark.parametrize("reason", list(EndReason), ids=_id)
def test_ended_is_terminal(reason):
    """SPEC §4 rule 3: an ended session never ends again nor comes back, and keeps its reason."""
    lifecycle = session_in(S.ACTIVE)
    lifecycle.end(EndReason.USER_TERMINATED)
    with pytest.raises(LifecycleError):
        lifecycle.end(reason)
    for step in (lifecycle.first_join, lifecycle.activate):
        with pytest.raises(LifecycleError):
            step()
    assert lifecycle.state is S.ENDED
    assert lifecycle.end_reason is EndReason.USER_TERMINATED


# -- session: the table checked against the SPEC -------------------------------


def test_new_session_starts_created():
    """SPEC §4 rule 3: a session starts in `created`, live, without end reason."""
    lifecycle = SessionLifecycle()
    assert lifecycle.state is S.CREATED
    assert lifecycle.live
    assert lifecycle.end_reason is None


def test_full_call_path():
    """SPEC §4 rule 3: created → first join → active → ended (max_duration_reached)."""
    lifecycle = SessionLifecycle()
    lifecycle.first_join()
    assert lifecycle.state is S.WAITING
    lifecycle.activate()
    assert lifecycle.state is S.ACTIVE
    lifecycle.end(EndReason.MAX_DURATION_REACHED)
    assert (lifecycle.state, lifecycle.end_reason) == (S.ENDED, EndReason.MAX_DURATION_REACHED)
    assert not lifecycle.live


def test_cannot_activate_before_first_join():
    """SPEC §4 rule 3: active needs both participants, so never straight from created."""
    with pytest.raises(LifecycleError):
        SessionLifecycle().activate()


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
def test_end_reason_legal_only_in_its_states(reason, legal_from):
    """SPEC §4 rules 3, 5, 6, §5: each end reason is legal exactly in the states the SPEC allows."""
    # max_duration/disconnect only from active, expired only before it, end_call and shutdown from
    # any live state, server_restart never (only for rows a killed process left open).
    for state in S:
        lifecycle = session_in(state)
        if state in legal_from:
            lifecycle.end(reason)
            assert lifecycle.end_reason is reason
        else:
            with pytest.raises(LifecycleError):
                lifecycle.end(reason)


def test_end_reason_values_match_call_log():
    """SPEC §5: the end reasons written to call_logs."""
    assert {r.value for r in EndReason} == {
        "user_terminated",
        "max_duration_reached",
        "disconnect_driver",
        "disconnect_passenger",
        "expired",
        "server_shutdown",
        "server_restart",
    }
    assert str(EndReason.EXPIRED) == "expired"


def test_error_message_names_states():
    """LifecycleError says which move was refused (a programming error should be easy to find)."""
    with pytest.raises(LifecycleError, match="active.*ended.*expired"):
        session_in(S.ACTIVE).end(EndReason.EXPIRED)


# -- connection ---------------------------------------------------------------

LEGAL_CONNECTION_MOVES = [
    (s, t) for s, targets in CONNECTION_TRANSITIONS.items() for t in sorted(targets, key=str)
]
ILLEGAL_CONNECTION_MOVES = [
    (s, t)
    for s, t in itertools.product(C, C)
    if t not in CONNECTION_TRANSITIONS[s] and not (s is t is C.CLOSED)
]


@pytest.mark.parametrize("source, target", LEGAL_CONNECTION_MOVES, ids=_id)
def test_legal_connection_transition(source, target):
    """SPEC §4 rules 1, 2: every move in the connection table is allowed."""
    lifecycle = connection_in(source)
    move_connection(lifecycle, target)
    assert lifecycle.state is target


@pytest.mark.parametrize("source, target", ILLEGAL_CONNECTION_MOVES, ids=_id)
def test_illegal_connection_transition(source, target):
    """SPEC §4 rules 1, 2: every move not in the table raises LifecycleError and changes nothing."""
    lifecycle = connection_in(source)
    with pytest.raises(LifecycleError):
        move_connection(lifecycle, target)
    assert lifecycle.state is source


def test_connection_path():
    """SPEC §4 rules 1, 2: connected → authenticated → replaced → closed."""
    lifecycle = ConnectionLifecycle()
    assert lifecycle.state is C.CONNECTED
    lifecycle.authenticate()
    lifecycle.replace()
    assert lifecycle.state is C.REPLACED
    assert lifecycle.close() is True
    assert lifecycle.state is C.CLOSED


def test_connection_cannot_be_replaced_before_authentication():
    """SPEC §4 rule 2: only an authenticated socket can be replaced."""
    with pytest.raises(LifecycleError):
        ConnectionLifecycle().replace()


def test_connection_cannot_authenticate_twice():
    """SPEC §4 rule 1: a second authenticate is refused by the machine (already_authenticated)."""
    lifecycle = ConnectionLifecycle()
    lifecycle.authenticate()
    with pytest.raises(LifecycleError):
        lifecycle.authenticate()


@pytest.mark.parametrize("state", [C.CONNECTED, C.AUTHENTICATED, C.REPLACED], ids=_id)
def test_close_is_idempotent(state):
    """SPEC §4 rule 2: closing twice (both sides at once) is fine; the second close returns False."""
    lifecycle = connection_in(state)
    assert lifecycle.close() is True
    assert lifecycle.close() is False
    assert lifecycle.close() is False
    assert lifecycle.state is C.CLOSED
