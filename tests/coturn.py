"""A real coturn TURN server on loopback for the tests, started from the
configuration block of docs/operations.md, "TURN with coturn".

The ```ini block is read from that section at test time and changed only
where a loopback test must differ (:func:`loopback_config`): listening and
relay address 127.0.0.1, free ports, the test's secret(s), a self-signed
certificate made with ``openssl`` in the test directory (so the ``turns:``
listener is tested too), loopback peers allowed (every test peer is on
127.0.0.1) and the loopback ``denied-peer-ip`` line dropped, no
``external-ip``, the user database and pid file in the test directory, the
log on standard output (read here). Only a value is replaced, never what
follows it on the line: a comment after a value, which coturn would take
as part of the value, still breaks the tests as it breaks coturn.

coturn is Debian's package ``coturn`` (``/usr/bin/turnserver``,
``/usr/bin/turnutils_uclient``); ``.ci/run`` installs it. Without it (or
without ``openssl``) the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
UCLIENT = shutil.which("turnutils_uclient") or "/usr/bin/turnutils_uclient"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
HAVE_COTURN = all(Path(path).is_file() for path in (TURNSERVER, UCLIENT, OPENSSL))

needs_coturn = pytest.mark.skipif(
    not HAVE_COTURN,
    reason="TURN tests need Debian's coturn (turnserver, turnutils_uclient) and openssl, which are "
    "missing: install them with `apt-get install coturn openssl`",
)

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
TURN_SECTION = "## TURN with coturn"
#: The documented names the loopback variants replace.
DOCUMENTED_HOST = "turn.intaleqapp.com"
DOCUMENTED_PORT = "3478"
DOCUMENTED_TLS_PORT = "5349"
DOCUMENTED_SECRET = "SAME-AS-TURN_SECRET"
#: The documented loopback range, which a loopback test must allow.
LOOPBACK_DENIAL = "denied-peer-ip=127.0.0.0-127.255.255.255"
#: How many relay ports each test coturn gets.
RELAY_PORTS = 40
#: What a coturn log line must not say once it has read its configuration.
PROBLEM = re.compile(r"(?i:error)|Cannot")


# -- the documented blocks --------------------------------------------------------


def turn_section() -> str:
    """docs/operations.md, "TURN with coturn", up to the next section."""
    text = OPERATIONS.read_text(encoding="utf-8")
    assert re.search(rf"^{TURN_SECTION}$", text, re.M), (
        f"docs/operations.md lost its {TURN_SECTION!r} section"
    )
    return text.split(f"\n{TURN_SECTION}\n", 1)[1].split("\n## ", 1)[0]


def documented_config() -> str:
    """The one ```ini block of "TURN with coturn": /etc/turnserver.conf."""
    blocks = re.findall(r"^```ini\n(.*?)^```$", turn_section(), flags=re.M | re.S)
    assert len(blocks) == 1, f"expected one ```ini block in {TURN_SECTION!r}, found {len(blocks)}"
    return blocks[0]


def documented_check() -> str:
    """The ```sh block of "TURN with coturn" that runs ``turnutils_uclient``."""
    blocks = [
        block
        for block in re.findall(r"^```sh\n(.*?)^```$", turn_section(), flags=re.M | re.S)
        if "turnutils_uclient" in block
    ]
    assert len(blocks) == 1, f"expected one ```sh block with turnutils_uclient in {TURN_SECTION!r}"
    return blocks[0]


def _set(line: str, value: str) -> str:
    """``key=<value>`` in place of ``line``'s first word of value; anything
    after that word stays (coturn would read it as part of the value)."""
    return re.sub(r"^([a-z0-9-]+=)[^\s]*", lambda match: match.group(1) + value, line)


def loopback_config(
    documented: str,
    *,
    workdir: Path,
    port: int,
    tls_port: int,
    low_port: int,
    secrets: tuple[str, ...],
    verbose: bool = False,
) -> str:
    """``documented`` (the ```ini block) with what a loopback test must
    change, and nothing else (see the module's docstring).

    Args:
        workdir: where ``cert.pem``, ``pkey.pem``, the user database and the
            pid file are.
        port: ``listening-port`` (UDP and TCP); ``tls_port``: TLS.
        low_port: the first of :data:`RELAY_PORTS` relay ports.
        secrets: one ``static-auth-secret`` line each.
        verbose: add ``verbose`` (coturn then logs every request and answer).
    """
    replaced = {
        "listening-ip": "127.0.0.1",
        "relay-ip": "127.0.0.1",
        "listening-port": str(port),
        "tls-listening-port": str(tls_port),
        "min-port": str(low_port),
        "max-port": str(low_port + RELAY_PORTS - 1),
        "cert": str(workdir / "cert.pem"),
        "pkey": str(workdir / "pkey.pem"),
        "log-file": "stdout",
    }
    lines: list[str] = []
    seen: list[str] = []
    for line in documented.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.strip() or line.startswith("#"):
            lines.append(line)
            continue
        seen.append(key)
        if key in replaced:
            lines.append(_set(line, replaced[key]))
        elif key == "static-auth-secret":
            lines.extend(_set(line, secret) for secret in secrets)
        elif key == "external-ip" or line.strip() == LOOPBACK_DENIAL:
            continue  # no NAT on loopback; every test peer is on 127.0.0.1
        else:
            lines.append(line)
    for key in (*replaced, "static-auth-secret", "use-auth-secret"):
        assert seen.count(key) == 1, f"the coturn block of {TURN_SECTION!r} has {seen.count(key)} {key} lines"
    assert LOOPBACK_DENIAL in documented.splitlines(), f"the coturn block lost {LOOPBACK_DENIAL}"
    lines += [
        "# -- loopback test only --",
        "allow-loopback-peers",
        f"userdb={workdir / 'turndb'}",
        f"pidfile={workdir / 'turnserver.pid'}",
        *(["verbose"] if verbose else []),
        "",
    ]
    return "\n".join(lines)


