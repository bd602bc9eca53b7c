"""systemd integration: sd_notify over `$NOTIFY_SOCKET`, without libsystemd.

`Type=notify` units learn from these datagrams that the daemon is ready (`READY=1`), what it is
doing (`STATUS=…`), that it is alive (`WATCHDOG=1`), that it is re-reading its configuration
(`RELOADING=1` with `MONOTONIC_USEC=`, then `READY=1` again: systemd's reload protocol, so that
`systemctl reload` returns once the reload is done) and that it is stopping (`STOPPING=1`). The
socket is a path or, when it starts with `@`, a Linux abstract socket. Without `$NOTIFY_SOCKET`
every call does nothing, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time

from projectord.logs import get_logger

log = get_logger("projectord.daemon.systemd")


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec if self.address else None
        self._socket: socket.socket | None = None
        self._failed = False
        self._announced_ready = False
        self._reloading = False

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """Read and remove `NOTIFY_SOCKET` and `WATCHDOG_*`, so child processes (an embedded
        Postgres) do not inherit them and notify in projectord's name."""
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        watchdog: int | None = None
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; never raises (systemd may be gone)."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("systemd.notify_failed", error=str(exc))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")
        self._announced_ready = True

    def reloading(self) -> None:
        """Start of a reload. systemd wants the CLOCK_MONOTONIC time of the request with it, to
        tell this reload from an older one. Before the first READY=1 there is nothing to reload
        as far as systemd knows, so nothing is said."""
        if not self._announced_ready:
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._reloading = self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration"
        )

    def reloaded(self, status: str) -> None:
        """End of a reload, whether the new configuration was taken or refused (logged)."""
        if self._reloading:
            self._reloading = False
            self.ready(status)

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address
