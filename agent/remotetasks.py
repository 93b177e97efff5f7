"""The tasks clients started over MQTT: who owns each; starting, stopping, steering them.

Each runs through the local API like any task; a :class:`~.publish.TaskPublisher` reads
its sink. Only the client that started a task may stop or steer it, and the end of the
client's lease (agent/leases.py) ends its tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..api import API
from ..errors import Forbidden, InvalidRequest, NotFound, Unavailable
from ..framing import Framing
from ..model import Stream, StreamAck
from ..protocol import Request
from .leases import lease_key
from .publish import TaskPublisher

__all__ = ["PUBLISHER_STOP_S", "RemoteTask", "RemoteTasks"]

log = logging.getLogger(__name__)

# How long a stop (or the agent's shutdown) waits for a task's end message to go out.
PUBLISHER_STOP_S = 5.0


@dataclass
class RemoteTask:
    """A task started over MQTT: where its messages go and who owns it."""

    id: str
    owner: str
    session: str  # the owner's connection that started it: its lease
    qos: int
    codec: str
    stream_id: str
    publisher: asyncio.Task[None] | None = None
    ended_by: str | None = None  # why the agent ended it (a lease), for the client
    stop_requested: bool = False  # a stop that came while the task was starting
    frames: int = 0
    samples: int = 0
    next_seq: int = 0  # of the next frame: status messages carry it to keep their place
    live: bool = False  # timestamps on this host's clocks (a replay's are the recording's)
    started: float = field(default_factory=time.time)

    @property
    def lease(self) -> str:
        """The lease this task lives by: its owner's connection."""
        return lease_key(self.owner, self.session)

    def describe(self) -> dict[str, Any]:
        """The task as ``list_tasks`` and the health message show it."""
        return {
            "task_id": self.id,
            "owner": self.owner,
            "qos": self.qos,
            "frames": self.frames,
            "samples": self.samples,
            "started": self.started,
        }


