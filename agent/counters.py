"""What the agent has done since it started: counted where it happens, read by health."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Counters"]


@dataclass
class Counters:
    """What the agent has done since it started (published in its health messages)."""

    frames: int = 0
    samples: int = 0
    frames_dropped: int = 0  # QoS 0 frames that met no connection
    requests: int = 0
    bad_requests: int = 0
    unidentified_requests: int = 0  # on a topic that names no valid client: not answered
    v1_requests: int = 0  # from protocol v1 peers: answered with an error
    requests_rate_limited: int = 0  # over their client's budget: not served
