"""Unit tests of the session registry, the message hold queue (docs/protocol.md,
"POST /sessions", rule 4 and "Precise points") and the POST /sessions
body validation."""

from __future__ import annotations

import json
import uuid

import pytest

from intaleq_signal.lifecycle import EndReason, LifecycleError, SessionState
from intaleq_signal.sessions import (
    HOLD_MAX_BYTES,
    HOLD_MAX_MESSAGES,
    Capacity,
    Registry,
    RideConflict,
    Seat,
    new_session_id,
)

T0 = 1000.0


def registry(duration: float = 60.0, max_sessions: int = 100) -> Registry:
    return Registry(duration=duration, max_sessions=max_sessions)


# -- Registry.create ----------------------------------------------------------


def test_create_new_session():
    """docs/protocol.md, "POST /sessions": POST /sessions creates a session with a UUID4
    session_id for the ride."""
    reg = registry()
    session, created = reg.create("ride-1", "drv", "pas", T0)
    assert created is True
    assert uuid.UUID(session.session_id).version == 4
    assert (session.ride_id, session.driver.user_id, session.passenger.user_id) == ("ride-1", "drv", "pas")
    assert (session.driver.role, session.passenger.role) == ("driver", "passenger")
    assert session.state is SessionState.CREATED
    assert reg.by_id[session.session_id] is session
    assert reg.live == 1


def test_session_ids_are_unique():
    """docs/protocol.md, "POST /sessions": every new session gets its own UUID4."""
    reg = registry(max_sessions=1000)
    ids = {reg.create(f"ride-{i}", "d", "p", T0)[0].session_id for i in range(200)}
    assert len(ids) == 200


def test_same_participants_get_the_same_session():
    """docs/protocol.md, "POST /sessions": a POST for a ride with a live session and the same
    participants returns that session."""
    reg = registry()
    first, _ = reg.create("ride-1", "drv", "pas", T0)
    again, created = reg.create("ride-1", "drv", "pas", T0 + 10)
    assert again is first
    assert created is False
    assert reg.live == 1


@pytest.mark.parametrize(
    "driver, passenger",
    [("other", "pas"), ("drv", "other"), ("pas", "drv"), ("x", "y")],
)
def test_different_participants_conflict(driver, passenger):
    """docs/protocol.md, "POST /sessions": a POST for a ride with a live session and other
    participants → 409 ride_conflict."""
    reg = registry()
    reg.create("ride-1", "drv", "pas", T0)
    with pytest.raises(RideConflict):
        reg.create("ride-1", driver, passenger, T0 + 1)
    assert reg.live == 1


def test_capacity():
    """docs/protocol.md, "POST /sessions": at MAX_SESSIONS live sessions, a new session → 503."""
    reg = registry(max_sessions=2)
    reg.create("r1", "d", "p", T0)
    reg.create("r2", "d", "p", T0)
    with pytest.raises(Capacity):
        reg.create("r3", "d", "p", T0)
    assert reg.live == 2
    assert "r3" not in reg.by_ride


def test_repost_allowed_at_capacity():
    """docs/protocol.md, "POST /sessions": a re-POST that returns an existing session is not
    refused for capacity."""
    reg = registry(max_sessions=1)
    first, _ = reg.create("r1", "d", "p", T0)
    assert reg.create("r1", "d", "p", T0 + 1) == (first, False)


def test_conflict_checked_before_capacity():
    """docs/protocol.md, "POST /sessions" (the order of the checks): ride conflict (409) before
    capacity (503)."""
    reg = registry(max_sessions=1)
    reg.create("r1", "d", "p", T0)
    with pytest.raises(RideConflict):
        reg.create("r1", "d", "other", T0)


def test_not_accepting_refuses_new_sessions():
    """docs/protocol.md, "POST /sessions": while shutting down, POST /sessions → 503."""
    reg = registry()
    with pytest.raises(Capacity):
        reg.create("r1", "d", "p", T0, accepting=False)
    assert reg.live == 0
    assert not reg.by_id


def test_end_frees_the_ride_and_capacity():
    """docs/protocol.md, "POST /sessions": an ended session is not live, so the ride can get a
    new session (and capacity frees up)."""
    reg = registry(max_sessions=1)
    old, _ = reg.create("r1", "d", "p", T0)
    reg.end(old, EndReason.USER_TERMINATED, T0 + 5)
    assert old.state is SessionState.ENDED
    assert old.ended == T0 + 5
    assert reg.live == 0
    assert "r1" not in reg.by_ride
    new, created = reg.create("r1", "d", "p", T0 + 6)
    assert created is True
    assert new.session_id != old.session_id
    assert reg.live == 1


def test_ended_session_is_remembered_until_forget():
    """docs/protocol.md, "Precise points": an ended session stays findable by id
    (session_ended, not not_found)."""
    reg = registry()
    session, _ = reg.create("r1", "d", "p", T0)
    reg.end(session, EndReason.EXPIRED, T0 + 60)
    assert reg.by_id[session.session_id] is session
    reg.forget(session)
    assert session.session_id not in reg.by_id
    reg.forget(session)  # forgetting twice is harmless


