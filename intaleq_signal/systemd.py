"""systemd service notifications (sd_notify protocol) with the standard
library: ``READY=1`` once listening, ``STOPPING=1`` on shutdown and
``WATCHDOG=1`` from the event loop (docs/operations.md, "systemd"; ``sd_notify(3)``).

Without ``NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

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
        return self.notify("STOPPING=1", "STATUS=stopping: ending calls, flushing the call log")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
