"""The README's references stay true: every test it names in the threat list
exists (issue 7), and the configuration table lists every variable."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_test_named_in_the_readme_exists() -> None:
    """Issue 7: each threat's "shown by" names real tests."""
    last_file = None
    named = 0
    for file, name in re.findall(r"`(?:(test_\w+\.py))?(?:::(test_\w+))?`", README):
        if file:
            last_file = file
            assert (ROOT / "tests" / file).exists(), file
        if name:
            assert last_file is not None, name
            source = (ROOT / "tests" / last_file).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.M), f"{last_file}::{name}"
            named += 1
    assert named >= 20


def test_configuration_table_lists_every_variable() -> None:
    """SPEC §2: the README documents every variable the daemon reads."""
    source = (ROOT / "intaleq_signal" / "config.py").read_text(encoding="utf-8")
    variables = set(re.findall(r'"([A-Z][A-Z_]+)"', source)) - {"EX_CONFIG"}
    for variable in variables:
        assert f"`{variable}`" in README, variable


def sh_blocks(text: str) -> list[str]:
    """The contents of the ```sh code blocks of a Markdown text."""
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def test_readme_install_and_upgrade_commands_name_the_fast_extra() -> None:
    """README "Installation on a server", "Upgrading": every pip install of the service
    installs the [fast] extra (uvloop: README "Performance" measures it faster), and
    that extra exists in setup.cfg with uvloop in it."""
    commands = [line for block in sh_blocks(README) for line in block.splitlines() if "pip install" in line]
    assert len(commands) >= 2, commands  # installation and upgrade
    for command in commands:
        assert "[fast]'" in command, command  # quoted: [...] is a shell glob
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert re.search(r"^fast =\n\s+uvloop\b", setup, re.M), "setup.cfg has no fast = uvloop extra"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed here")
def test_make_install_installs_the_fast_extra() -> None:
    """Makefile `install` (README: it does the installation steps): its pip install
    names the [fast] extra. `make -n` prints the commands without running them."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "install", "PREFIX=/nonexistent/intaleq-signal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    commands = [line for line in result.stdout.splitlines() if "pip install" in line]
    assert commands, result.stdout
    for command in commands:
        assert "'.[fast]'" in command, command
