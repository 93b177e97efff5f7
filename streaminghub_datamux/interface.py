"""The interface the local ``API`` and the ``RemoteAPI`` both offer, and its RPC methods.

Code written against :class:`DatamuxAPI` runs against either. mypy checks that both
classes satisfy it (the ``TYPE_CHECKING`` block below), and tests/test_conformance.py
checks their signatures against it at run time.

Each RPC method the API offers is declared here, once: its signature, and with
:func:`~.methods.rpc_method` its parameters' checks, its result and how it is served.
protocol.TABLE is made of these declarations. A *plain* method (its body
``from_the_table()``) needs nothing more than the API's implementation: the RemoteAPI,
which subclasses this interface, is given it from the table (docs/design.md, "The method
table").
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from . import wire
from .framing import Framing
from .methods import Param, from_the_table, rpc_method
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

    @rpc_method(wire.COLLECTIONS, paged=True, fleet=True)
    async def list_collections(self) -> list[Collection]:
        """Every collection."""
        from_the_table()

    @rpc_method(wire.STREAMS, checks={"collection_id": wire.ID}, paged=True)
    async def list_collection_streams(self, collection_id: str) -> list[Stream]:
        """One stream per recording and stream of a collection."""
        from_the_table()

    @rpc_method(wire.RECORDINGS, checks={"collection_id": wire.ID}, paged=True)
    async def list_collection_recordings(self, collection_id: str) -> list[dict[str, str]]:
        """The attrs of every recording of a collection."""
        from_the_table()

    @rpc_method(
        wire.ACK,
        params={
            "collection_id": Param(wire.ID, True),
            "stream_id": Param(wire.ID, True),
            "attrs": Param(wire.check_attrs),
            "task_id": Param(wire.TASK_ID, True),
            "speed": Param(wire.check_speed),
            "rate_limit": Param(wire.check_flag),
            "strict_time": Param(wire.check_flag),
            "use_relative_ts": Param(wire.check_flag),
            "framing": Param(wire.check_framing),
            "qos": Param(wire.check_qos),
            "start": Param(wire.check_position),
            "end": Param(wire.check_position),
            "loop": Param(wire.check_loop),
        },
        served_by="agent",
    )
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

    @rpc_method(wire.NODES, paged=True, fleet=True)
    async def list_live_nodes(self) -> list[Node]:
        """Every live node."""
        from_the_table()

    @rpc_method(wire.STREAMS, checks={"node_id": wire.ID}, paged=True)
    async def list_live_streams(self, node_id: str) -> list[Stream]:
        """The streams of one live node."""
        from_the_table()

    @rpc_method(
        wire.ACK,
        params={
            "node_id": Param(wire.ID, True),
            "stream_id": Param(wire.ID, True),
            "attrs": Param(wire.check_attrs),
            "task_id": Param(wire.TASK_ID, True),
            "framing": Param(wire.check_framing),
            "qos": Param(wire.check_qos),
        },
        served_by="agent",
    )
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

    @rpc_method(wire.ACK, params={"task_id": Param(wire.TASK_ID, True)}, served_by="agent")
    async def stop_task(self, randseq: str) -> StreamAck:
        """Stop a task; its sink gets END_OF_STREAM."""
        ...

    @rpc_method(
        wire.STATE,
        params={
            "task_id": Param(wire.TASK_ID, True),
            "action": Param(wire.check_action, True),
            "position": Param(wire.check_position),
            "speed": Param(wire.check_speed),
            "loop": Param(wire.check_loop),
        },
        served_by="agent",
    )
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
