"""The MQTT protocol between agents and clients: topics, messages and their schema.

docs/protocol.md is the specification; this module is its executable form, shared by the
agent and the RemoteAPI so the two cannot disagree. Nothing here touches the network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .model import Collection, Node, Stream, StreamError, StreamStatus
from .paging import PAGE_PARAMS, PAGED_METHODS

__all__ = [
    "METHODS",
    "PROTOCOL_VERSION",
    "Request",
    "Topics",
    "check_id",
    "ctrl_end",
    "ctrl_error",
    "ctrl_status",
    "error_reply",
    "ok_reply",
    "parse_request",
    "stream_from_wire",
    "stream_to_wire",
]

PROTOCOL_VERSION = 1

# Agent, client and task ids appear in topics (and the spool's folder): no "/", "+",
# "#" or spaces, and a bounded length.
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_TEXT = 256  # longest id, name or topic accepted in a request
MAX_ATTRS = 32
MAX_FRAME_SAMPLES = 1_000_000
MAX_LATENCY_MS = 60_000.0


def check_id(value: Any, what: str) -> str:
    """An id safe to put in a topic or a path.

    Raises:
        InvalidRequest: anything else.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidRequest(
            f"{what} must be 1 to 64 letters, digits, '_', '.' or '-' (not starting with "
            f"'.' or '-'), not {value!r:.80}"
        )
    return value


class Topics:
    """Every topic of one deployment, under its prefix (docs/protocol.md, "Topics")."""

    def __init__(self, prefix: str = "streaminghub/v1") -> None:
        self.prefix = prefix.strip("/")

    def agent_state(self, agent: str) -> str:
        return f"{self.prefix}/agents/{agent}/state"

    def agent_rpc(self, agent: str) -> str:
        return f"{self.prefix}/agents/{agent}/rpc"

    def agent_health(self, agent: str) -> str:
        return f"{self.prefix}/agents/{agent}/health"

    def task_data(self, agent: str, task: str) -> str:
        return f"{self.prefix}/agents/{agent}/tasks/{task}/data"

    def task_ctrl(self, agent: str, task: str) -> str:
        return f"{self.prefix}/agents/{agent}/tasks/{task}/ctrl"

    def task_any(self, agent: str, task: str) -> str:
        return f"{self.prefix}/agents/{agent}/tasks/{task}/+"

    def client_rpc(self, client: str) -> str:
        return f"{self.prefix}/clients/{client}/rpc"

    def client_state(self, client: str) -> str:
        return f"{self.prefix}/clients/{client}/state"

    @property
    def every_agent_state(self) -> str:
        return f"{self.prefix}/agents/+/state"

    @property
    def every_client_state(self) -> str:
        return f"{self.prefix}/clients/+/state"

    @property
    def reply_space(self) -> str:
        return f"{self.prefix}/clients/"

    def levels(self, topic: str, count: int) -> list[str]:
        """The first ``count`` topic levels after the prefix ("" where there are fewer):
        ``["agents", agent, "tasks", task, "data"]``."""
        parts = topic[len(self.prefix) + 1 :].split("/", count)[:count]
        return parts + [""] * (count - len(parts))


# -- requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A validated request: ``{id, method, params, reply_to, client}``."""

    id: str | int
    method: str
    params: dict[str, Any]
    reply_to: str
    client: str


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {_type(value)}")
    if not value or len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name} must be 1 to {MAX_TEXT} characters")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


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
        raise InvalidRequest(f"{name} must be a finite number, not {value!r:.40}")
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
    if isinstance(value, bool) or value not in (0, 1):
        raise InvalidRequest(f"{name} must be 0 (lowest latency) or 1 (no loss), not {value!r}")
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
            _number(item, f"{name}[{key!r}]")  # no NaN, no infinity: JSON has neither
        elif not isinstance(item, str | bool) or (isinstance(item, str) and len(item) > MAX_TEXT):
            raise InvalidRequest(f"{name}[{key!r}] must be a short string, number or boolean")
        out[key] = item
    return out


def _framing(value: Any, name: str) -> str | dict[str, Any]:
    if isinstance(value, str):
        return _text(value, name)
    if not isinstance(value, Mapping) or not set(value) <= {
        "preset",
        "max_samples",
        "max_latency_ms",
    }:
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


# The client checks what it sends with the same rules.
check_attrs = _attrs
check_framing = _framing
check_qos = _qos

Check = Callable[[Any, str], Any]
_ID: Check = _text

