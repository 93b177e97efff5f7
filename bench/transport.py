"""Transport benchmark: the MQTT RemoteAPI beside raw paho-mqtt and the local API.

Everything runs on loopback: a mosquitto on a free port (started and stopped by its own
pid), the agent as its own process (``python -m streaminghub_datamux serve``, stopped by
its pid), and the RemoteAPI client in this process. Each figure comes with a baseline
measured in the same run; variants alternate within each run (the order rotates from
run to run) and medians over the runs are reported.

* throughput: replay at speed 0 with ``framing="throughput"`` (8 and 64 float32
  channels) of two recording kinds per width: a DFDS CSV recording (what users replay
  most; the agent is bound by the CSV parser), timed from the request to END_OF_STREAM,
  and an XDF file (indexed in one pass when the replay opens, then decoded block by
  block with one copy: a source that is not parse-bound), timed from the first frame's
  arrival to END_OF_STREAM, so the index pass is left out. Through the local
  ``dm.API``, through ``RemoteAPI`` (QoS 1 and 0), and a raw paho-mqtt publisher process
  -> mosquitto -> raw paho subscriber moving payloads of exactly the byte sizes and count
  of the RemoteAPI's frames (QoS 1 and 0), no CBOR, no numpy, no asyncio, timed the same
  way; for XDF also the codec floor: raw paho at QoS 1 carrying the real frames, read,
  cut and encoded by the publisher with the agent's own parts and decoded by the
  subscriber with ``decode_frame`` (:func:`floor_payloads`);
* latency: a live simulated 1 kHz x 64-channel float32 stream with ``framing=
  "low-latency"``, ``time.time()`` at arrival in the sink minus each sample's timestamp
  (the simulator stamps samples with ``time.time()`` at open + k / rate), through the
  RemoteAPI (QoS 1 and 0) beside the local API in this process; the agent's CPU over
  each RemoteAPI window, and with the default framing for the preset's cost;
* resources: the agent process's RSS (``/proc/PID/status`` VmRSS) and CPU
  (``/proc/PID/stat`` utime + stime over a window) with 8 concurrent proxy tasks of
  256 Hz x 8 channels consumed by one RemoteAPI client, beside the idle agent.

Usage::

    python bench/transport.py               # default run (about 6 minutes on 2 cores)
    python bench/transport.py --quick       # smoke run (< 60 s)
    python bench/transport.py --write-doc   # also update "## Transport" in docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import loop_counter  # bench/loop_counter.py
import numpy as np
import paho.mqtt.client as mqtt
from common import code_version, log, median_range, verdict, write_doc  # bench/common.py
from datasets import (  # bench/datasets.py: its XDF chunk writer (pyxdf only reads)
    EEG_LABELS,
    SAMPLES_PER_CHUNK,
    TAG_FILE_HEADER,
    TAG_STREAM_FOOTER,
    TAG_STREAM_HEADER,
    XdfStreamSpec,
    chunk,
    clock_offset,
    footer,
    numeric_samples,
    xml_document,
)
from replay import load_average, machine_facts, write_recording

import streaminghub_datamux as dm
from streaminghub_datamux import preciseloop
from streaminghub_datamux.codec import decode_frame, encode_frame
from streaminghub_datamux.config import Config, load_config
from streaminghub_datamux.drivers.replay import BLOCK_BYTES
from streaminghub_datamux.drivers.signals import StreamSynth
from streaminghub_datamux.drivers.simulate import parse_node
from streaminghub_datamux.drivers.xdf import XdfFormat
from streaminghub_datamux.framing import PRESETS, Pieces

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "docs" / "performance.md"
SECTION = "## Transport"
# The code a remote task runs through (code_version lists uncommitted changes in these).

# The aims stated in the issue.
AIM_RATIO = 0.5  # RemoteAPI samples/s >= 50% of raw paho moving the same bytes
AIM_P99_MS = 5.0  # issue #12: sample-to-sink p99 of 1 kHz x 64 ch, low-latency framing
AIM_RSS_MB = 80.0  # agent RSS with 8 proxy tasks

LOOPBACK = "127.0.0.1"
AGENT_ID = "bench"
STARTUP_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 120.0  # one transfer; a hung one fails the bench instead of hanging
PUBLISHER_LIMIT_S = 300.0  # a raw publisher that is never told to exit exits by itself
# paho's in-flight window for QoS 1, set like the agent's (mqttio.MAX_OUTSTANDING).
RAW_INFLIGHT = 64
# From systemd/mosquitto.conf.example: the settings that bear on speed and frame size
# (the agent caps its frames to the maximum packet size the broker announces).
BROKER_MAX_PACKET = 4_194_304
BROKER_SETTINGS = (
    "set_tcp_nodelay true",
    "max_queued_messages 10000",
    f"max_packet_size {BROKER_MAX_PACKET}",
)

THROUGHPUT_RATE_HZ = 1000.0
WIDE_CHANNELS = 64
WIDE_ROWS_DIVISOR = 4
TASK_ID_LENGTH = 16  # hex characters of a RemoteAPI task id (they are inside every frame)
THROUGHPUT_FRAMING = "throughput"
XDF_FILE = "session"  # data/<collection>/session.xdf; replayed with {"file": "session"}
XDF_STREAM = "EEG"
# XDF transfers run 10-30 times faster than CSV ones: more rows keep them measurable.
XDF_ROWS_FACTOR = 4
XDF_OFFSET_EVERY = 10  # a ClockOffset chunk after every 10th Samples chunk (5 s at 1 kHz)

LATENCY_NODE, LATENCY_RATE_HZ, LATENCY_CHANNELS = "lat", 1000.0, 64
LATENCY_WARMUP_S = 0.5
LATENCY_FRAMING = "low-latency"

RESOURCE_TASKS, RESOURCE_RATE_HZ, RESOURCE_CHANNELS = 8, 256.0, 8
RESOURCE_FRAMING = "balanced"
RESOURCE_CHUNK_MS = 10.0  # the simulator's chunk period with balanced framing
AIM_CPU_VS_MINIMAL = 1.3  # issue #12: agent CPU <= 1.3 x bench/minimal_publisher.py
AIM_SYNTH_SHARE = 0.25  # issue #12: the simulator <= 25% of the agent's CPU
AIM_WAKES_PER_FRAME = 2.0  # issue #12: loop wake-ups per frame beyond the source's chunks
AIM_P50_MS = 2.0  # issue #12: live low-latency p50 through the RemoteAPI
RESOURCE_WARMUP_S = 1.0
RSS_SAMPLE_S = 0.25

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes: broker, agent, raw publisher -------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads."""
    where = f"/proc/{pid}" if thread is None else f"/proc/{pid}/task/{thread}"
    stat = Path(f"{where}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_mb(pid: int, key: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM), in MiB."""
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match[1]) / 1024 if match else float("nan")


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM to this process's pid, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


def serve_args(broker: Broker, root: Path, agent_id: str, state_dir: Path) -> list[str]:
    """``serve`` with the sim driver on ``broker``, data and state under ``root``."""
    return [
        "serve", "--host", LOOPBACK, "--port", str(broker.port), "--id", agent_id,
        "--embedded", "never", "--drivers", "sim", "--state-dir", str(state_dir),
        "--data_dir", str(root / "data"), "--meta_dir", str(root / "meta"),
    ]  # fmt: skip


def agent_env(root: Path, extra: dict[str, str]) -> dict[str, str]:
    """This environment without the user's STREAMINGHUB_ settings, HOME at ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    return {**env, "HOME": str(root), **extra}


@contextlib.contextmanager
def sim_workspace() -> Iterator[tuple[Path, Config, Broker]]:
    """A temporary root with the simulated nodes' rc (write_rc), its config and a broker
    (stopped by its pid when done): what the small benches beside this one start from."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "data").mkdir()
        (root / "meta").mkdir()
        write_rc(root)
        broker = Broker(root)
        try:
            yield root, make_config(root), broker
        finally:
            broker.stop()


def with_fresh_agent(
    broker: Broker,
    root: Path,
    agent_id: str,
    env: dict[str, str],
    run: Callable[[], Coroutine[Any, Any, Any]],
) -> Any:
    """``asyncio.run(run())`` beside a fresh agent (plain ``serve``, sim driver, ``env`` on
    top of a clean environment); the agent's log tail is printed if it fails; the agent
    is stopped by its pid either way."""
    command = [sys.executable, "-m", "streaminghub_datamux"]
    command += serve_args(broker, root, agent_id, root / "state")
    log_path = root / "agent.log"
    with log_path.open("ab") as log_file:
        agent = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=agent_env(root, env), cwd=root
        )
    try:
        return asyncio.run(run())
    except Exception:
        log(log_path.read_text()[-3000:])
        raise
    finally:
        stop_process(agent, timeout=15)


class Broker:
    """A mosquitto on a free loopback port, with the production example's speed settings."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
            None,
        )
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.port = free_port()
        self.log_path = workdir / "mosquitto.log"
        conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} {LOOPBACK}", "allow_anonymous true", *BROKER_SETTINGS]
        conf.write_text("\n".join([*lines, "log_dest stderr", "log_type error", ""]))
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process)


class AgentProcess:
    """``python -m streaminghub_datamux serve`` with the sim driver, stopped by its pid.

    It reads ``root/.streaminghubrc`` (simulated nodes) and nothing of the user's.
    """

    def __init__(self, broker: Broker, root: Path, name: str) -> None:
        self.log_path = root / f"agent-{name}.log"
        self.counts_path = root / f"agent-{name}-loop.json"
        # bench/loop_counter.py: the agent as `python -m streaminghub_datamux`, its loop
        # turns counted (SIGUSR1 writes them to counts_path).
        command = [sys.executable, str(Path(__file__).resolve().parent / "loop_counter.py")]
        command += serve_args(broker, root, AGENT_ID, root / f"state-{name}")
        env = agent_env(root, {"BENCH_LOOP_COUNTS": str(self.counts_path)})
        if profile := os.environ.get("BENCH_PROFILE"):  # SIGUSR2 toggles cProfile
            env["BENCH_PROFILE"] = profile
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def loop_counts(self) -> dict[str, int]:
        """The agent's loop turns so far: all selector calls, and those with timeout 0."""
        self.counts_path.unlink(missing_ok=True)
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return dict(json.loads(self.counts_path.read_text()))
            time.sleep(0.005)
        raise RuntimeError("the agent did not report its loop counts")

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the agent exited: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        code = stop_process(self.process, timeout=15)
        if code not in (0, None):
            log(f"agent exited with {code}: {self.log_path.read_text()[-1000:]}")


