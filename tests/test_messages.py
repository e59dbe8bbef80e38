"""Unit tests of the WebSocket message shapes (docs/protocol.md: "Client → server", "Server → client", rules
4 and 7)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from intaleq_signal import messages as m
from intaleq_signal.messages import MessageError, decode, parse_authenticate, parse_media_state, relay_payload

CANDIDATE_KEYS = {"candidate", "sdpMid", "sdpMLineIndex", "usernameFragment"}
FULL_CANDIDATE = {
    "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host",
    "sdpMid": "0",
    "sdpMLineIndex": 0,
    "usernameFragment": "abcd",
}


def relay(obj: dict) -> dict:
    """decode + relay_payload of ``obj`` as a client would send it, parsed back."""
    kind, parsed = decode(json.dumps(obj))
    return json.loads(relay_payload(kind, parsed))


def refused(text: str) -> MessageError:
    with pytest.raises(MessageError) as info:
        kind, obj = decode(text)
        if kind in m.RELAYED_TYPES:
            relay_payload(kind, obj)
    return info.value


# -- decode -------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "authenticate", "session_id": "s", "user_id": "u"},
        {"type": "offer", "sdp": "v=0\r\n"},
        {"type": "answer", "sdp": "v=0\r\n"},
        {"type": "ice_candidate", "candidate": FULL_CANDIDATE},
        {"type": "ice_candidate", "candidate": None},
        {"type": "heartbeat"},
        {"type": "end_call"},
        {"type": "media_state", "state": "connected", "candidate_type": "relay", "rtt_ms": 12.5},
    ],
    ids=lambda o: o["type"],
)
def test_decode_valid(obj):
    """docs/protocol.md, "Client → server": every message type decodes to (type, object)."""
    kind, parsed = decode(json.dumps(obj))
    assert kind == obj["type"]
    assert parsed == obj


def test_decode_ignores_extra_fields():
    """docs/protocol.md, "Client → server": unknown fields do not make a known message invalid (they are just
    never echoed)."""
    assert decode('{"type":"heartbeat","extra":[1,2,{"x":null}]}')[0] == "heartbeat"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "{",
        "not json",
        "{'type': 'heartbeat'}",
        '{"type":"heartbeat",}',
        '{"type":"heartbeat"} trailing',
        '{"type":"heartbeat","x":NaN}',
        '{"type":"heartbeat","x":Infinity}',
        '{"type":"heartbeat","x":-Infinity}',
        "NaN",
        '{"type":"heartbeat","n":' + "1" * 5000 + "}",
    ],
)
def test_decode_invalid_json(text):
    """docs/protocol.md, rule 7: invalid JSON (NaN and Infinity included) → invalid_json."""
    with pytest.raises(MessageError) as info:
        decode(text)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize("text", ["[]", "[1]", "1", "1.5", '"heartbeat"', "null", "true"])
def test_decode_not_an_object(text):
    """docs/protocol.md, rule 7: not an object → invalid_message."""
    with pytest.raises(MessageError) as info:
        decode(text)
    assert info.value.code == "invalid_message"


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"sdp":"x"}',
        '{"type":1}',
        '{"type":null}',
        '{"type":["offer"]}',
        '{"type":{"offer":1}}',
        '{"type":true}',
    ],
)
def test_decode_missing_or_non_string_type(text):
    """docs/protocol.md, rule 7: missing or non-string type → invalid_message."""
    with pytest.raises(MessageError) as info:
        decode(text)
    assert info.value.code == "invalid_message"


@pytest.mark.parametrize("kind", ["", "Offer", "OFFER", "ping", "call_ended", "pong", "offer "])
def test_decode_unknown_type(kind):
    """docs/protocol.md, rule 7: unknown type → unknown_type."""
    with pytest.raises(MessageError) as info:
        decode(json.dumps({"type": kind}))
    assert info.value.code == "unknown_type"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
        '{"type":"offer","sdp":' + "[" * 100_000,
        '{"type":"heartbeat","x":' + "[" * 50_000 + "]" * 50_000 + "}",
    ],
    ids=["open-arrays", "closed-arrays", "open-objects", "inside-offer", "inside-heartbeat"],
)
def test_decode_deep_nesting_only_raises_message_error(text):
    """docs/protocol.md, rule 7: a deeply nested frame is a bad message, never a crash (no RecursionError
    escapes)."""
    with pytest.raises(MessageError) as info:
        decode(text)
    assert info.value.code in ("invalid_json", "invalid_message")


JSON_ALPHABET = '{}[]":, \\0123456789.-+eEtrueflsnulNaIiy\ud7ff\t\n'


@settings(max_examples=150)
@given(st.text(alphabet=JSON_ALPHABET, max_size=60) | st.text(max_size=200))
def test_decode_arbitrary_text_only_raises_message_error(text):
    """docs/protocol.md, rule 7: any text frame either decodes or is a MessageError with a documented error
    code."""
    try:
        kind, obj = decode(text)
    except MessageError as exc:
        assert exc.code in ("invalid_json", "invalid_message", "unknown_type")
    else:
        assert kind in m.KNOWN_TYPES and type(obj) is dict


# -- relay_payload ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["offer", "answer"])
def test_relay_sdp_drops_unknown_fields(kind):
    """docs/protocol.md, rule 4: offer/answer are rebuilt from `sdp` only; other client fields are not
    echoed."""
    out = relay({"type": kind, "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n", "from": "x", "session_id": "s"})
    assert out == {"type": kind, "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"}


@pytest.mark.parametrize("sdp", [None, "", 0, ["v=0"], {"sdp": "v=0"}, True])
@pytest.mark.parametrize("kind", ["offer", "answer"])
def test_relay_sdp_must_be_non_empty_string(kind, sdp):
    """docs/protocol.md, "Client → server": `sdp` is a non-empty string, else invalid_message naming the
    field."""
    error = refused(json.dumps({"type": kind, "sdp": sdp}))
    assert error.code == "invalid_message"
    assert "sdp" in error.message


@pytest.mark.parametrize("kind", ["offer", "answer"])
def test_relay_sdp_missing(kind):
    """docs/protocol.md, "Client → server": an offer/answer without `sdp` is invalid_message."""
    assert refused(json.dumps({"type": kind})).code == "invalid_message"


def test_relay_candidate_drops_unknown_fields():
    """docs/protocol.md, rule 4: a candidate is rebuilt from candidate/sdpMid/sdpMLineIndex/usernameFragment
    only."""
    out = relay(
        {
            "type": "ice_candidate",
            "candidate": {**FULL_CANDIDATE, "evil": "<script>", "relayProtocol": "udp"},
            "session_id": "s",
            "to": "driver",
        }
    )
    assert out == {"type": "ice_candidate", "candidate": FULL_CANDIDATE}


@pytest.mark.parametrize(
    "candidate",
    [
        {"candidate": "candidate:1"},
        {"candidate": "candidate:1", "sdpMid": None},
        {"candidate": "candidate:1", "sdpMLineIndex": None},
        {"candidate": "candidate:1", "sdpMid": "audio", "sdpMLineIndex": 3},
        {"candidate": "candidate:1", "usernameFragment": None},
        {"candidate": "candidate:1", "usernameFragment": "uf"},
        {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0},
        {"candidate": ""},
        {"candidate": "x", "sdpMLineIndex": 65535},
    ],
)
def test_relay_candidate_keeps_optional_fields_only_when_present(candidate):
    """docs/protocol.md, "Precise points": sdpMid/sdpMLineIndex/usernameFragment relayed as given, missing as
    missing."""
    out = relay({"type": "ice_candidate", "candidate": {**candidate, "junk": 1}})
    assert out == {"type": "ice_candidate", "candidate": candidate}


def test_relay_candidate_null():
    """docs/protocol.md, "Client → server": `candidate: null` (gathering complete) is relayed as given."""
    assert relay({"type": "ice_candidate", "candidate": None, "junk": 1}) == {
        "type": "ice_candidate",
        "candidate": None,
    }


@pytest.mark.parametrize(
    "candidate, field",
    [
        ("candidate:1", "candidate"),
        (["candidate:1"], "candidate"),
        (0, "candidate"),
        (True, "candidate"),
        ({}, "candidate.candidate"),
        ({"candidate": None}, "candidate.candidate"),
        ({"candidate": 5}, "candidate.candidate"),
        ({"candidate": "c", "sdpMid": 0}, "candidate.sdpMid"),
        ({"candidate": "c", "sdpMid": ["0"]}, "candidate.sdpMid"),
        ({"candidate": "c", "sdpMLineIndex": True}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "sdpMLineIndex": False}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "sdpMLineIndex": "0"}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "sdpMLineIndex": -1}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "sdpMLineIndex": 65536}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "sdpMLineIndex": 10**30}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "sdpMLineIndex": 1.0}, "candidate.sdpMLineIndex"),
        ({"candidate": "c", "usernameFragment": 1}, "candidate.usernameFragment"),
    ],
)
def test_relay_candidate_rejects_bad_fields(candidate, field):
    """docs/protocol.md, "Client → server": wrong field types → invalid_message naming the field."""
    error = refused(json.dumps({"type": "ice_candidate", "candidate": candidate}))
    assert error.code == "invalid_message"
    assert f"'{field}'" in error.message


def test_relay_candidate_missing():
    """docs/protocol.md, "Client → server": ice_candidate without `candidate` is invalid_message."""
    assert refused('{"type":"ice_candidate"}').code == "invalid_message"


def test_relay_output_is_compact_json_and_keeps_unicode():
    """docs/protocol.md, rule 4: the rebuilt message is one JSON object carrying the same sdp text."""
    sdp = "v=0\r\ns=مكالمة\r\n"
    out = relay_payload("offer", {"type": "offer", "sdp": sdp})
    assert json.loads(out) == {"type": "offer", "sdp": sdp}
    assert ", " not in out and ": " not in out


def test_relay_output_of_lone_surrogate_escape_is_sendable():
    """docs/protocol.md, rules 4 and 7: a relayed message is sendable as UTF-8, or refused as
    invalid_message."""
    # "\ud800" is valid JSON that decodes to a lone surrogate, which str.encode("utf-8") refuses.
    text = '{"type":"offer","sdp":"v=0 \\ud800"}'
    try:
        kind, obj = decode(text)
        out = relay_payload(kind, obj)
    except MessageError as exc:
        assert exc.code in ("invalid_json", "invalid_message")
    else:
        out.encode("utf-8")  # what Client.send does; raises UnicodeEncodeError today


# -- parse_authenticate -------------------------------------------------------


def test_parse_authenticate():
    """docs/protocol.md, "Client → server": authenticate carries string session_id and user_id."""
    assert parse_authenticate({"type": "authenticate", "session_id": "s-1", "user_id": "u-1", "x": 1}) == (
        "s-1",
        "u-1",
    )


@pytest.mark.parametrize("value", ["a" * 255, "é" * 255, "\U0001f600" * 255])
def test_parse_authenticate_255_code_points(value):
    """docs/protocol.md, "Precise points": lengths (255) count characters (code points)."""
    assert parse_authenticate({"session_id": value, "user_id": value}) == (value, value)


@pytest.mark.parametrize("field", ["session_id", "user_id"])
@pytest.mark.parametrize("value", [None, "", 5, ["x"], {"x": 1}, True, "a" * 256, "\U0001f600" * 256])
def test_parse_authenticate_bounds(field, value):
    """docs/protocol.md, "Precise points": a malformed authenticate is invalid_message naming the field."""
    obj = {"session_id": "s", "user_id": "u", field: value}
    with pytest.raises(MessageError) as info:
        parse_authenticate(obj)
    assert info.value.code == "invalid_message"
    assert field in info.value.message


@pytest.mark.parametrize("field", ["session_id", "user_id"])
def test_parse_authenticate_missing(field):
    """docs/protocol.md, "Precise points": authenticate without one of its fields is invalid_message."""
    obj = {"session_id": "s", "user_id": "u"}
    del obj[field]
    with pytest.raises(MessageError, match=field):
        parse_authenticate(obj)


# -- parse_media_state ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"state": "connecting"}, ("connecting", None)),
        ({"state": "connected"}, ("connected", None)),
        ({"state": "disconnected", "rtt_ms": 0}, ("disconnected", None)),
        ({"state": "failed", "candidate_type": None, "rtt_ms": None}, ("failed", None)),
        ({"state": "connected", "candidate_type": "host", "rtt_ms": 60000}, ("connected", "host")),
        ({"state": "connected", "candidate_type": "srflx", "rtt_ms": 0.25}, ("connected", "srflx")),
        ({"state": "connected", "candidate_type": "prflx", "rtt_ms": 60000.0}, ("connected", "prflx")),
        (
            {"state": "connected", "candidate_type": "relay", "extra": [1], "to": "driver"},
            ("connected", "relay"),
        ),
    ],
)
def test_parse_media_state(fields, expected):
    """docs/protocol.md, "media_state": state, the optional candidate_type (null: absent) and rtt_ms;
    other fields ignored, as in every message."""
    kind, obj = decode(json.dumps({"type": "media_state", **fields}))
    assert kind == "media_state"
    assert parse_media_state(obj) == expected


STATE_ERROR = "field 'state' must be one of connecting, connected, disconnected, failed"
CANDIDATE_TYPE_ERROR = "field 'candidate_type' must be one of host, srflx, prflx, relay"
RTT_ERROR = "field 'rtt_ms' must be a number from 0 to 60000"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"type":"media_state"}', STATE_ERROR),
        ('{"type":"media_state","state":null}', STATE_ERROR),
        ('{"type":"media_state","state":1}', STATE_ERROR),
        ('{"type":"media_state","state":true}', STATE_ERROR),
        ('{"type":"media_state","state":["connected"]}', STATE_ERROR),
        ('{"type":"media_state","state":{"connected":1}}', STATE_ERROR),
        ('{"type":"media_state","state":""}', STATE_ERROR),
        ('{"type":"media_state","state":"Connected"}', STATE_ERROR),
        ('{"type":"media_state","state":"connected "}', STATE_ERROR),
        ('{"type":"media_state","state":"new"}', STATE_ERROR),  # connectionState values not reported
        ('{"type":"media_state","state":"closed"}', STATE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":"udp"}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":""}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":"RELAY"}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":1}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":false}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":["host"]}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","candidate_type":{}}', CANDIDATE_TYPE_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":-1}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":-0.001}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":60000.001}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":60001}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":true}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":false}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":"12"}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":"NaN"}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":[12]}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":{}}', RTT_ERROR),
        ('{"type":"media_state","state":"connected","rtt_ms":1e400}', RTT_ERROR),  # parses as infinity
        ('{"type":"media_state","state":"connected","rtt_ms":-1e400}', RTT_ERROR),
    ],
)
def test_parse_media_state_refuses(text, message):
    """docs/protocol.md, "media_state": a missing, unknown or non-string state, an unknown or non-string
    candidate_type, an rtt_ms that is not a number from 0 to 60000 (booleans, strings and the infinities of
    1e400 included) → invalid_message naming the field."""
    kind, obj = decode(text)
    with pytest.raises(MessageError) as info:
        parse_media_state(obj)
    assert (info.value.code, info.value.message) == ("invalid_message", message)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_parse_media_state_refuses_non_finite_rtt(value):
    """docs/protocol.md, "media_state": NaN never passes (no JSON text gives it: NaN is invalid_json), nor
    an infinity."""
    with pytest.raises(MessageError, match="rtt_ms"):
        parse_media_state({"type": "media_state", "state": "connected", "rtt_ms": value})
    with pytest.raises(MessageError) as info:
        decode('{"type":"media_state","state":"connected","rtt_ms":NaN}')
    assert info.value.code == "invalid_json"


# -- server messages ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (m.authenticated("u1"), {"type": "authenticated", "user_id": "u1"}),
        (
            m.session_joined("s1", "r1", "driver"),
            {"type": "session_joined", "session_id": "s1", "ride_id": "r1", "role": "driver"},
        ),
        (m.participant_joined("passenger"), {"type": "participant_joined", "role": "passenger"}),
        (m.participant_left("driver"), {"type": "participant_left", "role": "driver"}),
        (m.call_timeout(), {"type": "call_timeout", "reason": "max_duration_reached"}),
        (m.call_ended("user_terminated"), {"type": "call_ended", "reason": "user_terminated"}),
        (m.unauthorized("session_not_found"), {"type": "unauthorized", "reason": "session_not_found"}),
        (
            m.error("peer_not_connected", "the other participant is not connected"),
            {
                "type": "error",
                "code": "peer_not_connected",
                "message": "the other participant is not connected",
            },
        ),
        (m.PONG, {"type": "pong"}),
    ],
    ids=lambda v: v.get("type") if isinstance(v, dict) else None,
)
def test_server_messages(text, expected):
    """docs/protocol.md, "Server → client": exact shapes, nothing else."""
    assert json.loads(text) == expected


# -- property -----------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
interesting = st.sampled_from(
    [None, True, 0, -1, 65535, 65536, 1.5, "", "0", "candidate:1", [], {}, {"candidate": "c"}]
)
candidate_objects = st.dictionaries(
    st.sampled_from(sorted(CANDIDATE_KEYS | {"extra", "foo"})), interesting | json_values, max_size=6
)
plausible_candidates = st.fixed_dictionaries(
    {"candidate": st.text(max_size=20)},
    optional={
        "sdpMid": st.none() | st.text(max_size=5) | interesting,
        "sdpMLineIndex": st.none() | st.integers(-2, 70_000) | interesting,
        "usernameFragment": st.none() | st.text(max_size=5) | interesting,
        "extra": json_values,
    },
)
extras = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
client_messages = st.builds(
    lambda kind, fields, extra: {**extra, **fields, "type": kind},
    st.sampled_from(sorted(m.KNOWN_TYPES | {"nope"})) | st.text(max_size=5) | json_scalars,
    st.fixed_dictionaries(
        {},
        optional={"sdp": interesting | json_values, "candidate": st.none() | candidate_objects | json_values},
    ),
    extras,
)
relayed_messages = st.builds(
    lambda kind, sdp, extra: {**extra, "type": kind, "sdp": sdp},
    st.sampled_from(["offer", "answer"]),
    st.text(max_size=30) | interesting | json_values,
    extras,
) | st.builds(
    lambda candidate, extra: {**extra, "type": "ice_candidate", "candidate": candidate},
    st.none() | plausible_candidates | candidate_objects | json_values,
    extras,
)


valid_candidates = st.fixed_dictionaries(
    {"candidate": st.text(max_size=20)},
    optional={
        "sdpMid": st.none() | st.text(max_size=5),
        "sdpMLineIndex": st.none() | st.integers(0, 65535),
        "usernameFragment": st.none() | st.text(max_size=5),
        "extra": json_values,
        "relayProtocol": st.text(max_size=5),
    },
)
valid_relayed = st.builds(
    lambda kind, sdp, extra: {**extra, "type": kind, "sdp": sdp},
    st.sampled_from(["offer", "answer"]),
    st.text(min_size=1, max_size=30),
    extras,
) | st.builds(
    lambda candidate, extra: {**extra, "type": "ice_candidate", "candidate": candidate},
    st.none() | valid_candidates,
    extras,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_relayed, relayed_messages, client_messages, json_values))
def test_relay_property_only_defined_keys(value):
    """docs/protocol.md, rule 4: any JSON value relays to only the defined fields, or raises MessageError."""
    try:
        kind, obj = decode(json.dumps(value))
        if kind not in m.RELAYED_TYPES:
            return
        out = relay_payload(kind, obj)
    except MessageError as exc:
        event(f"refused: {exc.code}")
        assert exc.code in ("invalid_json", "invalid_message", "unknown_type")
        return
    event(f"relayed: {kind}")
    assert isinstance(out, str)
    parsed = json.loads(out)
    assert parsed["type"] == kind
    if kind == "ice_candidate":
        assert set(parsed) == {"type", "candidate"}
        candidate = parsed["candidate"]
        if candidate is not None:
            assert set(candidate) <= CANDIDATE_KEYS
            assert type(candidate["candidate"]) is str
            assert candidate == {k: v for k, v in value["candidate"].items() if k in CANDIDATE_KEYS}
            index = candidate.get("sdpMLineIndex")
            assert index is None or (type(index) is int and 0 <= index <= 65535)
    else:
        assert set(parsed) == {"type", "sdp"}
        assert type(parsed["sdp"]) is str and parsed["sdp"]


@settings(max_examples=60)
@given(valid_relayed)
def test_relay_property_valid_messages_relayed_exactly(value):
    """docs/protocol.md, rule 4: a well-formed offer/answer/ice_candidate is relayed with exactly its defined
    fields."""
    if value["type"] == "ice_candidate":
        given_candidate = value["candidate"]
        expected = {
            "type": "ice_candidate",
            "candidate": None
            if given_candidate is None
            else {k: v for k, v in given_candidate.items() if k in CANDIDATE_KEYS},
        }
    else:
        expected = {"type": value["type"], "sdp": value["sdp"]}
    assert relay(value) == expected


@pytest.mark.parametrize(
    "text, session_id",
    [
        ('{"type": "authenticate", "session_id": "s-1", "user_id": "u"}', "s-1"),
        ('{"type": "authenticate", "session_id": "", "user_id": "u"}', None),
        ('{"type": "offer", "sdp": "x"}', None),
        ("not json", None),
        ("[]", None),
    ],
)
def test_authenticate_session(text, session_id):
    """The session an authenticate asks for, as routing reads it (docs/design.md, "Several instances")."""
    assert m.authenticate_session(text) == session_id