# Each method's parameters: name -> (check, required). Unknown parameters are refused,
# so a typo never silently falls back to a default.
METHODS: dict[str, dict[str, tuple[Check, bool]]] = {
    "list_collections": {},
    "list_collection_streams": {"collection_id": (_ID, True)},
    "list_collection_recordings": {"collection_id": (_ID, True)},
    "replay_collection_stream": {
        "collection_id": (_ID, True),
        "stream_id": (_ID, True),
        "attrs": (_attrs, False),
        "task_id": (_task_id, True),
        "speed": (_speed, False),
        "rate_limit": (_flag, False),
        "strict_time": (_flag, False),
        "use_relative_ts": (_flag, False),
        "framing": (_framing, False),
        "qos": (_qos, False),
    },
    "list_live_nodes": {},
    "list_live_streams": {"node_id": (_ID, True)},
    "proxy_live_stream": {
        "node_id": (_ID, True),
        "stream_id": (_ID, True),
        "attrs": (_attrs, False),
        "task_id": (_task_id, True),
        "framing": (_framing, False),
        "qos": (_qos, False),
    },
    "stop_task": {"task_id": (_task_id, True)},
    "list_tasks": {},
}
for _method in PAGED_METHODS:  # listings may be asked for in pages (paging.py)
    METHODS[_method].update(PAGE_PARAMS)


def read_envelope(message: Any, topics: Topics) -> tuple[Any, str | None]:
    """The request id and reply address, as far as they can be read (for error replies)."""
    if not isinstance(message, Mapping):
        return None, None
    reply_to = message.get("reply_to")
    client = message.get("client")
    # Tied to the client's own topic when the client id is valid (a bad id still gets
    # its error reply, on some client's rpc topic, never elsewhere).
    valid = isinstance(client, str) and ID_PATTERN.fullmatch(client) is not None
    ok = reply_topic_ok(reply_to, topics, client if valid else None)
    request_id = message.get("id")
    if not (isinstance(request_id, str) and len(request_id) <= MAX_TEXT) and not (
        isinstance(request_id, int) and not isinstance(request_id, bool)
    ):
        request_id = None
    return request_id, reply_to if ok else None


def reply_topic_ok(topic: Any, topics: Topics, client: str | None = None) -> bool:
    """Whether an agent may reply to ``topic``: a client's own ``rpc`` topic only.

    Anything looser would let a request make the agent publish elsewhere on its
    behalf, e.g. an "offline" into another client's presence, ending its tasks.
    """
    if (
        not isinstance(topic, str)
        or len(topic) > MAX_TEXT
        or not topic.startswith(topics.reply_space)
    ):
        return False
    owner, _, rest = topic[len(topics.reply_space) :].partition("/")
    if rest != "rpc" or not ID_PATTERN.fullmatch(owner):
        return False
    return client is None or owner == client


def parse_request(message: Any, topics: Topics) -> Request:
    """Validate a decoded request against the schema.

    Raises:
        InvalidRequest: a missing or wrong field, an unknown method or parameter.
    """
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"a request must be a map, not {_type(message)}")
    request_id, reply_to = read_envelope(message, topics)
    if request_id is None:
        raise InvalidRequest("id must be a string of at most 256 characters or an integer")
    client = check_id(message.get("client"), "client")
    if reply_to is None:
        raise InvalidRequest(f"reply_to must be the client's own {topics.client_rpc(client)}")
    method = message.get("method")
    if method not in METHODS:
        raise InvalidRequest(f"unknown method {method!r:.60}; methods: {sorted(METHODS)}")
    raw = message.get("params", {})
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"params must be a map, not {_type(raw)}")
    schema = METHODS[method]
    unknown = sorted(str(k) for k in raw if k not in schema)
    if unknown:
        raise InvalidRequest(f"{method}: unknown parameters {unknown}; known: {sorted(schema)}")
    params: dict[str, Any] = {}
    for name, (check, required) in schema.items():
        if name in raw:
            params[name] = check(raw[name], name)
        elif required:
            raise InvalidRequest(f"{method}: missing parameter {name!r}")
    return Request(request_id, method, params, reply_to, client)


def ok_reply(request_id: Any, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


# -- model objects on the wire ---------------------------------------------------------


def stream_to_wire(stream: Stream) -> dict[str, Any]:
    return {"id": stream.id, **stream.to_dict()}


def stream_from_wire(data: Mapping[str, Any]) -> Stream:
    return Stream.from_dict(str(data["id"]), data)


def collection_from_wire(data: Mapping[str, Any]) -> Collection:
    return Collection.from_dict(data)


def node_from_wire(data: Mapping[str, Any]) -> Node:
    return Node.from_dict(data)


# -- task control messages -------------------------------------------------------------


def ctrl_end(task_id: str, frames: int, samples: int) -> dict[str, Any]:
    """The last message of a task: how many frames were sent, so gaps can be found."""
    return {"task": task_id, "kind": "end", "frames": frames, "samples": samples}


def ctrl_error(task_id: str, error: StreamError) -> dict[str, Any]:
    return {
        "task": task_id,
        "kind": "error",
        "stream_id": error.stream_id,
        "code": error.code,
        "reason": error.reason,
    }


def ctrl_status(task_id: str, status: StreamStatus) -> dict[str, Any]:
    return {
        "task": task_id,
        "kind": "status",
        "stream_id": status.stream_id,
        "status": status.status,
        "reason": status.reason,
    }
