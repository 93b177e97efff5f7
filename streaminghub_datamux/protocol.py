"""The MQTT protocol between agents and clients: topics, messages and their schema.

docs/protocol.md is the specification; this module is its executable form, shared by the
agent and the RemoteAPI so the two cannot disagree. Nothing here touches the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .checks import ID_PATTERN, is_id
from .drivers.replaycontrol import ACTIONS as CONTROL_ACTIONS
from .errors import InvalidRequest
from .methods import Check, Method, MethodTable, Param, Result
from .model import Collection, Node, Stream, StreamError, StreamStatus
from .paging import PAGE_PARAMS

__all__ = [
    "DEFAULT_PREFIX",
    "ID_PATTERN",
    "METHODS",
    "PROTOCOL_VERSION",
    "TABLE",
    "Request",
    "Topics",
    "check_id",
    "ctrl_end",
    "ctrl_error",
    "ctrl_status",
    "error_reply",
    "is_id",
    "ok_reply",
    "parse_request",
    "request_id_of",
    "status_data",
    "stream_from_wire",
    "stream_to_wire",
]

PROTOCOL_VERSION = 2
DEFAULT_PREFIX = "streaminghub/v2"
# Where protocol v1 peers are found when the prefix is the default one (for clear errors).
V1_PREFIX = "streaminghub/v1"

# Agent, client and task ids appear in topics (and the spool's folder): ID_PATTERN has
# no "/", "+", "#" or spaces, and a bounded length.
MAX_TEXT = 256  # longest id, name or topic accepted in a request
MAX_ATTRS = 32
MAX_FRAME_SAMPLES = 1_000_000
MAX_LATENCY_MS = 60_000.0


def check_id(value: Any, what: str) -> str:
    """An id safe to put in a topic or a path.

    Raises:
        InvalidRequest: anything else.
    """
    if not is_id(value):
        raise InvalidRequest(
            f"{what} must be 1 to 64 letters, digits, '_', '.' or '-' (not starting with "
            f"'.' or '-'), not {_short(value)}"
        )
    return value


class Topics:
    """Every topic of one deployment, under its prefix (docs/protocol.md, "Topics").

    The one place the topic layout is written down. Who may publish on a topic is in
    the topic itself, so that a broker ACL can enforce it (``%u``): everything an agent
    publishes is under ``agents/{agent}/``, a request names its client as the last level
    of ``agents/{agent}/rpc/{client}``, and task topics carry their owner.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix.strip("/")

    # -- published by an agent
    def agent_state(self, agent: str) -> str:
        """Where ``agent`` announces itself: birth, and its will (retained)."""
        return f"{self.prefix}/agents/{agent}/state"

    def agent_health(self, agent: str) -> str:
        """Where ``agent`` publishes its health (retained)."""
        return f"{self.prefix}/agents/{agent}/health"

    def reply(self, agent: str, client: str) -> str:
        """Where ``agent`` answers ``client``: readable by that client only (ACL)."""
        return f"{self.prefix}/agents/{agent}/reply/{client}"

    def task_data(self, agent: str, owner: str, task: str) -> str:
        """Where a task's frames go."""
        return f"{self.prefix}/agents/{agent}/tasks/{owner}/{task}/data"

    def task_ctrl(self, agent: str, owner: str, task: str) -> str:
        """Where a task's end, error and status messages go."""
        return f"{self.prefix}/agents/{agent}/tasks/{owner}/{task}/ctrl"

    def task_any(self, agent: str, owner: str, task: str) -> str:
        """Both of a task's topics, for a subscription."""
        return f"{self.prefix}/agents/{agent}/tasks/{owner}/{task}/+"

    # -- published by a client
    def rpc(self, agent: str, client: str) -> str:
        """Where ``client`` sends requests to ``agent``: writable by that client only."""
        return f"{self.prefix}/agents/{agent}/rpc/{client}"

    def client_state(self, client: str) -> str:
        """Where ``client`` announces its presence (the agents' lease)."""
        return f"{self.prefix}/clients/{client}/state"

    def discover(self, client: str) -> str:
        """Where ``client`` asks every agent to announce itself again (not retained)."""
        return f"{self.prefix}/clients/{client}/discover"

    # -- subscriptions
    def rpc_of(self, agent: str) -> str:
        """Every client's requests to ``agent``."""
        return f"{self.prefix}/agents/{agent}/rpc/+"

    def replies_to(self, client: str) -> str:
        """Every agent's replies to ``client``."""
        return f"{self.prefix}/agents/+/reply/{client}"

    @property
    def every_agent_state(self) -> str:
        """Every agent's birth and will."""
        return f"{self.prefix}/agents/+/state"

    @property
    def every_agent_health(self) -> str:
        """Every agent's health."""
        return f"{self.prefix}/agents/+/health"

    @property
    def every_discover(self) -> str:
        """Every client's discovery requests (docs/protocol.md, "Discovery")."""
        return f"{self.prefix}/clients/+/discover"

    @property
    def every_client_state(self) -> str:
        """Every client's presence."""
        return f"{self.prefix}/clients/+/state"

    def v1_state(self, agent: str) -> str | None:
        """Where protocol v1 clients look for ``agent`` (with the default prefix only):
        a v2 agent announces itself there too, so that their requests reach it and get
        a clear error instead of no agent at all."""
        return f"{V1_PREFIX}/agents/{agent}/state" if self.prefix == DEFAULT_PREFIX else None

    def v1_rpc(self, agent: str) -> list[str]:
        """Where protocol v1 clients send requests to ``agent`` (answered with an error)."""
        topics = [f"{self.prefix}/agents/{agent}/rpc"]
        if self.prefix == DEFAULT_PREFIX:
            topics.append(f"{V1_PREFIX}/agents/{agent}/rpc")
        return topics

    def levels(self, topic: str, count: int) -> list[str]:
        """The first ``count`` topic levels after the prefix ("" where there are fewer):
        ``["agents", agent, "tasks", owner, task, "data"]``. Empty for another prefix."""
        if not topic.startswith(self.prefix + "/"):
            return [""] * count
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) > count:
            return [""] * count  # deeper than any topic of ours
        return parts + [""] * (count - len(parts))


