"""Small helpers shared by the API, the drivers and user code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

from .errors import DatamuxError, error_from_code
from .model import Frame, StreamError

__all__ = ["END_OF_STREAM", "frames", "iter_samples"]


class _EndOfStream:
    """The marker that ends every task's output. Compare with ``==`` or ``is``."""

    _instance: _EndOfStream | None = None

    def __new__(cls) -> _EndOfStream:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END_OF_STREAM"

    def __reduce__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM: Final = _EndOfStream()


async def frames(sink: asyncio.Queue[Any]) -> AsyncIterator[Frame]:
    """Yield the frames on ``sink`` until END_OF_STREAM.

    Status items are skipped; an error item raises the matching
    :class:`~streaminghub_datamux.errors.DatamuxError`.
    """
    while True:
        item = await sink.get()
        if item is END_OF_STREAM:
            return
        if isinstance(item, Frame):
            yield item
        elif isinstance(item, StreamError):
            raise error_from_code(item.code, item.reason)


def iter_samples(frame: Frame) -> Iterator[dict[str, dict[str, Any]]]:
    """Upstream-style per-sample dicts of a frame (see :meth:`Frame.samples`)."""
    return frame.samples()


def describe_error(exc: BaseException) -> tuple[str, str]:
    """The ``(code, message)`` pair sent for an exception."""
    if isinstance(exc, DatamuxError):
        return exc.code, str(exc)
    return "internal", f"{type(exc).__name__}: {exc}"
