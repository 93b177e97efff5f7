"""The RPC method table's parts: a method is declared once, everything else reads it.

One :class:`Method` says a method's name, its parameters with their checks, the type of
its result and who serves it. From the table (``protocol.TABLE``) the agent validates
and dispatches requests, the RemoteAPI builds its calls and reads the replies, and a test
holds docs/protocol.md's table to it. docs/design.md, "The method table", says how to add
a method. Nothing here knows any particular method; protocol.py declares them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequest

__all__ = ["Check", "Method", "MethodTable", "Param", "Result"]

#: A parameter check: ``(value, name) -> the value to use``; raises InvalidRequest.
Check = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its check, and whether a request must carry it."""

    check: Check
    required: bool = False


@dataclass(frozen=True)
class Result:
    """A result type: how the agent writes it on the wire and the client reads it back.

    ``from_wire`` may raise KeyError, TypeError or ValueError on a malformed reply; the
    RemoteAPI reports those as a malformed reply from that agent.
    """

    name: str
    to_wire: Callable[[Any], Any]
    from_wire: Callable[[Any], Any]


@dataclass(frozen=True)
class Method:
    """One RPC method (docs/protocol.md, "Methods").

    Args:
        name: the method's name on the wire, and of the API method that implements it.
        params: its parameters in the order they are documented (required ones first).
        result: what it returns.
        served_by: ``"api"``: the agent calls the API's method of the same name with the
            parameters and writes its result with ``result.to_wire``; ``"agent"``: the
            agent's own ``_serve_<name>(request, codec)`` answers (ownership, tasks).
        paged: a listing: it also takes the paging parameters (paging.py).
        fleet: asked of every agent when the client talks to a fleet (no id to route by).
    """

    name: str
    params: Mapping[str, Param] = field(default_factory=dict)
    result: Result | None = None
    served_by: Literal["api", "agent"] = "api"
    paged: bool = False
    fleet: bool = False

    def required(self) -> list[str]:
        """The parameters a request must carry, in their documented order."""
        return [name for name, param in self.params.items() if param.required]

    def optional(self) -> list[str]:
        """The parameters a request may leave out (paging's not included)."""
        return [name for name, param in self.params.items() if not param.required]

    def build(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A request's ``params`` as the client sends them: ``None`` means "not given".

        The names are checked here with the agent's own words; the values are checked by
        the agent (its answer is the one authority, and counts a bad request).

        Raises:
            InvalidRequest: an unknown or missing parameter.
        """
        unknown = sorted(repr(k) for k in params if k not in self.params)
        if unknown:
            raise InvalidRequest(
                f"{self.name}: unknown parameters {', '.join(unknown[:8])}; "
                f"known: {sorted(self.params)}"
            )
        wire = {k: v for k, v in params.items() if v is not None}
        for name in self.required():
            if name not in wire:
                raise InvalidRequest(f"{self.name}: missing parameter {name!r}")
        return wire


class MethodTable(Mapping[str, Method]):
    """Every method by name; declared once, in protocol.py."""

    def __init__(self, methods: list[Method]) -> None:
        self._methods = {m.name: m for m in methods}
        if len(self._methods) != len(methods):
            raise ValueError("a method is declared twice")

    def __getitem__(self, name: str) -> Method:
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def served_by(self, who: Literal["api", "agent"]) -> list[Method]:
        """The methods the agent serves through the API, or itself."""
        return [m for m in self._methods.values() if m.served_by == who]
