"""Unguided simulated devices: synthetic live nodes declared in the config.

A :class:`SimDriver` serves the built-in ``demo`` node (EEG, IMU and event markers) plus
every node of the ``simulate.nodes`` config section. Their streams behave like real
devices: samples arrive on a wall-clock schedule, optionally with jitter, drops and
disconnects, so code tested against a simulated node works against hardware. Pure
asyncio + numpy: no threads, nothing runs after :meth:`SimSource.aclose`.

See docs/simulate.md for the config format.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checks import check_keys, config_id, config_number, config_text
from ..errors import ConfigError, DeviceLost, NotFound
from ..framing import Framing
from ..model import Node, Stream, numpy_dtype
from .base import Chunk, Driver, Source, live_stream
from .guided import GuidedSource, GuidedSpec, device_framing, parse_guided
from .replay import ReplayOpener
from .signals import ChannelSpec, StreamSynth, parse_channel

__all__ = [
    "DEMO_NODE",
    "FaultSpec",
    "NodeSpec",
    "SimDriver",
    "SimSource",
    "StreamSpec",
    "parse_node",
    "parse_nodes",
]

log = logging.getLogger(__name__)

CONFIG_PATH = "simulate.nodes"
DEFAULT_CHUNK_MS = 10.0

_NODE_KEYS = {"name", "description", "streams"}
_STREAM_KEYS = {
    "name", "description", "frequency", "dtype", "seed", "unit", "channels", "chunk_ms",
    "faults",
}  # fmt: skip
_FAULT_KEYS = {"jitter_ms", "drop_rate", "disconnect_every_s", "disconnect_for_s"}
# Node and stream ids end up in MQTT topics and file names: no '/', '+', '#', spaces.

_EEG_CHANNELS = ("Fp1", "Fp2", "C3", "C4", "P3", "P4", "O1", "O2")

#: The built-in demo node, in config form (a config node with id ``demo`` replaces it).
DEMO_NODE: dict[str, Any] = {
    "name": "Demo device",
    "description": "Simulated 8-channel EEG headset with an IMU and event markers",
    "streams": {
        "eeg": {
            "name": "EEG",
            "description": "10 Hz alpha rhythm plus noise, phase shifted per channel",
            "frequency": 250,
            "dtype": "f32",
            "unit": "uV",
            "channels": {
                ch: {
                    "signal": "sine",
                    "freq_hz": 10.0,
                    "amplitude": 20.0,
                    "phase": i * math.pi / 4,
                    "noise": 5.0,
                }
                for i, ch in enumerate(_EEG_CHANNELS)
            },
        },
        "imu": {
            "name": "IMU",
            "description": "Accelerometer (slow sines plus noise) and gyroscope (random walks)",
            "frequency": 100,
            "dtype": "f32",
            "channels": {
                "ax": {
                    "signal": "sine",
                    "freq_hz": 0.5,
                    "amplitude": 0.2,
                    "noise": 0.02,
                    "unit": "m/s^2",
                },
                "ay": {
                    "signal": "sine",
                    "freq_hz": 0.3,
                    "amplitude": 0.2,
                    "phase": 1.0,
                    "noise": 0.02,
                    "unit": "m/s^2",
                },
                "az": {
                    "signal": "sine",
                    "freq_hz": 0.2,
                    "amplitude": 0.1,
                    "offset": 9.81,
                    "noise": 0.02,
                    "unit": "m/s^2",
                },
                "gx": {"signal": "random_walk", "step": 0.05, "unit": "deg/s"},
                "gy": {"signal": "random_walk", "step": 0.05, "unit": "deg/s"},
                "gz": {"signal": "random_walk", "step": 0.05, "unit": "deg/s"},
            },
        },
        "markers": {
            "name": "Markers",
            "description": "Irregular event labels, about one per second",
            "frequency": 0,
            "dtype": "str",
            "channels": {
                "marker": {"signal": "marker", "labels": ["stimulus", "response"], "rate_hz": 1.0}
            },
        },
    },
}


@dataclass(frozen=True)
class FaultSpec:
    """Fault injection for one stream (all off by default)."""

    jitter_ms: float = 0.0
    drop_rate: float = 0.0
    disconnect_every_s: float = 0.0  # 0: never
    disconnect_for_s: float = 1.0


@dataclass(frozen=True)
class StreamSpec:
    """One simulated stream, validated."""

    id: str
    channels: Mapping[str, ChannelSpec]
    frequency: float
    dtype: np.dtype
    dtype_name: str
    seed: int
    name: str = ""
    description: str = ""
    unit: str = ""
    chunk_ms: float = DEFAULT_CHUNK_MS
    faults: FaultSpec = field(default_factory=FaultSpec)

    def to_stream(self, node_id: str) -> Stream:
        """The public :class:`Stream` metadata of this simulated stream."""
        return live_stream(
            self.id,
            node_id,
            self.channels,
            dtype=self.dtype_name,
            attrs={"mode": "simulate"},
            name=self.name,
            description=self.description,
            unit=self.unit,
            frequency=self.frequency,
        )


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node, validated."""

    id: str
    streams: Mapping[str, StreamSpec | GuidedSpec]
    name: str = ""
    description: str = ""

    def to_node(self) -> Node:
        """The public :class:`Node` metadata of this simulated node."""
        return Node(
            id=self.id,
            name=self.name or self.id,
            description=self.description,
            device={"model": "simulated", "manufacturer": "streaminghub"},
            kind="sim",
        )


