"""The interface the local ``API`` and the ``RemoteAPI`` both offer.

Code written against :class:`DatamuxAPI` runs against either. mypy checks that both
classes satisfy it (the ``TYPE_CHECKING`` block below), and tests/test_conformance.py
checks their signatures against it at run time and that every method of protocol.TABLE
the API serves is part of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from .framing import Framing
from .model import Collection, Node, Stream, StreamAck

__all__ = ["DatamuxAPI"]


@runtime_checkable
class DatamuxAPI(Protocol):
    """Collections, live nodes and tasks: in this process (``API``) or over MQTT."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def list_collections(self) -> list[Collection]:
        """Every collection."""
        ...

    async def list_collection_streams(self, collection_id: str) -> list[Stream]:
        """One stream per recording and stream of a collection."""
        ...

    async def list_collection_recordings(self, collection_id: str) -> list[dict[str, str]]:
        """The attrs of every recording of a collection."""
        ...

    async def replay_collection_stream(
        self,
        collection_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        speed: float | None = None,
        rate_limit: bool | None = None,
        strict_time: bool = True,
        use_relative_ts: bool = False,
        framing: Framing | str | dict[str, Any] | None = None,
        start: float | None = None,
        end: float | None = None,
        loop: bool | int = False,
    ) -> StreamAck:
        """Replay one stream of one recording into ``sink``."""
        ...

    async def publish_collection_stream(
        self, collection_id: str, stream_id: str, attrs: Mapping[str, Any], **options: Any
    ) -> StreamAck:
        """Replay one stream of one recording as an LSL outlet on this machine."""
        ...

    async def list_live_nodes(self) -> list[Node]:
        """Every live node."""
        ...

    async def list_live_streams(self, node_id: str) -> list[Stream]:
        """The streams of one live node."""
        ...

    async def proxy_live_stream(
        self,
        node_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        framing: Framing | str | dict[str, Any] | None = None,
    ) -> StreamAck:
        """Stream a live stream into ``sink`` until stopped."""
        ...

    async def stop_task(self, randseq: str) -> StreamAck:
        """Stop a task; its sink gets END_OF_STREAM."""
        ...

    async def control_task(self, randseq: str, action: str, **params: Any) -> dict[str, Any]:
        """Steer a running replay; returns its state."""
        ...


if TYPE_CHECKING:  # mypy: both implementations satisfy the interface
    from .api import API
    from .client.remote import RemoteAPI

    def _local(api: API) -> DatamuxAPI:
        return api

    def _remote(api: RemoteAPI) -> DatamuxAPI:
        return api
