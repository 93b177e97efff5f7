"""RemoteAPI: the local API's methods, served by agents behind an MQTT broker.

::

    api = dm.RemoteAPI("mqtt", "cbor")
    await api.connect(server_host="127.0.0.1", server_port=1883)
    nodes = await api.list_live_nodes()

Without ``agent_id`` the client sees every agent behind the broker, and ids are
qualified with the agent's id (``pi-lab1/demo``) so they are unique in the fleet; with
``agent_id`` it talks to that one agent and ids are exactly as the local API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self

from .. import protocol
from ..codec import CODECS, decode, decode_frame, encode
from ..config import Config, load_config
from ..errors import (
    DatamuxError,
    InvalidRequest,
    NotFound,
    Timeout,
    Unavailable,
    error_from_code,
)
from ..framing import Framing
from ..lslout import Publications, publish_collection_stream
from ..model import Collection, Frame, Node, Stream, StreamAck, StreamError, StreamStatus
from ..mqttio import BrokerSettings, Incoming, MqttLink, Will
from ..paging import fetch_all_pages
from ..protocol import (
    DEFAULT_PREFIX,
    PROTOCOL_VERSION,
    TABLE,
    V1_PREFIX,
    Topics,
    check_id,
    is_id,
)
from .clocksync import EXCHANGES, ClockEstimate, ClockTracker
from .taskstream import TaskStream

__all__ = ["RemoteAPI"]

log = logging.getLogger(__name__)

# How long a task's consumer waits for its agent to come back before the task ends.
AGENT_RETURN_S = 30.0
STOP_WAIT_S = 5.0
CLOCK_REFRESH_S = 30.0
# Without retained births, a fleet client waits this long for the first agent to answer
# its discovery request, then this long for the others.
DISCOVERY_WAIT_S = 1.0
DISCOVERY_SETTLE_S = 0.2


class RemoteAPI:
    """The local API's interface over MQTT (docs/remote-api.md).

    Args:
        rpc_name: the transport; ``"mqtt"``.
        codec_name: ``"cbor"`` (default) or ``"json"``.
        agent_id: talk to this agent only (ids as in the local API); default: every agent.
        config: broker settings and timeouts come from here (``broker.*``, ``client.*``).
        timeout: seconds a request may take; default ``client.timeout_s``.
        qos: data QoS of the tasks this client starts: 1 (no loss, default) or 0.
        client_id: who this client is in topics, and who owns its tasks. On a broker
            with one of the shipped ACL profiles it must be the broker user name (with
            certificates: the certificate's CN). Default: ``client.id``, else the user
            name if one is set, else a random id.
        clock_refresh_s: how often the clock offsets of the agents measured so far are
            measured again (docs/remote-api.md, "Clocks").
    """

    def __init__(
        self,
        rpc_name: str = "mqtt",
        codec_name: str = "cbor",
        *,
        agent_id: str | None = None,
        config: Config | None = None,
        timeout: float | None = None,
        qos: int = 1,
        client_id: str | None = None,
        clock_refresh_s: float = CLOCK_REFRESH_S,
    ) -> None:
        if rpc_name != "mqtt":
            raise InvalidRequest(f"unknown rpc {rpc_name!r}; the transport is 'mqtt'")
        if codec_name not in CODECS:
            raise InvalidRequest(f"unknown codec {codec_name!r}; use one of {list(CODECS)}")
        if qos not in (0, 1) or isinstance(qos, bool):
            raise InvalidRequest("qos must be 0 or 1")
        self.codec = codec_name
        self.agent_id = check_id(agent_id, "agent_id") if agent_id is not None else None
        self.config = config
        self.timeout = timeout
        self.qos = qos
        self._chosen_id = check_id(client_id, "client_id") if client_id is not None else None
        self.client_id = self._chosen_id or "c" + secrets.token_hex(8)
        # This connection among the client's (one user may run several): its tasks'
        # lease follows this connection's presence only.
        self.session = secrets.token_hex(8)
        self.link: MqttLink | None = None
        self.topics = Topics()
        self._agents: dict[str, Mapping[str, Any]] = {}
        self._v1_agents: set[str] = set()  # seen under the v1 prefix: named in errors
        # request id -> (the agent asked, its reply); ids are unpredictable, and a reply
        # counts only on that agent's reply topic.
        self._replies: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        self._sync_marker: str | None = None
        self._synced: asyncio.Event | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self._streams: dict[tuple[str, str], TaskStream] = {}
        self._since = time.time()
        self._heartbeat_stop = threading.Event()
        self._lsl_out = Publications()
        self._agent_seen = asyncio.Event()
        self.clock_refresh_s = float(clock_refresh_s)
        self._clocks: dict[str, ClockTracker] = {}
        self._clock_refresher: asyncio.Task[None] | None = None

    # -- connection ----------------------------------------------------------------------

    async def connect(
        self, server_host: str | None = None, server_port: int | None = None, **options: Any
    ) -> Self:
        """Connect to the broker and learn which agents are online.

        Keyword options override ``broker.*`` settings: ``protocol``, ``username``,
        ``password``, ``ca_file``, ``cert_file``, ``key_file``, ``keepalive_s``, ``prefix``.

        Raises:
            Unavailable: no broker answers.
            NotFound: ``agent_id`` was given and that agent never announced itself.
        """
        if self.link is not None:
            raise InvalidRequest("already connected; close() first")
        config = self.config if self.config is not None else load_config()
        self.config = config
        if self.timeout is None:
            self.timeout = float(config.get("client.timeout_s"))
        settings = BrokerSettings.from_config(config, host=server_host, port=server_port, **options)
        self.topics = Topics(settings.prefix)
        if self._chosen_id is None:
            configured = config.get("client.id") or settings.username
            if is_id(configured):
                # The broker's identity of us: what the ACL profiles pin topics to (%u).
                self.client_id = configured
            elif configured:
                log.warning(
                    "broker user name %r cannot be a client id (letters, digits, '_', '.', "
                    "'-'); using %s. With an ACL profile the broker will refuse it: set "
                    "client.id",
                    configured[:64],
                    self.client_id,
                )
        self.link = MqttLink(
            # Unique per connection: one user may run several clients at once.
            f"{self.client_id}-{secrets.token_hex(4)}",
            settings,
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=Will(self.topics.client_state(self.client_id), self._absence()),
        )
        try:
            await self.link.connect(timeout=self.timeout)
        except BaseException:
            self.link = None
            raise
        try:
            await self.link.subscribe(self.topics.replies_to(self.client_id), qos=1)
            await self.link.subscribe(self.topics.client_state(self.client_id), qos=1)
            states = (
                self.topics.agent_state(self.agent_id)
                if self.agent_id
                else self.topics.every_agent_state
            )
            await self.link.subscribe(states, qos=1)
            if self.topics.prefix == DEFAULT_PREFIX:
                # Old agents, only to say why they are not used.
                await self.link.subscribe(f"{V1_PREFIX}/agents/+/state", qos=1)
            await self._discover()
        except BaseException:
            link, self.link = self.link, None
            await link.close()
            raise
        self._start_heartbeat()
        if self.agent_id and self.agent_id not in self._agents:
            await self.close()
            raise NotFound(
                f"agent {self.agent_id!r} has never announced itself on {settings.address} "
                f"under {self.topics.prefix}{self._v1_hint(self.agent_id)}"
            )
        return self

    async def _discover(self) -> None:
        """Learn which agents are online: their retained births, and their answers to a
        discovery request for brokers that do not deliver retained messages to wildcard
        subscriptions (RabbitMQ) or keep none (docs/protocol.md, "Discovery")."""
        assert self.link is not None
        self._agent_seen.clear()
        request = encode({"client": self.client_id}, self.codec)
        self.link.publish_nowait(self.topics.discover(self.client_id), request, qos=1)
        await self._sync()
        if self.agent_id is not None:
            wanted, wait = self.agent_id in self._agents, float(self.timeout or 10.0)
        else:
            wanted, wait = bool(self._agents), DISCOVERY_WAIT_S
        if wanted:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not (self.agent_id in self._agents if self.agent_id else self._agents):
                    self._agent_seen.clear()
                    await self._agent_seen.wait()
        if self._agents and self.agent_id is None:
            await asyncio.sleep(DISCOVERY_SETTLE_S)  # the others answer about as fast

    async def _sync(self) -> None:
        """Wait until the broker has sent every retained agent state.

        Our own presence comes back after them: the broker sends retained messages right
        after the SUBACK, in order. (Only agents may publish replies, so the echo is the
        presence, on the one topic this client may both write and read.)
        """
        assert self.link is not None
        self._sync_marker = secrets.token_hex(8)
        self._synced = asyncio.Event()
        try:
            payload = self._presence(sync=self._sync_marker)
            self.link.publish_nowait(
                self.topics.client_state(self.client_id), payload, qos=1, retain=True
            )
            async with asyncio.timeout(self.timeout):
                await self._synced.wait()
        except TimeoutError:
            raise Timeout("the broker did not echo a message in time") from None
        finally:
            self._sync_marker = None

    def _v1_hint(self, agent: str | None = None) -> str:
        old = sorted(self._v1_agents) if agent is None else sorted({agent} & self._v1_agents)
        if not old:
            return ""
        return (
            f"; agents {old} speak protocol v1 under {V1_PREFIX}: upgrade them to "
            f"v{PROTOCOL_VERSION} (docs/protocol.md, Versioning)"
        )

    def _absence(self) -> bytes:
        # Not an empty message (which would clear the retained presence): some brokers
        # refuse an empty will. A clean close clears it instead.
        absence = {"state": "offline", "client": self.client_id, "session": self.session}
        return encode(absence, self.codec)

    def _presence(self, **extra: Any) -> bytes:
        assert self.link is not None
        presence: dict[str, Any] = {
            "state": "online",
            "client": self.client_id,
            "session": self.session,
        }
        presence["since"] = self._since
        presence["keepalive"] = self.link.settings.keepalive_s
        return encode({**presence, **extra}, self.codec)

    def _on_connect(self, session_present: bool) -> None:
        assert self.link is not None
        self.link.publish_nowait(
            self.topics.client_state(self.client_id), self._presence(), qos=1, retain=True
        )

    def _start_heartbeat(self) -> None:
        """Re-send our presence every keepalive/2 while we own tasks: the agents' lease.

        A thread, not a coroutine: analytics code that blocks the event loop for a
        while must not cost the client its tasks.
        """
        assert self.link is not None
        link, topic = self.link, self.topics.client_state(self.client_id)
        payload, period = self._presence(), max(link.settings.keepalive_s / 2, 1.0)
        stop = self._heartbeat_stop = threading.Event()

        def beat() -> None:
            while not stop.wait(period):
                if self._streams:
                    link.publish_from_thread(topic, payload)

        threading.Thread(target=beat, name=f"heartbeat-{self.client_id}", daemon=True).start()

    async def close(self) -> None:
        """Stop this client's tasks (each sink gets END_OF_STREAM) and disconnect."""
        link, streams = self.link, list(self._streams.values())
        if link is None:
            return
        if streams and link.connected:
            stops = [self._stop_quietly(s) for s in streams]
            await asyncio.gather(*stops)
        for stream in list(self._streams.values()):
            stream.end(StreamError(stream.stream_id, "unavailable", "the client closed"))
        await self._lsl_out.wait_closed()
        self._fail_replies(lambda agent: True, "the client closed")
        self.link = None
        if self._clock_refresher is not None:
            self._clock_refresher.cancel()
            self._clock_refresher = None
        self._heartbeat_stop.set()
        # "offline" for this connection's lease, then clear the retained presence.
        state = self.topics.client_state(self.client_id)
        await link.close(final=[(state, self._absence(), 1, False), (state, b"", 1, True)])

    def _fail_replies(self, which: Callable[[str], bool], why: str) -> None:
        """End the waits of requests to the agents ``which`` selects, with Unavailable."""
        for agent, future in self._replies.values():
            if agent and which(agent) and not future.done():
                future.set_exception(Unavailable(why))

    async def _stop_quietly(self, stream: TaskStream) -> None:
        with contextlib.suppress(DatamuxError):
            await self._stop(stream.agent, stream.task_id)

    async def __aenter__(self) -> Self:
        if self.link is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    aclose = close

    # -- agents and ids ------------------------------------------------------------------

    def agents(self) -> dict[str, Mapping[str, Any]]:
        """The agents seen on the broker, by id, with their last state message."""
        return dict(self._agents)

    def _online(self) -> list[str]:
        """Online agents that speak our protocol version."""
        return sorted(
            a
            for a, s in self._agents.items()
            if s.get("state") == "online" and s.get("protocol") == PROTOCOL_VERSION
        )

    def _route(self, qualified: str, what: str) -> tuple[str, str]:
        """(agent, local id) for an id the caller passed."""
        if not isinstance(qualified, str):
            raise InvalidRequest(f"{what} must be a string, not {type(qualified).__name__}")
        if self.agent_id is not None:
            return self.agent_id, qualified
        agent, sep, local = qualified.partition("/")
        if sep:
            return check_id(agent, f"the agent part of {what}"), local
        online = self._online()
        if len(online) == 1:
            return online[0], qualified
        raise InvalidRequest(
            f"{what} {qualified!r} names no agent; in a fleet ids look like 'agent/id' "
            f"(online agents: {online or 'none'})"
        )

    def _qualify(self, agent: str, local: str) -> str:
        return local if self.agent_id is not None else f"{agent}/{local}"

    def _targets(self) -> list[str]:
        if self.agent_id is not None:
            return [self.agent_id]
        return self._online()

    async def _each_agent(self, method: str, convert: Callable[[str, Any], list[Any]]) -> list[Any]:
        """Ask every target agent; a fleet answer leaves out (and logs) agents that fail."""
        self._require_link()
        targets = self._targets()
        results = await asyncio.gather(
            *(self._rpc(agent, method) for agent in targets),
            return_exceptions=True,
        )
        merged: list[Any] = []
        failures = []
        for agent, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, DatamuxError):
                    raise result
                failures.append((agent, result))
                log.warning("agent %s did not list: %s", agent, result)
            else:
                merged.extend(convert(agent, result))
        if failures and (self.agent_id is not None or len(failures) == len(targets)):
            raise failures[0][1]
        return merged

    # -- RPC -----------------------------------------------------------------------------

    async def _call(self, agent: str, method: str, params: Mapping[str, Any]) -> Any:
        link = self._require_link()
        state = self._agents.get(agent)
        if state is None:
            raise NotFound(
                f"no agent {agent!r} behind the broker (online: {self._online()})"
                + self._v1_hint(agent)
            )
        if state.get("state") != "online":
            raise Unavailable(f"agent {agent!r} is offline")
        if state.get("protocol") != PROTOCOL_VERSION:
            raise Unavailable(
                f"agent {agent!r} speaks protocol {state.get('protocol')!r:.20}, this client "
                f"v{PROTOCOL_VERSION}: upgrade the older one (docs/protocol.md, Versioning)"
            )
        # Unpredictable, so that nobody who sees or guesses ids can answer in our place.
        request_id = secrets.token_urlsafe(16)
        request = {
            "id": request_id,
            "method": method,
            "params": dict(params),
            "session": self.session,
        }
        future = asyncio.get_running_loop().create_future()
        self._replies[request_id] = (agent, future)
        try:
            # The deadline covers sending too: a stalled broker must not stall the caller.
            async with asyncio.timeout(self.timeout):
                sent = await link.publish(
                    self.topics.rpc(agent, self.client_id), encode(request, self.codec), qos=1
                )
                if not sent:
                    raise Unavailable(f"not connected to the broker {link.settings.address}")
                reply = await future
        except TimeoutError:
            raise Timeout(
                f"{method}: no answer from agent {agent!r} within {self.timeout} s"
            ) from None
        finally:
            self._replies.pop(request_id, None)
        if not isinstance(reply, Mapping):
            raise DatamuxError(f"{method}: malformed reply from agent {agent!r}")
        if reply.get("ok") is True:
            return reply.get("result")
        error = reply.get("error")
        if not isinstance(error, Mapping):
            raise DatamuxError(f"{method}: malformed error reply from agent {agent!r}")
        raise error_from_code(str(error.get("code", "internal")), str(error.get("message", "")))

    async def _rpc(self, agent: str, method: str, **params: Any) -> Any:
        """Call ``method`` as protocol.TABLE declares it: its parameters (``None``: not
        given), every page of a listing, its result read back into model objects."""
        declared = TABLE[method]
        wire = declared.build(params)
        if declared.paged:
            result = await fetch_all_pages(self._call, agent, method, wire)
        else:
            result = await self._call(agent, method, wire)
        if declared.result is None:
            return result
        try:
            return declared.result.from_wire(result)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatamuxError(f"{method}: malformed reply from agent {agent!r}") from exc

    def _require_link(self) -> MqttLink:
        if self.link is None:
            raise Unavailable("not connected: call `await api.connect(...)` first")
        return self.link

    # -- the API -------------------------------------------------------------------------

    async def list_collections(self) -> list[Collection]:
        """Every collection of the agent (or of every agent, ids qualified)."""

        def convert(agent: str, result: list[Collection]) -> list[Collection]:
            return [self._collection(agent, c) for c in result]

        return await self._each_agent("list_collections", convert)

    def _collection(self, agent: str, collection: Collection) -> Collection:
        if self.agent_id is not None:
            return collection
        qualified = self._qualify(agent, collection.id)
        streams = {k: self._stream(agent, s) for k, s in collection.streams.items()}
        return dataclasses.replace(collection, id=qualified, streams=streams)

    def _stream(self, agent: str, stream: Stream) -> Stream:
        if self.agent_id is not None:
            return stream
        changes: dict[str, Any] = {}
        if stream.node_id is not None:
            changes["node_id"] = self._qualify(agent, stream.node_id)
        if stream.collection_id is not None:
            changes["collection_id"] = self._qualify(agent, stream.collection_id)
        return dataclasses.replace(stream, **changes)

    async def list_collection_streams(self, collection_id: str) -> list[Stream]:
        """The streams of one collection."""
        agent, local = self._route(collection_id, "collection_id")
        result = await self._rpc(agent, "list_collection_streams", collection_id=local)
        return [self._stream(agent, s) for s in result]

    async def list_collection_recordings(self, collection_id: str) -> list[dict[str, str]]:
        """The attrs of every recording of a collection."""
        agent, local = self._route(collection_id, "collection_id")
        result: list[dict[str, str]] = await self._rpc(
            agent, "list_collection_recordings", collection_id=local
        )
        return result

    async def list_live_nodes(self) -> list[Node]:
        """Every live node of the agent (or of every agent, ids qualified)."""

        def convert(agent: str, nodes: list[Node]) -> list[Node]:
            if self.agent_id is not None:
                return nodes
            return [dataclasses.replace(n, id=self._qualify(agent, n.id)) for n in nodes]

        return await self._each_agent("list_live_nodes", convert)

    async def list_live_streams(self, node_id: str) -> list[Stream]:
        """The streams of one live node."""
        agent, local = self._route(node_id, "node_id")
        result = await self._rpc(agent, "list_live_streams", node_id=local)
        return [self._stream(agent, s) for s in result]

    async def replay_collection_stream(
        self,
        collection_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        speed: float | None = None,
        rate_limit: bool | None = None,
        strict_time: bool | None = None,
        use_relative_ts: bool | None = None,
        framing: Framing | str | dict[str, Any] | None = None,
        qos: int | None = None,
        start: float | None = None,
        end: float | None = None,
        loop: bool | int = False,
    ) -> StreamAck:
        """As :meth:`API.replay_collection_stream`; ``qos`` overrides the client's.

        ``transform`` is local only (a callable cannot travel): apply it to the frames
        taken from ``sink``.
        """
        agent, local = self._route(collection_id, "collection_id")
        params = {
            "collection_id": local,
            "stream_id": stream_id,
            "speed": speed,
            "rate_limit": rate_limit,
            "strict_time": strict_time,
            "use_relative_ts": use_relative_ts,
            "start": start,
            "end": end,
            "loop": None if loop is False else loop,  # the agent's default
        }
        return await self._start(
            agent, "replay_collection_stream", params, attrs, sink, framing, qos
        )

    async def proxy_live_stream(
        self,
        node_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        framing: Framing | str | dict[str, Any] | None = None,
        qos: int | None = None,
        clock: str = "agent",
    ) -> StreamAck:
        """As :meth:`API.proxy_live_stream`; ``qos`` overrides the client's.

        ``clock="client"`` delivers timestamps on this machine's clocks: each frame is
        corrected by the agent's current clock offset (:meth:`clock_offset`).
        """
        agent, local = self._route(node_id, "node_id")
        if clock not in ("agent", "client"):
            raise InvalidRequest(f"clock must be 'agent' or 'client', not {clock!r}")
        params: dict[str, Any] = {"node_id": local, "stream_id": stream_id}
        restamp = await self._restamper(agent) if clock == "client" else None
        return await self._start(
            agent, "proxy_live_stream", params, attrs, sink, framing, qos, restamp
        )

    async def _start(
        self,
        agent: str,
        method: str,
        params: dict[str, Any],
        attrs: Mapping[str, Any] | None,
        sink: asyncio.Queue[Any],
        framing: Framing | str | dict[str, Any] | None,
        qos: int | None,
        restamp: Callable[[Frame], None] | None = None,
    ) -> StreamAck:
        if not isinstance(sink, asyncio.Queue):
            raise InvalidRequest(f"sink must be an asyncio.Queue, not {type(sink).__name__}")
        link = self._require_link()
        task_qos = self.qos if qos is None else qos
        task_id = secrets.token_hex(8)
        params = {**params, "task_id": task_id, "qos": task_qos}
        params["attrs"] = protocol.check_attrs(attrs, "attrs")  # the agent's schema, here
        params["qos"] = protocol.check_qos(task_qos, "qos")
        if framing is not None:
            params["framing"] = protocol.check_framing(_framing_wire(framing), "framing")
        stream = TaskStream(agent, task_id, sink, self._forget)
        stream.restamp = restamp
        self._streams[(agent, task_id)] = stream
        topic = self.topics.task_any(agent, self.client_id, task_id)
        try:
            # Subscribe first: frames may flow before the reply arrives.
            await link.subscribe(topic, qos=task_qos, timeout=self.timeout or 10.0)
            result = await self._rpc(agent, method, **params)
        except BaseException as exc:
            self._streams.pop((agent, task_id), None)
            stream.delivery.cancel()
            if isinstance(exc, Timeout | asyncio.CancelledError):
                # The agent may have started it after all: it must not stream to nobody.
                self._spawn(_quietly(self._rpc(agent, "stop_task", task_id=task_id)))
            self._spawn(_quietly(link.unsubscribe(topic)))
            raise
        status = bool(result.get("status", True)) if isinstance(result, Mapping) else True
        return StreamAck(status=status, randseq=self._qualify(agent, task_id))

    async def publish_collection_stream(
        self, collection_id: str, stream_id: str, attrs: Mapping[str, Any], **options: Any
    ) -> StreamAck:
        """As :meth:`API.publish_collection_stream`: an agent replays, the LSL outlet is
        on this machine (docs/lsl-out.md)."""
        publication = await publish_collection_stream(
            self, collection_id, stream_id, attrs, **options
        )
        self._lsl_out.add(publication)
        return StreamAck(status=True, randseq=publication.task_id)

    async def stop_task(self, randseq: str) -> StreamAck:
        """Stop a task; its sink gets END_OF_STREAM. Stopping an ended task is a no-op.

        Raises:
            NotFound: no such task on that agent.
            Forbidden: another client started it.
        """
        agent, local = self._route(randseq, "randseq")
        await self._stop(agent, local)
        return StreamAck(status=True, randseq=randseq)

    async def control_task(self, randseq: str, action: str, **params: Any) -> dict[str, Any]:
        """As :meth:`API.control_task`: steer a running replay; returns its state."""
        agent, local = self._route(randseq, "randseq")
        state: dict[str, Any] = await self._rpc(
            agent, "control_task", task_id=local, action=action, **params
        )
        return state

    # -- clocks (client/clocksync.py) ------------------------------------------------------

    async def clock_offset(
        self, agent_id: str | None = None, *, exchanges: int = EXCHANGES
    ) -> ClockEstimate:
        """Measure an agent's clock offset now (``exchanges`` more exchanges); the
        estimate from the best recent one. Refreshed every ``clock_refresh_s`` after.

        Raises:
            InvalidRequest: no agent given in a fleet of several.
        """
        agent = self._agent_for_clock(agent_id)
        return await self._tracker(agent).measure(exchanges)

    def clock_estimates(self) -> dict[str, ClockEstimate]:
        """The latest estimate of every agent measured so far, by agent id."""
        estimates = {}
        for agent, tracker in self._clocks.items():
            with contextlib.suppress(DatamuxError):
                estimates[agent] = tracker.estimate()
        return estimates

    def _agent_for_clock(self, agent_id: str | None) -> str:
        if agent_id is not None:
            return check_id(agent_id, "agent_id")
        if self.agent_id is not None:
            return self.agent_id
        online = self._online()
        if len(online) == 1:
            return online[0]
        raise InvalidRequest(f"which agent? online agents: {online or 'none'}")

    def _tracker(self, agent: str) -> ClockTracker:
        tracker = self._clocks.get(agent)
        if tracker is None:
            tracker = self._clocks[agent] = ClockTracker(agent, lambda: self._rpc(agent, "clock"))
        if self._clock_refresher is None and self.clock_refresh_s > 0:
            self._clock_refresher = asyncio.get_running_loop().create_task(
                self._refresh_clocks(), name=f"clocks-{self.client_id}"
            )
        return tracker

    async def _refresh_clocks(self) -> None:
        while True:
            await asyncio.sleep(self.clock_refresh_s)
            for agent, tracker in list(self._clocks.items()):
                if self._agents.get(agent, {}).get("state") != "online":
                    continue
                try:
                    await tracker.measure(EXCHANGES // 2)
                except DatamuxError as exc:
                    log.info("clock refresh of agent %s failed: %s", agent, exc)

    async def _restamper(self, agent: str) -> Callable[[Frame], None]:
        """A function moving a frame's timestamps onto this client's clocks."""
        tracker = self._tracker(agent)
        try:
            tracker.estimate()
        except DatamuxError:
            await tracker.measure()

        def restamp(frame: Frame) -> None:
            estimate = tracker.estimate()
            clock = "lsl" if frame.attrs.get("mode") == "lsl" else "unix"
            frame.timestamps = frame.timestamps - estimate.offsets.get(clock, estimate.offset)

        return restamp

    async def _stop(self, agent: str, task_id: str) -> None:
        # Look the task up first: its end message comes before the reply, and may already
        # have been handled (and the task forgotten) when the reply is.
        stream = self._streams.get((agent, task_id))
        await self._rpc(agent, "stop_task", task_id=task_id)
        if stream is None:
            return
        # Wait until END_OF_STREAM is on the sink, as with the local API. Should the end
        # message have got lost, end the sink here: a stop never leaves it open. (A full
        # bounded sink gets it as soon as there is room.)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT_S):
                await stream.ended.wait()
        if not stream.ended.is_set():
            stream.end()

    # -- incoming ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        job = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _forget(self, stream: TaskStream) -> None:
        self._streams.pop((stream.agent, stream.task_id), None)
        link = self.link
        if link is not None:
            topic = self.topics.task_any(stream.agent, self.client_id, stream.task_id)
            self._spawn(_quietly(link.unsubscribe(topic)))

    def _on_message(self, message: Incoming) -> None:
        # Who published is in the topic (the ACL profiles let only agent X write under
        # agents/X/), so each kind of message is taken only from where it belongs.
        me = self.client_id
        root, agent, kind, rest = self.topics.levels(message.topic, 4)
        if root == "agents" and kind == "state" and rest == "":
            self._on_agent_state(agent, message.payload)
        elif root == "agents" and kind == "reply" and rest == me:
            self._on_reply(agent, message.payload)
        elif root == "clients" and agent == me and kind == "state" and rest == "":
            self._on_own_presence(message.payload)
        elif root == "":
            root, agent, kind, owner, task, channel = self.topics.levels(message.topic, 6)
            if root == "agents" and kind == "tasks" and owner == me:
                self._on_task_message(agent, task, channel, message)
            elif message.topic.startswith(f"{V1_PREFIX}/agents/"):
                self._on_v1_agent_state(message.topic.split("/")[-2], message.payload)

    def _on_v1_agent_state(self, agent: str, payload: bytes) -> None:
        """An agent under the v1 prefix: v1 itself, or a v2 agent that also shows there."""
        with contextlib.suppress(InvalidRequest):
            state = decode(payload) if payload else None
            if isinstance(state, Mapping) and state.get("protocol") != PROTOCOL_VERSION:
                self._v1_agents.add(agent)

    def _on_own_presence(self, payload: bytes) -> None:
        if self._sync_marker is None or self._synced is None:
            return
        with contextlib.suppress(InvalidRequest):
            presence = decode(payload)
            if isinstance(presence, Mapping) and presence.get("sync") == self._sync_marker:
                self._synced.set()

    def _on_reply(self, agent: str, payload: bytes) -> None:
        try:
            reply = decode(payload)
        except InvalidRequest as exc:
            log.warning("ignored an unreadable reply from agent %s: %s", agent, exc)
            return
        if not isinstance(reply, Mapping) or not isinstance(reply.get("id"), str):
            return
        waiting = self._replies.get(reply["id"])
        if waiting is None or waiting[0] != agent:
            return  # not ours, or not from the agent we asked
        if not waiting[1].done():
            waiting[1].set_result(reply)

    def _on_task_message(self, agent: str, task_id: str, kind: str, message: Incoming) -> None:
        stream = self._streams.get((agent, task_id))
        if stream is None:
            return
        try:
            if kind == "data":
                wire = decode_frame(message.payload)
                if wire.task_id != task_id:
                    log.warning("task %s: ignored a frame of task %r", task_id, wire.task_id[:64])
                    return
                stream.on_frame(wire.frame)
            elif kind == "ctrl":
                ctrl = decode(message.payload)
                if isinstance(ctrl, Mapping):
                    stream.on_ctrl(ctrl)
        except InvalidRequest as exc:
            log.warning("task %s: ignored an unreadable %s message: %s", task_id, kind, exc)

    def _on_agent_state(self, agent: str, payload: bytes) -> None:
        if not payload:
            self._agents.pop(agent, None)
            state: Mapping[str, Any] = {"state": "offline"}
        else:
            try:
                decoded = decode(payload)
            except InvalidRequest:
                log.warning("ignored an unreadable state message of agent %s", agent)
                return
            if not isinstance(decoded, Mapping):
                return
            state = decoded
        previous = self._agents.get(agent)
        if payload:
            self._agents[agent] = state
            self._agent_seen.set()
        if state.get("state") != "online":
            self._fail_replies(lambda target: target == agent, f"agent {agent!r} went offline")
        for stream in [s for s in self._streams.values() if s.agent == agent]:
            self._follow_agent(stream, previous, state)

    def _follow_agent(
        self, stream: TaskStream, previous: Mapping[str, Any] | None, state: Mapping[str, Any]
    ) -> None:
        online = state.get("state") == "online"
        if previous is not None and online and previous.get("boot") != state.get("boot"):
            reason = f"agent {stream.agent} restarted; its tasks ended"
            stream.end(StreamError(stream.stream_id, "unavailable", reason))
        elif not online and stream.agent_lost is None:
            reason = f"agent {stream.agent} went offline"
            stream.put(StreamStatus(stream.stream_id, "disconnected", reason))

            def give_up() -> None:
                why = f"agent {stream.agent} did not come back within {AGENT_RETURN_S:.0f} s"
                stream.end(StreamError(stream.stream_id, "unavailable", why))

            stream.agent_lost = asyncio.get_running_loop().call_later(AGENT_RETURN_S, give_up)
        elif online and stream.agent_lost is not None:
            stream.agent_lost.cancel()
            stream.agent_lost = None
            stream.put(StreamStatus(stream.stream_id, "reconnected", f"agent {stream.agent}"))


def _framing_wire(framing: Framing | str | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(framing, Framing):
        return {"max_samples": framing.max_samples, "max_latency_ms": framing.max_latency_ms}
    if isinstance(framing, str):
        return framing
    return dict(framing)


async def _quietly(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(DatamuxError, asyncio.CancelledError):
        await awaitable
