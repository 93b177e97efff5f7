"""Log set-up for the command line: plain lines on a terminal, priorities for journald.

Under systemd, stderr is a journal stream and ``$JOURNAL_STREAM`` names it
(``device:inode``). There each line starts with its syslog priority (``<4>`` for a
warning, see ``sd-daemon(3)``), so ``journalctl -p warning`` finds warnings, and the
time stamp is left to the journal. Every line of a multi-line record (a traceback)
carries the prefix, since journald reads the priority line by line.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["JournalFormatter", "configure_logging", "stderr_is_journal", "syslog_priority"]

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


def syslog_priority(level: int) -> int:
    """The syslog priority of a logging level (3 error, 4 warning, 6 info, 7 debug)."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Prefixes every line with ``<priority>`` for journald."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """Whether stderr is the journal stream systemd named in ``$JOURNAL_STREAM``.

    Compared by device and inode, as ``sd_journal_stream_fd`` users should: a child
    whose stderr was redirected elsewhere inherits the variable but not the stream.
    """
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def configure_logging(level: int) -> None:
    """Set up the root logger on stderr at ``level``, in the journal's format if fitting."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JournalFormatter() if stderr_is_journal() else logging.Formatter(TERMINAL_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
