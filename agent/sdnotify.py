"""A minimal ``sd_notify`` client: tell systemd that the agent is ready, alive or stopping.

Standard library only; python-systemd is not needed. The protocol is one datagram of
newline-separated ``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(see ``sd_notify(3)``). Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op
returning ``False``, so the agent calls these unconditionally.

Used by ``datamux serve`` with ``systemd/streaminghub-agent.service`` (``Type=notify``,
``WatchdogSec=``)::

    sdnotify.ready("serving 3 nodes")       # after the broker session is up
    period = sdnotify.watchdog_interval()   # None when the unit has no watchdog
    ...                                     # every `period` s: sdnotify.watchdog_ping()
    sdnotify.stopping()                     # first thing on SIGTERM
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog_interval", "watchdog_ping"]

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """The socket address for ``$NOTIFY_SOCKET``, or ``None`` when it is not one we speak."""
    if value.startswith("@"):
        # Abstract namespace: Python takes a leading NUL byte for it.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd >= 254 may also hand out "vsock:CID:PORT" (VMs); not needed on a Pi.
    return None


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to the service manager.

    Args:
        message: One or more ``KEY=value`` lines separated by ``\\n``.

    Returns:
        ``True`` if the datagram was sent; ``False`` when ``$NOTIFY_SOCKET`` is unset
        (not run by systemd, or not ``Type=notify``), not a supported address, or the
        send failed. Never raises: a failed notification must not take the agent down;
        systemd's own timeouts (start, watchdog) report the problem instead.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; ignoring it", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block the event loop: a receiver that does not read (its queue holds
            # about 10 datagrams) costs one notification, not the agent.
            sock.setblocking(False)
            # A datagram is sent whole or not at all; no partial writes to handle.
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", value, exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the datagram.
    return " ".join(text.splitlines())


def ready(status: str = "") -> bool:
    """Report that start-up is complete (``READY=1``), with an optional status line.

    With ``Type=notify`` systemd keeps the unit "activating" until this arrives, and
    only then starts the watchdog timer.
    """
    if status:
        return notify(f"READY=1\nSTATUS={_one_line(status)}")
    return notify("READY=1")


def stopping() -> bool:
    """Report that a clean shutdown has begun (``STOPPING=1``)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status`` (``STATUS=...``)."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """Tell the watchdog the service is alive (``WATCHDOG=1``).

    Send it from the event loop, not from a thread of its own: a ping proves the loop
    still runs, which is what the watchdog is there to check.
    """
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or ``None`` when no watchdog applies to us.

    systemd sets ``$WATCHDOG_USEC`` (the timeout, microseconds) and ``$WATCHDOG_PID``
    (the main process). Like ``sd_watchdog_enabled(3)``, a ``$WATCHDOG_PID`` that is not
    this process means the variables were inherited by a child, which must not ping.

    Returns:
        Half the timeout, the period ``sd_watchdog_enabled(3)`` recommends, so one late
        or lost ping does not kill the service; ``None`` if unset or malformed.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        timeout_us = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None
    if timeout_us <= 0:
        return None
    return timeout_us / 2 / 1_000_000
