"""A request budget per asking client: a token bucket each (docs/protocol.md, "Errors").

One client publishing requests as fast as it can (the ACL lets it write its own request
topic) once held a live 1 kHz stream's frames half a second and made every other
client wait. Each client id (the last level of the request topic, which the broker's
ACL makes the user's own) gets ``burst`` requests at once and ``rate_per_s`` sustained.
Over budget, a request is not served. It is answered ``rate_limited`` with when to retry
(the time until the bucket holds a request again); the client's requests before that
time get no reply at all, and after it one is served. So a flood costs the agent a dict
lookup per request and at most one notice per served request, not a reply each, and a
client that waits as told is never left without an answer.

Buckets are bounded: a full bucket is the same as none, so the least recently used are
dropped first once ``max_clients`` ids are known (ids churned on an open broker).
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["MAX_CLIENTS", "RequestBudget", "Verdict"]

MAX_CLIENTS = 1024  # buckets kept; the least recently used go first


class Verdict(enum.Enum):
    """What to do with one request."""

    SERVE = "serve"
    NOTICE = "notice"  # over budget: answer rate_limited, do not serve
    DROP = "drop"  # over budget before the time it was told: count it, no reply


class _Bucket:
    __slots__ = ("quiet_until", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.quiet_until = 0.0  # the retry time it was last told: no reply before it


class RequestBudget:
    """Token buckets by client id.

    Args:
        rate_per_s: requests a client may send per second, sustained
            (``agent.max_requests_per_s``).
        burst: requests a client may send at once (``agent.request_burst``).
        max_clients: buckets kept at most.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate_per_s must be > 0, burst >= 1 and max_clients >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> Verdict:
        """One request of ``client``: serve it if a token is left, else say how to refuse."""
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(client)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate_per_s)
            bucket.stamp = now
        if bucket.tokens >= 1.0 - 1e-9:  # at the time it was told, whatever the rounding
            bucket.tokens -= 1.0
            bucket.quiet_until = 0.0  # served: the next one over budget is told again
            return Verdict.SERVE
        if now >= bucket.quiet_until:
            bucket.quiet_until = now + (1.0 - bucket.tokens) / self.rate_per_s
            return Verdict.NOTICE
        return Verdict.DROP

    def retry_after_s(self, client: str) -> float:
        """Seconds until ``client`` may send one request again (0 if it may now)."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        missing = 1.0 - (bucket.tokens + (self.clock() - bucket.stamp) * self.rate_per_s)
        return max(0.0, missing / self.rate_per_s)
