"""What travels in the RPC methods: the checks of request parameters and the result types.

The agent checks every request parameter with these (nothing from the network is
trusted), and the client checks what it sends with the same rules. Each
:class:`~.methods.Result` says how a result is written on the wire, read back, and how
its ids are qualified by the agent's id in a fleet. The methods themselves are declared
in interface.py and protocol.py (docs/design.md, "The method table").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from .checks import is_id
from .drivers.replaycontrol import ACTIONS as CONTROL_ACTIONS
from .errors import InvalidRequest
from .methods import Check, Result
from .model import Collection, Node, Stream

__all__ = [
    "ACK",
    "COLLECTIONS",
    "ID",
    "MAX_ATTRS",
    "MAX_TEXT",
    "NODES",
    "RECORDINGS",
    "STATE",
    "STREAMS",
    "TASKS",
    "TASK_ID",
    "check_action",
    "check_attrs",
    "check_flag",
    "check_framing",
    "check_id",
    "check_loop",
    "check_position",
    "check_qos",
    "check_speed",
    "check_text",
    "short",
    "stream_from_wire",
    "stream_to_wire",
    "type_name",
]

MAX_TEXT = 256  # longest id, name or topic accepted in a request
MAX_ATTRS = 32
MAX_FRAME_SAMPLES = 1_000_000
MAX_LATENCY_MS = 60_000.0

# -- parameter checks: (value, name) -> the value to use, or InvalidRequest -------------


def check_id(value: Any, what: str) -> str:
    """An id safe to put in a topic or a path.

    Raises:
        InvalidRequest: anything else.
    """
    if not is_id(value):
        raise InvalidRequest(
            f"{what} must be 1 to 64 letters, digits, '_', '.' or '-' (not starting with "
            f"'.' or '-'), not {short(value)}"
        )
    return value


def check_text(value: Any, name: str) -> str:
    """A string of 1 to :data:`MAX_TEXT` characters."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {type_name(value)}")
    if not value or len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name} must be 1 to {MAX_TEXT} characters")
    return value


def type_name(value: Any) -> str:
    """A value's type as a message names it (``null`` for None)."""
    return "null" if value is None else type(value).__name__


def short(value: Any) -> str:
    """A value for an error message: short, and safe for any hostile shape."""
    if isinstance(value, str):
        return repr(value[:60])
    if isinstance(value, bool | float) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else "a huge integer"
    return f"a {type_name(value)}"


def check_number(value: Any, name: str) -> float:
    """A finite number (not a boolean)."""
    try:
        finite = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and (math.isfinite(value))
        )
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise InvalidRequest(f"{name} must be a finite number, not {short(value)}")
    return float(value)


def check_speed(value: Any, name: str) -> float:
    """A replay speed: a finite number >= 0 (0: as fast as possible)."""
    speed = check_number(value, name)
    if speed < 0:
        raise InvalidRequest(f"{name} must be >= 0 (0 means as fast as possible)")
    return speed


def check_flag(value: Any, name: str) -> bool:
    """True or false, nothing else."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, not {type_name(value)}")
    return value


def check_qos(value: Any, name: str) -> int:
    """A task's data QoS: 0 or 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1):
        raise InvalidRequest(
            f"{name} must be 0 (lowest latency) or 1 (no loss), not {short(value)}"
        )
    return int(value)


