"""``server.run_event_loop``: uvloop when installed, else the standard loop,
and an exception escaping the server is never chained to the ImportError of
the missing uvloop (PEP 3134 implicit chaining)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from intaleq_signal.server import run_event_loop


class Escaped(Exception):
    """Raised from the coroutine the loop runs."""


def escape_from_loop() -> tuple[Escaped, type]:
    """Run a coroutine that raises :class:`Escaped`; the exception and the loop's type."""
    seen: list[type] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))
        raise Escaped("from main")

    with pytest.raises(Escaped) as info:
        run_event_loop(main())
    return info.value, seen[0]


def assert_not_chained(exc: BaseException) -> None:
    context = exc.__context__
    while context is not None:  # the whole implicit chain, not only the first link
        assert not isinstance(context, ImportError), repr(context)
        context = context.__context__


def test_exception_without_uvloop_is_not_chained_to_import_error(monkeypatch) -> None:
    """No uvloop installed: the standard loop runs main, and what escapes it carries no
    "No module named 'uvloop'" ("During handling of the above exception")."""
    monkeypatch.delenv("INTALEQ_EVENT_LOOP", raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    exc, loop_type = escape_from_loop()
    assert issubclass(loop_type, asyncio.BaseEventLoop)
    assert not loop_type.__module__.startswith("uvloop")
    assert_not_chained(exc)


def test_exception_on_forced_standard_loop_is_not_chained(monkeypatch) -> None:
    """INTALEQ_EVENT_LOOP=asyncio: the standard loop, and no ImportError in the chain."""
    monkeypatch.setenv("INTALEQ_EVENT_LOOP", "asyncio")
    exc, loop_type = escape_from_loop()
    assert not loop_type.__module__.startswith("uvloop")
    assert_not_chained(exc)


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed here")
def test_uvloop_runs_main_when_installed(monkeypatch) -> None:
    """uvloop installed (the [fast] extra) and not refused: main runs on uvloop's loop."""
    monkeypatch.delenv("INTALEQ_EVENT_LOOP", raising=False)
    exc, loop_type = escape_from_loop()
    assert loop_type.__module__.startswith("uvloop")
    assert_not_chained(exc)
