"""One bounded hand-over from a producer (a reader thread or a callback) to the event loop.

Every live reader (serial, BLE, LSL) and the client's task stream hand items to a
consumer on the loop the same way, through a :class:`Channel`:

- :meth:`Channel.send` may be called from any thread (or from the loop itself); it
  never blocks. Past ``capacity`` items the oldest droppable one gives way and its size
  is added to :attr:`Channel.dropped`, so a stalled consumer never stalls the device
  and the loss is counted, never silent.
- :meth:`Channel.close` is the one end-of-stream marker: without an error the consumer's
  iteration ends once the items before it are taken; with one, the consumer gets that
  error (raised ``from`` its cause, if it has one) in place of the next item.
- :meth:`Channel.receive` (and ``async for``) waits without polling.

:func:`put_when_room` is the other half of the hand-over: putting on a user's unbounded
:class:`asyncio.Queue` only while it holds fewer than a high-water mark of items,
waiting for the consumer's next ``get`` rather than polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Channel", "ChannelClosed", "put_when_room"]

T = TypeVar("T")


class ChannelClosed(Exception):
    """Raised by :meth:`Channel.receive` once a channel closed without an error is empty."""


def _one(_item: Any) -> int | None:
    return 1


class Channel(Generic[T]):
    """A bounded, drop-oldest queue from any thread to one consumer on ``loop``.

    Args:
        capacity: droppable items held at most; past that the oldest droppable one goes.
        size: an item's weight in :attr:`dropped` when it is dropped (e.g. its sample
            count), or None for an item that is never dropped and does not count
            towards ``capacity`` (status items that must reach the consumer).
        on_drop: told each dropped item's size as it is dropped (shared counters).

    The consumer's loop is the one running where the channel is made, or else the
    first one to :meth:`receive`. Until one is known, sends are taken at once (a
    source made in a worker thread sends nothing before it is opened on the loop).
    """

    def __init__(
        self,
        capacity: int,
        *,
        size: Callable[[T], int | None] = _one,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.dropped = 0  # summed sizes of the items dropped so far
        self._size = size
        self._on_drop = on_drop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # the loop's thread: sends from it are taken at once
        self._items: deque[T] = deque()
        self._droppable = 0
        self._closed = False  # no more items are taken
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        with contextlib.suppress(RuntimeError):  # no loop here: bound on the first receive
            self._bind(asyncio.get_running_loop())

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._thread = loop, threading.get_ident()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the producer's side (any thread) ----------------------------------------------

    def send(self, item: T) -> None:
        """Hand over an item; never blocks. Ignored once the channel is closed."""
        self._call(self._put, item)

    def close(self, error: BaseException | None = None) -> None:
        """End the stream after the items already sent; ``error`` is raised to the consumer.

        Only the first close counts: a stop after a loss still reports the loss.
        """
        self._call(self._end, error)

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        loop = self._loop
        if loop is None or threading.get_ident() == self._thread:
            fn(arg)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            loop.call_soon_threadsafe(fn, arg)

    def _put(self, item: T) -> None:
        if self._closed:
            return
        weight = self._size(item)
        if weight is not None:
            if self._droppable >= self.capacity:
                self._drop_oldest()
            self._droppable += 1
        self._items.append(item)
        self._wake()

    def _drop_oldest(self) -> None:
        for index, old in enumerate(self._items):
            weight = self._size(old)
            if weight is not None:
                del self._items[index]
                self._droppable -= 1
                self.dropped += weight
                if self._on_drop is not None:
                    self._on_drop(weight)
                return

    def _end(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the consumer's side (the loop) ------------------------------------------------

    def get_nowait(self) -> T:
        """The next item if there is one; asyncio.QueueEmpty if not (as asyncio.Queue)."""
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if self._size(item) is not None:
            self._droppable -= 1
        return item

    async def receive(self) -> T:
        """The next item; ChannelClosed (or the close's error) once the stream ended."""
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
            self._bind(loop)
        while not self._items:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise ChannelClosed
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                item = await self.receive()
            except ChannelClosed:
                return
            yield item


async def put_when_room(queue: asyncio.Queue[Any], item: Any, high_water: int) -> None:
    """Put ``item`` on ``queue`` once it holds fewer than ``high_water`` items.

    A bounded queue waits for its own room. An unbounded one (a user's sink) waits for
    the consumer's next ``get``: asyncio.Queue wakes its first waiting putter on every
    get, and this waits as one, so a slow consumer costs no polling.
    """
    if queue.maxsize > 0:
        await queue.put(item)
        return
    putters = getattr(queue, "_putters", None)
    while queue.qsize() >= high_water:
        if putters is None:  # not CPython's asyncio.Queue: fall back to a short sleep
            await asyncio.sleep(0.002)
            continue
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        putters.append(woken)
        try:
            await woken
        except asyncio.CancelledError:
            # Pass on a wake-up this waiter took but will not use, as Queue.put does.
            if woken.done() and not woken.cancelled():
                queue._wakeup_next(putters)  # type: ignore[attr-defined]
            raise
        finally:
            if woken in putters:
                putters.remove(woken)
    queue.put_nowait(item)
