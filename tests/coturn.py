"""A real coturn TURN server on loopback for the tests, configured the way
docs/operations.md, "TURN with coturn" tells operators to, except that
loopback peers are allowed (every test peer is on 127.0.0.1).

coturn is Debian's package ``coturn`` (``/usr/bin/turnserver``,
``/usr/bin/turnutils_uclient``); ``.ci/run`` installs it. Without it the
tests that need it are skipped, saying so.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
UCLIENT = shutil.which("turnutils_uclient") or "/usr/bin/turnutils_uclient"
HAVE_COTURN = Path(TURNSERVER).is_file() and Path(UCLIENT).is_file()

needs_coturn = pytest.mark.skipif(
    not HAVE_COTURN,
    reason="TURN tests need Debian's coturn (turnserver, turnutils_uclient), which is missing: "
    "install it with `apt-get install coturn`",
)

REALM = "turn.intaleq.test"


class Coturn:
    """``turnserver`` with ``use-auth-secret`` on 127.0.0.1: a free listening
    port (UDP and TCP), 40 relay ports, TLS/DTLS and the CLI off, its own
    user database in ``workdir``; logs kept in :attr:`lines`.

    Args:
        workdir: a fresh directory for the configuration and database.
        secret: ``static-auth-secret`` (the daemon's ``TURN_SECRET``).
    """

    def __init__(self, workdir: Path, secret: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        low = random.randrange(50000, 59000, 40)
        config = workdir / "turnserver.conf"
        config.write_text(
            "\n".join(
                [
                    "listening-ip=127.0.0.1",
                    "relay-ip=127.0.0.1",
                    f"listening-port={self.port}",
                    f"min-port={low}",
                    f"max-port={low + 39}",
                    "use-auth-secret",
                    f"static-auth-secret={secret}",
                    f"realm={REALM}",
                    "fingerprint",
                    "no-tls",
                    "no-dtls",
                    "no-cli",
                    "no-multicast-peers",
                    "allow-loopback-peers",  # tests only: every peer is on 127.0.0.1
                    f"userdb={workdir / 'turndb'}",
                    f"pidfile={workdir / 'turnserver.pid'}",
                    "log-file=stdout",
                    "simple-log",
                    "verbose",
                    "",
                ]
            )
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [TURNSERVER, "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_listening()

    @property
    def url(self) -> str:
        """The ``turn:`` URL for ``ICE_SERVERS`` (UDP)."""
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise AssertionError(f"turnserver exited with {self.proc.returncode}:\n{self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"turnserver not listening within {timeout}s:\n{self.log}") from None
                time.sleep(0.1)

    def allocate(self, username: str, credential: str) -> subprocess.CompletedProcess[str]:
        """``turnutils_uclient``: allocate a relay with these credentials and
        send 10 packets of 100 bytes through it to a peer on this machine
        (docs/operations.md, "TURN with coturn")."""
        return subprocess.run(
            [
                UCLIENT,
                "-p",
                str(self.port),
                "-u",
                username,
                "-w",
                credential,
                "-y",
                "-n",
                "10",
                "-m",
                "1",
                "-l",
                "100",
                "-e",
                "127.0.0.1",
                "127.0.0.1",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
