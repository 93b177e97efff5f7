"""The LSL driver: discovery in the background, the catalog of outlets, opening streams."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import DeviceError, NotFound
from ...framing import Framing
from ...model import Node, Stream
from ..base import Driver, DriverStatus, Source
from .liblsl import LSL_DTYPES, pylsl
from .options import INFO_RETRY_S, LslOptions, safe_id
from .outlets import (
    _build_stream,
    _Description,
    _fetch_description,
    _Known,
    _Outlet,
    describe_channels,
)
from .reader import _InletReader, _join
from .source import LslSource

log = logging.getLogger(__name__)


@dataclass
class _Catalog:
    """The streams listed so far and the ids handed out (they stay stable)."""

    known: dict[tuple[str, str], _Known] = field(default_factory=dict)  # every id ever listed
    ids: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> key -> stream id


class LslDriver(Driver):
    """Every LSL outlet on the network, one node per host.

    Args:
        options: the validated ``drivers.lsl`` options.
    """

    name = "lsl"

    def __init__(self, options: LslOptions | None = None) -> None:
        self.options = options or LslOptions()
        self._resolver: Any = None  # pylsl.ContinuousResolver, started on first use
        self._ready_at = 0.0  # loop time at which the first listing may answer
        self._catalog = _Catalog()
        self._descriptions: dict[str, _Description] = {}  # by outlet uid
        self._failed: dict[str, float] = {}  # uid -> monotonic time of a failed fetch
        # Outlets whose inlet just broke, by uid -> monotonic time until which they are
        # skipped: the resolver keeps listing a vanished outlet for forget_after_s.
        self._suspect: dict[str, float] = {}
        self._lock = threading.Lock()  # _suspect is written by reader threads
        self._readers: set[_InletReader] = set()
        self._closed = False  # after aclose: no discovery, no new sources
        self._problem = ""  # why discovery does not run, for status()

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> LslDriver:
        """From the ``drivers.lsl`` config section.

        Raises:
            ConfigError: an unknown key or a bad value (the message names the key).
        """
        return cls(LslOptions.parse(options))

    def status(self) -> DriverStatus:
        if self._problem:
            fix = "check that a network interface with multicast is up"
            return DriverStatus(self.name, "degraded", self._problem, fix)
        return DriverStatus(self.name)

    async def aclose(self) -> None:
        """Stop the resolver and every reader thread still running.

        Open sources end with a DeviceError ("LSL driver closed"); afterwards listings
        are empty and opening a stream raises DeviceError.
        """
        self._closed = True
        readers = list(self._readers)
        for reader in readers:
            reader.stop()
        for reader in readers:
            await _join(reader)
        # Dropping the only reference destroys the liblsl resolver and its threads.
        self._resolver = None

    # -- discovery ---------------------------------------------------------------------

    async def _ensure_resolver(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:  # no resolver is started again after aclose
            return
        if self._resolver is None:
            try:
                self._resolver = pylsl.ContinuousResolver(forget_after=self.options.forget_after_s)
            except RuntimeError as exc:  # no usable network: no LSL nodes, no failure
                if not self._problem:
                    log.warning("LSL discovery unavailable: %s", exc)
                self._problem = f"LSL discovery unavailable: {exc}"
                return
            self._problem = ""
            self._ready_at = loop.time() + self.options.wait_s
        delay = self._ready_at - loop.time()
        if delay > 0:  # the first multicast answers take a moment to arrive
            await asyncio.sleep(delay)

    def _results(self) -> list[_Outlet]:
        """Outlets the resolver sees now, minus suspects and untransmittable ones."""
        resolver = self._resolver
        if resolver is None:
            return []
        outlets = []
        for info in resolver.results():
            try:
                outlet = _Outlet.read(info)
            except Exception as exc:  # a broken announcement must not break listing
                log.debug("skipping an unreadable LSL stream info: %s", exc)
                continue
            if outlet.channel_format in LSL_DTYPES and outlet.channel_count > 0:
                outlets.append(outlet)
        now = time.monotonic()
        with self._lock:
            self._suspect = {u: t for u, t in self._suspect.items() if t > now}
            suspects = set(self._suspect)
        return [o for o in outlets if o.uid not in suspects]

    def mark_suspect(self, uid: str) -> None:
        """Stop listing an outlet that failed a reader, for ``forget_after_s`` (any thread)."""
        with self._lock:
            self._suspect[uid] = time.monotonic() + self.options.forget_after_s

    def is_listed(self, uid: str) -> bool:
        """Whether the resolver still sees the outlet (called from reader threads)."""
        resolver = self._resolver
        if resolver is None:  # the driver is closing: not a loss
            return True
        return any(info.uid() == uid for info in resolver.results())

    async def _describe(self, outlets: Sequence[_Outlet]) -> None:
        """Fetch the full description of outlets not seen before, concurrently."""
        visible = {o.uid for o in outlets}
        for cache in (self._descriptions, self._failed):
            for uid in [u for u in cache if u not in visible]:
                del cache[uid]
        now = time.monotonic()
        wanted = [
            o for o in outlets
            if o.uid not in self._descriptions and now - self._failed.get(o.uid, -math.inf)
            > INFO_RETRY_S
        ]  # fmt: skip
        if not wanted:
            return
        results = await asyncio.gather(
            *(asyncio.to_thread(_fetch_description, o) for o in wanted), return_exceptions=True
        )
        for outlet, result in zip(wanted, results, strict=True):
            if isinstance(result, _Description):
                self._descriptions[outlet.uid] = result
                self._failed.pop(outlet.uid, None)
            else:
                log.info("LSL outlet %r: no description (%s)", outlet.name, result)
                self._failed[outlet.uid] = time.monotonic()

    async def _refresh(self) -> dict[str, dict[str, _Known]]:
        """List the outlets now; update ids and metadata. Returns node -> id -> stream."""
        if self._closed:
            return {}
        await self._ensure_resolver()
        outlets = await asyncio.to_thread(self._results)
        await self._describe(outlets)
        visible: dict[str, dict[str, _Known]] = {}
        for node_id, group in _by_node(outlets).items():
            ids = self._assign_ids(node_id, group)
            for outlet in group:
                stream_id = ids[outlet.key]
                description = self._descriptions.get(outlet.uid) or describe_channels(
                    "", outlet.channel_count
                )
                known = _Known(_build_stream(outlet, node_id, stream_id, description), outlet)
                visible.setdefault(node_id, {})[stream_id] = known
                self._catalog.known[(node_id, stream_id)] = known
        return visible

    def _assign_ids(self, node_id: str, group: Sequence[_Outlet]) -> dict[str, str]:
        """Stream ids for one node's outlets (one per key), stable across listings.

        A key keeps the id it had. A new key gets the outlet name made safe, or, when a
        visible outlet holds that already, the name plus a source_id or uid prefix.
        """
        sticky = self._catalog.ids.setdefault(node_id, {})
        keys = {o.key: o for o in group}
        taken: dict[str, str] = {}  # stream id -> key, this listing
        for key in keys:
            if key in sticky and sticky[key] not in taken:
                taken[sticky[key]] = key
        for key, outlet in keys.items():
            if key in taken.values():
                continue
            stream_id = _free_id(outlet, taken)
            taken[stream_id] = key
            sticky[key] = stream_id
        # An id now held by another key is no longer the old key's (its outlet is gone).
        for key in [k for k, sid in sticky.items() if taken.get(sid) not in (k, None)]:
            del sticky[key]
        return {key: sid for sid, key in taken.items()}

    async def list_nodes(self) -> list[Node]:
        visible = await self._refresh()
        nodes = []
        for node_id, streams in sorted(visible.items()):
            host = next(iter(streams.values())).outlet.hostname
            nodes.append(
                Node(
                    id=node_id,
                    name=host,
                    description=f"LSL outlets on host {host}",
                    device={"hostname": host},
                    kind="lsl",
                )
            )
        return nodes

    async def list_streams(self, node_id: str) -> list[Stream]:
        visible = await self._refresh()
        if node_id not in visible:
            raise NotFound(f"no LSL node {node_id!r}; LSL nodes now: {sorted(visible) or 'none'}")
        return [known.stream for _, known in sorted(visible[node_id].items())]

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        # Streams listed once stay openable: after a loss the task reopens them by id, and
        # the source raises DeviceLost until the outlet is back.
        known = self._catalog.known.get((node_id, stream_id))
        if known is None:
            streams = sorted(sid for (nid, sid) in self._catalog.known if nid == node_id)
            if not streams:
                raise NotFound(f"no LSL node {node_id!r}")
            raise NotFound(f"LSL node {node_id!r} has no stream {stream_id!r}; streams: {streams}")
        return LslSource(known, self, framing)

    async def candidates(self, known: _Known) -> list[_Outlet]:
        """Outlets that could be this stream's device now, newest first."""
        self._check_open()
        await self._ensure_resolver()
        outlets = await asyncio.to_thread(self._results)
        found = [o for o in outlets if known.matches(o)]
        found.sort(key=lambda o: (o.uid != known.outlet.uid, -o.created_at))
        return found

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("LSL driver closed")

    def register_reader(self, reader: _InletReader) -> None:
        """Track a source's reader thread, for aclose to stop. DeviceError once closed."""
        self._check_open()
        self._readers.add(reader)

    def unregister_reader(self, reader: _InletReader) -> None:
        """Forget a reader thread that ended (called from that thread)."""
        self._readers.discard(reader)


def _by_node(outlets: Sequence[_Outlet]) -> dict[str, list[_Outlet]]:
    """Outlets per node, one per key (the newest), in a stable order."""
    newest: dict[tuple[str, str], _Outlet] = {}
    for outlet in sorted(outlets, key=lambda o: (o.created_at, o.uid)):
        newest[(outlet.node_id, outlet.key)] = outlet
    nodes: dict[str, list[_Outlet]] = {}
    for (node_id, _), outlet in newest.items():
        nodes.setdefault(node_id, []).append(outlet)
    return nodes


def _free_id(outlet: _Outlet, taken: Mapping[str, str]) -> str:
    base = safe_id(outlet.name)
    if base not in taken:
        return base
    suffix = safe_id(outlet.source_id or outlet.uid)[:8]
    candidate = safe_id(f"{base[: 64 - len(suffix) - 1]}-{suffix}")
    n = 2
    while candidate in taken:
        tail = f"-{suffix}-{n}"
        candidate = safe_id(base[: 64 - len(tail)] + tail)
        n += 1
    return candidate
