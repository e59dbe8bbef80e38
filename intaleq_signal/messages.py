"""WebSocket message shapes: validation of client messages and serialization
of server messages (``docs/protocol.md``, "Client → server" and "Server →
client"). Pure functions, no I/O.

A relayed message costs one ``json.loads``, one validation and one
``json.dumps`` of a message rebuilt from its defined fields only, so the server
never echoes fields it did not define (``docs/protocol.md``, rule 4).

A refused message raises :class:`~intaleq_signal.exceptions.MessageError`
(a :class:`~intaleq_signal.exceptions.Refusal`); :func:`error_message`
renders any refusal as the ``error`` message sent back.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _quote  # the C one when available
from typing import Any

from .exceptions import MessageError, Refusal

__all__ = [
    "MessageError",
    "authenticated",
    "call_ended",
    "call_timeout",
    "decode",
    "encode",
    "error",
    "error_message",
    "parse_authenticate",
    "parse_media_state",
    "participant_joined",
    "participant_left",
    "relay_payload",
    "session_joined",
    "unauthorized",
]

#: Types the server relays to the other participant (docs/protocol.md, rule 4).
RELAYED_TYPES = frozenset({"offer", "answer", "ice_candidate"})
KNOWN_TYPES = RELAYED_TYPES | {"authenticate", "heartbeat", "end_call", "media_state"}

#: ``media_state`` ``state``: the values of ``RTCPeerConnection.connectionState``
#: an app reports (docs/protocol.md, "media_state").
MEDIA_STATES = frozenset({"connecting", "connected", "disconnected", "failed"})
#: ``media_state`` ``candidate_type``: the type of the selected local ICE candidate.
CANDIDATE_TYPES = frozenset({"host", "srflx", "prflx", "relay"})
#: Largest ``media_state`` ``rtt_ms``, in milliseconds.
MAX_RTT_MS = 60_000

#: Longest ``session_id`` / ``user_id`` accepted in ``authenticate``, in code
#: points; ids are created with at most 255 (``docs/protocol.md``, "POST /sessions").
MAX_ID_LENGTH = 255
#: ``sdpMLineIndex`` is an unsigned short in WebRTC.
MAX_MLINE_INDEX = 65535


def _reject_constant(name: str) -> Any:
    """``NaN``, ``Infinity``, ``-Infinity``: not JSON (RFC 8259 §6), so the
    message is ``invalid_json`` like any other text that is not JSON."""
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_scan = _decoder.scan_once  # the C scanner, without decode()'s Python wrappers
_JSON_SPACE = " \t\n\r"  # RFC 8259 §2 whitespace, nothing else
# ASCII output: every frame is sendable (a lone surrogate from a "\ud800"
# escape is re-escaped, not a UnicodeEncodeError) and its length in
# characters is its length in bytes (the 16 KiB hold bound, docs/protocol.md, rule 4).
_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
encode = _encoder.encode


def decode(text: str) -> tuple[str, dict[str, Any]]:
    """Parse one text frame into ``(type, object)``.

    Raises:
        MessageError: ``invalid_json`` when the text is not JSON (``NaN`` and
        ``Infinity`` included), ``invalid_message`` when it is not an object
        with a string ``type``, ``unknown_type`` for a type not in
        ``docs/protocol.md``, "Client → server".
    """
    try:
        if text[:1] in _JSON_SPACE:
            text = text.lstrip(_JSON_SPACE)
        obj, end = _scan(text, 0)
    except (StopIteration, ValueError) as exc:  # not JSON; ints over the digit limit
        raise MessageError("invalid_json", "message is not valid JSON") from exc
    except RecursionError:
        raise MessageError("invalid_message", "message is nested too deeply") from None
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        raise MessageError("invalid_json", "message is not valid JSON")
    if type(obj) is not dict:
        raise MessageError("invalid_message", "message must be a JSON object")
    kind = obj.get("type")
    if type(kind) is not str:
        raise MessageError("invalid_message", "field 'type' must be a string")
    if kind not in KNOWN_TYPES:
        raise MessageError("unknown_type", "unknown message type")
    return kind, obj


def parse_authenticate(obj: dict[str, Any]) -> tuple[str, str]:
    """Return ``(session_id, user_id)`` of an ``authenticate`` message.

    Raises:
        MessageError: ``invalid_message`` when either is not a non-empty
        string of at most 255 code points.
    """
    session_id = obj.get("session_id")
    user_id = obj.get("user_id")
    for name, value in (("session_id", session_id), ("user_id", user_id)):
        if type(value) is not str or not value or len(value) > MAX_ID_LENGTH:
            raise MessageError("invalid_message", f"field '{name}' must be a non-empty string")
    return session_id, user_id  # type: ignore[return-value]


def authenticate_session(text: str) -> str | None:
    """The ``session_id`` of ``text`` when it is a well-formed
    ``authenticate``, else None (the engine answers anything else)."""
    try:
        kind, obj = decode(text)
        return parse_authenticate(obj)[0] if kind == "authenticate" else None
    except MessageError:
        return None


def parse_token(obj: dict[str, Any]) -> str | None:
    """The optional ``token`` of an ``authenticate`` message (docs/protocol.md,
    "Participant tokens"): None when absent or null.

    Raises:
        MessageError: ``invalid_message`` when it is present but not a
        string of at most 255 code points.
    """
    token = obj.get("token")
    if token is None:
        return None
    if type(token) is not str or len(token) > MAX_ID_LENGTH:
        raise MessageError("invalid_message", "field 'token' must be a string")
    return token


def parse_media_state(obj: dict[str, Any]) -> tuple[str, str | None]:
    """``(state, candidate_type)`` of a ``media_state`` message
    (docs/protocol.md, "media_state"): ``candidate_type`` None when absent
    or null. ``rtt_ms`` (milliseconds, absent or null, or a number from 0
    to :data:`MAX_RTT_MS`) is checked and not kept.

    Raises:
        MessageError: ``invalid_message`` naming the bad field.
    """
    state = obj.get("state")
    if type(state) is not str or state not in MEDIA_STATES:
        raise MessageError(
            "invalid_message", "field 'state' must be one of connecting, connected, disconnected, failed"
        )
    candidate_type = obj.get("candidate_type")
    if candidate_type is not None and (
        type(candidate_type) is not str or candidate_type not in CANDIDATE_TYPES
    ):
        raise MessageError(
            "invalid_message", "field 'candidate_type' must be one of host, srflx, prflx, relay"
        )
    rtt = obj.get("rtt_ms")
    # bool is an int subclass, and 1e400 parses as infinity: both refused.
    if rtt is not None and (type(rtt) not in (int, float) or not 0 <= rtt <= MAX_RTT_MS):
        raise MessageError("invalid_message", "field 'rtt_ms' must be a number from 0 to 60000")
    return state, candidate_type


def relay_payload(kind: str, obj: dict[str, Any]) -> str:
    """Rebuild a relayed message from its defined fields and serialize it.

    The JSON text is assembled from the fields directly (strings through
    the C string encoder), the same bytes ``encode`` would give for the
    rebuilt object without building that object: this is the hot path.

    Raises:
        MessageError: ``invalid_message`` naming the bad field.
    """
    if kind == "ice_candidate":
        return '{"type":"ice_candidate","candidate":' + _candidate(obj) + "}"
    sdp = obj.get("sdp")
    if type(sdp) is not str or not sdp:
        raise MessageError("invalid_message", "field 'sdp' must be a non-empty string")
    return '{"type":"' + kind + '","sdp":' + _quote(sdp) + "}"


def _candidate(obj: dict[str, Any]) -> str:
    """The ``candidate`` value as JSON text: ``null`` or an object with the
    defined keys present in the input, in a fixed order."""
    if "candidate" not in obj:
        raise MessageError("invalid_message", "field 'candidate' is required")
    given = obj["candidate"]
    if given is None:
        return "null"  # gathering complete, relayed as given
    if type(given) is not dict:
        raise MessageError("invalid_message", "field 'candidate' must be an object or null")
    line = given.get("candidate")
    if type(line) is not str:
        raise MessageError("invalid_message", "field 'candidate.candidate' must be a string")
    parts = ['{"candidate":', _quote(line)]
    if "sdpMid" in given:
        parts.append(',"sdpMid":' + _optional_string(given["sdpMid"], "sdpMid"))
    if "sdpMLineIndex" in given:
        index = given["sdpMLineIndex"]
        if index is None:
            parts.append(',"sdpMLineIndex":null')
        elif type(index) is int and 0 <= index <= MAX_MLINE_INDEX:
            parts.append(',"sdpMLineIndex":' + str(index))
        else:
            raise MessageError(
                "invalid_message", "field 'candidate.sdpMLineIndex' must be an integer or null"
            )
    if "usernameFragment" in given:
        parts.append(',"usernameFragment":' + _optional_string(given["usernameFragment"], "usernameFragment"))
    parts.append("}")
    return "".join(parts)


def _optional_string(value: Any, name: str) -> str:
    if value is None:
        return "null"
    if type(value) is not str:
        raise MessageError("invalid_message", f"field 'candidate.{name}' must be a string or null")
    return _quote(value)


# Server → client messages (docs/protocol.md, "Server → client").

PONG = encode({"type": "pong"})
UNSUPPORTED_FRAME = encode(
    {"type": "error", "code": "unsupported_frame", "message": "binary frames are not supported"}
)
CALL_TIMEOUT = encode({"type": "call_timeout", "reason": "max_duration_reached"})


def authenticated(user_id: str) -> str:
    return encode({"type": "authenticated", "user_id": user_id})


def session_joined(
    session_id: str, ride_id: str, role: str, ice_servers: list[dict[str, Any]] | None = None
) -> str:
    """``ice_servers`` (docs/protocol.md, "ICE servers") only when configured."""
    message: dict[str, Any] = {
        "type": "session_joined",
        "session_id": session_id,
        "ride_id": ride_id,
        "role": role,
    }
    if ice_servers:
        message["ice_servers"] = ice_servers
    return encode(message)


def participant_joined(role: str, ice_servers: list[dict[str, Any]] | None = None) -> str:
    """``ice_servers`` (fresh TURN credentials for the recipient) only when configured."""
    if ice_servers:
        return encode({"type": "participant_joined", "role": role, "ice_servers": ice_servers})
    return encode({"type": "participant_joined", "role": role})


def participant_left(role: str) -> str:
    return encode({"type": "participant_left", "role": role})


def call_ended(reason: str) -> str:
    return encode({"type": "call_ended", "reason": reason})


def call_timeout() -> str:
    return CALL_TIMEOUT


def unauthorized(reason: str) -> str:
    return encode({"type": "unauthorized", "reason": reason})


def error(code: str, message: str) -> str:
    return encode({"type": "error", "code": code, "message": message})


def error_message(refusal: Refusal) -> str:
    """The ``error`` message that tells a client about ``refusal``:
    ``{"type":"error","code":...,"message":...}``."""
    return error(refusal.code, refusal.message)
