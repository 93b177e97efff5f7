"""A complete third-party driver: one node whose stream counts up, 10 samples a second.

Install it as a plugin by declaring, in your package's pyproject.toml::

    [project.entry-points."streaminghub_datamux.drivers"]
    counter = "counter_driver:CounterDriver"

then ``datamux ls`` lists the node ``counter-1`` and ``datamux tail counter-1 count``
streams it. See docs/drivers.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np

from streaminghub_datamux import Field, Node, Stream
from streaminghub_datamux.drivers import Chunk, Driver, Source
from streaminghub_datamux.errors import ConfigError, NotFound
from streaminghub_datamux.framing import Framing


class CounterSource(Source):
    """Yields the next integers every 100 ms, timestamped on the wall clock."""

    def __init__(self, stream: Stream, step: int) -> None:
        super().__init__(stream)
        self.step = step
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def chunks(self) -> AsyncIterator[Chunk]:
        count = 0
        while not self.closed:
            await asyncio.sleep(0.1)  # a real driver awaits its device here
            values = np.arange(count, count + self.step, dtype=np.int32).reshape(-1, 1)
            timestamps = time.time() - np.arange(self.step)[::-1] * (0.1 / self.step)
            count += self.step
            yield timestamps, values


class CounterDriver(Driver):
    """One node, ``counter-1``, with one stream, ``count``."""

    name = "counter"

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.stream = Stream(
            id="count",
            name="Counter",
            frequency=10.0 * step,
            fields={"n": Field("n", dtype="i32")},
            index={"t": Field("t", dtype="f64", unit="s")},
            node_id="counter-1",
        )

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> CounterDriver:
        # Options come from the config: {"drivers": {"extra": {"counter": {"step": 2}}}}
        step = options.get("step", 1)
        if not isinstance(step, int) or step < 1:
            raise ConfigError(
                "must be an integer >= 1", key="drivers.extra.counter.step", fix='"step": 1'
            )
        return cls(step)

    async def list_nodes(self) -> list[Node]:
        return [Node(id="counter-1", name="Counter", kind="counter")]

    async def list_streams(self, node_id: str) -> list[Stream]:
        if node_id != "counter-1":
            raise NotFound(f"no counter node {node_id!r}")
        return [self.stream]

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        if (node_id, stream_id) != ("counter-1", "count"):
            raise NotFound(f"no stream {stream_id!r} on {node_id!r}; the counter has 'count'")
        return CounterSource(self.stream, self.step)
