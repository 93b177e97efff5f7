"""The RemoteAPI's plain methods, made from their declarations in protocol.TABLE.

A plain method travels exactly as its signature says (``methods.rpc_method`` without
wire ``params``). The client routes it by its first parameter, an id of something on one
agent (``"agent/id"`` in a fleet), or, declared ``fleet``, asks every agent and merges
their lists; in a fleet the ids in the result are qualified by the agent's id. So a new
plain method needs no code here or in the RemoteAPI (docs/design.md, "The method table").
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ..methods import Method
from ..protocol import TABLE
from .agents import Agents
from .rpc import Requests

__all__ = ["with_plain_methods"]


class Caller(Protocol):
    """What a class needs to be given the plain methods (the RemoteAPI's parts)."""

    _agents: Agents
    _requests: Requests


C = TypeVar("C", bound=Caller)


def with_plain_methods(cls: type[C]) -> type[C]:
    """Give ``cls`` each plain method of the table it does not write itself."""
    for method in TABLE.values():
        if method.signature is not None and method.name not in vars(cls):
            setattr(cls, method.name, _plain(method, cls))
    return cls


def _plain(method: Method, owner: type) -> Callable[..., Awaitable[Any]]:
    signature, result = method.signature, method.result
    assert signature is not None and result is not None

    def qualified(api: Caller, agent: str, value: Any) -> Any:
        if api._agents.agent_id is not None:
            return value  # one agent: ids exactly as the local API's
        return result.qualify(value, lambda local: f"{agent}/{local}")

    async def call(self: Caller, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)  # a TypeError as for any method
        bound.apply_defaults()
        params = dict(bound.arguments)
        del params["self"]
        if method.fleet:
            return await self._requests.each_agent(
                method.name, lambda agent, value: qualified(self, agent, value)
            )
        route = next(iter(params))
        agent, params[route] = self._agents.route(params[route], route)
        return qualified(self, agent, await self._requests.rpc(agent, method.name, **params))

    call.__name__ = method.name
    call.__qualname__ = f"{owner.__qualname__}.{method.name}"
    call.__module__ = owner.__module__
    call.__doc__ = inspect.getdoc(getattr(owner, method.name, None))
    call.__signature__ = signature  # type: ignore[attr-defined]
    return call
