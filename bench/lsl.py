"""LSL proxy benchmark: samples/s through ``proxy_live_stream`` against a direct inlet.

A 64-channel float32 outlet runs in a separate process (this script with ``--produce``)
and pushes large numpy chunks as fast as it can, with a sample counter in its first two
channels. Each run starts a fresh producer (its own outlet name and source_id), reads it
for a fixed window, then stops the producer by its pid. Two readers alternate:

* direct: a ``pylsl.StreamInlet`` with the driver's settings (same buffer, clocksync and
  monotonize) pulling chunks into a preallocated numpy buffer (``dest_obj``), keeping
  only the two counter columns of each chunk;
* datamux: ``dm.API().proxy_live_stream(..., framing="throughput")`` drained from the
  sink, keeping the same two columns of each frame.

Both count the samples received in a window that starts at the first sample. The
producer outruns either reader, so LSL drops the oldest samples at the outlet; the
counters show how many and that what arrived is in order. Everything is loopback.

Usage::

    python bench/lsl.py                 # default run (about 2 minutes)
    python bench/lsl.py --quick         # smoke run (< 30 s)
    python bench/lsl.py --write-doc     # also update "## LSL proxy" in docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pylsl
from common import code_version, log, median_range, write_doc  # bench/common.py
from replay import load_average, machine_facts

import streaminghub_datamux as dm
from streaminghub_datamux.config import load_config
from streaminghub_datamux.drivers.lsl import PROCESSING_FLAGS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "docs" / "performance.md"
SECTION = "## LSL proxy"

AIM_RATIO = 0.5  # the aim: datamux >= 50% of a direct inlet

CHANNELS = 64
# Declared rate. It only scales liblsl's buffers (seconds x rate samples) and the
# timestamps derived for a chunk; the producer pushes as fast as it can regardless.
NOMINAL_RATE_HZ = 100_000.0
PUSH_ROWS = 4096  # samples per push_chunk: 1 MiB of float32
BUFFER_S = 10  # outlet and inlet buffers, in seconds at the nominal rate
PULL_ROWS = 16384  # the direct reader's buffer: the driver pulls as much with "throughput"
COUNTER_BASE = 1 << 20  # counter = c0 + c1 * 2**20, both exact in float32
PRODUCER_LIMIT_S = 300.0  # a producer that is never stopped exits by itself
STARTUP_TIMEOUT_S = 20.0


# -- the producer process -------------------------------------------------------------


def produce(name: str) -> int:
    """Push counter chunks as fast as possible until SIGTERM; print what was pushed."""
    info = pylsl.StreamInfo(name, "Bench", CHANNELS, NOMINAL_RATE_HZ, "float32", name)
    outlet = pylsl.StreamOutlet(info, max_buffered=BUFFER_S)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    chunk = np.zeros((PUSH_ROWS, CHANNELS), np.float32)
    offsets = np.arange(PUSH_ROWS)
    print("ready", flush=True)
    began = time.monotonic()
    while not stopping and not outlet.wait_for_consumers(0.2):  # no CPU burnt before
        if time.monotonic() - began > PRODUCER_LIMIT_S:
            return 1
    pushed, started = 0, time.perf_counter()
    while not stopping and time.perf_counter() - started < PRODUCER_LIMIT_S:
        counter = pushed + offsets
        chunk[:, 0] = counter % COUNTER_BASE
        chunk[:, 1] = counter // COUNTER_BASE
        outlet.push_chunk(chunk)
        pushed += PUSH_ROWS
    print(f"pushed {pushed} {time.perf_counter() - started:.6f}", flush=True)
    return 0


@dataclass
class Producer:
    """A producer process and its outlet's name (also its source_id)."""

    name: str
    process: subprocess.Popen[str]

    @classmethod
    def start(cls) -> Producer:
        name = f"bench-lsl-{uuid.uuid4().hex[:10]}"
        process = subprocess.Popen(
            [sys.executable, __file__, "--produce", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # liblsl's log lines
            text=True,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.kill()
            process.communicate()
            raise RuntimeError("the producer did not start")
        return cls(name, process)

    def stop(self) -> float:
        """Stop it (SIGTERM to its pid, then kill); its push rate in samples/s."""
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        match = re.search(r"pushed (\d+) ([\d.]+)", out or "")
        return int(match[1]) / float(match[2]) if match and float(match[2]) > 0 else 0.0


# -- readers --------------------------------------------------------------------------


@dataclass
class Reading:
    """What one reader got in its window."""

    samples: int
    seconds: float
    counters: np.ndarray  # (n,) int64: the sample counter of every sample received
    pushed_per_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    @property
    def lost(self) -> float:
        """Share of the samples pushed during the window that never arrived (LSL dropped)."""
        if len(self.counters) < 2:
            return 0.0
        span = int(self.counters[-1] - self.counters[0]) + 1
        return 1.0 - len(self.counters) / span


def _counters(columns: Sequence[np.ndarray]) -> np.ndarray:
    table = np.concatenate(columns).astype(np.int64)
    return table[:, 0] + table[:, 1] * COUNTER_BASE


def read_direct(name: str, window: float) -> Reading:
    """A plain pylsl inlet pulling into one reused numpy buffer, for ``window`` s."""
    (info,) = pylsl.resolve_byprop("name", name, 1, STARTUP_TIMEOUT_S)
    inlet = pylsl.StreamInlet(
        info, max_buflen=BUFFER_S, recover=False, processing_flags=PROCESSING_FLAGS
    )
    inlet.open_stream(STARTUP_TIMEOUT_S)
    inlet.time_correction(STARTUP_TIMEOUT_S)  # as the driver does before its first pull
    buffer = np.empty((PULL_ROWS, CHANNELS), np.float32)
    columns, samples, first = [], 0, None
    while first is None or time.perf_counter() - first < window:
        _, timestamps = inlet.pull_chunk(
            timeout=0.1, max_samples=PULL_ROWS, dest_obj=buffer, min_samples=1, as_numpy=True
        )
        n = len(timestamps)
        if n:
            first = first or time.perf_counter()
            samples += n
            columns.append(buffer[:n, :2].copy())
    seconds = time.perf_counter() - first
    del inlet
    return Reading(samples, seconds, _counters(columns))


def make_api(root: Path) -> dm.API:
    """An API with only the LSL driver, configured like the direct inlet."""
    flags = {
        "data_dir": str(root / "data"),
        "meta_dir": str(root / "meta"),
        "drivers.enabled": "lsl",
        "drivers.lsl": {"wait_s": 0.2, "max_buffered_s": BUFFER_S},
    }
    config = load_config(flags=flags, env={}, cwd=root, home=root, system_rc=root / "none")
    return dm.API(config)


async def _find(api: dm.API, name: str) -> dm.Stream:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for node in await api.list_live_nodes():
            for stream in await api.list_live_streams(node.id):
                if stream.name == name:
                    return stream
        await asyncio.sleep(0.1)
    raise RuntimeError(f"outlet {name} not found")


async def _read_datamux(root: Path, name: str, window: float) -> tuple[Reading, np.ndarray]:
    api = make_api(root)
    try:
        stream = await _find(api, name)
        sink: asyncio.Queue[Any] = asyncio.Queue()
        await api.proxy_live_stream(stream.node_id, stream.id, {}, sink, framing="throughput")
        columns, samples, first, seqs = [], 0, None, []
        last_ts: list[np.ndarray] = []
        while first is None or time.perf_counter() - first < window:
            item = await sink.get()
            if not isinstance(item, dm.Frame):
                raise RuntimeError(f"the proxy sent {item!r}")
            first = first or time.perf_counter()
            samples += len(item)
            seqs.append(item.seq)
            columns.append(item.values[:, :2].copy())
            last_ts.append(item.timestamps[[0, -1]])
        seconds = time.perf_counter() - first
        if seqs != list(range(len(seqs))):
            raise RuntimeError("frame seq has gaps")
        return Reading(samples, seconds, _counters(columns)), np.concatenate(last_ts)
    finally:
        await api.aclose()


def read_datamux(root: Path, name: str, window: float) -> Reading:
    """``proxy_live_stream`` with throughput framing, drained for ``window`` s."""
    reading, timestamps = asyncio.run(_read_datamux(root, name, window))
    if np.any(np.diff(timestamps) < 0):
        raise RuntimeError("timestamps went backwards")
    return reading


# -- runs -----------------------------------------------------------------------------


@dataclass
class Result:
    """Readings per reader, one per run."""

    direct: list[Reading] = field(default_factory=list)
    datamux: list[Reading] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [d.rate / b.rate for d, b in zip(self.datamux, self.direct, strict=True)]


def measure(reader: str, root: Path, window: float) -> Reading:
    """One reading from a fresh producer, which is stopped by its pid afterwards."""
    producer = Producer.start()
    try:
        if reader == "direct":
            reading = read_direct(producer.name, window)
        else:
            reading = read_datamux(root, producer.name, window)
    finally:
        pushed = producer.stop()
    reading.pushed_per_s = pushed
    if np.any(np.diff(reading.counters) <= 0):
        raise RuntimeError(f"{reader}: samples out of order")
    return reading


def bench(root: Path, runs: int, window: float) -> Result:
    """Alternate the two readers ``runs`` times, swapping who goes first each run."""
    result = Result()
    for run in range(runs):
        order = ("direct", "datamux") if run % 2 == 0 else ("datamux", "direct")
        for reader in order:
            reading = measure(reader, root, window)
            getattr(result, reader).append(reading)
            log(
                f"run {run + 1}/{runs} {reader}: {reading.rate:,.0f} samples/s, "
                f"dropped by LSL {reading.lost:.1%}"
            )
    return result


# -- report ---------------------------------------------------------------------------


def results_table(result: Result) -> list[str]:
    bytes_per_sample = CHANNELS * 4
    lines = [
        "| reader | samples/s, median (range) | MB/s | samples dropped in LSL's buffers "
        "| producer pushed samples/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, readings in (
        ("direct `pylsl.StreamInlet.pull_chunk(dest_obj=...)`", result.direct),
        ('datamux `proxy_live_stream(..., framing="throughput")`', result.datamux),
    ):
        rates = [r.rate for r in readings]
        mbps = statistics.median(rates) * bytes_per_sample / 1e6
        lost = median_range([r.lost * 100 for r in readings], ".0f")
        pushed = statistics.median(r.pushed_per_s for r in readings)
        lines.append(
            f"| {label} | {median_range(rates)} | {mbps:,.0f} | {lost} % | {pushed:,.0f} |"
        )
    return lines


def render_section(
    result: Result, argv: Sequence[str], runs: int, window: float, loads: tuple[str, str]
) -> str:
    facts = machine_facts()
    facts["pylsl / liblsl"] = f"{pylsl.__version__} / {pylsl.library_version()}"
    facts["load average (1/5/15 min) at start -> end"] = f"{loads[0]} -> {loads[1]}"
    facts["code"] = code_version()
    ratio = statistics.median(result.ratios)
    ratios = ", ".join(f"{r:.2f}" for r in result.ratios)
    command = shlex.join(["python", "bench/lsl.py", *argv])
    verdict = "met" if ratio >= AIM_RATIO else "**NOT met**"
    return "\n".join(
        [
            f"Measured {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} with `{command}` "
            f"({runs} runs of {window:g} s per reader).",
            "",
            "Machine: " + "; ".join(f"{k}: {v}" for k, v in facts.items()) + ".",
            "",
            f"**Aim.** datamux >= {AIM_RATIO:.0%} of a direct inlet: {verdict} "
            f"(datamux / direct, median {ratio:.2f}; per run {ratios}).",
            "",
            f"Setup: a {CHANNELS}-channel float32 outlet in its own process pushes "
            f"`push_chunk` of {PUSH_ROWS} samples (1 MiB) as fast as it can, declared at "
            f"{NOMINAL_RATE_HZ:,.0f} Hz, buffers {BUFFER_S} s at both ends; a fresh "
            "producer for every reading, stopped by its pid afterwards. Readers alternate "
            "(who goes first swaps each run) and count samples in a window that starts at "
            "the first sample. Direct: `StreamInlet(max_buflen, recover=False, "
            "processing_flags=clocksync|monotonize)`, `pull_chunk(timeout=0.1, "
            f"max_samples={PULL_ROWS}, dest_obj=buffer, min_samples=1)`. datamux: the LSL "
            "driver (reader thread, copies into the event loop, framer) and a consumer "
            "draining the sink. Both keep the two counter columns of what they receive; "
            "every reading is checked to be in order (and datamux frames to have no seq "
            "gaps). Loopback, both processes on the same cores: the producer outruns "
            "either reader, so LSL's outlet and inlet buffers fill and drop their oldest "
            "samples (the 'dropped' column, from gaps in the counter); the readers' rates "
            "are what each can take.",
            "",
            *results_table(result),
        ]
    )


# -- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per reader (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="window per reading (default 5)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 runs of 2 s")
    parser.add_argument(
        "--write-doc", action="store_true", help=f"update the '{SECTION}' section of --doc"
    )
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the document to update")
    parser.add_argument("--produce", metavar="NAME", help=argparse.SUPPRESS)  # producer mode
    args = parser.parse_args(argv)
    args.runs = args.runs or (2 if args.quick else 5)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.produce:
        return produce(args.produce)
    loads_at_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-lsl-") as tmp:
        result = bench(Path(tmp), args.runs, args.seconds)
    generated = render_section(
        result, argv, args.runs, args.seconds, (loads_at_start, load_average())
    )
    print(f"{SECTION}\n\n{generated}")
    if args.write_doc:
        write_doc(args.doc, generated, __file__, SECTION)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
