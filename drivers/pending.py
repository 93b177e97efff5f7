"""A driver that could not start: reported as unavailable, retried with backoff.

On an unattended box one missing library (liblsl on a Pi), adapter or package must not
keep every other driver from serving. The registry puts a :class:`PendingDriver` in the
failed driver's place: it lists no nodes, tells its state, reason and fix through
:meth:`status` (birth and health messages, ``datamux status``), and tries to build the
real driver again in a thread after 5 s, 10 s, 20 s ... up to every 5 minutes. Once that
works it hands every call to the real driver, so an adapter plugged in or a library
installed later comes up without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import Unavailable
from ..framing import Framing
from ..model import Node, Stream
from .base import Driver, DriverStatus, Source

__all__ = ["RETRY_MAX_S", "RETRY_MIN_S", "PendingDriver"]

log = logging.getLogger(__name__)

RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0


def _fix_of(exc: BaseException) -> str:
    return str(getattr(exc, "fix", "") or "")


def _reason_of(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PendingDriver(Driver):
    """Stands in for driver ``name`` until ``build()`` succeeds.

    Args:
        name: the driver's registry name.
        build: makes the real driver (blocking: imports, reads options); run in a thread.
        reason: why it failed the first time.
        fix: what the operator can do about it.
        retry_min_s, retry_max_s: the first and the longest wait between attempts.
    """

    def __init__(
        self,
        name: str,
        build: Callable[[], Driver],
        reason: str,
        fix: str,
        *,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.name = name
        self._build = build
        self._reason, self._fix = reason, fix
        self._since = time.time()
        self._delay = retry_min_s
        self._retry_max_s = retry_max_s
        self._next_try = time.monotonic() + retry_min_s
        self._inner: Driver | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._closed = False
        self.attempts = 1
        # The one WARNING: what failed and what to do. Retries that fail the same way
        # stay at debug, so a journal filtered to warnings shows it once.
        log.warning(
            "driver %s unavailable: %s (fix: %s); the other drivers serve, retrying in %g s",
            name,
            reason,
            fix,
            retry_min_s,
        )

    @property
    def inner(self) -> Driver | None:
        """The real driver once it started, else None."""
        return self._inner

    def status(self) -> DriverStatus:
        if self._inner is not None:
            return self._inner.status()
        self._ensure_retrying()
        return DriverStatus(
            self.name,
            "unavailable",
            self._reason,
            self._fix,
            since=self._since,
            retry_in_s=round(max(0.0, self._next_try - time.monotonic()), 1),
        )

    def _ensure_retrying(self) -> None:
        if self._retrying is not None or self._closed or self._inner is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next async call starts it
            return
        self._retrying = loop.create_task(self._retry_loop(), name=f"retry-driver-{self.name}")

    async def _retry_loop(self) -> None:
        while self._inner is None and not self._closed:
            await asyncio.sleep(max(0.0, self._next_try - time.monotonic()))
            if self._closed:
                return
            self.attempts += 1
            try:
                driver = await asyncio.to_thread(self._build)
            except Exception as exc:
                self._failed_again(exc)
                continue
            if self._closed:  # closed while building: release what was built
                await driver.aclose()
                return
            self._inner = driver
            log.warning(
                "driver %s is available now (attempt %d); it serves", self.name, self.attempts
            )

    def _failed_again(self, exc: Exception) -> None:
        reason, fix = _reason_of(exc), _fix_of(exc) or self._fix
        self._delay = min(self._delay * 2, self._retry_max_s)
        self._next_try = time.monotonic() + self._delay
        if reason != self._reason:  # a new cause is news: warn again
            self._reason, self._fix, self._since = reason, fix, time.time()
            log.warning(
                "driver %s still unavailable, now: %s (fix: %s); retrying in %g s",
                self.name,
                reason,
                fix,
                self._delay,
            )
        else:
            log.debug(
                "driver %s still unavailable (attempt %d): %s; retrying in %g s",
                self.name,
                self.attempts,
                reason,
                self._delay,
            )

    async def aclose(self) -> None:
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        if self._inner is not None:
            await self._inner.aclose()

    async def list_nodes(self) -> list[Node]:
        if self._inner is None:
            self._ensure_retrying()
            return []
        return await self._inner.list_nodes()

    async def list_streams(self, node_id: str) -> list[Stream]:
        return await self._started().list_streams(node_id)

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        return self._started().open_stream(node_id, stream_id, attrs, framing)

    def _started(self) -> Driver:
        if self._inner is None:
            raise Unavailable(f"driver {self.name} is unavailable: {self._reason} ({self._fix})")
        return self._inner