def check_attrs(value: Any, name: str) -> dict[str, Any]:
    """A short map of short strings, finite numbers and booleans (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{name} must be a map, not {type_name(value)}")
    if len(value) > MAX_ATTRS:
        raise InvalidRequest(f"{name} has {len(value)} entries; at most {MAX_ATTRS}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        check_text(key, f"{name} key")
        if isinstance(item, int | float) and not isinstance(item, bool):
            check_number(item, f"{name}[{key[:60]!r}]")  # no NaN, no infinity: JSON has neither
        elif not isinstance(item, str | bool) or (isinstance(item, str) and len(item) > MAX_TEXT):
            raise InvalidRequest(f"{name}[{key[:60]!r}] must be a short string, number or boolean")
        out[key] = item
    return out


def check_framing(value: Any, name: str) -> str | dict[str, Any]:
    """A framing preset's name, or a map of preset, max_samples and max_latency_ms."""
    if isinstance(value, str):
        return check_text(value, name)
    if not isinstance(value, Mapping) or any(
        k not in ("preset", "max_samples", "max_latency_ms") for k in value
    ):
        raise InvalidRequest(
            f"{name} must be a preset name or a map of preset, max_samples, max_latency_ms"
        )
    out: dict[str, Any] = {}
    if "preset" in value:
        out["preset"] = check_text(value["preset"], f"{name}.preset")
    if "max_samples" in value:
        samples = value["max_samples"]
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise InvalidRequest(f"{name}.max_samples must be an integer")
        if not 1 <= samples <= MAX_FRAME_SAMPLES:
            raise InvalidRequest(f"{name}.max_samples must be 1 to {MAX_FRAME_SAMPLES}")
        out["max_samples"] = samples
    if "max_latency_ms" in value:
        latency = check_number(value["max_latency_ms"], f"{name}.max_latency_ms")
        if not 0 < latency <= MAX_LATENCY_MS:
            raise InvalidRequest(f"{name}.max_latency_ms must be > 0 and <= {MAX_LATENCY_MS}")
        out["max_latency_ms"] = latency
    return out


def check_position(value: Any, name: str) -> float:
    """Seconds into a recording: a finite number >= 0."""
    position = check_number(value, name)
    if position < 0:
        raise InvalidRequest(f"{name} must be >= 0 seconds into the recording")
    return position


def check_loop(value: Any, name: str) -> bool | int:
    """True (forever), false (once), or a count of passes (>= 1, or -1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and (value >= 1 or value == -1) and value < 2**31:
        return value
    raise InvalidRequest(f"{name} must be true (forever), false (once) or a count >= 1")


def check_action(value: Any, name: str) -> str:
    """One of the replay control actions."""
    if value not in CONTROL_ACTIONS:
        raise InvalidRequest(f"unknown {name} {value!r:.40}; actions: {list(CONTROL_ACTIONS)}")
    return str(value)


#: A collection, node or stream id in a request: a short text (the agent looks it up).
ID: Check = check_text
#: A task id: chosen by the client, it appears in topics, so a topic-safe id.
TASK_ID: Check = check_id


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


# -- result types ----------------------------------------------------------------------


def _list_of(convert: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def read(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise TypeError(f"a list, not {type_name(value)}")
        return [convert(item) for item in value]

    return read


def _map(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"a map, not {type_name(value)}")
    return dict(value)


def _same(value: Any) -> Any:
    return value


# Ids in a fleet: the RemoteAPI that talks to every agent names things "agent/id"; these
# say where a result holds ids (methods.Result.qualify).


def _qualified_stream(stream: Stream, qualify: Callable[[str], str]) -> Stream:
    changes: dict[str, Any] = {}
    if stream.node_id is not None:
        changes["node_id"] = qualify(stream.node_id)
    if stream.collection_id is not None:
        changes["collection_id"] = qualify(stream.collection_id)
    return dataclasses.replace(stream, **changes)


def _qualified_collection(collection: Collection, qualify: Callable[[str], str]) -> Collection:
    streams = {k: _qualified_stream(s, qualify) for k, s in collection.streams.items()}
    return dataclasses.replace(collection, id=qualify(collection.id), streams=streams)


def _qualified_node(node: Node, qualify: Callable[[str], str]) -> Node:
    return dataclasses.replace(node, id=qualify(node.id))


def _each(
    one: Callable[[Any, Callable[[str], str]], Any],
) -> Callable[[list[Any], Callable[[str], str]], list[Any]]:
    def qualify_all(items: list[Any], qualify: Callable[[str], str]) -> list[Any]:
        return [one(item, qualify) for item in items]

    return qualify_all


COLLECTIONS = Result(
    "list of collections",
    _list_of(Collection.to_dict),
    _list_of(collection_from_wire),
    _each(_qualified_collection),
)
STREAMS = Result(
    "list of streams",
    _list_of(stream_to_wire),
    _list_of(stream_from_wire),
    _each(_qualified_stream),
)
RECORDINGS = Result("list of maps of attrs", _same, _list_of(_map))
NODES = Result(
    "list of nodes", _list_of(Node.to_dict), _list_of(node_from_wire), _each(_qualified_node)
)
TASKS = Result("list of task descriptions", _same, _list_of(_map))
ACK = Result("task acknowledgement", _same, _same)  # the client reads it leniently
STATE = Result("map", _same, _map)
