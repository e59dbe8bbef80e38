"""The documentation's references stay true: every test the threat list of
docs/design.md names exists, the configuration reference of
docs/operations.md lists every variable the daemon reads, every documented
pip install names the [fast] extra, and the Makefile installs what the
README says it does."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CONFIG_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "docs").glob("*.md"))}
#: Markdown texts a reader gets: the README and every page of docs/.
TEXTS = {"README.md": README, **{f"docs/{name}": text for name, text in DOCS.items()}}


def section(text: str, heading: str) -> str:
    """The body of the Markdown section ``heading`` (a whole heading line),
    up to the next heading of the same or a higher level."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines()
    assert heading in lines, f"no section {heading!r}"
    body: list[str] = []
    fenced = False
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "\n".join(body) + "\n"


def table_rows(text: str) -> list[str]:
    """The body rows of the Markdown tables in ``text``."""
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


def test_every_test_named_in_the_docs_exists() -> None:
    """Each threat's "shown by" (docs/design.md) names real tests, and so
    does any other `test_file.py::test_name` in the README or docs/."""
    named = {}
    for where, text in TEXTS.items():
        last_file = None
        count = 0
        for file, name in re.findall(r"`(?:(test_\w+\.py))?(?:::(test_\w+))?`", text):
            if file:
                last_file = file
                assert (ROOT / "tests" / file).exists(), f"{where}: {file}"
            if name:
                assert last_file is not None, f"{where}: {name}"
                source = (ROOT / "tests" / last_file).read_text(encoding="utf-8")
                assert re.search(rf"^(?:async )?def {name}\(", source, re.M), f"{where}: {last_file}::{name}"
                count += 1
        named[where] = count
    threats = section(DOCS["design.md"], "## Threats and mitigations")
    assert len(table_rows(threats)) >= 12, "docs/design.md lost rows of its threat list"
    assert named["docs/design.md"] >= 20, named


def test_configuration_reference_lists_every_variable() -> None:
    """docs/operations.md "Configuration": its table has a row for every
    variable the daemon reads, and .env.example sets every one of them."""
    rows = "\n".join(table_rows(section(DOCS["operations.md"], "## Configuration")))
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    for variable in CONFIG_VARIABLES:
        assert f"`{variable}`" in rows, f"docs/operations.md, Configuration: {variable}"
        assert re.search(rf"^{variable}=", example, re.M), f".env.example: {variable}"


def test_readme_configuration_table_names_real_variables() -> None:
    """The README's short table names only variables the daemon reads, the
    most important ones among them, and points to the full reference."""
    rows = table_rows(section(README, "## Configuration"))
    listed = {name for row in rows for name in re.findall(r"`([A-Z][A-Z_]+)`", row.split("|")[1])}
    assert listed <= CONFIG_VARIABLES, listed - CONFIG_VARIABLES
    assert {"SERVER_ADDR", "API_KEY", "ENVIRONMENT", "RATE_LIMIT_PER_MIN"} <= listed, listed
    assert "(docs/operations.md#configuration)" in README


def sh_blocks(text: str) -> list[str]:
    """The contents of the ```sh code blocks of a Markdown text."""
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def test_documented_install_and_upgrade_commands_name_the_fast_extra() -> None:
    """docs/operations.md "Installation", "Upgrade" (and any other shell
    block of the README or docs/): every pip install of the service installs
    the [fast] extra (uvloop: docs/performance.md measures it faster), and
    that extra exists in setup.cfg with uvloop in it."""
    commands = {
        where: [line for block in sh_blocks(text) for line in block.splitlines() if "pip install" in line]
        for where, text in TEXTS.items()
    }
    assert len(commands["docs/operations.md"]) >= 2, commands  # installation and upgrade
    for where, lines in commands.items():
        for command in lines:
            assert "[fast]'" in command, f"{where}: {command}"  # quoted: [...] is a shell glob
    for heading in ("## Installation", "## Upgrade"):
        body = section(DOCS["operations.md"], heading)
        assert any("pip install" in line for block in sh_blocks(body) for line in block.splitlines()), heading
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert re.search(r"^fast =\n\s+uvloop\b", setup, re.M), "setup.cfg has no fast = uvloop extra"


def make_dry_run(*args: str) -> list[str]:
    """The pip install commands ``make -n`` prints for ``args`` (nothing is
    run), but the one that upgrades pip itself."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    return [line for line in lines if "pip install" in line and not line.endswith("--upgrade pip")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed here")
def test_make_install_installs_the_fast_extra() -> None:
    """Makefile `install` (docs/operations.md: it does the installation
    steps): its pip install names the [fast] extra."""
    commands = make_dry_run("install", "PREFIX=/nonexistent/intaleq-signal")
    assert commands
    for command in commands:
        assert "'.[fast]'" in command, command


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed here")
def test_make_run_installs_what_running_needs_only() -> None:
    """README "The two commands": `make run` installs the package with its
    [fast] extra and not the test stack; the test targets install both."""
    run = make_dry_run("-B", "run")  # -B: as on a fresh clone
    assert run, "make run installs nothing"
    for command in run:
        assert "'.[fast]'" in command and "test" not in command, command
    test = make_dry_run("-B", ".venv/.installed")
    assert any("'.[test,fast]'" in command for command in test), test
