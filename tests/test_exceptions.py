"""The exception tree of intaleq_signal/exceptions.py: the tree drawn in its
docstring is the real one, every refusal renders as the HTTP answer or the
WebSocket ``error`` message of docs/protocol.md, and each start-up error
gives its exit status."""

from __future__ import annotations

import json
import re

import pytest

from intaleq_signal import exceptions
from intaleq_signal.exceptions import (
    EX_CONFIG,
    Capacity,
    ConfigError,
    JournalError,
    LifecycleError,
    ListenError,
    MessageError,
    Refusal,
    RideConflict,
    SignalingError,
    StartError,
    StartupError,
    StoreError,
)
from intaleq_signal.front import error_response
from intaleq_signal.messages import decode, error, error_message

# -- the tree ----------------------------------------------------------------

_FENCE = re.compile(r"^```\n(.*?)^```", re.M | re.S)
_NODE = re.compile(r"^(?P<prefix>[│├└─ ]*)(?P<name>[A-Z]\w+)")


def documented_tree() -> list[tuple[str, str | None]]:
    """``(class name, parent name)`` for each line of the docstring's tree,
    the parent found by indentation (four columns a level)."""
    (block,) = _FENCE.findall(exceptions.__doc__ or "")
    nodes: list[tuple[str, str | None]] = []
    path: list[str] = []
    for line in block.splitlines():
        match = _NODE.match(line)
        assert match, f"not a tree line: {line!r}"
        depth = len(match["prefix"]) // 4
        assert len(match["prefix"]) % 4 == 0 and depth <= len(path), line
        del path[depth:]
        nodes.append((match["name"], path[-1] if path else None))
        path.append(match["name"])
    return nodes


def defined_classes() -> dict[str, type]:
    return {
        name: value
        for name, value in vars(exceptions).items()
        if isinstance(value, type) and value.__module__ == exceptions.__name__
    }


def test_the_docstring_lists_every_class_of_the_module_once() -> None:
    names = [name for name, _ in documented_tree()]
    assert len(names) == len(set(names)), names
    assert set(names) == set(defined_classes())
    assert set(defined_classes()) <= set(exceptions.__all__)


def test_the_docstring_tree_is_the_class_tree() -> None:
    classes = defined_classes()
    for name, parent in documented_tree():
        bases = classes[name].__bases__
        assert bases == ((classes[parent],) if parent else (Exception,)), (name, bases)


def test_the_tree() -> None:
    for cls in (Refusal, StartupError, LifecycleError):
        assert issubclass(cls, SignalingError)
    for cls in (MessageError, RideConflict, Capacity):
        assert issubclass(cls, Refusal)
    for cls in (ConfigError, StoreError, JournalError, StartError, ListenError):
        assert issubclass(cls, StartupError)
    assert issubclass(JournalError, StoreError) and issubclass(StoreError, ConfigError)
    assert not issubclass(LifecycleError, Refusal) and not issubclass(Refusal, StartupError)


def test_the_old_names_are_the_same_classes() -> None:
    from intaleq_signal import config, lifecycle, messages, server, sessions
    from intaleq_signal.calllog import journal, store, writer

    assert messages.MessageError is MessageError
    assert (sessions.RideConflict, sessions.Capacity) == (RideConflict, Capacity)
    assert (config.ConfigError, config.EX_CONFIG) == (ConfigError, EX_CONFIG)
    assert store.StoreError is StoreError and journal.JournalError is JournalError
    assert writer.StartError is StartError and server.ListenError is ListenError
    assert lifecycle.LifecycleError is LifecycleError


# -- refusals: HTTP ----------------------------------------------------------


def http_answer(refusal: Refusal) -> bytes:
    return error_response(refusal).serialize()


def test_ride_conflict_is_the_409_answer() -> None:
    body = b'{"error": "ride_conflict", "message": "this ride has a live session with other participants"}'
    assert http_answer(RideConflict("ride-1")) == (
        b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n" % len(body) + body
    )
    assert RideConflict("ride-1").ride_id == "ride-1"


def test_capacity_is_the_503_answer() -> None:
    head, _, body = http_answer(Capacity()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert json.loads(body) == {"error": "capacity", "message": "too many live sessions; retry later"}


def test_a_refusal_answers_with_its_status_headers_and_json_body() -> None:
    refusal = Refusal("rate_limited", "slow down", http_status=429, headers={"Retry-After": "60"})
    response = error_response(refusal)
    assert (response.status_code, response.reason_phrase) == (429, "Too Many Requests")
    assert list(response.headers.raw_items()) == [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(response.body))),
        ("Connection", "close"),
        ("Cache-Control", "no-store"),
        ("Retry-After", "60"),
    ]
    assert json.loads(response.body) == {"error": "rate_limited", "message": "slow down"}
    assert str(refusal) == "slow down"


def test_a_websocket_refusal_has_no_http_answer() -> None:
    with pytest.raises(ValueError, match="invalid_json"):
        error_response(MessageError("invalid_json", "message is not valid JSON"))


def test_body_refusals_are_400() -> None:
    from intaleq_signal.http_api import validate_session_body

    with pytest.raises(Refusal) as info:
        validate_session_body(b"{")
    assert (info.value.http_status, info.value.code) == (400, "invalid_json")
    assert json.loads(error_response(info.value).body) == {
        "error": "invalid_json",
        "message": "request body is not valid JSON",
    }


# -- refusals: WebSocket -------------------------------------------------------


def test_a_message_error_is_the_error_message() -> None:
    with pytest.raises(MessageError) as info:
        decode("{")
    assert info.value.http_status is None
    assert (
        error_message(info.value)
        == '{"type":"error","code":"invalid_json","message":"message is not valid JSON"}'
    )
    assert error_message(info.value) == error(info.value.code, info.value.message)


@pytest.mark.parametrize("refusal", [RideConflict(), Capacity(), MessageError("unknown_type", "unknown")])
def test_every_refusal_renders_as_an_error_message(refusal: Refusal) -> None:
    assert json.loads(error_message(refusal)) == {
        "type": "error",
        "code": refusal.code,
        "message": refusal.message,
    }


# -- start-up errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "status", "line"),
    [
        (ConfigError, 78, "configuration error: X=1 is wrong"),
        (StoreError, 78, "configuration error: X=1 is wrong"),
        (JournalError, 78, "configuration error: X=1 is wrong"),
        (StartError, 78, "X=1 is wrong"),
        (ListenError, 1, "X=1 is wrong"),
    ],
)
def test_startup_errors_give_their_exit_status_and_line(
    monkeypatch, capsys, error_type, status, line
) -> None:
    from intaleq_signal import __main__ as entry

    def refuse(config: object) -> None:
        raise error_type("X=1 is wrong")

    assert error_type.exit_status == status and error_type("X=1 is wrong").line() == line
    monkeypatch.setenv("API_KEY", "k" * 32)
    monkeypatch.setenv("ENVIRONMENT", "development")
    monkeypatch.setattr(entry, "run", refuse)
    assert entry.main([]) == status
    assert capsys.readouterr().err.strip().splitlines() == [f"intaleq-signal: {line}"]
    assert EX_CONFIG == 78