@contextlib.contextmanager
def running_agent(broker: Broker, root: Path, name: str) -> Iterator[AgentProcess]:
    agent = AgentProcess(broker, root, name)
    try:
        yield agent
    finally:
        agent.stop()


async def connect_remote(
    config: Config, broker: Broker, qos: int = 1, network: Any = "thread"
) -> dm.RemoteAPI:
    """A RemoteAPI for the bench agent; retries until the agent has announced itself."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        api = dm.RemoteAPI(
            "mqtt", "cbor", agent_id=AGENT_ID, config=config, timeout=RPC_TIMEOUT_S, qos=qos,
            network=network,
        )  # fmt: skip
        try:
            return await api.connect(LOOPBACK, broker.port)
        except dm.errors.NotFound:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# The raw publisher: this script with --publish, a plain paho client in its own process.


def publish(port: int, qos: int, sizes_file: str, topic: str) -> int:
    """Wait for a message on ``topic/go``, publish one payload per size, wait for acks.

    Exits when stdin closes (after the bench has read its CPU time) or after
    PUBLISHER_LIMIT_S.
    """
    watchdog = threading.Timer(PUBLISHER_LIMIT_S, lambda: os._exit(3))
    watchdog.daemon = True  # does not keep the process alive after a normal exit
    watchdog.start()
    spec = json.loads(Path(sizes_file).read_text())
    if isinstance(spec, dict):  # the codec floor: frames made and encoded as they go
        sizes, payloads = spec["samples"], None
    else:
        sizes, payloads = spec, {size: os.urandom(size) for size in set(spec)}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(RAW_INFLIGHT)
    connected, subscribed, go, done = (threading.Event() for _ in range(4))
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == len(sizes):
            done.set()

    client.on_connect = lambda *_: connected.set()
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda *_: go.set()
    client.on_publish = on_publish
    client.connect(LOOPBACK, port)
    client.loop_start()
    if not connected.wait(STARTUP_TIMEOUT_S):
        return 1
    client.subscribe(f"{topic}/go", 1)
    if not subscribed.wait(STARTUP_TIMEOUT_S):
        return 1
    print("ready", flush=True)
    if not go.wait(PUBLISHER_LIMIT_S):
        return 1
    if payloads is None:
        for payload in floor_payloads(spec):
            client.publish(topic, payload, qos=qos)
    else:
        for size in sizes:
            client.publish(topic, payloads[size], qos=qos)
    done.wait(TRANSFER_TIMEOUT_S)
    print(f"published {acked[0]}", flush=True)
    sys.stdin.readline()
    client.disconnect()
    client.loop_stop()
    return 0


def floor_payloads(spec: dict[str, Any]) -> Iterator[bytes]:
    """The RemoteAPI's frames made with the agent's own parts, minus its framework.

    The XDF reader's blocks (as replay asks for them), cut into frames of the
    RemoteAPI's sizes (held as views, joined only across blocks, as replay does), each
    encoded with ``encode_frame``: no asyncio, no task, no outbox, no thread hop.
    """
    reader = XdfFormat()
    path = Path(spec["path"])
    stream = reader.describe(path)[spec["stream"]]
    held, sizes = Pieces(), iter(spec["samples"])
    wanted = next(sizes, None)
    seq = 0
    for timestamps, values in reader.blocks(path, stream, max(BLOCK_BYTES, reader.min_block_bytes)):
        held.add(timestamps, values)
        while wanted is not None and len(held) >= wanted:
            timestamps, values = held.take(wanted)
            frame = dm.Frame(
                spec["stream_id"], seq, timestamps, values, spec["channels"], spec["attrs"]
            )
            yield encode_frame(frame, "0" * TASK_ID_LENGTH, "cbor")
            seq += 1
            wanted = next(sizes, None)


# -- throughput -------------------------------------------------------------------------

VARIANTS = ("local", "remote-q1", "remote-q0", "raw-q1", "raw-q0")
# XDF only: raw paho carrying real frames, made and read with the agent's and client's
# own parts (reader, cutting, encode_frame, decode_frame) but no framework: the floor.
FLOOR = "floor-q1"
VARIANT_LABELS = {
    "local": "local `dm.API` (in-process)",
    "remote-q1": "`RemoteAPI`, QoS 1 (default)",
    "remote-q0": "`RemoteAPI`, QoS 0",
    "raw-q1": "raw paho -> mosquitto -> paho, QoS 1",
    "raw-q0": "raw paho -> mosquitto -> paho, QoS 0",
}


@dataclass(frozen=True)
class BenchRecording:
    """One recording replayed by the throughput part, and how its transfers are timed."""

    kind: str  # "CSV" or "XDF"
    collection: str
    stream: str
    attrs: dict[str, str]
    channels: int
    rows: int

    @property
    def from_first_frame(self) -> bool:
        """XDF: timed from the first frame's arrival, which leaves out the index pass at open."""
        return self.kind == "XDF"

    @property
    def label(self) -> str:
        return f"{self.kind}, {self.channels} ch f32, {self.rows:,} rows"


def write_xdf_recording(root: Path, collection: str, rows: int, channels: int) -> BenchRecording:
    """``data/<collection>/session.xdf``: one float32 stream "EEG" at 1 kHz, LabRecorder-like.

    Written with bench/datasets.py's chunk writer: Samples chunks of 500 samples, every
    other one with only its first sample stamped (the reader deduces the rest), a
    ClockOffset every 5 s and a StreamFooter. A folder of XDF files is a collection by
    itself (docs/datasets.md), so no metadata file is needed.
    """
    spec = XdfStreamSpec(
        1, XDF_STREAM, "EEG", channels, THROUGHPUT_RATE_HZ, "float32", EEG_LABELS[:channels]
    )
    rng = np.random.default_rng(channels)
    t0 = 4711.25  # LSL's clock: seconds since the sender's boot
    timestamps = t0 + np.arange(rows) / THROUGHPUT_RATE_HZ + rng.normal(0.0, 1e-4, rows)
    values = (rng.standard_normal((rows, channels)) * 10.0).astype(np.float32)
    offsets = []
    path = root / "data" / collection / f"{XDF_FILE}.xdf"
    path.parent.mkdir(parents=True)
    with path.open("wb") as out:
        out.write(b"XDF:")
        out.write(chunk(TAG_FILE_HEADER, xml_document("<info><version>1.0</version></info>")))
        out.write(chunk(TAG_STREAM_HEADER, spec.header(t0 - 1.0), spec.xdf_id))
        for number, start in enumerate(range(0, rows, SAMPLES_PER_CHUNK)):
            stop = min(rows, start + SAMPLES_PER_CHUNK)
            stamp_all = number % 2 == 0
            out.write(
                numeric_samples(spec.xdf_id, timestamps[start:stop], values[start:stop], stamp_all)
            )
            if number % XDF_OFFSET_EVERY == 0:
                offsets.append((float(timestamps[stop - 1]), -0.0342 + rng.normal(0.0, 2e-5)))
                out.write(clock_offset(spec.xdf_id, *offsets[-1]))
        content = footer(float(timestamps[0]), float(timestamps[-1]), rows, offsets)
        out.write(chunk(TAG_STREAM_FOOTER, content, spec.xdf_id))
    return BenchRecording("XDF", collection, XDF_STREAM, {"file": XDF_FILE}, channels, rows)


@dataclass
class Transfer:
    """One transfer: samples timed, seconds, and CPU seconds per process.

    ``samples`` are those that arrived inside the timed span (from the first frame on:
    all but the first frame's); ``delivered`` counts every sample that arrived.
    """

    samples: int
    seconds: float
    frames: int
    cpu: dict[str, float]  # "source", "broker", "sink" -> CPU seconds during the transfer
    delivered: int
    first_s: float = 0.0  # from the request to the first frame (XDF: the index pass)

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


