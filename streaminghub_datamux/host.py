"""Facts about this box that configs default to."""

from __future__ import annotations

import socket

__all__ = ["default_agent_id"]


def default_agent_id() -> str:
    """The host name, trimmed to what an id may contain."""
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "_-" else "-" for c in name).strip("-.")
    return cleaned[:64] or "agent"
