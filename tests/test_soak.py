"""The soak, short enough for CI: 20 concurrent calls churning for 30 s
(several hundred calls, every ending of docs/protocol.md, "End reasons", in rotation)
against a real daemon, in 3 phases with an idle checkpoint after each.
``tests/soak.py`` is the driver and documents the criteria; the long run is
``.venv/bin/python tests/soak.py --calls 50 --minutes 10``.
"""

from __future__ import annotations

import pytest
import soak

pytestmark = pytest.mark.soak

CONCURRENCY = 20
SECONDS = 30.0  # of churn, 3 phases of 10 s; with the idle checkpoints the test takes ~45 s


def test_soak_short(tmp_path) -> None:
    """No call error on any ending path; at every idle checkpoint
    /health shows no connection, session or call and the daemon's file
    descriptors are back to their count before the first call (±2); RSS
    grows by less than 2 MiB + 1 KiB per call from the end of warm-up (the
    first phase) to the end; the daemon exits 0 on SIGTERM with no warning
    or error in its log; every call-log row has the end reason its call
    produced. The table of samples is the test's captured output (`-s`
    shows it as it goes)."""
    report = soak.run(CONCURRENCY, SECONDS, phases=3, every=2.0, workdir=tmp_path)
    log = report.log_path.read_text()[-5000:] if report.log_path else ""
    assert not report.problems, report.verdict() + "\n\nthe daemon's log ends:\n" + log
    # enough churn to mean something: several hundred calls, each path many times
    assert report.calls >= 300, report.verdict()
    assert min(report.done[name] for name in soak.SCENARIOS) >= 20, report.verdict()