@dataclass
class ThroughputResult:
    recording: BenchRecording
    frame_bytes: list[int] = field(default_factory=list)  # the RemoteAPI's frames, encoded
    frame_samples: list[int] = field(default_factory=list)
    runs: dict[str, list[Transfer]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    codec_rates: list[float] = field(default_factory=list)  # encode + decode only
    local_frames: int = 0  # frames of the local API's replay (not capped)
    # XDF only: the publisher's recipe for the codec floor (floor_payloads), its runs.
    floor_spec: dict[str, Any] | None = None
    floor_runs: list[Transfer] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.recording.channels

    @property
    def rows(self) -> int:
        return self.recording.rows

    def ratios(self, variant: str, baseline: str) -> list[float]:
        pairs = zip(self.runs[variant], self.runs[baseline], strict=True)
        return [v.rate / b.rate for v, b in pairs]


def make_config(root: Path) -> Config:
    """The config the agent process also reads: root/.streaminghubrc, sim driver only."""
    flags = {
        "data_dir": str(root / "data"),
        "meta_dir": str(root / "meta"),
        "drivers.enabled": "sim",
    }
    return load_config(flags=flags, env={}, cwd=root, home=root, system_rc=root / "none")


class CpuMeter:
    """CPU seconds of named processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._marks: dict[str, float] = {}

    def start(self) -> None:
        self._marks = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self._marks[name] for name, pid in self.pids.items()}


async def _drain_replay(
    api: Any,
    recording: BenchRecording,
    meter: CpuMeter,
    qos: int | None = None,
    framing: Any = THROUGHPUT_FRAMING,
    keep: bool = True,
) -> tuple[Transfer, list[dm.Frame]]:
    """Replay at speed 0 and drain the sink; the frames are returned if ``keep``.

    Without ``keep`` each frame is dropped on arrival, like the raw subscriber's
    payloads: holding a whole recording would time the consumer's allocator too.
    """
    sink: asyncio.Queue[Any] = asyncio.Queue()
    frames: list[dm.Frame] = []
    sizes: list[int] = []
    seqs: list[int] = []
    extra = {} if qos is None else {"qos": qos}
    first_s = float("nan")
    meter.start()
    start = time.perf_counter()
    await api.replay_collection_stream(
        recording.collection,
        recording.stream,
        recording.attrs,
        sink,
        speed=0,
        framing=framing,
        **extra,
    )
    async with asyncio.timeout(TRANSFER_TIMEOUT_S):
        while True:
            item = await sink.get()
            if item is dm.END_OF_STREAM:
                break
            if not isinstance(item, dm.Frame):
                raise RuntimeError(f"replay of {recording.label} sent {item!r}")
            if not sizes:
                first_s = time.perf_counter() - start
                if recording.from_first_frame:
                    meter.start()
                    start = time.perf_counter()
            sizes.append(len(item))
            seqs.append(item.seq)
            if keep:
                frames.append(item)
    seconds = time.perf_counter() - start
    cpu = meter.stop()
    if seqs != list(range(len(seqs))):
        raise RuntimeError(f"replay of {recording.label}: frame seq has gaps")
    delivered = sum(sizes)
    timed = delivered - (sizes[0] if recording.from_first_frame and sizes else 0)
    return Transfer(timed, seconds, len(sizes), cpu, delivered, first_s), frames


async def _local_replay(
    config: Config,
    recording: BenchRecording,
    framing: Any = THROUGHPUT_FRAMING,
    keep: bool = True,
) -> tuple[Transfer, list[dm.Frame]]:
    me = os.getpid()
    async with dm.API(config) as api:
        meter = CpuMeter({"source": me, "sink": me})
        return await _drain_replay(api, recording, meter, framing=framing, keep=keep)


async def _remote_replay(
    config: Config,
    broker: Broker,
    agent: AgentProcess,
    recording: BenchRecording,
    qos: int,
    keep: bool = True,
) -> tuple[Transfer, list[dm.Frame]]:
    api = await connect_remote(config, broker, qos)
    try:
        pids = {"source": agent.pid, "broker": broker.pid, "sink": os.getpid()}
        return await _drain_replay(api, recording, CpuMeter(pids), qos, keep=keep)
    finally:
        await api.close()


def raw_transfer(
    broker: Broker, root: Path, result: ThroughputResult, qos: int, floor: bool = False
) -> tuple[Transfer, list[dm.Frame]]:
    """Raw paho publisher process -> mosquitto -> raw paho subscriber (this process).

    One payload per RemoteAPI frame, of that frame's size. Timed like the RemoteAPI:
    from the subscriber's "go" message (the request) or from the first payload's arrival
    (the first frame), to the last payload's arrival. With ``floor`` the payloads are
    the frames themselves, read, cut and encoded by the publisher as it goes
    (:func:`floor_payloads`) and decoded by the subscriber with ``decode_frame``.
    """
    sizes, counts = result.frame_bytes, result.frame_samples
    from_first = result.recording.from_first_frame
    topic = f"bench/raw/{os.urandom(4).hex()}"
    sizes_file = root / "raw-sizes.json"
    sizes_file.write_text(json.dumps(result.floor_spec if floor else sizes))
    decoded = [0]  # samples in the decoded frames (floor)
    publisher = subprocess.Popen(
        [sys.executable, __file__, "--publish", str(broker.port), str(qos), str(sizes_file), topic],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected, subscribed, finished = threading.Event(), threading.Event(), threading.Event()
    published = threading.Event()
    meter = CpuMeter({"source": publisher.pid, "broker": broker.pid, "sink": os.getpid()})
    received = [0, 0, 0.0, 0.0]  # messages, bytes, arrival of the first and of the last one

    def on_message(client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if received[0] == 0 and from_first:
            meter.start()
            received[2] = now
        received[3] = now
        received[0] += 1
        received[1] += len(message.payload)
        if floor:
            decoded[0] += len(decode_frame(message.payload).frame)
        if received[0] == len(sizes):
            finished.set()

    def watch_publisher() -> None:
        assert publisher.stdout is not None
        for line in publisher.stdout:
            if line.startswith("published"):
                published.set()
                return

    subscriber.on_connect = lambda *_: connected.set()
    subscriber.on_subscribe = lambda *_: subscribed.set()
    subscriber.on_message = on_message
    try:
        assert publisher.stdout is not None and publisher.stdin is not None
        if publisher.stdout.readline().strip() != "ready":
            raise RuntimeError("the raw publisher did not start")
        subscriber.connect(LOOPBACK, broker.port)
        subscriber.loop_start()
        if not connected.wait(STARTUP_TIMEOUT_S):
            raise RuntimeError("the raw subscriber did not connect")
        subscriber.subscribe(topic, qos)
        if not subscribed.wait(STARTUP_TIMEOUT_S):
            raise RuntimeError("the raw subscriber got no SUBACK")
        meter.start()
        start = time.perf_counter()
        threading.Thread(target=watch_publisher, daemon=True).start()
        subscriber.publish(f"{topic}/go", b"go", qos=1)
        deadline = start + TRANSFER_TIMEOUT_S
        # QoS 0 may lose messages: once the publisher is done, stop after a quiet second.
        while not finished.wait(0.05):
            quiet = time.perf_counter() - max(received[3], start)
            if (published.is_set() and quiet > 1.0) or time.perf_counter() > deadline:
                break
        cpu = meter.stop()
        publisher.stdin.close()
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()
        stop_process(publisher)
    arrived = received[0]
    if received[1] != sum(sizes[:arrived]) and arrived == len(sizes):
        raise RuntimeError("raw transfer: byte count differs from the sizes sent")
    if floor and decoded[0] != sum(counts[:arrived]):
        raise RuntimeError(f"codec floor: {decoded[0]} samples decoded, not {sum(counts)}")
    # QoS 0 may lose payloads: count samples as if the first ones arrived.
    delivered = sum(counts[:arrived])
    timed = delivered - (counts[0] if from_first and arrived else 0)
    begin = received[2] if from_first else start
    return Transfer(timed, received[3] - begin, arrived, cpu, delivered), []


def codec_rate(frames: Sequence[dm.Frame]) -> float:
    """Samples/s of ``encode_frame`` + ``decode_frame`` alone, over the given frames."""
    task_id = "0" * TASK_ID_LENGTH
    start = time.perf_counter()
    for frame in frames:
        decode_frame(encode_frame(frame, task_id, "cbor"))
    return sum(len(f) for f in frames) / (time.perf_counter() - start)


def verify_same(frames: Sequence[dm.Frame], reference: Sequence[dm.Frame], what: str) -> None:
    """Same frame boundaries, channels, timestamps and values as the reference."""
    if [len(f) for f in frames] != [len(f) for f in reference]:
        raise RuntimeError(f"{what}: frame boundaries differ from the local API's")
    for mine, theirs in zip(frames, reference, strict=True):
        if mine.channels != theirs.channels or mine.values.dtype != theirs.values.dtype:
            raise RuntimeError(f"{what}: channels or dtype differ from the local API's")
        np.testing.assert_array_equal(mine.timestamps, theirs.timestamps)
        np.testing.assert_array_equal(mine.values, theirs.values)


def rotate(items: Sequence[str], run: int) -> list[str]:
    shift = run % len(items)
    return [*items[shift:], *items[:shift]]


def bench_throughput(
    root: Path, broker: Broker, agent: AgentProcess, recording: BenchRecording, runs: int
) -> ThroughputResult:
    """Alternate the variants ``runs`` times over one recording.

    First, untimed: a RemoteAPI transfer, whose frames (the agent caps them to
    agent.max_frame_bytes and to the broker's maximum packet size) set the raw
    baseline's payload sizes, and a local replay framed like them (max_samples = the
    RemoteAPI's largest frame), which they must equal frame for frame; then a QoS 0
    transfer checked the same way. Timed transfers drop each frame on arrival.
    """
    config = make_config(root)
    result = ThroughputResult(recording)
    _, remote_frames = asyncio.run(_remote_replay(config, broker, agent, recording, 1))
    task_id = "0" * TASK_ID_LENGTH
    result.frame_bytes = [len(encode_frame(f, task_id, "cbor")) for f in remote_frames]
    result.frame_samples = [len(f) for f in remote_frames]
    capped = {
        "max_samples": max(result.frame_samples),
        "max_latency_ms": PRESETS[THROUGHPUT_FRAMING].max_latency_ms,
    }
    _, reference = asyncio.run(_local_replay(config, recording, capped))
    if sum(result.frame_samples) != recording.rows:
        raise RuntimeError(f"{recording.label}: {sum(result.frame_samples)} samples arrived")
    verify_same(remote_frames, reference, "RemoteAPI, QoS 1")
    if recording.kind == "XDF":
        first = remote_frames[0]
        result.floor_spec = {
            "path": str(root / "data" / recording.collection / f"{XDF_FILE}.xdf"),
            "stream": recording.stream,
            "samples": result.frame_samples,
            "stream_id": first.stream_id,
            "channels": list(first.channels),
            "attrs": dict(first.attrs),
        }
    _, remote_frames = asyncio.run(_remote_replay(config, broker, agent, recording, 0))
    verify_same(remote_frames, reference, "RemoteAPI, QoS 0")
    del remote_frames
    variants = [*VARIANTS, FLOOR] if result.floor_spec else list(VARIANTS)
    for run in range(runs):
        for variant in rotate(variants, run):
            agent.check()
            if variant == FLOOR:
                transfer, _ = raw_transfer(broker, root, result, 1, floor=True)
                if transfer.delivered != recording.rows:
                    raise RuntimeError(f"{variant}: {transfer.delivered} of {recording.rows}")
                result.floor_runs.append(transfer)
                log(f"  run {run + 1}/{runs} {variant}: {transfer.rate:,.0f} samples/s")
                continue
            if variant == "local":
                transfer, frames = asyncio.run(_local_replay(config, recording, keep=False))
                result.local_frames = transfer.frames
                result.codec_rates.append(codec_rate(reference))
            elif variant.startswith("remote"):
                transfer, frames = asyncio.run(
                    _remote_replay(config, broker, agent, recording, int(variant[-1]), False)
                )
            else:
                transfer, frames = raw_transfer(broker, root, result, int(variant[-1]))
            if variant != "raw-q0" and transfer.delivered != recording.rows:
                raise RuntimeError(f"{variant}: {transfer.delivered} of {recording.rows} samples")
            result.runs[variant].append(transfer)
            del frames
            log(f"  run {run + 1}/{runs} {variant}: {transfer.rate:,.0f} samples/s")
    return result


# -- latency ----------------------------------------------------------------------------

# remote-loop: QoS 1 with RemoteAPI(network="loop"), the client's socket on its own loop.
# remote-balanced: QoS 1 with the default framing, the baseline of the preset's CPU cost.
LATENCY_VARIANTS = ("local", "remote-q1", "remote-q0", "remote-loop", "remote-balanced")
COST_BASELINE_FRAMING = "balanced"


@dataclass
class LatencyResult:
    """Per-sample latencies (ms) pooled over runs, and per-run figures, per variant."""

    samples_ms: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {v: [] for v in LATENCY_VARIANTS}
    )
    newest_ms: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {v: [] for v in LATENCY_VARIANTS}
    )
    frame_sizes: dict[str, list[float]] = field(
        default_factory=lambda: {v: [] for v in LATENCY_VARIANTS}
    )
    problems: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LATENCY_VARIANTS, 0))
    # The agent's CPU % of a core over each run's window (remote variants).
    agent_cpu: dict[str, list[float]] = field(
        default_factory=lambda: {v: [] for v in LATENCY_VARIANTS}
    )
    bare_ms: list[np.ndarray] = field(default_factory=list)  # bare loop's lateness per run
    # ... of asyncio's default loop, whose epoll timeouts round up to whole milliseconds
    bare_default_ms: list[np.ndarray] = field(default_factory=list)
    raw_ms: list[np.ndarray] = field(default_factory=list)  # minimal publisher -> paho

    def floor(self, period_ms: float) -> np.ndarray:
        """The least sample-to-sink latency this machine's loop allows a live source.

        A sample waits for the next delivery (uniform over the period) plus the loop's
        lateness at that wake: the bare loop's lateness, each value combined with a
        uniform grid of waits.
        """
        late = np.concatenate(self.bare_ms)
        waits = (np.arange(16) + 0.5) / 16 * period_ms
        return (late[:, None] + waits[None, :]).ravel()

    def pooled(self, variant: str, newest: bool = False) -> np.ndarray:
        parts = (self.newest_ms if newest else self.samples_ms)[variant]
        return np.concatenate(parts) if parts else np.empty(0)

    def p99_per_run(self, variant: str) -> list[float]:
        return [float(np.percentile(a, 99)) for a in self.samples_ms[variant]]


async def _measure_latency(
    api: Any, seconds: float, qos: int | None = None, framing: str = LATENCY_FRAMING
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Proxy the latency node for ``seconds`` after a warm-up.

    Returns per-sample latencies (ms), per-frame latency of the newest sample (ms), mean
    samples per frame, and how many non-frame items (status, errors) arrived.
    """
    sink: asyncio.Queue[Any] = asyncio.Queue()
    extra = {} if qos is None else {"qos": qos}
    ack = await api.proxy_live_stream(LATENCY_NODE, "sig", {}, sink, framing=framing, **extra)
    per_sample: list[np.ndarray] = []
    newest: list[float] = []
    problems = 0
    began = time.monotonic()
    end = began + LATENCY_WARMUP_S + seconds
    try:
        async with asyncio.timeout(LATENCY_WARMUP_S + seconds + TRANSFER_TIMEOUT_S):
            while time.monotonic() < end:
                item = await sink.get()
                now = time.time()
                if not isinstance(item, dm.Frame):
                    problems += 1
                    log(f"  latency: the stream sent {item!r}")
                    if item is dm.END_OF_STREAM:
                        raise RuntimeError("the latency stream ended early")
                    continue
                if time.monotonic() - began < LATENCY_WARMUP_S:
                    continue
                ages = (now - item.timestamps) * 1e3
                per_sample.append(ages)
                newest.append(float(ages[-1]))
    finally:
        await api.stop_task(ack.randseq)
    samples = np.concatenate(per_sample)
    return samples, np.asarray(newest), len(samples) / len(newest), problems


async def _bare_loop(seconds: float, period_s: float) -> np.ndarray:
    """Lateness (ms) of a bare asyncio loop sleeping to absolute deadlines every period.

    The baseline for every latency here: no source, no framing, no transport, only the
    wake-ups the simulator's chunks need, in this process on this loaded machine.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    late = []
    k = 1
    while (due := start + k * period_s) < start + seconds:
        await asyncio.sleep(max(due - loop.time(), 0.0))
        late.append(loop.time() - due)
        k = max(k + 1, int((loop.time() - start) / period_s) + 1)
    return np.asarray(late) * 1e3


async def _latency_local(config: Config, seconds: float) -> tuple[Any, ...]:
    async with dm.API(config) as api:
        return await _measure_latency(api, seconds)


async def _latency_remote(
    config: Config,
    broker: Broker,
    agent: AgentProcess,
    seconds: float,
    qos: int,
    network: str = "thread",
    framing: str = LATENCY_FRAMING,
) -> tuple:
    """As _measure_latency, plus the agent's CPU % of a core over the window."""
    api = await connect_remote(config, broker, qos, network)
    try:
        cpu_from, began = cpu_seconds(agent.pid), time.monotonic()
        measured = await _measure_latency(api, seconds, qos, framing)
        cpu = 100.0 * (cpu_seconds(agent.pid) - cpu_from) / (time.monotonic() - began)
        return (*measured, cpu)
    finally:
        await api.close()


def raw_latency(broker: Broker, seconds: float) -> np.ndarray:
    """Sample-to-subscriber latency (ms) of bench/minimal_publisher.py, the raw baseline.

    The same stream (rate, channels, float32) and framing (deliveries every source
    period, a frame when its oldest sample is max_latency_ms old), published by paho +
    cbor2 in its own process (no asyncio), QoS 1, to a plain paho subscriber in this
    process that stamps each frame in paho's network thread (no event loop either).
    """
    low = PRESETS[LATENCY_FRAMING]
    ages: list[np.ndarray] = []
    begin = [0.0]
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        if now < begin[0]:
            return
        stamps = cbor2.loads(message.payload)["t"].value
        ages.append((now - np.frombuffer(stamps, "<f8")) * 1e3)

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw-latency")
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.connect(LOOPBACK, broker.port)
    subscriber.loop_start()
    try:
        subscriber.subscribe("bench/minimal/0", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the raw latency subscriber was not subscribed")
        script = Path(__file__).resolve().parent / "minimal_publisher.py"
        command = [
            sys.executable, str(script), f"--port={broker.port}", "--streams=1",
            f"--rate={LATENCY_RATE_HZ}", f"--channels={LATENCY_CHANNELS}",
            f"--chunk-ms={low.source_period_s(RESOURCE_CHUNK_MS / 1000) * 1000:g}",
            f"--latency-ms={low.max_latency_ms:g}", f"--seconds={seconds}",
            f"--warmup={LATENCY_WARMUP_S}", "--epoch", "--qos=1",
        ]  # fmt: skip
        begin[0] = time.time() + LATENCY_WARMUP_S
        subprocess.run(command, check=True, capture_output=True, timeout=seconds + 60)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    if not ages:
        raise RuntimeError("the raw latency subscriber got nothing")
    return np.concatenate(ages)


def bench_latency(
    root: Path, broker: Broker, agent: AgentProcess, runs: int, seconds: float
) -> LatencyResult:
    config = make_config(root)
    result = LatencyResult()
    period_s = PRESETS[LATENCY_FRAMING].source_period_s(10e-3)  # the simulator's chunks
    for run in range(runs):
        for variant in rotate((*LATENCY_VARIANTS, "bare", "bare-default", "raw"), run):
            agent.check()
            if variant == "raw":
                result.raw_ms.append(raw_latency(broker, seconds))
                p50, p99 = np.percentile(result.raw_ms[-1], [50, 99])
                log(f"  run {run + 1}/{runs} raw paho: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
                continue
            if variant.startswith("bare"):
                # The agent's loop (preciseloop: timers on time), and asyncio's default.
                default = variant == "bare-default"
                runner = asyncio.run if default else preciseloop.run
                lateness = runner(_bare_loop(seconds, period_s))
                (result.bare_default_ms if default else result.bare_ms).append(lateness)
                p50, p99 = np.percentile(lateness, [50, 99])
                log(f"  run {run + 1}/{runs} {variant}: lateness p50 {p50:.2f}, p99 {p99:.2f} ms")
                continue
            # The bench's own loop is the one docs/local-api.md advises for live streams.
            if variant == "local":
                measured = preciseloop.run(_latency_local(config, seconds))
            else:
                qos = 0 if variant == "remote-q0" else 1
                network = "loop" if variant == "remote-loop" else "thread"
                framing = COST_BASELINE_FRAMING if variant == "remote-balanced" else LATENCY_FRAMING
                remote = _latency_remote(config, broker, agent, seconds, qos, network, framing)
                *measured, cpu = preciseloop.run(remote)
                result.agent_cpu[variant].append(cpu)
            samples, newest, per_frame, problems = measured
            result.samples_ms[variant].append(samples)
            result.newest_ms[variant].append(newest)
            result.frame_sizes[variant].append(per_frame)
            result.problems[variant] += problems
            p50, p99 = np.percentile(samples, [50, 99])
            log(f"  run {run + 1}/{runs} {variant}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return result


# -- agent resources --------------------------------------------------------------------


@dataclass
class Window:
    """What one measurement window saw."""

    agent_cpu_percent: float
    broker_cpu_percent: float
    client_cpu_percent: float
    rss_mb: list[float]
    samples: int = 0  # samples the client received during the window
    frames: int = 0  # frames the client received during the window
    loop_turns: int = 0  # the agent loop's selector calls during the window
    zero_turns: int = 0  # ... of which with timeout 0 (more work was already queued)
    seconds: float = 0.0  # the window's wall time
    loop_cpu_percent: float = 0.0  # the agent's main (event loop) thread alone

    @property
    def rss_max(self) -> float:
        return max(self.rss_mb)


@dataclass
class ResourceResult:
    idle: list[Window] = field(default_factory=list)
    loaded: list[Window] = field(default_factory=list)
    minimal: list[dict[str, float]] = field(default_factory=list)  # minimal_publisher.py
    bare: list[dict[str, float]] = field(default_factory=list)  # bare_sleeps: loop turns
    minimal_dry: list[dict[str, float]] = field(default_factory=list)  # ... --no-publish
    peak_mb: float = 0.0  # VmHWM at the end of the section
    problems: int = 0
    expected_per_s: float = RESOURCE_TASKS * RESOURCE_RATE_HZ


async def _window(
    agent: AgentProcess, broker: Broker, seconds: float, counter: list[int]
) -> Window:
    pids = {"agent": agent.pid, "broker": broker.pid, "client": os.getpid()}
    meter = CpuMeter(pids)
    loop_thread = cpu_seconds(agent.pid, agent.pid)  # the main thread runs the event loop
    rss = [proc_status_mb(agent.pid, "VmRSS")]
    counted, frames = counter[0], counter[1]
    turns = agent.loop_counts()
    meter.start()
    start = time.monotonic()
    while (left := start + seconds - time.monotonic()) > 0:
        await asyncio.sleep(min(RSS_SAMPLE_S, left))
        rss.append(proc_status_mb(agent.pid, "VmRSS"))
    wall = time.monotonic() - start
    cpu = {k: 100.0 * v / wall for k, v in meter.stop().items()}
    loop_thread = 100.0 * (cpu_seconds(agent.pid, agent.pid) - loop_thread) / wall
    after = agent.loop_counts()
    return Window(
        cpu["agent"], cpu["broker"], cpu["client"], rss, counter[0] - counted,
        counter[1] - frames, after["selects"] - turns["selects"],
        after["zero_timeout"] - turns["zero_timeout"], wall, loop_thread,
    )  # fmt: skip


async def _consume(sink: asyncio.Queue[Any], counter: list[int], problems: list[int]) -> None:
    while True:
        item = await sink.get()
        if isinstance(item, dm.Frame):
            counter[0] += len(item)
            counter[1] += 1
        elif item is dm.END_OF_STREAM:
            return
        else:
            problems[0] += 1
            log(f"  resources: a stream sent {item!r}")


async def _loaded_window(
    config: Config, broker: Broker, agent: AgentProcess, seconds: float, problems: list[int]
) -> Window:
    """Start the proxy tasks from a fresh RemoteAPI client, measure, stop them.

    A fresh client per window, so that every window starts from the same state. (The
    first version of this bench reused one client and found that a lease left from its
    earlier tasks ended its new ones; fixed in 67666ca.)
    """
    counter = [0, 0]  # samples, frames
    api = await connect_remote(config, broker)
    try:
        acks, consumers = [], []
        for i in range(RESOURCE_TASKS):
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream(f"res{i}", "sig", {}, sink, framing=RESOURCE_FRAMING)
            acks.append(ack)
            consumers.append(asyncio.create_task(_consume(sink, counter, problems)))
        await asyncio.sleep(RESOURCE_WARMUP_S)
        profiling = bool(os.environ.get("BENCH_PROFILE"))  # cProfile the agent's loop
        if profiling:
            agent.process.send_signal(signal.SIGUSR2)
        window = await _window(agent, broker, seconds, counter)
        if profiling:
            agent.process.send_signal(signal.SIGUSR2)
        for ack in acks:
            await api.stop_task(ack.randseq)
        async with asyncio.timeout(RPC_TIMEOUT_S):
            await asyncio.gather(*consumers)
    finally:
        await api.close()
    expected = RESOURCE_TASKS * RESOURCE_RATE_HZ * seconds
    if window.samples < 0.9 * expected:
        raise RuntimeError(f"the tasks delivered {window.samples} of {expected:.0f} samples")
    return window


async def _bare_sleeps(seconds: float, counts: dict[str, int]) -> dict[str, float]:
    """A bare asyncio loop doing only the simulated sources' wakes: the floor of turns.

    RESOURCE_TASKS coroutines each sleep to absolute deadlines every RESOURCE_CHUNK_MS
    (staggered, as the agent's sources are). asyncio needs two turns per such wake: the
    timer's, and the sleeping task's step, which the timer's callback schedules.
    """
    loop = asyncio.get_running_loop()
    period = RESOURCE_CHUNK_MS / 1000

    async def wake(offset: float, until: float) -> None:
        k = 1
        while (due := began + offset + k * period) < until:
            await asyncio.sleep(max(due - loop.time(), 0.0))
            k += 1

    before = dict(counts)
    began = loop.time()
    offsets = [period * i / RESOURCE_TASKS for i in range(RESOURCE_TASKS)]
    await asyncio.gather(*(wake(o, began + seconds) for o in offsets))
    wall = loop.time() - began
    turns = counts["selects"] - before["selects"]
    zero = counts["zero_timeout"] - before["zero_timeout"]
    return {"turns": turns, "zero": zero, "wall_s": wall}


def bare_sleeps(seconds: float) -> dict[str, float]:
    """_bare_sleeps in a fresh loop (in the calling thread) with its turns and CPU counted.

    Then, in the same thread, the simulator alone: the agent's StreamSynth for the same
    streams, asked for what is due every RESOURCE_CHUNK_MS over the same span, back to
    back. Both CPU figures are this thread's (time.thread_time), % of a core.
    """
    selector = loop_counter.CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    cpu = time.thread_time()
    try:
        result = loop.run_until_complete(_bare_sleeps(seconds, selector.counts))
    finally:
        loop.close()
    result["cpu_percent"] = 100.0 * (time.thread_time() - cpu) / result["wall_s"]
    node = parse_node(
        "res", {"streams": {"sig": _stream_spec(RESOURCE_RATE_HZ, RESOURCE_CHANNELS)}}
    )
    spec = node.streams["sig"]
    synths = [
        StreamSynth(spec.channels, spec.frequency, spec.dtype, spec.seed)
        for _ in range(RESOURCE_TASKS)
    ]
    cpu = time.thread_time()
    for k in range(1, int(seconds * 1000 / RESOURCE_CHUNK_MS) + 1):
        for synth in synths:
            synth.upto(k * RESOURCE_CHUNK_MS / 1000)
    result["synth_cpu_percent"] = 100.0 * (time.thread_time() - cpu) / seconds
    return result


async def _minimal_publisher(
    broker: Broker, seconds: float, publish: bool = True
) -> dict[str, float]:
    """bench/minimal_publisher.py on the same broker: the same streams and wakes.

    Without ``publish``: its wakes, data and framing alone (no CBOR, no paho calls).
    """
    script = Path(__file__).resolve().parent / "minimal_publisher.py"
    args = [
        f"--port={broker.port}",
        f"--streams={RESOURCE_TASKS}",
        f"--rate={RESOURCE_RATE_HZ}",
        f"--channels={RESOURCE_CHANNELS}",
        f"--chunk-ms={RESOURCE_CHUNK_MS:g}",
        f"--latency-ms={PRESETS[RESOURCE_FRAMING].max_latency_ms:g}",
        f"--seconds={seconds}",
        f"--warmup={RESOURCE_WARMUP_S}",
        *([] if publish else ["--no-publish"]),
    ]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(seconds + RESOURCE_WARMUP_S + 30):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["cpu_percent"] = 100.0 * result["cpu_s"] / result["wall_s"]
    return result


async def _resources(
    config: Config, broker: Broker, agent: AgentProcess, runs: int, seconds: float
) -> ResourceResult:
    result = ResourceResult()
    problems = [0]
    await asyncio.sleep(RESOURCE_WARMUP_S)  # the agent settles after its birth
    for run in range(runs):
        for variant in rotate(("idle", "loaded", "minimal", "bare", "minimal-dry"), run):
            agent.check()
            if variant == "minimal-dry":
                result.minimal_dry.append(await _minimal_publisher(broker, seconds, False))
            elif variant == "bare":
                result.bare.append(await asyncio.to_thread(bare_sleeps, seconds))
            elif variant == "idle":
                result.idle.append(await _window(agent, broker, seconds, [0, 0]))
            elif variant == "minimal":
                result.minimal.append(await _minimal_publisher(broker, seconds))
            else:
                window = await _loaded_window(config, broker, agent, seconds, problems)
                result.loaded.append(window)
            await asyncio.sleep(RESOURCE_WARMUP_S)
        idle, loaded = result.idle[-1], result.loaded[-1]
        log(
            f"  run {run + 1}/{runs}: agent idle {idle.agent_cpu_percent:.1f}% CPU "
            f"{idle.rss_max:.1f} MiB, loaded {loaded.agent_cpu_percent:.1f}% CPU "
            f"{loaded.rss_max:.1f} MiB, {loaded.samples / seconds:,.0f} samples/s; minimal "
            f"publisher {result.minimal[-1]['cpu_percent']:.1f}% CPU"
        )
    result.peak_mb = proc_status_mb(agent.pid, "VmHWM")
    result.problems = problems[0]
    return result


# -- simulated nodes --------------------------------------------------------------------


def _stream_spec(rate: float, channels: int) -> dict[str, Any]:
    return {"frequency": rate, "dtype": "f32", "channels": _channels(channels)}


def _channels(count: int) -> dict[str, Any]:
    return {
        f"c{i}": {"signal": "sine", "freq_hz": 1.0 + i, "amplitude": 10.0, "noise": 0.5}
        for i in range(count)
    }


def write_rc(root: Path) -> None:
    """root/.streaminghubrc with the simulated nodes (the agent and the local API read it)."""
    nodes: dict[str, Any] = {
        LATENCY_NODE: {
            "streams": {
                "sig": {
                    "frequency": LATENCY_RATE_HZ,
                    "dtype": "f32",
                    "channels": _channels(LATENCY_CHANNELS),
                }
            }
        }
    }
    for i in range(RESOURCE_TASKS):
        nodes[f"res{i}"] = {
            "streams": {
                "sig": {
                    "frequency": RESOURCE_RATE_HZ,
                    "dtype": "f32",
                    "channels": _channels(RESOURCE_CHANNELS),
                }
            }
        }
    (root / ".streaminghubrc").write_text(json.dumps({"simulate": {"nodes": nodes}}, indent=1))


# -- report -----------------------------------------------------------------------------


def _first_s(result: ThroughputResult, variant: str) -> str:
    return f"{statistics.median(t.first_s for t in result.runs[variant]):.2f}"


def _pct(values: np.ndarray) -> str:
    p50, p99 = np.percentile(values, [50, 99])
    return f"{p50:.2f} / {p99:.2f} / {values.max():.2f}"


def _cpu_share(transfers: Sequence[Transfer]) -> str:
    """Median CPU seconds per second of transfer: source / broker / sink."""
    if "broker" not in transfers[0].cpu:  # the local API: source and sink are one process
        return (
            f"{statistics.median(t.cpu['source'] / t.seconds for t in transfers):.2f} (one process)"
        )
    parts = []
    for name in ("source", "broker", "sink"):
        parts.append(f"{statistics.median(t.cpu[name] / t.seconds for t in transfers):.2f}")
    return " / ".join(parts)


def throughput_table(results: Sequence[ThroughputResult]) -> list[str]:
    lines = [
        "| recording | path | samples/s, median (range) | median s timed | MB/s of frames "
        "| / raw same QoS | / local API | CPU s per s: source / broker / sink |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = r.frame_bytes[0] if r.recording.from_first_frame else 0
        timed_mb = (sum(r.frame_bytes) - first) / 1e6
        for variant in VARIANTS:
            transfers = r.runs[variant]
            rates = [t.rate for t in transfers]
            seconds = [t.seconds for t in transfers]
            mbps = statistics.median(timed_mb / t.seconds for t in transfers)
            qos = variant[-1]
            raw = "1.00" if variant.startswith("raw") else (
                "-" if variant == "local" else
                f"{statistics.median(r.ratios(variant, f'raw-q{qos}')):.2f}"
            )  # fmt: skip
            local = f"{statistics.median(r.ratios(variant, 'local')):.2f}"
            lines.append(
                f"| {r.recording.label} | {VARIANT_LABELS[variant]} "
                f"| {median_range(rates)} | {statistics.median(seconds):.2f} | {mbps:,.0f} "
                f"| {raw} | {local} "
                f"| {_cpu_share(transfers)} |"
            )
    return lines


def floor_summary(results: Sequence[ThroughputResult]) -> str:
    """The codec floor of the XDF recordings beside raw paho and the RemoteAPI, same runs."""
    parts = []
    for r in (r for r in results if r.floor_runs):
        rates = [t.rate for t in r.floor_runs]
        of_raw = [f.rate / raw.rate for f, raw in zip(r.floor_runs, r.runs["raw-q1"], strict=True)]
        remote = [
            rem.rate / f.rate for rem, f in zip(r.runs["remote-q1"], r.floor_runs, strict=True)
        ]
        parts.append(
            f"{r.channels} ch {median_range(rates)} samples/s, floor / raw "
            f"{statistics.median(of_raw):.2f} ({min(of_raw):.2f}-{max(of_raw):.2f}), "
            f"RemoteAPI / floor {statistics.median(remote):.2f} "
            f"({min(remote):.2f}-{max(remote):.2f}), CPU s per s {_cpu_share(r.floor_runs)}"
        )
    if not parts:
        return ""
    return (
        "**Floor, same runs (XDF).** Raw paho at QoS 1 carrying the real frames: the "
        "publisher makes them as it goes with the agent's own parts (the XDF reader's "
        "blocks, cut into the RemoteAPI's frame sizes as replay cuts them, `encode_frame`) "
        "and the subscriber decodes each with `decode_frame` in paho's thread; no asyncio, "
        "task, outbox or thread hop of ours: "
        + "; ".join(parts)
        + ". *floor / raw* is what reading, encoding and decoding leave of raw paho moving "
        "bytes (a ceiling for RemoteAPI / raw with these parts); *RemoteAPI / floor* is "
        "what the framework around them costs."
    )


def latency_table(result: LatencyResult, period_ms: float) -> list[str]:
    lines = [
        "| path | samples (runs) | sample to sink p50 / p99 / max (ms) | p99 per run (ms) "
        "| newest sample of each frame p50 / p99 / max (ms) | samples per frame "
        f"| agent CPU % of a core, median (range) | aim p99 <= {AIM_P99_MS:g} ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    labels = {
        "local": "local `dm.API` (in-process)",
        "remote-q1": "`RemoteAPI`, QoS 1 (default)",
        "remote-q0": "`RemoteAPI`, QoS 0",
        "remote-loop": '`RemoteAPI(network="loop")`, QoS 1 (the client\'s socket on its loop)',
        "remote-balanced": f'`RemoteAPI`, QoS 1, `framing="{COST_BASELINE_FRAMING}"` '
        "(the default: baseline of the low-latency preset's CPU cost)",
    }
    for variant in LATENCY_VARIANTS:
        samples = result.pooled(variant)
        per_run = ", ".join(f"{v:.1f}" for v in result.p99_per_run(variant))
        judged = "baseline" if variant in ("local", "remote-balanced") else verdict(
            float(np.percentile(samples, 99)) <= AIM_P99_MS
        )  # fmt: skip
        cpu = median_range(result.agent_cpu[variant], ".1f") if result.agent_cpu[variant] else "-"
        lines.append(
            f"| {labels[variant]} | {len(samples):,} ({len(result.samples_ms[variant])}) "
            f"| {_pct(samples)} | {per_run} | {_pct(result.pooled(variant, newest=True))} "
            f"| {statistics.mean(result.frame_sizes[variant]):.1f} | {cpu} | {judged} |"
        )
    if result.raw_ms:
        raw = np.concatenate(result.raw_ms)
        per_run = ", ".join(f"{np.percentile(a, 99):.1f}" for a in result.raw_ms)
        judged = verdict(float(np.percentile(raw, 99)) <= AIM_P99_MS)
        lines.append(
            "| baseline: raw paho + cbor2, `bench/minimal_publisher.py` (same stream and "
            "framing, no asyncio) -> mosquitto -> a paho subscriber thread, QoS 1 "
            f"| {len(raw):,} ({len(result.raw_ms)}) | {_pct(raw)} | {per_run} | - | - | - "
            f"| {judged} |"
        )
    for lateness_runs, which in (
        (result.bare_default_ms, "asyncio's default loop (epoll timeouts in whole ms)"),
        (result.bare_ms, "the agent's loop (`preciseloop`: a timerfd ends each timed wait)"),
    ):
        bare = np.concatenate(lateness_runs)
        per_run = ", ".join(f"{np.percentile(a, 99):.1f}" for a in lateness_runs)
        lines.append(
            f"| baseline: a bare asyncio loop in the bench process waking every {period_ms:g} "
            f"ms (lateness of each wake), {which} | {len(bare):,} wakes ({len(lateness_runs)}) "
            f"| {_pct(bare)} | {per_run} | - | - | - | floor |"
        )
    floor = result.floor(period_ms)
    reachable = np.percentile(floor, 99) <= AIM_P99_MS
    lines.append(
        f"| floor: the wait for the next {period_ms:g} ms delivery + the bare loop's "
        f"lateness | - | {_pct(floor)} | - | - | - | - | "
        f"{'within the aim' if reachable else 'above the aim: out of reach here'} |"
    )
    return lines


def resource_table(result: ResourceResult, seconds: float) -> list[str]:
    lines = [
        "| agent | agent CPU % of a core, median (range); of it the loop's thread "
        "| agent VmRSS max MiB, median (range) "
        "| mosquitto CPU % | client (this process) CPU % | samples/s received "
        "| loop turns/s (of them with timeout 0) | loop turns per frame beyond the "
        "sources' own wakes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, windows in (
        ("idle (baseline)", result.idle),
        (
            f"{RESOURCE_TASKS} proxy tasks, {RESOURCE_RATE_HZ:g} Hz x {RESOURCE_CHANNELS} ch f32",
            result.loaded,
        ),
    ):
        received = statistics.median(w.samples / seconds for w in windows)
        turns = statistics.median(w.loop_turns / w.seconds for w in windows)
        zero = statistics.median(w.zero_turns / w.seconds for w in windows)
        per_frame = (
            median_range([_beyond_bare(result, w) for w in windows], ".2f")
            if windows[0].frames
            else "-"
        )
        lines.append(
            f"| {label} | {median_range([w.agent_cpu_percent for w in windows], '.1f')}; "
            f"{statistics.median(w.loop_cpu_percent for w in windows):.1f} "
            f"| {median_range([w.rss_max for w in windows], '.1f')} "
            f"| {statistics.median(w.broker_cpu_percent for w in windows):.1f} "
            f"| {statistics.median(w.client_cpu_percent for w in windows):.1f} "
            f"| {received:,.0f} | {turns:,.0f} ({zero:,.0f}) | {per_frame} |"
        )
    if result.minimal:
        published = statistics.median(m["samples"] / m["wall_s"] for m in result.minimal)
        minimal_beyond = [
            _beyond_chunks(m["turns"], m["frames"], m["wall_s"]) for m in result.minimal
        ]
        lines.append(
            "| baseline: `bench/minimal_publisher.py` (paho + cbor2, same streams, wakes and "
            f"framing; CPU of its own process) "
            f"| {median_range([m['cpu_percent'] for m in result.minimal], '.1f')} | - | - | - "
            f"| {published:,.0f} published "
            f"| {statistics.median(m['turns'] / m['wall_s'] for m in result.minimal):,.0f} "
            f"| {median_range(minimal_beyond, '.2f')} |"
        )
    if result.minimal_dry:
        lines.append(
            "| the same with `--no-publish` (its wakes, data and framing alone) "
            f"| {median_range([m['cpu_percent'] for m in result.minimal_dry], '.1f')} "
            "| - | - | - | - | - | - |"
        )
    if result.bare:
        turns = statistics.median(b["turns"] / b["wall_s"] for b in result.bare)
        zero = statistics.median(b["zero"] / b["wall_s"] for b in result.bare)
        lines.append(
            f"| baseline: a bare asyncio loop in the bench process, {RESOURCE_TASKS} "
            f"coroutines sleeping to a {RESOURCE_CHUNK_MS:g} ms grid (the sources' wakes "
            f"alone) | {statistics.median(b['cpu_percent'] for b in result.bare):.1f} "
            f"| - | - | - | - | {turns:,.0f} ({zero:,.0f}) "
            "| - (the reference) |"
        )
        lines.append(
            f"| the simulator alone: {RESOURCE_TASKS} streams' `StreamSynth` asked for what is "
            f"due every {RESOURCE_CHUNK_MS:g} ms, in the bench process "
            f"| {statistics.median(b['synth_cpu_percent'] for b in result.bare):.1f} "
            "| - | - | - | - | - | - |"
        )
    return lines


def _beyond_bare(result: ResourceResult, window: Window) -> float:
    """The agent's loop turns per frame beyond the bare loop's (the sources' wakes)."""
    bare = statistics.median(b["turns"] / b["wall_s"] for b in result.bare)
    return (window.loop_turns - bare * window.seconds) / window.frames


def _beyond_chunks(turns: float, frames: float, seconds: float) -> float:
    """Loop turns per frame beyond one per source chunk (the sources' own period)."""
    chunk_turns = RESOURCE_TASKS * seconds * 1000.0 / RESOURCE_CHUNK_MS
    return (turns - chunk_turns) / frames if frames else float("nan")


def aims_summary(
    throughput: Sequence[ThroughputResult], latency: LatencyResult, resources: ResourceResult
) -> str:
    def each(results: Sequence[ThroughputResult], variant: str, baseline: str) -> str:
        return ", ".join(f"{statistics.median(r.ratios(variant, baseline)):.2f}" for r in results)

    def met(results: Sequence[ThroughputResult]) -> bool:
        return all(statistics.median(r.ratios("remote-q1", "raw-q1")) >= AIM_RATIO for r in results)

    def widths(results: Sequence[ThroughputResult]) -> str:
        return ", ".join(f"{r.channels} ch" for r in results)

    xdf = [r for r in throughput if r.recording.kind == "XDF"]
    csv = [r for r in throughput if r.recording.kind == "CSV"]
    p99 = float(np.percentile(latency.pooled("remote-q1"), 99))
    p99_q0 = float(np.percentile(latency.pooled("remote-q0"), 99))
    local_p99 = float(np.percentile(latency.pooled("local"), 99))
    p50 = float(np.percentile(latency.pooled("remote-q1"), 50))
    p50_loop = float(np.percentile(latency.pooled("remote-loop"), 50))
    bare_p99 = float(np.percentile(np.concatenate(latency.bare_ms), 99))
    period_ms = PRESETS[LATENCY_FRAMING].source_period_s(RESOURCE_CHUNK_MS / 1000) * 1000
    floor_p50, floor_p99 = np.percentile(latency.floor(period_ms), [50, 99])
    raw_p50, raw_p99 = np.percentile(np.concatenate(latency.raw_ms), [50, 99])
    low_cpu = statistics.median(latency.agent_cpu["remote-q1"])
    default_cpu = statistics.median(latency.agent_cpu["remote-balanced"])
    rss = max(w.rss_max for w in resources.loaded)
    return (
        f"**Aims.** Throughput, RemoteAPI (QoS 1) >= {AIM_RATIO:.0%} of raw paho moving the "
        f"same bytes: XDF (a source that is not parse-bound) {verdict(met(xdf))} "
        f"(RemoteAPI / raw {each(xdf, 'remote-q1', 'raw-q1')} for {widths(xdf)}; "
        f"RemoteAPI / local API {each(xdf, 'remote-q1', 'local')}); CSV {verdict(met(csv))} "
        f"(RemoteAPI / raw {each(csv, 'remote-q1', 'raw-q1')} for {widths(csv)}, bound by the "
        f"CSV parser: the local API, with no transport at all, / raw "
        f"{each(csv, 'local', 'raw-q1')}; RemoteAPI / local API "
        f"{each(csv, 'remote-q1', 'local')}). "
        f"Latency p99 <= {AIM_P99_MS:g} ms through the RemoteAPI (QoS 1, the default): "
        f"{verdict(p99 <= AIM_P99_MS)} ({p99:.2f} ms; local API {local_p99:.2f} ms; with "
        f"QoS 0 {p99_q0:.2f} ms, {verdict(p99_q0 <= AIM_P99_MS)}; p50 {p50:.2f} ms, aim "
        f"<= {AIM_P50_MS:g}: {verdict(p50 <= AIM_P50_MS)}, and with "
        f'`RemoteAPI(network="loop")` {p50_loop:.2f} ms: {verdict(p50_loop <= AIM_P50_MS)}; '
        "same-run baseline: a bare "
        f"asyncio loop's wake lateness p99 {bare_p99:.2f} ms, floor p50 / p99 "
        f"{floor_p50:.2f} / {floor_p99:.2f} ms; raw paho + cbor2 with the same stream and "
        f"framing p50 / p99 {raw_p50:.2f} / {raw_p99:.2f} ms). "
        f"The low-latency preset's cost: the agent spends {low_cpu:.1f} % of a core on this "
        f'stream ({default_cpu:.1f} % with `framing="{COST_BASELINE_FRAMING}"`, same runs). '
        f"Agent RSS <= {AIM_RSS_MB:g} MB with {RESOURCE_TASKS} proxy tasks: "
        f"{verdict(rss * 1.048576 <= AIM_RSS_MB)} (max VmRSS {rss:.1f} MiB = "
        f"{rss * 1.048576:.1f} MB)." + _cpu_aim(resources)
    )


def _cpu_aim(resources: ResourceResult) -> str:
    if not resources.minimal:
        return ""
    agent = statistics.median(w.agent_cpu_percent for w in resources.loaded)
    minimal = statistics.median(m["cpu_percent"] for m in resources.minimal)
    ratio = agent / minimal if minimal > 0 else float("inf")
    wakes = statistics.median(_beyond_bare(resources, w) for w in resources.loaded)
    minimal_wakes = statistics.median(
        _beyond_chunks(m["turns"], m["frames"], m["wall_s"]) for m in resources.minimal
    )
    return (
        f" Agent CPU <= {AIM_CPU_VS_MINIMAL:g} x a minimal paho + cbor2 publisher of the same "
        f"streams: {verdict(ratio <= AIM_CPU_VS_MINIMAL)} ({agent:.1f}% / {minimal:.1f}% = "
        f"{ratio:.2f}). Agent loop turns per frame beyond the sources' own wakes (a bare "
        f"asyncio loop doing only those sleeps, same run) <= "
        f"{AIM_WAKES_PER_FRAME:g}: {verdict(wakes <= AIM_WAKES_PER_FRAME)} ({wakes:.2f}; the "
        f"minimal publisher {minimal_wakes:.2f})." + _floor_summary(resources, agent, minimal)
    )


def _floor_summary(resources: ResourceResult, agent: float, minimal: float) -> str:
    if not resources.bare:
        return ""
    bare = statistics.median(b["cpu_percent"] for b in resources.bare)
    synth = statistics.median(b["synth_cpu_percent"] for b in resources.bare)
    dry = statistics.median(m["cpu_percent"] for m in resources.minimal_dry)
    publishing = max(minimal - dry, 0.0)
    floor = bare + synth + publishing
    return (
        f" Simulator <= {AIM_SYNTH_SHARE:.0%} of the agent's CPU: "
        f"{verdict(synth <= AIM_SYNTH_SHARE * agent)} ({synth:.1f}% of a core, "
        f"{synth / agent:.0%} of the agent's). Floor, same run: an asyncio agent with these "
        f"sources costs at least the bare loop's sleeps ({bare:.1f}%) plus the simulator "
        f"({synth:.1f}%) plus what the minimal publisher spends on publishing (its CPU "
        f"minus its CPU with --no-publish, {dry:.1f}%: {publishing:.1f}%), "
        f"{floor:.1f}% = {floor / minimal:.2f} x the minimal publisher; the agent is "
        f"{agent / floor:.2f} x that floor."
    )


def render_section(
    throughput: Sequence[ThroughputResult],
    latency: LatencyResult,
    resources: ResourceResult,
    args: argparse.Namespace,
    argv: Sequence[str],
    loads: tuple[str, str],
    code: str,
    throughput_peak_mb: float,
    max_frame_bytes: int,
) -> str:
    facts = machine_facts()
    facts["paho-mqtt"] = getattr(mqtt, "__version__", "") or _dist_version("paho-mqtt")
    facts["cbor2"] = _dist_version("cbor2")
    facts["mosquitto"] = _mosquitto_version()
    facts["load average (1/5/15 min) at start -> end"] = f"{loads[0]} -> {loads[1]}"
    facts["code"] = code
    command = shlex.join(["python", "bench/transport.py", *argv])
    largest = max(max(r.frame_bytes) for r in throughput)
    low = PRESETS[LATENCY_FRAMING]
    balanced = PRESETS[RESOURCE_FRAMING]
    latency_wake_ms = low.source_period_s(RESOURCE_CHUNK_MS / 1000) * 1000
    frames_per = ", ".join(
        f"{r.recording.kind} {r.channels} ch {len(r.frame_bytes)} ({max(r.frame_bytes):,})"
        for r in throughput
    )
    local_frames = ", ".join(
        f"{r.recording.kind} {r.channels} ch {r.local_frames}" for r in throughput
    )
    xdf = [r for r in throughput if r.recording.from_first_frame]
    return "\n".join(
        [
            f"Measured {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} with `{command}` "
            f"({args.runs} runs of every variant; throughput: CSV {args.rows:,} rows at 8 ch "
            f"and {args.rows // WIDE_ROWS_DIVISOR:,} at 64 ch, XDF {XDF_ROWS_FACTOR} times as "
            f"many; latency windows of "
            f"{args.latency_seconds:g} s, resource windows of {args.resource_seconds:g} s).",
            "",
            "Machine: " + "; ".join(f"{k}: {v}" for k, v in facts.items()) + ".",
            "",
            aims_summary(throughput, latency, resources),
            "",
            "Setup, for every part: mosquitto on a free loopback port with the speed "
            f"settings of `systemd/mosquitto.conf.example` ({', '.join(BROKER_SETTINGS)}; no "
            "TLS, no password, no persistence), the agent as its own process "
            "(`python -m streaminghub_datamux serve --drivers sim ...`, a fresh one per part, "
            "reading the bench's simulated nodes from its `.streaminghubrc`), and the "
            "consumer (local API, RemoteAPI client or raw subscriber) in the bench process: "
            "three processes on the same cores. Variants alternate within each run and "
            "their order rotates from run to run.",
            "",
            "### Throughput at replay speed 0",
            "",
            "Two recordings per width, 1 kHz timestamps and float32 values: a DFDS CSV "
            "recording (what users replay most) and an XDF file with "
            f"{XDF_ROWS_FACTOR} times as many rows, so that its much faster transfers still "
            "last long enough to time (one stream, written with bench/datasets.py's XDF "
            "chunk writer: Samples chunks of "
            f"{SAMPLES_PER_CHUNK} samples, every other one stamped on its first sample only, "
            "a ClockOffset every 5 s). Each is replayed with `replay_collection_stream(..., "
            'speed=0, framing="throughput")`, the consumer draining the sink (RemoteAPI: a '
            "fresh client per transfer, connected before the clock starts). **CSV** "
            "transfers are timed from the request to END_OF_STREAM: the agent parses the "
            "file while it sends. **XDF** transfers are timed from the first frame's "
            "arrival to END_OF_STREAM and count the samples after the first frame: XDF "
            "replay indexes the file in one pass when it opens (every timestamp, pyxdf's "
            "clock sync and dejitter) and then decodes values block by block with one copy, "
            "so the index pass is left out (request to first frame, median: "
            + "; ".join(
                f"{r.channels} ch local {_first_s(r, 'local')} s, RemoteAPI "
                f"{_first_s(r, 'remote-q1')} s"
                for r in xdf
            )
            + ") and what is timed is framing, transport and consumer with no parser in the "
            "way. Raw baseline: a plain paho-mqtt client in its own process publishes, on a "
            "message from the subscriber, one random payload per RemoteAPI frame with "
            "exactly that frame's CBOR size (task id, attrs and all), to a plain paho "
            "subscriber in the bench process; timed to the last payload's arrival from that "
            "message (CSV) or from the first payload's arrival (XDF). Both use MQTT 5 and "
            f"paho's QoS 1 in-flight window of {RAW_INFLIGHT} messages (the agent also caps "
            "unacknowledged bytes at 16 MiB). The agent cuts frames to "
            f"`agent.max_frame_bytes` ({max_frame_bytes:,} bytes, the default) and to the "
            "broker's announced maximum packet size, so the RemoteAPI's frames can hold "
            f"fewer samples than the local API's {PRESETS[THROUGHPUT_FRAMING].max_samples:,}; "
            "the raw baseline mirrors the RemoteAPI's frames. Before the runs an untimed "
            "RemoteAPI transfer of each recording is checked frame for frame (boundaries, "
            "channels, dtype, timestamps, values) against a local replay with max_samples "
            "set to the RemoteAPI's largest frame, and so is an untimed QoS 0 transfer; "
            "timed consumers (RemoteAPI, local API, raw subscriber) count each frame and drop "
            "it. *CPU s per s*: CPU seconds of the source process (local: the bench process; "
            "RemoteAPI: the agent; raw: the publisher), of mosquitto, and of "
            "the sink process, per second of the timed span (from /proc, all threads; 1.00 "
            f"= one core busy). RemoteAPI frames per transfer (largest, bytes): {frames_per}; "
            f"local API frames per transfer: {local_frames}.",
            "",
            *throughput_table(throughput),
            "",
            floor_summary(throughput),
            "",
            "For scale, CBOR `encode_frame` + `decode_frame` alone, in one process, over the "
            "RemoteAPI's frames: "
            + "; ".join(
                f"{r.channels} ch {median_range(r.codec_rates)} samples/s"
                for r in throughput
                if r.recording.kind == "CSV"
            )
            + f". Agent peak RSS (VmHWM) after the throughput part: {throughput_peak_mb:.0f} "
            f"MiB (XDF replay holds a stream's timestamps, and the dejitter fit over them "
            "before the first frame). The largest frame is "
            f"{largest:,} bytes, within the broker's `max_packet_size` {BROKER_MAX_PACKET:,} "
            "(as in the production example).",
            "",
            "### Latency, sample to sink (live, low-latency framing)",
            "",
            f"A simulated node streams {LATENCY_RATE_HZ:g} Hz x {LATENCY_CHANNELS} float32 "
            f'channels; `proxy_live_stream(..., framing="{LATENCY_FRAMING}")` '
            f"(max_samples {low.max_samples}, max_latency_ms {low.max_latency_ms:g}). The "
            "simulator stamps sample k with `t0 + k / rate`, `t0` = `time.time()` when the "
            "stream opened (drivers/simulate.py), and delivers what is due every "
            f"{latency_wake_ms:g} ms (its chunk period, capped at max_latency_ms / 2). "
            "Latency of a sample = `time.time()` when the consumer takes its frame from the "
            "sink minus the sample's timestamp; agent and client share the machine's clock. "
            f"Each window starts {LATENCY_WARMUP_S:g} s after the task (warm-up not "
            "counted). Percentiles over all samples of all runs pooled. Baseline: the same "
            "stream through the local API in the bench process, so RemoteAPI minus local is "
            "the transport. *Newest sample of each frame*: the age of a frame's last sample "
            "on arrival, i.e. without the wait for the frame to fill.",
            "",
            *latency_table(latency, latency_wake_ms),
            "",
            "What framing accounts for: a sample waits for the simulator's next delivery "
            f"(up to {latency_wake_ms:g} ms) and then for its frame to be flushed, at the "
            f"latest when the frame's oldest sample is {low.max_latency_ms:g} ms old (a "
            "frame that would be due before the next delivery, or up to the loop's jitter "
            "margin after it, leaves with this one); the "
            "local API's figures are that framing latency plus one event-loop hop. The "
            "bare loop's row is the wake-up lateness the machine itself adds, in a process "
            "with nothing else to do: every path above includes it at least once (the "
            "simulator's wake); the RemoteAPI adds the broker's round trip and, by default, "
            "the client's hand-off from paho's thread to its loop, which "
            '`RemoteAPI(network="loop")` removes (the agent serves its socket from its '
            "loop). The floor row combines it with the wait for the next "
            "delivery: no live source delivering every "
            f"{latency_wake_ms:g} ms can do better on this machine at this load. "
            f"Status or error items during the windows: "
            + ", ".join(f"{v} {n}" for v, n in latency.problems.items())
            + ".",
            "",
            "### Agent resources",
            "",
            f"One agent process serving {RESOURCE_TASKS} simulated nodes; one RemoteAPI "
            f"client (QoS 1) proxies one {RESOURCE_RATE_HZ:g} Hz x {RESOURCE_CHANNELS}-channel "
            f'float32 stream of each (`framing="{RESOURCE_FRAMING}"`: max_latency_ms '
            f"{balanced.max_latency_ms:g}, simulator chunks of 10 ms) and drains the sinks. "
            f"Each run measures a {args.resource_seconds:g} s window with no task and no "
            f"client (the idle agent, baseline) and one with the {RESOURCE_TASKS} tasks "
            f"running (a fresh client per window, which starts the tasks "
            f"{RESOURCE_WARMUP_S:g} s before the window and stops them after it; a window "
            "that gets less than 90% of the expected samples fails the bench), in "
            "alternating order. CPU % = "
            "utime + stime from /proc/PID/stat over the window / wall time (100 = one core). "
            f"RSS = the largest VmRSS of /proc/PID/status, sampled every {RSS_SAMPLE_S:g} s. "
            f"Agent VmHWM at the end: {resources.peak_mb:.1f} MiB. Expected samples/s with "
            f"the tasks: {resources.expected_per_s:,.0f}; status or error items: "
            f"{resources.problems}.",
            "",
            *resource_table(resources, args.resource_seconds),
        ]
    )


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        done = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"mosquitto version (\S+)", done.stdout + done.stderr)
    return match[1] if match else "unknown"


# -- main -------------------------------------------------------------------------------


PARTS = ("throughput", "latency", "resources")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per variant (default 5)")
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows of the 8-channel CSV recording (default 1,200,000; 64 channels get a "
        f"quarter; XDF recordings {XDF_ROWS_FACTOR} times as many)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=None, help="latency window (default 5)"
    )
    parser.add_argument(
        "--resource-seconds", type=float, default=None, help="resource window (default 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 runs, 200k rows, 2 s windows"
    )
    parser.add_argument(
        "--write-doc", action="store_true", help=f"update the '{SECTION}' section of --doc"
    )
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the document to update")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all: {','.join(PARTS)}); "
        "--write-doc needs all",
    )
    parser.add_argument("--publish", nargs=4, help=argparse.SUPPRESS)  # raw publisher mode
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.write_doc and set(args.parts) != set(PARTS):
        parser.error("--write-doc needs every part (leave out --parts)")
    args.runs = args.runs or (2 if args.quick else 5)
    args.rows = args.rows or (200_000 if args.quick else 1_200_000)
    args.latency_seconds = args.latency_seconds or (2.0 if args.quick else 5.0)
    args.resource_seconds = args.resource_seconds or (2.0 if args.quick else 5.0)
    return args


def run_parts(args: argparse.Namespace, root: Path) -> tuple[Any, ...]:
    (root / "data").mkdir()
    (root / "meta").mkdir()
    write_rc(root)
    log("writing recordings")
    recordings = []
    for collection, channels in (("narrow", 8), ("wide", WIDE_CHANNELS)):
        if "throughput" not in args.parts:
            break
        rows = args.rows if channels == 8 else args.rows // WIDE_ROWS_DIVISOR
        write_recording(root, collection, rows, channels, THROUGHPUT_RATE_HZ)
        recordings.append(
            BenchRecording("CSV", collection, "sig", {"subject": "A"}, channels, rows)
        )
    for collection, channels in (("xdf_narrow", 8), ("xdf_wide", WIDE_CHANNELS)):
        if "throughput" not in args.parts:
            break
        rows = XDF_ROWS_FACTOR * (args.rows if channels == 8 else args.rows // WIDE_ROWS_DIVISOR)
        recordings.append(write_xdf_recording(root, collection, rows, channels))
    max_frame_bytes = int(make_config(root).get("agent.max_frame_bytes"))
    broker = Broker(root)
    throughput: list[ThroughputResult] = []
    latency = resources = None
    peak = 0.0
    try:
        if "throughput" in args.parts:
            with running_agent(broker, root, "throughput") as agent:
                for recording in recordings:
                    log(f"throughput: {recording.label}")
                    throughput.append(bench_throughput(root, broker, agent, recording, args.runs))
                peak = proc_status_mb(agent.pid, "VmHWM")
        if "latency" in args.parts:
            with running_agent(broker, root, "latency") as agent:
                log(f"latency: {LATENCY_RATE_HZ:g} Hz x {LATENCY_CHANNELS} ch")
                latency = bench_latency(root, broker, agent, args.runs, args.latency_seconds)
        if "resources" in args.parts:
            with running_agent(broker, root, "resources") as agent:
                log(f"resources: {RESOURCE_TASKS} tasks of {RESOURCE_RATE_HZ:g} Hz")
                resources = asyncio.run(
                    _resources(make_config(root), broker, agent, args.runs, args.resource_seconds)
                )
    finally:
        broker.stop()
    return throughput, latency, resources, peak, max_frame_bytes


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.publish:
        port, qos, sizes_file, topic = args.publish
        return publish(int(port), int(qos), sizes_file, topic)
    loads_at_start, code = load_average(), code_version()
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        throughput, latency, resources, peak, max_frame_bytes = run_parts(args, Path(tmp))
    loads = (loads_at_start, load_average())
    if throughput == [] or latency is None or resources is None:  # some parts only
        log(f"load average at start -> end: {loads[0]} -> {loads[1]}")
        if throughput:
            print("\n".join(throughput_table(throughput)))
            print(floor_summary(throughput))
        if latency is not None:
            period_ms = PRESETS[LATENCY_FRAMING].source_period_s(RESOURCE_CHUNK_MS / 1000) * 1000
            print("\n".join(latency_table(latency, period_ms)))
        if resources is not None:
            print("\n".join(resource_table(resources, args.resource_seconds)))
            print(_cpu_aim(resources))
        return 0
    generated = render_section(
        throughput, latency, resources, args, argv, loads, code, peak, max_frame_bytes
    )
    print(f"{SECTION}\n\n{generated}")
    if args.write_doc:
        write_doc(args.doc, generated, __file__, SECTION)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