def make_certificate(workdir: Path, name: str = "turn.intaleq.test") -> bytes:
    """A self-signed certificate for ``name`` (P-256, 2 days) written to
    ``workdir``/cert.pem and pkey.pem, each replaced in one rename so a
    reader never sees half a file; its DER bytes."""
    for kind in ("cert", "pkey"):
        (workdir / f"{kind}.new.pem").unlink(missing_ok=True)
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(workdir / "pkey.new.pem"), "-out", str(workdir / "cert.new.pem"),
         "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.replace(workdir / "pkey.new.pem", workdir / "pkey.pem")
    os.replace(workdir / "cert.new.pem", workdir / "cert.pem")
    return ssl.PEM_cert_to_DER_cert((workdir / "cert.pem").read_text())


def free_udp_and_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (coturn takes both)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Coturn:
    """``turnserver`` from the documented configuration, on 127.0.0.1 (see
    :func:`loopback_config`); its log in :attr:`lines`.

    Args:
        workdir: a fresh directory for the configuration, certificate and
            database.
        secret: ``static-auth-secret`` (the daemon's ``TURN_SECRET``).
        more_secrets: further ``static-auth-secret`` lines (a rotation).
        verbose: coturn logs every request and answer (allocations made,
            401 answers), which the documented configuration does not.
    """

    def __init__(
        self, workdir: Path, secret: str, *, more_secrets: tuple[str, ...] = (), verbose: bool = False
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_udp_and_tcp_port()
        self.tls_port = free_udp_and_tcp_port()
        self.certificate = make_certificate(workdir)
        self.config = workdir / "turnserver.conf"
        self.config.write_text(
            loopback_config(
                documented_config(),
                workdir=workdir,
                port=self.port,
                tls_port=self.tls_port,
                low_port=random.randrange(50000, 59000, RELAY_PORTS),
                secrets=(secret, *more_secrets),
                verbose=verbose,
            )
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [TURNSERVER, "-c", str(self.config)],
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

    def problems(self) -> list[str]:
        """The log lines that say "error" or "Cannot"."""
        with self._lock:
            return [line for line in self.lines if PROBLEM.search(line)]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for port in (self.port, self.tls_port):
            while True:
                if self.proc.poll() is not None:
                    self._reader.join(2)
                    raise AssertionError(f"turnserver exited with {self.proc.returncode}:\n{self.log}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise AssertionError(
                            f"turnserver not listening on {port} within {timeout}s:\n{self.log}"
                        ) from None
                    time.sleep(0.1)

    def allocate(
        self, username: str, credential: str, transport: str = "udp"
    ) -> subprocess.CompletedProcess[str]:
        """``turnutils_uclient`` over ``transport`` (``udp``, ``tcp``:
        ``-t``, ``tls``: ``-S`` on the TLS port, the certificate not
        verified): allocate a relay with these credentials and send 10
        packets of 100 bytes through it to a peer on this machine
        (docs/operations.md, "TURN with coturn")."""
        how = {"udp": ["-p", str(self.port)], "tcp": ["-t", "-p", str(self.port)],
               "tls": ["-S", "-p", str(self.tls_port)]}[transport]  # fmt: skip
        return subprocess.run(
            [UCLIENT, *how, "-u", username, "-w", credential, "-y", "-n", "10", "-m", "1", "-l", "100",
             "-e", "127.0.0.1", "127.0.0.1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def run_documented_check(self, secret: str) -> subprocess.CompletedProcess[str]:
        """The check of docs/operations.md, "TURN with coturn", as written,
        run by ``bash -e`` against this coturn: only the secret, the host
        name and the two ports are replaced."""
        script = documented_check()
        for documented, here in (
            (DOCUMENTED_SECRET, secret),
            (DOCUMENTED_HOST, "127.0.0.1"),
            (f"-p {DOCUMENTED_TLS_PORT}", f"-p {self.tls_port}"),
            (f"-p {DOCUMENTED_PORT}", f"-p {self.port}"),
        ):
            assert documented in script, f"the documented check lost {documented!r}"
            script = script.replace(documented, here)
        return subprocess.run(
            ["bash", "-e", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def served_certificate(self) -> bytes:
        """The DER certificate the TLS listener presents now."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.tls_port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate

    def reload_certificate(self, name: str) -> bytes:
        """Replace cert.pem and pkey.pem with a new certificate for
        ``name`` and send SIGUSR2, as the documented certbot deploy hook
        does; the new certificate's DER bytes."""
        certificate = make_certificate(self.workdir, name)
        self.proc.send_signal(signal.SIGUSR2)
        return certificate

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
