"""The repository owns its documentation: a short README, links that
resolve inside the repository (anchors included), no reference to anything
a clone does not have, and section names that code and tests cite exist.

The README and docs/*.md are what someone who clones the repository reads;
they must stand alone (no specification file, issue tracker or sibling
directory behind them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
#: Files that must not point outside the repository: every tracked text
#: file but this one (it spells the forbidden strings out), CI's entry point
#: and the benchmark drivers (they fetch and drive the external harness).
_EXEMPT = {"tests/test_docs.py", ".ci/run"}
SELF_CONTAINED = [
    ROOT / name
    for name in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if name not in _EXEMPT
    and not name.startswith("tests/bench_")
    and (ROOT / name).is_file()
    and not (ROOT / name).is_symlink()
    and (ROOT / name).suffix
    in {".py", ".md", ".sql", ".service", ".socket", ".sh", ".html", ".js", ".cfg", ".toml", ".example", ""}
]
#: The one Makefile line allowed to name the benchmark harness's location:
#: the bench targets need a checkout of it beside the repository.
#: (The forbidden strings are assembled, so this file holds none of them.)
SIBLING = "../" + "shared"
BENCH_DIR_LINE = f"BENCH_DIR := {SIBLING}/bench"
README_LIMIT = 10_000  # bytes

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FORBIDDEN = [
    (re.compile("SPEC" + " §"), "a specification section"),
    (re.compile(r"\bSPEC\b"), "a specification"),
    (re.compile("design" + " card", re.I), "the design" + " card"),
    (re.compile(r"\.\./shared"), "a directory outside the repository"),
    (re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
    (re.compile(r"(?:^|\s)#\d+\b", re.M), "an issue number"),
]


def without_code_blocks(text: str) -> str:
    """``text`` with its fenced code blocks blanked (links and headings in
    them are not links and headings)."""
    return _FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without Markdown markup,
    lower-cased, every character but letters, digits, ``_``, ``-`` and
    spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The heading texts of a Markdown file, outside code blocks."""
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    return [match.group(1).strip() for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M)]


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, with GitHub's ``-1``, ``-2`` suffixes
    for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The targets of the inline links and images of a Markdown file."""
    return _LINK.findall(without_code_blocks(path.read_text(encoding="utf-8")))


def test_docs_exist() -> None:
    names = {path.name for path in DOCS}
    assert {"protocol.md", "operations.md", "design.md", "performance.md"} <= names, names


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (details: docs/)"


def test_readme_links_every_page_of_the_docs() -> None:
    targets = {target.split("#", 1)[0] for target in links(README)}
    for page in DOCS:
        assert f"docs/{page.name}" in targets, f"README.md does not link docs/{page.name}"


def test_readme_gives_the_two_commands() -> None:
    """README, "The two commands": one shell block with exactly `make run` and `make test`."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## The two commands\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "README.md lost its 'The two commands' section"
    block = re.search(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S)
    assert block, "no ```sh block in 'The two commands'"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make run", "make test"], commands


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    """Every relative link names a file inside the repository; an
    ``#anchor`` into a Markdown file names one of its headings."""
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file in the repository")
            continue
        if anchor:
            if resolved.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(resolved):
                broken.append(f"{target}: no heading with the anchor #{anchor} in {resolved.name}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_links_are_checked() -> None:
    """The link check sees the links (the pattern has not gone blind)."""
    assert len(links(README)) >= 5
    assert "operations.md#configuration" in links(ROOT / "docs" / "protocol.md")
    heading = "Every refusal, error and ending, and what to do"
    assert slug(heading) == "every-refusal-error-and-ending-and-what-to-do"
    assert slug("`POST /sessions`") == "post-sessions"
    assert slug("Client → server") == "client--server"


@pytest.mark.parametrize("path", SELF_CONTAINED, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_reference_outside_the_repository(path: Path) -> None:
    """No specification, issue number, design notes or sibling directory: a
    clone has none of them. The Makefile may name the benchmark harness's
    directory once, in ``BENCH_DIR``."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if path.name == "Makefile" and line.strip() == BENCH_DIR_LINE:
            continue
        for pattern, what in _FORBIDDEN:
            if pattern.search(line):
                found.append(f"{path.name}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_makefile_names_the_benchmark_directory_once() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert makefile.count(SIBLING) == 1 and BENCH_DIR_LINE in makefile.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed here")
def test_bench_targets_skip_without_the_harness() -> None:
    """Without the benchmark harness beside the repository, the bench
    targets say so and succeed (they used to fail)."""
    for target in ("bench", "bench-memory", "bench-calllog", "bench-cluster"):
        result = subprocess.run(
            ["make", "--no-print-directory", target, "BENCH_DIR=/nonexistent/bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (target, result.stdout, result.stderr)
        assert "skipped" in result.stdout and "docs/performance.md" in result.stdout, result.stdout


def cited_sections() -> list[tuple[str, str, str]]:
    """``(file, page, section)`` for every ``docs/<page>.md, "<section>"`` or
    ``docs/<page>.md, rule <n>`` that code and tests cite."""
    cited = []
    pattern = re.compile(r'docs/(\w+\.md)`*,\s+(?:"([^"]+)"|rule (\d+))')
    for path in [*(ROOT / "intaleq_signal").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text(encoding="utf-8"))  # citations wrap lines
        for page, name, rule in pattern.findall(text):
            cited.append((str(path.relative_to(ROOT)), page, name or f"rule {rule}"))
    return cited


def test_cited_sections_exist() -> None:
    """Code and tests cite the docs as ``docs/protocol.md, "Relay"`` or
    ``docs/protocol.md, rule 4``: each cited section is a heading (a rule
    heading is ``N. Name``)."""
    missing = []
    for where, page, name in cited_sections():
        path = ROOT / "docs" / page
        if not path.exists():
            missing.append(f"{where}: docs/{page} does not exist")
            continue
        names = set()
        for heading in headings(path):
            plain = heading.replace("`", "")
            names.add(plain)
            numbered = re.match(r"(\d+)\. (.+)", plain)
            if numbered:
                names.update({numbered.group(2), f"rule {numbered.group(1)}"})
        if name not in names:
            missing.append(f'{where}: docs/{page}, "{name}" is no heading')
    assert not missing, "\n".join(missing)


def test_app_guide_builds_the_peer_connection_from_the_servers_ice_servers() -> None:
    """docs/protocol.md, "The flow of a call" and "Reconnect and ICE
    restart" say what the reference client, clients/web/intaleq-call.js,
    does (tests/test_webrtc.py runs it): the RTCPeerConnection is
    built on ``session_joined`` with its ``ice_servers`` (not before
    ``authenticate`` with STUN/TURN of the app's own), and the fresh ones
    are set before an ICE restart (the first TURN credentials expire)."""
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8"))
    flow = text.split("### The flow of a call", 1)[1].split("###", 1)[0]
    built = [row for row in flow.split("| ") if "new RTCPeerConnection" in row]
    assert built and all("session_joined" in row and "msg.ice_servers" in row for row in built), built
    assert flow.index("new RTCPeerConnection") > flow.index("authenticate"), "built before authenticate"
    restart = text.split("### Reconnect and ICE restart", 1)[1].split("###", 1)[0]
    call = "pc.setConfiguration({...pc.getConfiguration(), iceServers: msg.ice_servers})"
    assert call in restart, restart
    client = (ROOT / "clients" / "web" / "intaleq-call.js").read_text(encoding="utf-8")
    assert "this.pc.setConfiguration({...this.pc.getConfiguration(), iceServers})" in client
    assert "new RTCPeerConnection(config)" in client
    built = client.split('case "session_joined":', 1)[1].split("case ", 1)[0]
    assert "this.useIceServers(msg.ice_servers)" in built, "not built on session_joined"
