"""The local API: every task runs in this process, no broker involved.

``RemoteAPI`` offers the same methods over MQTT, so code written against one runs
against the other.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .catalog import Catalog
from .checks import check_sink, check_text
from .config import Config, load_config
from .drivers.base import Driver, DriverStatus, Source
from .drivers.registry import create_drivers
from .drivers.replay import ReplayOpener
from .drivers.replaycontrol import ReplayControl
from .errors import InvalidRequest, NotFound
from .framing import Framing
from .lslout import Publications, publish_collection_stream
from .model import Collection, Frame, Node, Stream, StreamAck
from .tasks import Task

__all__ = ["API"]

log = logging.getLogger(__name__)

_REMEMBER_ENDED = 4096


def _check_attrs(attrs: Any) -> dict[str, Any]:
    if attrs is None:
        return {}
    if not isinstance(attrs, Mapping):
        raise InvalidRequest(f"attrs must be a mapping, not {type(attrs).__name__}")
    return dict(attrs)


class API:
    """Collections, live nodes and tasks, in this process.

    Args:
        config: the effective configuration; loaded from the usual layers when omitted.
        drivers: the live drivers; by default the simulator with the configured nodes.
    """

    def __init__(
        self, config: Config | None = None, *, drivers: Sequence[Driver] | None = None
    ) -> None:
        self.config = config if config is not None else load_config()
        self.framing = Framing.coerce(self.config.framing or None)
        self.catalog = Catalog(Path(self.config.data_dir), Path(self.config.meta_dir))
        #: Opens replays of the catalog's recordings: replay tasks and guided simulation.
        self.recordings = ReplayOpener(self.catalog)
        self._drivers = list(drivers) if drivers is not None else self._default_drivers()
        self._tasks: dict[str, Task] = {}
        # Ids of tasks that ended, so stopping one after its END_OF_STREAM is not an error.
        self._ended: deque[str] = deque(maxlen=_REMEMBER_ENDED)
        self._lsl_out = Publications()

    def _default_drivers(self) -> list[Driver]:
        options = {
            "sim": self.config.simulate,
            "lsl": self.config.get("drivers.lsl"),
            "serial": self.config.get("drivers.serial"),
            "ble": self.config.get("drivers.ble"),
            **self.config.get("drivers.extra"),
        }
        return create_drivers(
            self.config.get("drivers.enabled"), options, recordings=self.recordings
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every task (each sink gets END_OF_STREAM), then release the drivers."""
        await asyncio.gather(*(task.stop() for task in list(self._tasks.values())))
        await self._lsl_out.wait_closed()
        await asyncio.gather(*(driver.aclose() for driver in self._drivers))

    # -- collections -------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The folder recordings are read from (``data_dir`` of the configuration)."""
        return Path(self.config.data_dir)

    def get_collection(self, collection_id: str) -> Collection:
        """One collection by id. A broken metadata file raises its MetadataError here."""
        return self.catalog.get(check_text(collection_id, "collection_id"))

    def get_collection_stream(self, collection_id: str, stream_id: str) -> Stream:
        """One declared stream of a collection, by ids (NotFound names the known ones)."""
        stream_id = check_text(stream_id, "stream_id")
        return self.recordings.get_collection_stream(
            check_text(collection_id, "collection_id"), stream_id
        )

    async def list_collections(self) -> list[Collection]:
        """Every collection that loads (broken metadata files are logged and skipped)."""
        collections, _ = await asyncio.to_thread(self.catalog.scan)
        return list(collections.values())

    async def list_collection_streams(self, collection_id: str) -> list[Stream]:
        """One stream per recording and stream, as upstream DataMux lists them.

        Each ``stream.attrs`` holds the recording's attributes plus ``collection``,
        ``id`` and ``mode``; passed back to :meth:`replay_collection_stream` they replay
        that recording. The declared streams alone: :meth:`get_collection`.

        Raises:
            NotFound: unknown collection, or no recordings (naming the folders searched
                and the pattern).
        """

        def listing() -> list[Stream]:
            return self.catalog.recording_streams(self.get_collection(collection_id))

        return await asyncio.to_thread(listing)

    async def list_collection_recordings(self, collection_id: str) -> list[dict[str, str]]:
        """The attrs of every recording of a collection (what ``attrs`` may select).

        Raises:
            NotFound: unknown collection, or no recordings (naming the folders searched
                and the pattern).
        """

        def listing() -> list[dict[str, str]]:
            recordings = self.catalog.recordings(self.get_collection(collection_id))
            return [dict(r.attrs) for r in recordings]

        return await asyncio.to_thread(listing)

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
        transform: Callable[[Frame], Any] | None = None,
        framing: Framing | str | dict[str, Any] | None = None,
        owner: str = "",
        task_id: str | None = None,
        start: float | None = None,
        end: float | None = None,
        loop: bool | int = False,
    ) -> StreamAck:
        """Replay one stream of one recording into ``sink``.

        Args:
            collection_id: the collection.
            stream_id: the stream in it.
            attrs: selects exactly one recording (e.g. ``{"subject": "A"}``): the
                pattern's placeholders select, other keys (such as upstream's ``id``,
                ``mode``, ``collection``) are echoed on every frame.
            sink: receives frames, then END_OF_STREAM.
            speed: 1.0 real time (default), 2.0 twice as fast, 0 as fast as possible.
            rate_limit: upstream's switch; ``False`` means speed 0.
            strict_time: ``True`` (default) releases frames on the timestamps' absolute
                schedule; ``False`` paces by sample count at the nominal frequency.
            use_relative_ts: shift timestamps so the first sample is at 0 (upstream's
                default); ``False`` (default) keeps the recording's own (docs/design.md).
            transform: called with each frame; what it returns goes on the sink instead
                (status items, errors and END_OF_STREAM pass unchanged). An exception
                in it ends the task with an error item.
            framing: a :class:`Framing`, a preset name or a dict; defaults to the config.
            owner: who asked (the agent passes the client id; see docs/protocol.md).
            task_id: the task's id; chosen here when omitted (the agent passes the
                client's choice, so the client can subscribe before frames flow).
            start, end: play only this window, in seconds after the first sample.
            loop: ``True`` repeats the window until stopped, an integer N plays it N
                times; each new pass is marked by a ``StreamStatus("loop")``.

        The running replay can be steered with :meth:`control_task`.

        Raises:
            NotFound: unknown collection, stream, or no matching recording.
            InvalidRequest: bad parameters, or attrs that match several recordings.
        """
        attrs = _check_attrs(attrs)
        sink = check_sink(sink)
        task_id = self._new_task_id(task_id)
        if speed is None:
            speed = 0.0 if rate_limit is False else 1.0
        for name, flag in (("strict_time", strict_time), ("use_relative_ts", use_relative_ts)):
            if not isinstance(flag, bool):
                raise InvalidRequest(f"{name} must be True or False, not {flag!r}")
        if transform is not None and not callable(transform):
            raise InvalidRequest(f"transform must be callable, not {type(transform).__name__}")
        chosen = Framing.coerce(framing) if framing is not None else self.framing
        control = ReplayControl(speed, start=start, end=end, loop=loop)
        source = await asyncio.to_thread(
            self.recordings.open_replay,
            check_text(collection_id, "collection_id"),
            check_text(stream_id, "stream_id"),
            attrs,
            speed=speed,
            framing=chosen,
            relative_ts=use_relative_ts,
            strict_time=strict_time,
            control=control,
        )
        frame_attrs = {**source.stream.attrs, **attrs}
        return self._start(
            source.stream,
            lambda: source,
            sink,
            frame_attrs,
            chosen,
            owner,
            task_id,
            transform,
            control,
        )

    async def publish_collection_stream(
        self, collection_id: str, stream_id: str, attrs: Mapping[str, Any], **options: Any
    ) -> StreamAck:
        """Replay one stream of one recording as an LSL outlet on this machine.

        Upstream's method, with every replay option (``speed``, ``framing``, ...) and the
        outlet's ``name``, ``stream_type`` and ``source_id`` (docs/lsl-out.md).
        :meth:`stop_task` with the returned ``randseq`` ends the replay and the outlet.
        """
        publication = await publish_collection_stream(
            self, collection_id, stream_id, attrs, **options
        )
        self._lsl_out.add(publication)
        return StreamAck(status=True, randseq=publication.task_id)

    # -- live nodes --------------------------------------------------------------------

    async def list_live_nodes(self) -> list[Node]:
        """Every live node the drivers can see now."""
        nodes: list[Node] = []
        for driver in self._drivers:
            nodes.extend(await driver.list_nodes())
        return nodes

    def driver_states(self) -> list[DriverStatus]:
        """How each live driver is doing (``unavailable`` ones are retried in the background)."""
        return [driver.status() for driver in self._drivers]

    async def _driver_of(self, node_id: str) -> Driver:
        check_text(node_id, "node_id")
        seen: list[str] = []
        for driver in self._drivers:
            for node in await driver.list_nodes():
                if node.id == node_id:
                    return driver
                seen.append(node.id)
        raise NotFound(f"no live node {node_id!r}; nodes: {sorted(seen) or 'none'}")

    async def list_live_streams(self, node_id: str) -> list[Stream]:
        """The streams of one live node."""
        driver = await self._driver_of(node_id)
        return await driver.list_streams(node_id)

    async def proxy_live_stream(
        self,
        node_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        framing: Framing | str | dict[str, Any] | None = None,
        owner: str = "",
        task_id: str | None = None,
    ) -> StreamAck:
        """Stream a live stream into ``sink`` until stopped.

        ``framing``, ``owner`` and ``task_id`` are as for :meth:`replay_collection_stream`.

        Raises:
            NotFound: unknown node or stream.
            InvalidRequest: bad parameters.
        """
        attrs = _check_attrs(attrs)
        sink = check_sink(sink)
        stream_id = check_text(stream_id, "stream_id")
        task_id = self._new_task_id(task_id)
        chosen = Framing.coerce(framing) if framing is not None else self.framing
        driver = await self._driver_of(node_id)

        def open_source() -> Source:
            return driver.open_stream(node_id, stream_id, attrs, chosen)

        # Built now so a bad request fails here, not inside the task; opened by the task.
        stream = (await asyncio.to_thread(open_source)).stream
        frame_attrs = {**stream.attrs, **attrs}
        return self._start(stream, open_source, sink, frame_attrs, chosen, owner, task_id)

    # -- tasks -------------------------------------------------------------------------

    def _start(
        self,
        stream: Stream,
        open_source: Any,
        sink: asyncio.Queue[Any],
        attrs: Mapping[str, Any],
        framing: Framing,
        owner: str,
        task_id: str,
        transform: Callable[[Frame], Any] | None = None,
        control: ReplayControl | None = None,
    ) -> StreamAck:
        if task_id in self._tasks:  # checked before, but an await came in between
            raise InvalidRequest(f"task id {task_id!r} is in use")
        task = Task(
            task_id,
            open_source,
            sink,
            stream_id=stream.id,
            channels=stream.channels,
            attrs=attrs,
            framing=framing,
            owner=owner,
            transform=transform,
            control=control,
        )
        self._tasks[task_id] = task
        task.start(on_done=self._forget)
        return StreamAck(status=True, randseq=task_id)

    def _new_task_id(self, task_id: str | None) -> str:
        if task_id is None:
            return secrets.token_hex(8)
        task_id = check_text(task_id, "task_id")
        if task_id in self._tasks or task_id in self._ended:
            raise InvalidRequest(f"task id {task_id!r} is in use; choose a new one")
        return task_id

    def _forget(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        self._ended.append(task.id)

    def tasks(self) -> list[Task]:
        """The tasks running now."""
        return list(self._tasks.values())

    async def stop_task(self, randseq: str) -> StreamAck:
        """Stop a task; its sink gets END_OF_STREAM. Stopping an ended task is a no-op.

        Raises:
            NotFound: no task ever had this id (here).
        """
        task = self._tasks.get(randseq) if isinstance(randseq, str) else None
        if task is None:
            if randseq in self._ended:
                return StreamAck(status=True, randseq=randseq)
            raise NotFound(f"no task {randseq!r}")
        await task.stop()
        return StreamAck(status=True, randseq=randseq)

    async def control_task(self, randseq: str, action: str, **params: Any) -> dict[str, Any]:
        """Steer a running replay (docs/replay-control.md); returns its state.

        Actions: ``pause``, ``resume``, ``seek`` (``position=`` seconds into the
        recording), ``speed`` (``speed=``), ``loop`` (``loop=`` True, False or N) and
        ``state`` (changes nothing). The state is ``{paused, speed, position, start,
        end, loop, pass}``.

        Raises:
            NotFound: no running task with this id.
            InvalidRequest: a live task, an unknown action or a bad parameter.
        """
        task = self._tasks.get(randseq) if isinstance(randseq, str) else None
        if task is None:
            ended = " (it has ended)" if randseq in self._ended else ""
            raise NotFound(f"no running task {randseq!r}{ended}")
        if task.control is None:
            raise InvalidRequest(f"task {randseq!r} is a live stream; only replays can be steered")
        return task.control.apply(check_text(action, "action"), params)
