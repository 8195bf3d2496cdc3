"""systemd's ``sd_notify`` protocol without a dependency: a no-op outside systemd.

``Type=notify`` units read ``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` and
``STOPPING=1`` from a datagram on the AF_UNIX socket named by ``NOTIFY_SOCKET``
(a leading ``@`` is an abstract socket). Failures to send are logged once and
never stop the daemon. A receiver that stops reading (its queue of datagrams is
full, ``net.unix.max_dgram_qlen``) never blocks the daemon either: a send waits
at most ``SEND_TIMEOUT`` seconds and the message is dropped.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

__all__ = ["Notifier"]

SEND_TIMEOUT = 0.25


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """``send(READY=1, STATUS="folding step 900")`` → one datagram ``READY=1\\nSTATUS=…``."""
        if self.address is None:
            return False
        message = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(SEND_TIMEOUT)
                s.connect(self.address)
                s.sendall(message)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), e.strerror or e)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)