def _parse_faults(data: Any, path: str) -> FaultSpec:
    data = check_keys(data, path, _FAULT_KEYS, "faults")
    drop_rate = config_number(data, "drop_rate", path, 0.0, low=0)
    if drop_rate >= 1:
        raise ConfigError(
            f"{drop_rate!r} would drop every sample",
            key=f"{path}.drop_rate",
            fix="use a fraction in [0, 1), e.g. 0.01 for 1%",
        )
    return FaultSpec(
        jitter_ms=config_number(data, "jitter_ms", path, 0.0, low=0),
        drop_rate=drop_rate,
        disconnect_every_s=config_number(data, "disconnect_every_s", path, 0.0, low=0),
        disconnect_for_s=config_number(data, "disconnect_for_s", path, 1.0, low=0),
    )


def _parse_stream(node_id: str, stream_id: str, data: Any, path: str) -> StreamSpec:
    data = check_keys(data, path, _STREAM_KEYS, "stream")
    raw_channels = data.get("channels")
    if not isinstance(raw_channels, Mapping) or not raw_channels:
        raise ConfigError(
            "a stream needs at least one channel",
            key=f"{path}.channels",
            fix='add e.g. "channels": {"ch1": {"signal": "sine", "freq_hz": 1}}',
        )
    channels: dict[str, ChannelSpec] = {}
    for ch, spec in raw_channels.items():
        if not isinstance(ch, str) or not ch:
            raise ConfigError(f"invalid channel id {ch!r}", key=f"{path}.channels", fix="name it")
        channels[ch] = parse_channel(spec, f"{path}.channels.{ch}")
    markers = [spec.is_marker for spec in channels.values()]
    irregular = all(markers)
    if any(markers) and not irregular:
        raise ConfigError(
            "marker channels cannot share a stream with sampled channels",
            key=f"{path}.channels",
            fix="put the marker channels in a stream of their own",
        )

    if irregular:
        rates = {spec.rate_hz for spec in channels.values()}
        if len(rates) > 1:
            raise ConfigError(
                f"marker channels of one stream have different rate_hz {sorted(rates)}",
                key=f"{path}.channels",
                fix="give every marker channel of the stream the same rate_hz",
            )
        frequency = config_number(data, "frequency", path, 0.0, low=0)
        if frequency != 0:
            raise ConfigError(
                "a marker stream is irregular",
                key=f"{path}.frequency",
                fix="remove frequency or set it to 0",
            )
    else:
        if "frequency" not in data:
            raise ConfigError(
                "missing sampling rate", key=f"{path}.frequency", fix="set it in Hz, e.g. 250"
            )
        frequency = config_number(data, "frequency", path, 0.0, positive=True)

    dtype_name = data.get("dtype", "str" if irregular else "f32")
    try:
        if not isinstance(dtype_name, str):
            raise ValueError(f"expected a dtype name, got {dtype_name!r}")
        dtype = numpy_dtype(dtype_name)
    except ValueError as exc:
        raise ConfigError(
            str(exc), key=f"{path}.dtype", fix="use f32, f64, i16, i32, u8, bool or str"
        ) from None
    if irregular != (dtype.kind == "U"):
        raise ConfigError(
            f"dtype {dtype_name!r} does not fit {'marker' if irregular else 'numeric'} channels",
            key=f"{path}.dtype",
            fix="use str for marker streams and a numeric dtype (e.g. f32) otherwise",
        )

    seed = data.get("seed")
    if seed is None:
        # A stable default: reproducible across runs, different for every stream.
        seed = zlib.crc32(f"{node_id}/{stream_id}".encode())
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(
            f"expected an integer >= 0, got {seed!r}", key=f"{path}.seed", fix="use e.g. 7"
        )

    return StreamSpec(
        id=stream_id,
        channels=channels,
        frequency=frequency,
        dtype=dtype,
        dtype_name="str" if dtype.kind == "U" else dtype_name.lower(),
        seed=seed,
        name=config_text(data, "name", path),
        description=config_text(data, "description", path),
        unit=config_text(data, "unit", path),
        chunk_ms=config_number(data, "chunk_ms", path, DEFAULT_CHUNK_MS, positive=True),
        faults=_parse_faults(data.get("faults", {}), f"{path}.faults"),
    )