# -- requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A validated request: ``{id, method, params}`` from ``client``, the last level of
    the topic it came on (never a payload field)."""

    id: str | int
    method: str
    params: dict[str, Any]
    client: str
    session: str = ""  # which of the client's connections: groups its tasks' lease


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {_type(value)}")
    if not value or len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name} must be 1 to {MAX_TEXT} characters")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    """A value for an error message: short, and safe for any hostile shape."""
    if isinstance(value, str):
        return repr(value[:60])
    if isinstance(value, bool | float) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else "a huge integer"
    return f"a {_type(value)}"


def _number(value: Any, name: str) -> float:
    try:
        finite = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and (math.isfinite(value))
        )
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise InvalidRequest(f"{name} must be a finite number, not {_short(value)}")
    return float(value)


def _speed(value: Any, name: str) -> float:
    speed = _number(value, name)
    if speed < 0:
        raise InvalidRequest(f"{name} must be >= 0 (0 means as fast as possible)")
    return speed


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, not {_type(value)}")
    return value


def _qos(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1):
        raise InvalidRequest(
            f"{name} must be 0 (lowest latency) or 1 (no loss), not {_short(value)}"
        )
    return int(value)


def _attrs(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{name} must be a map, not {_type(value)}")
    if len(value) > MAX_ATTRS:
        raise InvalidRequest(f"{name} has {len(value)} entries; at most {MAX_ATTRS}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        _text(key, f"{name} key")
        if isinstance(item, int | float) and not isinstance(item, bool):
            _number(item, f"{name}[{key[:60]!r}]")  # no NaN, no infinity: JSON has neither
        elif not isinstance(item, str | bool) or (isinstance(item, str) and len(item) > MAX_TEXT):
            raise InvalidRequest(f"{name}[{key[:60]!r}] must be a short string, number or boolean")
        out[key] = item
    return out


def _framing(value: Any, name: str) -> str | dict[str, Any]:
    if isinstance(value, str):
        return _text(value, name)
    if not isinstance(value, Mapping) or any(
        k not in ("preset", "max_samples", "max_latency_ms") for k in value
    ):
        raise InvalidRequest(
            f"{name} must be a preset name or a map of preset, max_samples, max_latency_ms"
        )
    out: dict[str, Any] = {}
    if "preset" in value:
        out["preset"] = _text(value["preset"], f"{name}.preset")
    if "max_samples" in value:
        samples = value["max_samples"]
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise InvalidRequest(f"{name}.max_samples must be an integer")
        if not 1 <= samples <= MAX_FRAME_SAMPLES:
            raise InvalidRequest(f"{name}.max_samples must be 1 to {MAX_FRAME_SAMPLES}")
        out["max_samples"] = samples
    if "max_latency_ms" in value:
        latency = _number(value["max_latency_ms"], f"{name}.max_latency_ms")
        if not 0 < latency <= MAX_LATENCY_MS:
            raise InvalidRequest(f"{name}.max_latency_ms must be > 0 and <= {MAX_LATENCY_MS}")
        out["max_latency_ms"] = latency
    return out


def _task_id(value: Any, name: str) -> str:
    return check_id(value, name)


def _position(value: Any, name: str) -> float:
    position = _number(value, name)
    if position < 0:
        raise InvalidRequest(f"{name} must be >= 0 seconds into the recording")
    return position


def _loop(value: Any, name: str) -> bool | int:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and (value >= 1 or value == -1) and value < 2**31:
        return value
    raise InvalidRequest(f"{name} must be true (forever), false (once) or a count >= 1")


def _action(value: Any, name: str) -> str:
    if value not in CONTROL_ACTIONS:
        raise InvalidRequest(f"unknown {name} {value!r:.40}; actions: {list(CONTROL_ACTIONS)}")
    return str(value)


# The client checks what it sends with the same rules.
check_attrs = _attrs
check_framing = _framing
check_qos = _qos

_ID: Check = _text


# -- model objects on the wire ---------------------------------------------------------


def stream_to_wire(stream: Stream) -> dict[str, Any]:
    """A stream as a listing carries it: its metadata entry with its id."""
    return {"id": stream.id, **stream.to_dict()}


def stream_from_wire(data: Mapping[str, Any]) -> Stream:
    """A stream from a listing (the inverse of :func:`stream_to_wire`)."""
    return Stream.from_dict(str(data["id"]), data)


def collection_from_wire(data: Mapping[str, Any]) -> Collection:
    return Collection.from_dict(data)


def node_from_wire(data: Mapping[str, Any]) -> Node:
    return Node.from_dict(data)


# -- the method table ------------------------------------------------------------------
# Each RPC method, declared once (docs/design.md, "The method table"): the agent checks
# and dispatches requests with it, the RemoteAPI builds its calls and reads the replies
# with it, and tests hold docs/protocol.md's table and the API's interface to it.


def _list_of(convert: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def read(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise TypeError(f"a list, not {_type(value)}")
        return [convert(item) for item in value]

    return read


def _map(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"a map, not {_type(value)}")
    return dict(value)


def _same(value: Any) -> Any:
    return value


COLLECTIONS = Result(
    "list of collections", _list_of(Collection.to_dict), _list_of(collection_from_wire)
)
STREAMS = Result("list of streams", _list_of(stream_to_wire), _list_of(stream_from_wire))
RECORDINGS = Result("list of maps of attrs", _same, _list_of(_map))
NODES = Result("list of nodes", _list_of(Node.to_dict), _list_of(node_from_wire))
TASKS = Result("list of task descriptions", _same, _list_of(_map))
ACK = Result("task acknowledgement", _same, _same)  # the client reads it leniently
STATE = Result("map", _same, _map)

TABLE = MethodTable(
    [
        Method("list_collections", result=COLLECTIONS, paged=True, fleet=True),
        Method(
            "list_collection_streams",
            {"collection_id": Param(_ID, True)},
            STREAMS,
            paged=True,
        ),
        Method(
            "list_collection_recordings",
            {"collection_id": Param(_ID, True)},
            RECORDINGS,
            paged=True,
        ),
        Method(
            "replay_collection_stream",
            {
                "collection_id": Param(_ID, True),
                "stream_id": Param(_ID, True),
                "attrs": Param(_attrs),
                "task_id": Param(_task_id, True),
                "speed": Param(_speed),
                "rate_limit": Param(_flag),
                "strict_time": Param(_flag),
                "use_relative_ts": Param(_flag),
                "framing": Param(_framing),
                "qos": Param(_qos),
                "start": Param(_position),
                "end": Param(_position),
                "loop": Param(_loop),
            },
            ACK,
            served_by="agent",
        ),
        Method("list_live_nodes", result=NODES, paged=True, fleet=True),
        Method("list_live_streams", {"node_id": Param(_ID, True)}, STREAMS, paged=True),
        Method(
            "proxy_live_stream",
            {
                "node_id": Param(_ID, True),
                "stream_id": Param(_ID, True),
                "attrs": Param(_attrs),
                "task_id": Param(_task_id, True),
                "framing": Param(_framing),
                "qos": Param(_qos),
            },
            ACK,
            served_by="agent",
        ),
        Method("stop_task", {"task_id": Param(_task_id, True)}, ACK, served_by="agent"),
        Method("list_tasks", result=TASKS, served_by="agent", paged=True),
        Method("clock", result=STATE, served_by="agent"),
        Method(
            "control_task",
            {
                "task_id": Param(_task_id, True),
                "action": Param(_action, True),
                "position": Param(_position),
                "speed": Param(_speed),
                "loop": Param(_loop),
            },
            STATE,
            served_by="agent",
        ),
    ]
)

# Each method's parameters as the request parser reads them: name -> (check, required),
# the paging parameters included. Unknown parameters are refused, so a typo never
# silently falls back to a default.
METHODS: dict[str, dict[str, tuple[Check, bool]]] = {
    method.name: {
        **{name: (param.check, param.required) for name, param in method.params.items()},
        **(PAGE_PARAMS if method.paged else {}),
    }
    for method in TABLE.values()
}
#: The methods whose replies are lists, and so may be paged (paging.py).
PAGED_METHODS = tuple(method.name for method in TABLE.values() if method.paged)


# A request's fields; anything else is refused, so that a v1 request (with "client" and
# "reply_to", which v2 takes from the topic) gets a clear error.
REQUEST_FIELDS = ("id", "method", "params", "session")


def request_id_of(message: Any) -> str | int | None:
    """The request's id, if it has a usable one (to address an error reply)."""
    if not isinstance(message, Mapping):
        return None
    request_id = message.get("id")
    if isinstance(request_id, str) and 0 < len(request_id) <= MAX_TEXT:
        return request_id
    if (
        isinstance(request_id, int)
        and not isinstance(request_id, bool)
        and -(2**63) <= request_id < 2**64
    ):
        return request_id
    return None