def test_end_twice_raises():
    """docs/protocol.md, rule 3: ending an ended session is a programming error."""
    reg = registry()
    session, _ = reg.create("r1", "d", "p", T0)
    reg.end(session, EndReason.USER_TERMINATED, T0)
    with pytest.raises(LifecycleError):
        reg.end(session, EndReason.EXPIRED, T0)


def test_end_with_illegal_reason_changes_nothing():
    """docs/protocol.md, rule 3: max_duration_reached is refused for a session that never became active."""
    reg = registry()
    session, _ = reg.create("r1", "d", "p", T0)
    with pytest.raises(LifecycleError):
        reg.end(session, EndReason.MAX_DURATION_REACHED, T0)
    assert reg.by_ride["r1"] is session
    assert session.ended is None


def test_expired_session_is_not_live():
    """docs/protocol.md, "POST /sessions": one live session per ride — a session past its
    deadline is not returned again."""
    reg = registry(duration=60)
    old, _ = reg.create("r1", "d", "p", T0)
    assert reg.create("r1", "d", "p", T0 + 59.9) == (old, False)
    new, created = reg.create("r1", "d", "p", T0 + 60)
    assert created is True and new is not old
    assert reg.by_ride["r1"] is new
    assert reg.by_id[old.session_id] is old
    # the old session's expiry timer fires late: it must not unregister the new one
    reg.end(old, EndReason.EXPIRED, T0 + 61.5)
    assert reg.by_ride["r1"] is new
    assert reg.live == 1


def test_expired_session_with_other_participants_is_no_conflict():
    """docs/protocol.md, "POST /sessions": 409 only against a session that is neither ended nor expired."""
    reg = registry(duration=60)
    reg.create("r1", "d", "p", T0)
    new, created = reg.create("r1", "d2", "p2", T0 + 60)
    assert created and new.driver.user_id == "d2"


# -- expires_in ---------------------------------------------------------------


@pytest.mark.parametrize(
    "duration, elapsed, expected",
    [
        (60, 0, 60),
        (60, 0.5, 60),
        (60, 1, 59),
        (60, 59.01, 1),
        (60, 59.999, 1),
        (60, 60, 0),
        (60, 500, 0),
        (2.5, 0, 3),
        (0.2, 0, 1),
    ],
)
def test_expires_in_rounds_up(duration, elapsed, expected):
    """docs/protocol.md, "POST /sessions": expires_in is whole seconds, rounded up, of the time
    left (never negative)."""
    session, _ = registry(duration=duration).create("r1", "d", "p", T0)
    assert session.expires_in(T0 + elapsed) == expected


def test_expires_in_of_repost_is_the_remaining_time():
    """docs/protocol.md, "POST /sessions": a re-POST returns the same session with the
    remaining expires_in."""
    reg = registry(duration=60)
    reg.create("r1", "d", "p", T0)
    session, _ = reg.create("r1", "d", "p", T0 + 20.5)
    assert session.expires_in(T0 + 20.5) == 40


def test_expires_in_follows_the_deadline():
    """docs/protocol.md, "POST /sessions": for an active call, expires_in counts to
    call_timeout (the deadline moves at activation)."""
    session, _ = registry(duration=60).create("r1", "d", "p", T0)
    session.deadline = T0 + 30 + 60  # activated at T0 + 30 by the signaling layer
    assert session.expires_in(T0 + 45) == 45


# -- Session helpers ----------------------------------------------------------


def test_seat_of_and_other():
    """docs/protocol.md, rule 1: the role comes from the session's ids; anyone else is not in the session."""
    session, _ = registry().create("r1", "drv", "pas", T0)
    assert session.seat_of("drv") is session.driver
    assert session.seat_of("pas") is session.passenger
    assert session.seat_of("stranger") is None
    assert session.other(session.driver) is session.passenger
    assert session.other(session.passenger) is session.driver


# -- Seat hold queue ----------------------------------------------------------


def test_hold_64_messages():
    """docs/protocol.md, rule 4: up to 64 messages are held for an absent participant."""
    seat = Seat("passenger", "p")
    assert HOLD_MAX_MESSAGES == 64
    assert all(seat.hold(f"m{i}") for i in range(64))
    assert seat.hold("m64") is False
    assert seat.take_held() == [f"m{i}" for i in range(64)]


def test_hold_16_kib():
    """docs/protocol.md, rule 4: at most 16 KiB in all are held; a message that does not fit is refused."""
    seat = Seat("passenger", "p")
    assert HOLD_MAX_BYTES == 16 * 1024
    assert seat.hold("a" * 16000)
    assert seat.hold("b" * 500) is False
    assert seat.hold("c" * 384)  # exactly fills 16 KiB
    assert seat.hold("d") is False
    assert seat.take_held() == ["a" * 16000, "c" * 384]


def test_hold_single_message_over_16_kib_refused():
    """docs/protocol.md, rule 4: a single message larger than 16 KiB is never held."""
    seat = Seat("driver", "d")
    assert seat.hold("x" * (16 * 1024 + 1)) is False
    assert seat.hold("x" * (16 * 1024)) is True