@dataclass(eq=False, kw_only=True)
class RemoteTasks:
    """The agent's remote tasks, by id.

    Args:
        agent_id: this agent, named in errors.
        api: runs the tasks.
        publisher: publishes each task's sink.
        renew: restarts a lease's countdown (starting a task is a sign of life).
        spawn: runs a background job (named) that the agent cancels when it stops.
        max_tasks: ``agent.max_tasks``.
    """

    agent_id: str
    api: API
    publisher: TaskPublisher
    renew: Callable[[str], None]
    spawn: Callable[[Coroutine[Any, Any, Any], str], None]
    max_tasks: int
    _tasks: dict[str, RemoteTask] = field(default_factory=dict, init=False, repr=False)

    def __len__(self) -> int:
        return len(self._tasks)

    def all(self) -> list[RemoteTask]:
        """Every running remote task."""
        return list(self._tasks.values())

    def of_client(self, client: str) -> list[dict[str, Any]]:
        """``list_tasks``: the tasks ``client`` started."""
        return [t.describe() for t in self._tasks.values() if t.owner == client]

    def publishers(self) -> list[asyncio.Task[None]]:
        """The publishers still running: the agent's shutdown waits for their end messages."""
        return [t.publisher for t in self._tasks.values() if t.publisher is not None]

    def leases(self) -> set[str]:
        """The leases that own tasks."""
        return {t.lease for t in self._tasks.values()}

    def owns(self, lease: str) -> bool:
        """Whether the client connection ``lease`` owns tasks here."""
        return any(t.lease == lease for t in self._tasks.values())

    def release(self, lease: str, why: str) -> None:
        """End the tasks of a lease that ran out, saying why."""
        owned = [t for t in self._tasks.values() if t.lease == lease]
        client = lease.split("#", 1)[0]
        if owned:
            log.info("stopping %d tasks of client %s: %s", len(owned), client, why)
        for remote in owned:
            # Should the client still be there after all, it learns why its task ended.
            remote.ended_by = f"the agent ended the task: client {client} {why}"
            self.spawn(self.api.stop_task(remote.id), f"release-{remote.id}")

    # -- the methods -------------------------------------------------------------------

    async def start(self, request: Request, codec: str) -> dict[str, Any]:
        """``replay_collection_stream`` or ``proxy_live_stream`` for a client."""
        params = dict(request.params)
        task_id = params.pop("task_id")
        qos = params.pop("qos", 1)
        if len(self._tasks) >= self.max_tasks:
            raise Unavailable(f"agent {self.agent_id} runs {len(self._tasks)} tasks, its limit")
        if task_id in self._tasks:
            raise InvalidRequest(f"task id {task_id!r} is in use; choose a new one")
        sink: asyncio.Queue[Any] = asyncio.Queue()
        attrs = params.pop("attrs", {})
        remote = RemoteTask(
            task_id, request.client, request.session, qos, codec, params["stream_id"]
        )
        remote.live = request.method == "proxy_live_stream"
        self._tasks[task_id] = remote
        try:
            stream = await self._stream_of(request.method, params)
            asked = params.get("framing")
            framing = Framing.coerce(asked) if asked is not None else self.api.framing
            params["framing"] = self.publisher.fit_framing(stream, framing, attrs)
            start: Callable[..., Awaitable[StreamAck]]
            if request.method == "replay_collection_stream":
                start, source = self.api.replay_collection_stream, params.pop("collection_id")
            else:
                start, source = self.api.proxy_live_stream, params.pop("node_id")
            ack = await start(
                source,
                params.pop("stream_id"),
                attrs,
                sink,
                owner=request.client,
                task_id=task_id,
                **params,
            )
        except BaseException:
            del self._tasks[task_id]
            raise
        remote.publisher = asyncio.get_running_loop().create_task(
            self._publish(remote, sink), name=f"publish-{task_id}"
        )
        if remote.stop_requested:
            await self.api.stop_task(task_id)
        self.renew(remote.lease)
        log.info("task %s for %s: %s", task_id, request.client, request.method)
        return {"randseq": ack.randseq, "status": ack.status}

    async def _publish(self, remote: RemoteTask, sink: asyncio.Queue[Any]) -> None:
        try:
            await self.publisher.publish(remote, sink)
        finally:
            self._tasks.pop(remote.id, None)

    async def _stream_of(self, method: str, params: dict[str, Any]) -> Stream:
        """The stream a task request names (NotFound if it does not exist)."""
        if method == "replay_collection_stream":
            return await asyncio.to_thread(
                self.api.get_collection_stream, params["collection_id"], params["stream_id"]
            )
        streams = await self.api.list_live_streams(params["node_id"])
        for stream in streams:
            if stream.id == params["stream_id"]:
                return stream
        raise NotFound(
            f"node {params['node_id']!r} has no stream {params['stream_id']!r}; "
            f"streams: {', '.join(sorted(s.id for s in streams))}"
        )

    async def stop(self, task_id: str, client: str) -> dict[str, Any]:
        """``stop_task``: only the owner may stop a task."""
        remote = self._tasks.get(task_id)
        if remote is not None and remote.owner != client:
            raise Forbidden(f"task {task_id!r} belongs to another client")
        if remote is None and not any(t.id == task_id for t in self.api.tasks()):
            await self.api.stop_task(task_id)  # an ended task: a no-op; unknown: NotFound
            return {"randseq": task_id, "status": True}
        if remote is None:
            raise Forbidden(f"task {task_id!r} was started locally, not by a client")
        if remote.publisher is None:
            # Still starting (the client gave up waiting): stopped as soon as it starts.
            remote.stop_requested = True
            return {"randseq": task_id, "status": True}
        await self.api.stop_task(task_id)
        if remote.publisher is not None:
            # The end message is published before the reply, so it reaches the client first.
            await asyncio.wait({remote.publisher}, timeout=PUBLISHER_STOP_S)
        return {"randseq": task_id, "status": True}

    async def control(self, request: Request) -> dict[str, Any]:
        """Steer a replay this client started (docs/replay-control.md)."""
        params = dict(request.params)
        task_id, action = params.pop("task_id"), params.pop("action")
        remote = self._tasks.get(task_id)
        if remote is None:
            raise NotFound(f"no running task {task_id!r} on agent {self.agent_id}")
        if remote.owner != request.client:
            raise Forbidden(f"task {task_id!r} belongs to another client")
        return await self.api.control_task(task_id, action, **params)
