"""docs/design.md, "State machines": its Mermaid diagrams are what the
transition tables give (``make docs`` redraws them), and the drawing says
what the tables say."""

from __future__ import annotations

import enum

import pytest

from intaleq_signal.diagrams import DESIGN, TABLES, blocks, main, mermaid, render
from intaleq_signal.lifecycle import (
    CONNECTION_TRANSITIONS,
    SESSION_TRANSITIONS,
    ConnectionState,
    SessionState,
)


@pytest.mark.parametrize("name", list(TABLES))
def test_design_md_diagram_is_the_generated_one(name: str) -> None:
    """docs/design.md holds each table's diagram as generated; run `make docs` after changing a table."""
    table, initial = TABLES[name]
    found = blocks(DESIGN.read_text(encoding="utf-8"))
    assert name in found, f"docs/design.md has no '{name}' diagram block"
    assert found[name] == mermaid(table, initial), "docs/design.md is stale: run `make docs`"


def test_render_leaves_an_up_to_date_file_unchanged() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    assert render(text) == text


def test_main_rewrites_a_stale_block(tmp_path) -> None:
    """`python -m intaleq_signal.diagrams PATH` replaces what is between the markers, nothing else."""
    stale = DESIGN.read_text(encoding="utf-8").replace("created --> waiting : first_join", "created --> x")
    path = tmp_path / "design.md"
    path.write_text(stale, encoding="utf-8")
    assert main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == DESIGN.read_text(encoding="utf-8")


def test_main_fails_without_markers(tmp_path, capsys) -> None:
    path = tmp_path / "design.md"
    path.write_text("# no diagrams\n", encoding="utf-8")
    assert main([str(path)]) == 1
    assert "no <!-- diagram: session -->" in capsys.readouterr().err


@pytest.mark.parametrize(
    "table, initial",
    [(SESSION_TRANSITIONS, SessionState.CREATED), (CONNECTION_TRANSITIONS, ConnectionState.CONNECTED)],
)
def test_every_table_entry_is_drawn(table: dict, initial: enum.Enum) -> None:
    """Each (state, event) -> state entry appears in its edge's label, and nothing else does."""
    lines = mermaid(table, initial).splitlines()
    assert lines[0] == "stateDiagram-v2"
    drawn = set()
    for line in lines:
        if " --> " in line and " : " in line:
            edge, _, label = line.strip().partition(" : ")
            source, _, target = edge.partition(" --> ")
            drawn |= {(source, event, target) for event in label.split(", ")}
    expected = {
        (state.name.lower(), event.name.lower(), target.name.lower())
        for (state, event), target in table.items()
    }
    assert drawn == expected


def test_final_states_are_those_without_a_way_out() -> None:
    session = mermaid(SESSION_TRANSITIONS, SessionState.CREATED)
    assert "    [*] --> created\n" in session
    assert [line for line in session.splitlines() if line.endswith("--> [*]")] == ["    ended --> [*]"]
    connection = mermaid(CONNECTION_TRANSITIONS, ConnectionState.CONNECTED)
    assert [line for line in connection.splitlines() if line.endswith("--> [*]")] == ["    closed --> [*]"]
