"""systemd with the standard library (docs/operations.md, "systemd"):

- service notifications (``sd_notify(3)``): ``READY=1`` once listening,
  ``STOPPING=1`` on shutdown and ``WATCHDOG=1`` from the event loop. Without
  ``NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.
- socket activation (``sd_listen_fds(3)``, ``systemd.socket(5)``): the
  listening socket that ``intaleq-signal.socket`` hands the process as file
  descriptor 3 is served instead of binding ``SERVER_ADDR``
  (:func:`take_listen_socket`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

from .exceptions import ConfigError

__all__ = [
    "LISTEN_BACKLOG",
    "LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "listening_socket",
    "take_listen_socket",
]

log = logging.getLogger("intaleq_signal.systemd")


class Notifier:
    """Datagrams to ``$NOTIFY_SOCKET``.

    Attributes:
        watchdog_interval: seconds between ``WATCHDOG=1`` pings (half of
            ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises), or None
            when systemd asked for no watchdog, or asked another process.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2 / 1_000_000
        self._sock: socket.socket | None = None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False when there is no
        socket or the send failed (logged, never raised: notifications must
        not take the service down)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: closing the sockets, flushing the call log")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- socket activation ---------------------------------------------------------

#: ``SD_LISTEN_FDS_START`` (sd_listen_fds(3)): the first descriptor passed.
LISTEN_FDS_START = 3
#: The ``listen()`` backlog the daemon gives a socket from systemd: the
#: socket unit's ``Backlog=`` (``intaleq-signal.socket``). The event loop
#: calls ``listen()`` again when it starts serving, with its own default of
#: 100 unless told; the kernel caps either at ``net.core.somaxconn``.
LISTEN_BACKLOG = 4096
#: What sd_listen_fds(3) reads, and unsets so that children do not inherit it.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: More descriptors than Linux lets a process have by default
#: (``fs.nr_open``): not a count systemd would pass.
_MAX_LISTEN_FDS = 1 << 20


def listen_fds(env: Mapping[str, str], pid: int) -> list[int]:
    """The file descriptors systemd passed to process ``pid``, read from
    ``env`` as sd_listen_fds(3) reads them: none unless ``LISTEN_PID`` is
    ``pid`` and ``LISTEN_FDS`` is set, else ``LISTEN_FDS`` of them from
    ``SD_LISTEN_FDS_START`` (3) on. An empty value counts as unset. Nothing
    is changed here (:func:`take_listen_socket` does that).

    Raises:
        ConfigError: ``LISTEN_PID`` or ``LISTEN_FDS`` is not a positive
            number (where sd_listen_fds(3) returns ``-EINVAL``).
    """
    text = env.get("LISTEN_PID", "")
    if not text:
        return []
    if not _positive(text):
        raise ConfigError(f"LISTEN_PID={text!r} is not a process id")
    if int(text) != pid:
        return []  # another process's (inherited through one that did not unset them)
    text = env.get("LISTEN_FDS", "")
    if not text:
        return []
    if not _positive(text) or int(text) > _MAX_LISTEN_FDS:
        raise ConfigError(f"LISTEN_FDS={text!r} is not a number of file descriptors")
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(text)))


def _positive(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) > 0


def take_listen_socket(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> socket.socket | None:
    """The listening socket systemd handed this process (socket activation,
    docs/operations.md, "systemd"), or None when there is none: bind
    ``SERVER_ADDR`` then.

    As sd_listen_fds(3) does, ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed from ``environ`` (``os.environ``: unset)
    whatever they say, and the passed descriptors get ``FD_CLOEXEC``, so
    that no child inherits them. ``pid`` defaults to this process's.

    Raises:
        ConfigError: naming ``LISTEN_FDS``: more than one descriptor, one
            that is not open, or not a listening TCP socket
            (:func:`listening_socket`); or a malformed variable
            (:func:`listen_fds`).
    """
    environ = os.environ if environ is None else environ
    try:
        fds = listen_fds(environ, os.getpid() if pid is None else pid)
        names = environ.get("LISTEN_FDNAMES", "")
    finally:
        for name in LISTEN_VARIABLES:
            environ.pop(name, None)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ConfigError(
                f"LISTEN_FDS={len(fds)}: file descriptor {fd} is not open ({exc.strerror})"
            ) from exc
    if len(fds) > 1:
        named = f" (LISTEN_FDNAMES={names})" if names else ""
        raise ConfigError(
            f"LISTEN_FDS={len(fds)}{named}: one listening socket expected, "
            "a single ListenStream= in intaleq-signal.socket"
        )
    return listening_socket(fds[0]) if fds else None


def listening_socket(fd: int) -> socket.socket:
    """The socket object of descriptor ``fd``, which must be a listening TCP
    socket (IPv4 or IPv6, ``SOCK_STREAM``, ``SO_ACCEPTCONN``): what a
    ``ListenStream=`` of systemd.socket(5) with an address makes.

    Raises:
        ConfigError: naming ``LISTEN_FDS`` and saying what ``fd`` is
            instead; ``fd`` is left open.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"LISTEN_FDS: file descriptor {fd} is not a socket ({exc.strerror})") from exc
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise ConfigError(f"LISTEN_FDS: file descriptor {fd}: {exc.strerror}") from exc
    if sock.family in (socket.AF_INET, socket.AF_INET6) and kind == socket.SOCK_STREAM and accepting:
        return sock
    family = getattr(sock.family, "name", str(sock.family))
    try:
        kind_name = socket.SocketKind(kind).name
    except ValueError:
        kind_name = f"type {kind}"
    state = "" if accepting else ", not listening"
    sock.detach()  # not ours to close
    raise ConfigError(
        f"LISTEN_FDS: file descriptor {fd} is an {family} {kind_name} socket{state}, "
        "not a listening TCP socket (ListenStream=host:port in intaleq-signal.socket)"
    )