def parse_request(message: Any, client: str) -> Request:
    """Validate a decoded request from ``client`` (taken from its topic) against the schema.

    Any value in any field, however deep or odd, either passes or raises InvalidRequest.

    Raises:
        InvalidRequest: a missing or wrong field, an unknown method or parameter.
    """
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"a request must be a map, not {_type(message)}")
    unknown_fields = [k for k in message if k not in REQUEST_FIELDS]
    if unknown_fields:
        names = ", ".join(sorted(_short(k) for k in unknown_fields)[:8])
        hint = ""
        if "client" in unknown_fields or "reply_to" in unknown_fields:
            hint = (
                f" (protocol v{PROTOCOL_VERSION} takes the client from the request's topic, "
                "agents/{agent}/rpc/{client}, and always replies on agents/{agent}/reply/{client})"
            )
        raise InvalidRequest(f"unknown request fields {names}; known: {list(REQUEST_FIELDS)}{hint}")
    request_id = request_id_of(message)
    if request_id is None:
        raise InvalidRequest("id must be a string of 1 to 256 characters or a 64-bit integer")
    method = message.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidRequest(f"unknown method {_short(method)}; methods: {sorted(METHODS)}")
    raw = message.get("params", {})
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"params must be a map, not {_type(raw)}")
    schema = METHODS[method]
    unknown = sorted(_short(k) for k in raw if k not in schema)
    if unknown:
        raise InvalidRequest(
            f"{method}: unknown parameters {', '.join(unknown[:8])}; known: {sorted(schema)}"
        )
    params: dict[str, Any] = {}
    for name, (check, required) in schema.items():
        if name in raw:
            params[name] = check(raw[name], name)
        elif required:
            raise InvalidRequest(f"{method}: missing parameter {name!r}")
    session = message.get("session", "")
    if session != "":
        check_id(session, "session")
    return Request(request_id, method, params, check_id(client, "client"), session)