def parse_node(node_id: str, data: Any, path: str | None = None) -> NodeSpec:
    """Validate one node spec (``{"name": ..., "streams": {...}}``).

    Args:
        node_id: the node's id.
        data: the node's JSON object.
        path: its key path for error messages; default ``simulate.nodes.<node_id>``.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    path = path or f"{CONFIG_PATH}.{node_id}"
    config_id(node_id, path, "node")
    data = check_keys(data, path, _NODE_KEYS, "node")
    raw_streams = data.get("streams")
    if not isinstance(raw_streams, Mapping) or not raw_streams:
        raise ConfigError(
            "a node needs at least one stream",
            key=f"{path}.streams",
            fix='add e.g. "streams": {"ecg": {"frequency": 250, "channels": {...}}}',
        )
    streams: dict[str, StreamSpec | GuidedSpec] = {}
    for sid, spec in raw_streams.items():
        stream_path = f"{path}.streams.{sid}"
        config_id(sid, stream_path, "stream")
        if isinstance(spec, Mapping) and "guided" in spec:
            streams[sid] = parse_guided(sid, spec, stream_path)
        else:
            streams[sid] = _parse_stream(node_id, sid, spec, stream_path)
    return NodeSpec(
        id=node_id,
        streams=streams,
        name=config_text(data, "name", path),
        description=config_text(data, "description", path),
    )


def parse_nodes(config: Mapping[str, Any] | None, path: str = CONFIG_PATH) -> dict[str, NodeSpec]:
    """Validate the ``simulate.nodes`` section: node id -> node spec.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"expected a JSON object of nodes, got {type(config).__name__}",
            key=path,
            fix='write it as {"my-node": {"streams": {...}}}',
        )
    return {nid: parse_node(nid, spec, f"{path}.{nid}") for nid, spec in config.items()}


@dataclass
class _DeviceState:
    """Disconnect state of one (node, stream), shared by all its sources (monotonic s)."""

    lost_at: float = -math.inf
    down_until: float = -math.inf


class SimDriver(Driver):
    """Simulated live nodes: the ``demo`` node plus those of the config.

    Args:
        nodes_config: the ``simulate.nodes`` config section (node id -> node spec).
        recordings: opens the recordings guided streams replay.

    Raises:
        ConfigError: the config is invalid (the message names the key path and the fix).
    """

    name = "sim"

    def __init__(
        self,
        nodes_config: Mapping[str, Any] | None = None,
        recordings: ReplayOpener | None = None,
    ) -> None:
        self._recordings = recordings
        self._nodes: dict[str, NodeSpec] = {"demo": parse_node("demo", DEMO_NODE)}
        self._nodes.update(parse_nodes(nodes_config))
        self._devices: dict[tuple[str, str], _DeviceState] = {}

    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], *, recordings: ReplayOpener | None = None
    ) -> SimDriver:
        """From the ``simulate`` config section (``{"nodes": {...}}``)."""
        return cls(options.get("nodes") or {}, recordings=recordings)

    def node_spec(self, node_id: str) -> NodeSpec:
        """The validated spec of one node. Raises NotFound for an unknown id."""
        try:
            return self._nodes[node_id]
        except KeyError:
            known = ", ".join(self._nodes)
            raise NotFound(f"no simulated node {node_id!r}; known nodes: {known}") from None

    def stream_spec(self, node_id: str, stream_id: str) -> StreamSpec | GuidedSpec:
        """The validated spec of one stream. Raises NotFound for unknown ids."""
        node = self.node_spec(node_id)
        try:
            return node.streams[stream_id]
        except KeyError:
            known = ", ".join(node.streams)
            raise NotFound(
                f"simulated node {node_id!r} has no stream {stream_id!r}; streams: {known}"
            ) from None

    async def list_nodes(self) -> list[Node]:
        return [spec.to_node() for spec in self._nodes.values()]

    async def list_streams(self, node_id: str) -> list[Stream]:
        streams = []
        for spec in self.node_spec(node_id).streams.values():
            if isinstance(spec, GuidedSpec):
                try:
                    # Reads the collection's files: in a thread, never on the loop.
                    recorded = await asyncio.to_thread(self._recorded, spec)
                    streams.append(spec.to_stream(node_id, recorded))
                except Exception as exc:  # listed again once its recording is there
                    log.warning("guided stream %s/%s unavailable: %s", node_id, spec.id, exc)
            else:
                streams.append(spec.to_stream(node_id))
        return streams

    def _recorded(self, spec: GuidedSpec) -> Stream:
        if self._recordings is None:
            raise NotFound(f"guided stream {spec.id!r}: no collections available to replay")
        return self._recordings.get_collection_stream(spec.collection, spec.stream)

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        spec = self.stream_spec(node_id, stream_id)
        if isinstance(spec, GuidedSpec):
            stream = spec.to_stream(node_id, self._recorded(spec))
            assert self._recordings is not None  # _recorded() raised otherwise
            replay = self._recordings.open_replay(
                spec.collection, spec.stream, spec.attrs,
                speed=1.0, framing=device_framing(spec), loop=True,
            )  # fmt: skip
            return GuidedSource(stream, replay)
        device = self._devices.setdefault((node_id, stream_id), _DeviceState())
        return SimSource(spec.to_stream(node_id), spec, device, framing)


