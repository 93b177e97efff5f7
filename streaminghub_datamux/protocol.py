"""The MQTT protocol between agents and clients: topics, messages and their schema.

docs/protocol.md is the specification; this module is its executable form, shared by the
agent and the RemoteAPI so the two cannot disagree. Nothing here touches the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checks import ID_PATTERN, is_id
from .errors import InvalidRequest
from .interface import DatamuxAPI
from .methods import Check, Method, MethodTable, declared_on
from .model import StreamError, StreamStatus
from .paging import PAGE_PARAMS
from .wire import (
    MAX_ATTRS,
    MAX_TEXT,
    STATE,
    TASKS,
    check_attrs,
    check_framing,
    check_id,
    check_qos,
    stream_from_wire,
    stream_to_wire,
)
from .wire import short as _short
from .wire import type_name as _type

__all__ = [
    "DEFAULT_PREFIX",
    "ID_PATTERN",
    "METHODS",
    "PROTOCOL_VERSION",
    "TABLE",
    "Request",
    "Topics",
    "check_attrs",
    "check_framing",
    "check_id",
    "check_qos",
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


# -- the method table ------------------------------------------------------------------
# Each RPC method, declared once (docs/design.md, "The method table"): those the API offers
# on the interface (interface.py), the two only an agent serves here. The agent checks
# and dispatches requests with the table, the RemoteAPI builds its calls and reads the
# replies with it, and tests hold docs/protocol.md's table and the API to it.

TABLE = MethodTable(
    [
        *declared_on(DatamuxAPI),
        Method("list_tasks", result=TASKS, served_by="agent", paged=True),
        Method("clock", result=STATE, served_by="agent"),
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


def error_reply(
    request_id: Any, code: str, message: str, *, retry_after_s: float | None = None
) -> dict[str, Any]:
    """A failed reply: an error code (docs/protocol.md, "Errors") and what went wrong;
    ``retry_after_s``: when the client may ask again (``rate_limited``)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if retry_after_s is not None:
        error["retry_after_s"] = math.ceil(retry_after_s * 1000) / 1000  # never too early
    return {"id": request_id, "ok": False, "error": error}


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