def ok_reply(request_id: Any, result: Any) -> dict[str, Any]:
    """A successful reply to the request ``request_id``."""
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: Any, code: str, message: str) -> dict[str, Any]:
    """A failed reply: an error code (docs/protocol.md, "Errors") and what went wrong."""
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


# -- task control messages -------------------------------------------------------------


def ctrl_end(task_id: str, frames: int, samples: int) -> dict[str, Any]:
    """The last message of a task: how many frames were sent, so gaps can be found."""
    return {"task": task_id, "kind": "end", "frames": frames, "samples": samples}


def ctrl_error(task_id: str, error: StreamError) -> dict[str, Any]:
    """A task's error message; an end message follows it."""
    return {
        "task": task_id,
        "kind": "error",
        "stream_id": error.stream_id,
        "code": error.code,
        "reason": error.reason,
    }


def ctrl_status(task_id: str, status: StreamStatus, seq: int | None = None) -> dict[str, Any]:
    """A status item; ``seq`` (the next frame's) lets the client put it back in its place
    among the frames, which travel on another topic."""
    message: dict[str, Any] = {
        "task": task_id,
        "kind": "status",
        "stream_id": status.stream_id,
        "status": status.status,
        "reason": status.reason,
        "data": dict(status.data),
    }
    if seq is not None:
        message["seq"] = seq
    return message


def status_data(value: Any) -> dict[str, Any]:
    """The ``data`` of a status message from the network: short scalars only."""
    if not isinstance(value, Mapping) or len(value) > MAX_ATTRS:
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > MAX_TEXT:
            continue
        if isinstance(item, bool | int | float) or (
            isinstance(item, str) and len(item) <= MAX_TEXT
        ):
            out[key] = item
    return out