def test_hold_bound_counts_utf8_bytes():
    """docs/protocol.md, rule 4: the 16 KiB hold bound counts bytes on the wire, not characters."""
    # 9000 two-byte characters are 18 000 bytes as relayed (messages.encode uses ensure_ascii=False).
    seat = Seat("driver", "d")
    assert seat.hold("é" * 9000) is False


def test_take_held_order_and_reset():
    """docs/protocol.md, rule 4: held messages are delivered in order, then the queue starts empty again."""
    seat = Seat("driver", "d")
    assert seat.take_held() == []
    for text in ("offer", "cand-1", "cand-2"):
        assert seat.hold(text)
    assert seat.take_held() == ["offer", "cand-1", "cand-2"]
    assert seat.take_held() == []
    assert seat.held_bytes == 0
    # both bounds are fresh after a take
    assert all(seat.hold("y" * 256) for _ in range(64))
    assert seat.hold("z") is False
    assert len(seat.take_held()) == 64


def test_each_direction_has_its_own_bound():
    """docs/protocol.md, "Precise points": each direction (seat) has its own hold bound."""
    session, _ = registry().create("r1", "d", "p", T0)
    assert all(session.driver.hold("to-driver") for _ in range(64))
    assert session.driver.hold("to-driver") is False
    assert session.passenger.hold("to-passenger") is True


# -- POST /sessions body ------------------------------------------------------


def body(**fields: object) -> bytes:
    base: dict[str, object] = {"ride_id": "ride-1", "driver_id": "drv", "passenger_id": "pas"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def validate_session_body(data: bytes) -> tuple[str, str, str]:
    # Imported here so that the registry tests above do not depend on the
    # HTTP layer (http_api imports websockets and the wire module).
    from intaleq_signal.http_api import validate_session_body

    return validate_session_body(data)


def bad_request(data: bytes):
    from intaleq_signal.exceptions import Refusal as BadRequest

    with pytest.raises(BadRequest) as info:
        validate_session_body(data)
    assert info.value.http_status == 400
    return info.value


def test_valid_body():
    """docs/protocol.md, "POST /sessions": body with ride_id, driver_id, passenger_id non-empty strings."""
    assert validate_session_body(body()) == ("ride-1", "drv", "pas")
    assert validate_session_body(body(extra=1)) == ("ride-1", "drv", "pas")


@pytest.mark.parametrize("value", ["r" * 255, "é" * 255, "\U0001f697" * 255])
def test_body_255_code_points(value):
    """docs/protocol.md, "POST /sessions" and "Precise points": at most 255 characters, counted
    in code points."""
    assert validate_session_body(body(ride_id=value))[0] == value


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"{", b'{"ride_id": NaN}', b"\xff\xfe{}", b'{"ride_id":"r",}'],
)
def test_body_not_json(data):
    """docs/protocol.md, "POST /sessions": not JSON → 400 invalid_json."""
    assert bad_request(data).code == "invalid_json"


@pytest.mark.parametrize("data", [b"[]", b"1", b'"x"', b"null"])
def test_body_not_an_object(data):
    """docs/protocol.md, "POST /sessions": anything but a JSON object → 400 invalid_request."""
    assert bad_request(data).code == "invalid_request"


@pytest.mark.parametrize("field", ["ride_id", "driver_id", "passenger_id"])
@pytest.mark.parametrize("value", [..., None, "", 5, ["x"], {"x": "y"}, True, "x" * 256])
def test_body_bad_field_is_named(field, value):
    """docs/protocol.md, "POST /sessions": a missing, empty, non-string or over-long field →
    400 invalid_request naming the field."""
    error = bad_request(body(**{field: value}))
    assert error.code == "invalid_request"
    assert field in error.message


def test_body_same_driver_and_passenger():
    """docs/protocol.md, "POST /sessions": driver and passenger must differ."""
    error = bad_request(body(driver_id="same", passenger_id="same"))
    assert error.code == "invalid_request"
    assert "passenger_id" in error.message


def test_body_deeply_nested_is_invalid_json():
    """docs/protocol.md, "POST /sessions": a pathological body is a 400, never a crash."""
    assert bad_request(b"[" * 100_000).code == "invalid_json"


def test_body_lone_surrogate_escape_refused():
    """docs/protocol.md, "POST /sessions": an id that is not encodable as UTF-8 (lone surrogate
    escape) is a 400."""
    # "\ud800" is valid JSON, but the call-log INSERT and the `authenticated` frame cannot encode it.
    bad_request(b'{"ride_id":"r","driver_id":"d\\ud800","passenger_id":"p"}')


def test_new_session_id_is_a_random_uuid4_in_canonical_text() -> None:
    """RFC 9562 §5.4: version 4, variant 10xx; 36 lower-case characters, as
    ``str(uuid.uuid4())`` writes them."""
    ids = [new_session_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    assert {text[19] for text in ids} == set("89ab")  # every variant digit occurs
