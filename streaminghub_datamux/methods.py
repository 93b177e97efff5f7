"""The RPC method table's parts: a method is declared once, everything else reads it.

One :class:`Method` says a method's name, its parameters with their checks, the type of
its result and who serves it. A method the API offers is declared where its signature
is, on the interface (interface.py), with :func:`rpc_method`; the two the agent alone
serves are declared in protocol.py. From the table they make (``protocol.TABLE``) the
agent validates and dispatches requests, the RemoteAPI builds its calls (every plain
method entirely) and reads the replies, and a test holds docs/protocol.md's table to it.
docs/design.md, "The method table", says how to add a method. Nothing here knows any
particular method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar

from .errors import InvalidRequest

__all__ = [
    "Check",
    "Method",
    "MethodTable",
    "Param",
    "Result",
    "declared_on",
    "from_the_table",
    "rpc_method",
]

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
    #: ``(result, qualify) -> result`` with every id in it passed through ``qualify``
    #: (a fleet client names things "agent/id"); a result without ids is left as it is.
    qualify: Callable[[Any, Callable[[str], str]], Any] = lambda result, qualify: result


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
        signature: set for a *plain* method, whose wire parameters are exactly the
            parameters of its Python signature (declared with :func:`rpc_method` without
            ``params``): a client can then offer it generically, routed by its first
            parameter (an id of something on one agent) or, ``fleet``, asked of all.
    """

    name: str
    params: Mapping[str, Param] = field(default_factory=dict)
    result: Result | None = None
    served_by: Literal["api", "agent"] = "api"
    paged: bool = False
    fleet: bool = False
    signature: inspect.Signature | None = field(default=None, compare=False)

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
    """Every method by name, each declared once (interface.py, protocol.py)."""

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


# -- declaring the methods on the interface -----------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])

_DECLARED = "__rpc_method__"  # where rpc_method keeps a function's declaration


def rpc_method(
    result: Result,
    *,
    checks: Mapping[str, Check] | None = None,
    params: Mapping[str, Param] | None = None,
    served_by: Literal["api", "agent"] = "api",
    paged: bool = False,
    fleet: bool = False,
) -> Callable[[F], F]:
    """Declare the decorated method of the interface an RPC method (see :class:`Method`).

    A *plain* method (no ``params``) travels as its signature says: its parameters, in
    order, are the request's, each checked by ``checks[name]``; those without a default
    are required. A method whose wire form differs from its signature (a sink, a task id
    the client picks) gives its wire ``params`` instead, and its client side by hand.

    Raises:
        TypeError: checks that do not name exactly the signature's parameters, or a plain
            method that is neither routed by a first parameter nor asked of the fleet.
    """

    def declare(function: F) -> F:
        name = function.__name__
        signature = None
        wire = params
        if wire is None:
            signature = inspect.signature(function)
            names = [p for p in signature.parameters if p != "self"]
            kinds = {signature.parameters[p].kind for p in names}
            if kinds - {inspect.Parameter.POSITIONAL_OR_KEYWORD}:
                raise TypeError(f"{name}: a plain method takes plain parameters only")
            if sorted(checks or {}) != sorted(names):
                raise TypeError(f"{name}: checks for {sorted(checks or {})}, parameters {names}")
            if fleet == bool(names) or served_by != "api":
                raise TypeError(
                    f"{name}: a plain method is served by the API and either routed by its "
                    "first parameter or, without parameters, asked of the fleet"
                )
            empty = inspect.Parameter.empty
            wire = {
                p: Param((checks or {})[p], signature.parameters[p].default is empty) for p in names
            }
        declared = Method(name, wire, result, served_by, paged, fleet, signature)
        setattr(function, _DECLARED, declared)
        return function

    return declare


def declared_on(interface: type) -> list[Method]:
    """The methods declared with :func:`rpc_method` on ``interface``, in order."""
    found = (getattr(member, _DECLARED, None) for member in vars(interface).values())
    return [method for method in found if isinstance(method, Method)]


def from_the_table() -> NoReturn:
    """The body of a plain method on the interface.

    An implementation supplies the method: the API writes it, the RemoteAPI is given it
    from the table (client/plain.py). Not an empty body, so that mypy does not count the
    method abstract in the RemoteAPI, which subclasses the interface to be given it.

    Raises:
        NotImplementedError: always; the class at hand lacks the method.
    """
    raise NotImplementedError("a declared method was called on a class that does not offer it")