class SimSource(Source):
    """A live simulated stream.

    Samples are generated on an absolute schedule from the open time: sample k has
    timestamp ``t0 + k / frequency`` (``t0`` from ``time.time()``). Pacing uses the
    monotonic clock so a wall-clock step neither bursts nor stalls the stream.
    """

    paced = False

    def __init__(
        self, stream: Stream, spec: StreamSpec, device: _DeviceState, framing: Framing
    ) -> None:
        super().__init__(stream)
        self.spec = spec
        self._device = device
        # Wake often enough that the framer can honour its latency budget.
        self.wake_s = self.period_s = framing.source_period_s(spec.chunk_ms / 1000.0)
        self._opened = False
        self._closed = False
        self._t0_wall = 0.0
        self._t0_mono = 0.0
        self._synth: StreamSynth | None = None

    async def open(self) -> None:
        """Start a run at the current time. Raises DeviceLost during a simulated outage."""
        now = time.monotonic()
        if self._device.down_until > now:
            raise DeviceLost(
                f"simulated disconnect: {self.stream.node_id}/{self.spec.id} is back in "
                f"{self._device.down_until - now:.2f} s"
            )
        spec = self.spec
        self._synth = StreamSynth(spec.channels, spec.frequency, spec.dtype, spec.seed)
        seq = np.random.SeedSequence(spec.seed, spawn_key=(1,))
        self._drop_draws, self._jitter_draws = (np.random.default_rng(s) for s in seq.spawn(2))
        self._t0_wall, self._t0_mono = time.time(), time.monotonic()
        self._opened, self._closed = True, False

    async def aclose(self) -> None:
        """Stop the stream: a running :meth:`chunks` returns at its next wake. Idempotent."""
        self._closed = True
        self._opened = False

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """Yield due samples every wake; raise DeviceLost at a simulated disconnect."""
        if not self._opened:
            await self.open()
        synth, faults, t0 = self._synth, self.spec.faults, self._t0_mono
        assert synth is not None
        every = faults.disconnect_every_s
        wake = 0
        while not self._closed:
            delay = t0 + wake * self.wake_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._closed:
                return
            if self._device.lost_at > t0:  # another source of this device saw it vanish
                raise DeviceLost(f"simulated disconnect ({self.stream.node_id}/{self.spec.id})")
            elapsed = time.monotonic() - t0
            lost = 0 < every <= elapsed
            # At a disconnect, deliver what was due strictly before it, then fail.
            rel, values = synth.upto(every if lost else elapsed, inclusive=not lost)
            if len(rel) and faults.drop_rate > 0:
                keep = self._drop_draws.random(len(rel)) >= faults.drop_rate
                rel, values = rel[keep], values[keep]
            if lost:
                now = time.monotonic()
                self._device.lost_at, self._device.down_until = now, now + faults.disconnect_for_s
            if len(rel) and faults.jitter_ms > 0:
                await asyncio.sleep(self._jitter_draws.uniform(0.0, faults.jitter_ms / 1000.0))
                if self._closed:
                    return
            if len(rel):
                yield self._t0_wall + rel, values
            if lost:
                raise DeviceLost(
                    f"simulated disconnect ({self.stream.node_id}/{self.spec.id}, "
                    f"back in {faults.disconnect_for_s:g} s)"
                )
            # Next grid point after now: a late wake skips ahead instead of bursting.
            wake = max(wake + 1, math.floor((time.monotonic() - t0) / self.wake_s) + 1)
