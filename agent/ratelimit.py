"""A request budget per asking client: a token bucket each (docs/protocol.md, "Errors").

One client publishing requests as fast as it can (the ACL lets it write its own request
topic) once held a live 1 kHz stream's frames half a second and made every other
client wait. Each client id (the last level of the request topic, which the broker's
ACL makes the user's own) gets ``burst`` requests at once and ``rate_per_s`` sustained.
Over budget, a request is not served. The first one after a served request (or after
``notice_every_s``) is answered ``rate_limited``, the rest not at all: a flood costs the
agent a dict lookup per request, not a reply each, and a client that asks one request at
a time always hears why.

Buckets are bounded: a full bucket is the same as none, so the least recently used are
dropped first once ``max_clients`` ids are known (ids churned on an open broker).
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["MAX_CLIENTS", "NOTICE_EVERY_S", "RequestBudget", "Verdict"]

MAX_CLIENTS = 1024  # buckets kept; the least recently used go first
NOTICE_EVERY_S = 1.0  # over budget and already told: told again after this long


class Verdict(enum.Enum):
    """What to do with one request."""

    SERVE = "serve"
    NOTICE = "notice"  # over budget: answer rate_limited, do not serve
    DROP = "drop"  # over budget, already told: count it, no reply


class _Bucket:
    __slots__ = ("noticed", "stamp", "tokens", "told")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.noticed = 0.0  # when it was last told (meaningful while ``told``)
        self.told = False  # told since its last served request


class RequestBudget:
    """Token buckets by client id.

    Args:
        rate_per_s: requests a client may send per second, sustained
            (``agent.max_requests_per_s``).
        burst: requests a client may send at once (``agent.request_burst``).
        max_clients: buckets kept at most.
        notice_every_s: over budget and told, one request per this long is told again.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        max_clients: int = MAX_CLIENTS,
        notice_every_s: float = NOTICE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate_per_s must be > 0, burst >= 1 and max_clients >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_clients = max_clients
        self.notice_every_s = notice_every_s
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
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.told = False
            return Verdict.SERVE
        if not bucket.told or now - bucket.noticed >= self.notice_every_s:
            bucket.told, bucket.noticed = True, now
            return Verdict.NOTICE
        return Verdict.DROP

    def retry_after_s(self, client: str) -> float:
        """Seconds until ``client`` may send one request again (0 if it may now)."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        missing = 1.0 - (bucket.tokens + (self.clock() - bucket.stamp) * self.rate_per_s)
        return max(0.0, missing / self.rate_per_s)
