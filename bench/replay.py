"""Replay benchmark: throughput at speed 0 and pacing error at speed 1.0.

Everything is local: recordings are written as a DFDS collection in a temporary folder
and replayed through ``dm.API`` (no broker, no network). Each figure comes with a
baseline measured in the same run, on the same machine:

* throughput: ``np.loadtxt`` of the same file (a plain numpy parse) against
  ``replay_collection_stream(speed=0, framing="throughput")`` drained to END_OF_STREAM;
  baseline and replay alternate, K runs, medians reported.
* pacing: at speed 1.0 with the default framing, the consumer stamps ``loop.time()``
  as each frame leaves the sink; the error is that time minus the frame's scheduled
  time. The baseline is a bare ``asyncio.sleep``-to-absolute-deadline loop on the same
  schedule: what the event loop itself achieves.

Usage::

    python bench/replay.py                 # default run (a few minutes on 2 cores)
    python bench/replay.py --quick         # CI smoke run (< 30 s)
    python bench/replay.py --write-doc     # also update "## Replay" in docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from common import code_version, log, n_runs, verdict, write_doc  # bench/common.py

import streaminghub_datamux as dm
from streaminghub_datamux import preciseloop
from streaminghub_datamux.config import load_config
from streaminghub_datamux.drivers.replay import BLOCK_BYTES as REPLAY_BLOCK_BYTES
from streaminghub_datamux.drivers.replay import ReplaySource

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "docs" / "performance.md"
SECTION = "## Replay"
CODE_DIRS = ("streaminghub_datamux", "drivers")  # the code a replay runs through

# The aims stated in the issues (#12: replay at disk speed, >= 5 x np.loadtxt, and
# pacing p99 <= 2 ms even with a speed-0 replay in the same loop).
AIM_THROUGHPUT_RATIO = 5.0
AIM_PACING_P99_MS = 2.0

THROUGHPUT_RATE_HZ = 1000.0
WIDE_CHANNELS = 64
WIDE_ROWS_DIVISOR = 4  # 64 channels: a quarter of the rows, so the file stays ~200 MB
PACING_CHANNELS = 8
PACING_RATES_HZ = (100.0, 1000.0)
WRITE_CHUNK_ROWS = 50_000


# -- recordings ----------------------------------------------------------------------


@dataclass
class Recording:
    """One recording written as a one-stream DFDS collection."""

    collection_id: str
    path: Path
    rows: int
    channels: int
    frequency: float


def _collection_metadata(channels: int, frequency: float) -> dict[str, Any]:
    return {
        "name": f"bench {channels} ch at {frequency:g} Hz",
        "description": "synthetic recording for bench/replay.py",
        "streams": {
            "sig": {
                "name": "signal",
                "frequency": frequency,
                "fields": {f"c{i}": {"dtype": "f32"} for i in range(channels)},
                "index": {"t": {"dtype": "f64", "unit": "s"}},
            }
        },
        "groups": {"subject": {"values": ["A"]}},
        "pattern": "csv://{subject}",
    }


def write_recording(
    root: Path, collection_id: str, rows: int, channels: int, frequency: float
) -> Recording:
    """Write ``meta/<id>.collection.json`` and ``data/<id>/A.csv``.

    Timestamps are ``i / frequency`` written with enough decimals to be exact; values
    are float32 written with 9 significant digits, which round-trips float32.
    """
    meta = root / "meta" / f"{collection_id}.collection.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(_collection_metadata(channels, frequency), indent=2))
    path = root / "data" / collection_id / "A.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    decimals = max(0, int(np.ceil(np.log10(frequency))))
    line = ",".join([f"%.{decimals}f"] + ["%.9g"] * channels) + "\n"
    rng = np.random.default_rng(channels)
    with path.open("w") as handle:
        handle.write(",".join(["t"] + [f"c{i}" for i in range(channels)]) + "\n")
        for start in range(0, rows, WRITE_CHUNK_ROWS):
            n = min(WRITE_CHUNK_ROWS, rows - start)
            timestamps = np.arange(start, start + n) / frequency
            values = rng.standard_normal((n, channels)).astype(np.float32)
            table = np.column_stack([timestamps, values.astype(np.float64)])
            handle.write("".join(line % tuple(row) for row in table.tolist()))
    return Recording(collection_id, path, rows, channels, frequency)


def make_api(root: Path) -> dm.API:
    """An API over ``root/meta`` and ``root/data`` that never reads the user's files."""
    flags = {"data_dir": str(root / "data"), "meta_dir": str(root / "meta")}
    config = load_config(flags=flags, env={}, cwd=root, home=root, system_rc=root / "none")
    return dm.API(config)


# -- throughput ----------------------------------------------------------------------


@dataclass
class ThroughputResult:
    """Samples per second of the baseline parse and the replay, one entry per run."""

    recording: Recording
    baseline: list[float] = field(default_factory=list)
    replay: list[float] = field(default_factory=list)
    reader: list[float] = field(default_factory=list)  # the CSV reader alone, no replay
    parser: list[float] = field(default_factory=list)  # pandas' parse alone (none: numpy)

    @property
    def ratios(self) -> list[float]:
        return [r / b for r, b in zip(self.replay, self.baseline, strict=True)]

    @property
    def reader_ratios(self) -> list[float]:
        return [r / b for r, b in zip(self.reader, self.baseline, strict=True)]

    @property
    def parser_ratios(self) -> list[float]:
        return [p / b for p, b in zip(self.parser, self.baseline, strict=True)]


def time_baseline(path: Path) -> tuple[float, np.ndarray]:
    """Seconds for a plain ``np.loadtxt`` of the file, and the parsed table."""
    start = time.perf_counter()
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    return time.perf_counter() - start, table


async def _replay_all(api: dm.API, recording: Recording) -> tuple[float, list[dm.Frame]]:
    """Seconds from the request to END_OF_STREAM at speed 0, and the frames."""
    sink: asyncio.Queue[Any] = asyncio.Queue()
    frames: list[dm.Frame] = []
    start = time.perf_counter()
    await api.replay_collection_stream(
        recording.collection_id, "sig", {"subject": "A"}, sink, speed=0, framing="throughput"
    )
    while True:
        item = await sink.get()
        if item is dm.END_OF_STREAM:
            break
        if not isinstance(item, dm.Frame):
            raise RuntimeError(f"replay sent {item!r}")
        frames.append(item)
    return time.perf_counter() - start, frames


def verify_replay(frames: Sequence[dm.Frame], table: np.ndarray) -> None:
    """Every row arrived once, in order, with the values numpy parsed."""
    samples = sum(len(f) for f in frames)
    assert samples == len(table), f"replay delivered {samples} of {len(table)} rows"
    assert [f.seq for f in frames] == list(range(len(frames))), "frame seq has gaps"
    timestamps = np.concatenate([f.timestamps for f in frames])
    values = np.concatenate([f.values for f in frames])
    np.testing.assert_array_equal(timestamps, table[:, 0])
    np.testing.assert_array_equal(values, table[:, 1:].astype(np.float32))


def time_reader(api: dm.API, recording: Recording) -> float:
    """Seconds for the replay's own CSV reader to read every block of the file.

    The same reader, block size and parser (pandas' when installed) as replay, iterated
    in this thread with nothing else: the ceiling of replay's throughput (the floor of
    its time), so replay / baseline can be read against reader / baseline.
    """
    # Imported here: it loads pandas, which bench/xdf_memory.py's idle floor (it imports
    # this module) must not include.
    from streaminghub_datamux.drivers.csvfile import CsvStreamReader

    stream = api.get_collection_stream(recording.collection_id, "sig")
    reader = CsvStreamReader(recording.path, stream, block_bytes=REPLAY_BLOCK_BYTES)
    start = time.perf_counter()
    rows = sum(len(timestamps) for timestamps, _ in reader.blocks())
    seconds = time.perf_counter() - start
    assert rows == recording.rows, f"the reader read {rows} of {recording.rows} rows"
    return seconds


def time_parser(api: dm.API, recording: Recording) -> float | None:
    """Seconds for pandas' parse alone of the reader's blocks, in the reader's threads.

    The file is cut into the reader's blocks in memory first (not timed), then each block
    goes through ``csvfast.parse_floats`` in ``PARSE_THREADS`` threads: no file reads, no
    line counting, no cast to float32, no replay. The floor of the reader's time on this
    machine at this load. ``None`` without pandas (numpy's parse is the baseline itself).
    """
    from concurrent.futures import ThreadPoolExecutor

    from streaminghub_datamux.drivers import csvfast
    from streaminghub_datamux.drivers.csvfile import PARSE_THREADS, CsvStreamReader

    if not csvfast.available():
        return None
    stream = api.get_collection_stream(recording.collection_id, "sig")
    block = CsvStreamReader(recording.path, stream, block_bytes=REPLAY_BLOCK_BYTES).block_bytes
    data = recording.path.read_bytes()
    blocks, start = [], data.index(b"\n") + 1  # after the header
    while start < len(data):
        end = data.rfind(b"\n", start, start + block) + 1 or len(data)
        blocks.append((data[start:end], data.count(b"\n", start, end)))
        start = end
    del data
    width = recording.channels + 1
    columns = list(range(width))

    def parse(item: tuple[bytes, int]) -> int:
        parsed = csvfast.parse_floats(item[0], columns, item[1], width)
        assert parsed is not None, "pandas refused a block of the bench file"
        return len(parsed[0])

    started = time.perf_counter()
    with ThreadPoolExecutor(PARSE_THREADS) as pool:
        rows = sum(pool.map(parse, blocks))
    seconds = time.perf_counter() - started
    assert rows == recording.rows, f"the parser read {rows} of {recording.rows} rows"
    return seconds


def bench_throughput(api: dm.API, recording: Recording, runs: int) -> ThroughputResult:
    """Alternate baseline parse and replay ``runs`` times; verify the first replay."""
    result = ThroughputResult(recording)
    for run in range(runs):
        seconds, table = time_baseline(recording.path)
        result.baseline.append(recording.rows / seconds)
        seconds, frames = asyncio.run(_replay_all(api, recording))
        result.replay.append(sum(len(f) for f in frames) / seconds)
        result.reader.append(recording.rows / time_reader(api, recording))
        parse_seconds = time_parser(api, recording)
        if parse_seconds is not None:
            result.parser.append(recording.rows / parse_seconds)
        if run == 0:
            verify_replay(frames, table)
        del table, frames
    return result


# -- pacing --------------------------------------------------------------------------


@dataclass
class PacingResult:
    """Lateness (ms) of every frame, pooled over runs, for replay and the bare loop.

    ``load`` names a recording replayed at speed 0 in the same event loop during the
    paced replay (the interference case); its bare loop shares its loop with the same
    speed-0 replay.
    """

    recording: Recording
    load: Recording | None = None
    frames_per_run: list[int] = field(default_factory=list)
    replay_ms: list[float] = field(default_factory=list)
    anchored_ms: list[float] = field(default_factory=list)
    baseline_ms: list[float] = field(default_factory=list)
    replay_p99_per_run: list[float] = field(default_factory=list)


def _capture_sources(api: dm.API) -> list[ReplaySource]:
    """Wrap ``api.recordings.open_replay`` to keep each source, to read its ``started_at``."""
    sources: list[ReplaySource] = []
    original: Callable[..., ReplaySource] = api.recordings.open_replay

    def open_replay(*args: Any, **kwargs: Any) -> ReplaySource:
        source = original(*args, **kwargs)
        sources.append(source)
        return source

    api.recordings.open_replay = open_replay  # type: ignore[method-assign]
    return sources


async def _replay_paced(
    api: dm.API, sources: list[ReplaySource], recording: Recording
) -> tuple[list[float], list[float], float]:
    """Replay at speed 1.0 with the default framing.

    ``sources`` is the list :func:`_capture_sources` fills for ``api``. Returns each
    frame's arrival time (loop clock), each frame's last timestamp, and the source's
    ``started_at`` (the loop time at which the first sample was due).
    """
    loop = asyncio.get_running_loop()
    sink: asyncio.Queue[Any] = asyncio.Queue()
    await api.replay_collection_stream(recording.collection_id, "sig", {"subject": "A"}, sink)
    arrivals: list[float] = []
    last_ts: list[float] = []
    while True:
        item = await sink.get()
        now = loop.time()
        if item is dm.END_OF_STREAM:
            break
        if not isinstance(item, dm.Frame):
            raise RuntimeError(f"replay sent {item!r}")
        arrivals.append(now)
        last_ts.append(float(item.timestamps[-1]))
    started_at = sources[-1].started_at
    assert started_at is not None, "the replay source never started"
    return arrivals, last_ts, started_at


async def _replay_paced_under_load(
    api: dm.API, sources: list[ReplaySource], recording: Recording, load_api: dm.API,
    load: Recording,
) -> tuple[list[float], list[float], float]:  # fmt: skip
    """:func:`_replay_paced` while ``load`` is replayed at speed 0, over and over."""
    return await _while_replaying(_replay_paced(api, sources, recording), load_api, load)


async def _while_replaying(body: Awaitable[T], load_api: dm.API, load: Recording) -> T:
    """Await ``body`` while ``load`` is replayed at speed 0 in the same loop, over and over."""
    done = asyncio.Event()

    async def background() -> None:
        while not done.is_set():
            await _replay_all(load_api, load)

    loader = asyncio.create_task(background())
    try:
        return await body
    finally:
        done.set()
        await loader


async def _sleep_loop(offsets: Sequence[float]) -> list[float]:
    """Bare event loop: sleep to ``start + offset`` for each offset; lateness in s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    errors = []
    for offset in offsets:
        due = start + offset
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        errors.append(loop.time() - due)
    return errors


async def _sleep_loop_under_load(
    offsets: Sequence[float], load_api: dm.API, load: Recording
) -> list[float]:
    """:func:`_sleep_loop` while ``load`` is replayed at speed 0 in the same loop.

    The floor of the stress case: no paced replay can wake sooner than a bare sleep
    sharing its loop with the same speed-0 replay.
    """
    return await _while_replaying(_sleep_loop(offsets), load_api, load)


def stress_runs(runs: int) -> int:
    """The stress case (paced replay sharing its loop) runs half as often: it is slow."""
    return max(1, runs // 2)


def bench_pacing(
    root: Path, recording: Recording, runs: int, load: Recording | None = None
) -> PacingResult:
    """Alternate paced replay and the bare sleep loop on the replay's own schedule.

    With ``load``, the paced replay shares its event loop with a speed-0 replay of
    ``load`` (through a second API), and so does the bare loop.
    """
    result = PacingResult(recording, load)
    api = make_api(root)
    sources = _capture_sources(api)
    first_ts = 0.0  # the recordings start at t = 0
    for _ in range(runs):
        if load is None:
            replay = _replay_paced(api, sources, recording)
        else:
            replay = _replay_paced_under_load(api, sources, recording, make_api(root), load)
        # On the agent's event loop (timers on time), as the agent paces replays.
        arrivals, last_ts, started_at = preciseloop.run(replay)
        offsets = [ts - first_ts for ts in last_ts]
        late = [(a - (started_at + o)) * 1e3 for a, o in zip(arrivals, offsets, strict=True)]
        anchor = arrivals[0] - offsets[0]
        anchored = [(a - (anchor + o)) * 1e3 for a, o in zip(arrivals, offsets, strict=True)]
        result.frames_per_run.append(len(arrivals))
        result.replay_ms.extend(late)
        result.anchored_ms.extend(anchored)
        result.replay_p99_per_run.append(float(np.percentile(late, 99)))
        if load is None:
            baseline = preciseloop.run(_sleep_loop(offsets))
        else:
            baseline = preciseloop.run(_sleep_loop_under_load(offsets, make_api(root), load))
        result.baseline_ms.extend(e * 1e3 for e in baseline)
    return result


# -- report --------------------------------------------------------------------------


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine shows here)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_facts() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match[1].strip() if match else cpu
    except OSError:
        pass
    try:
        cores = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        cores = str(os.cpu_count())
    return {
        "cores (nproc)": cores,
        "CPU": cpu,
        "python -VV": sys.version.replace("\n", " "),
        "numpy": np.__version__,
        "OS": platform.platform(),
    }


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    array = np.asarray(values)
    return float(np.percentile(array, 50)), float(np.percentile(array, 99)), float(array.max())


def _fmt_stats(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in _stats(values)) if values else "-"


def _label(recording: Recording) -> str:
    seconds = recording.rows / recording.frequency
    return f"{recording.channels} ch, {recording.frequency:g} Hz, {seconds:g} s"


def throughput_table(results: Sequence[ThroughputResult]) -> list[str]:
    lines = [
        "| recording | rows | baseline `np.loadtxt` (samples/s) "
        f"| replay speed 0 (samples/s) | replay / baseline (range over runs) "
        "| ceiling: the CSV reader alone / baseline (range) "
        "| ceiling: pandas' parse alone, file in memory / baseline (range) "
        f"| aim >= {AIM_THROUGHPUT_RATIO:g} |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rec = r.recording
        ratio = statistics.median(r.ratios)
        lines.append(
            f"| {rec.channels} ch f32, {rec.frequency:g} Hz | {rec.rows:,} "
            f"| {statistics.median(r.baseline):,.0f} | {statistics.median(r.replay):,.0f} "
            f"| {ratio:.2f} ({min(r.ratios):.2f}-{max(r.ratios):.2f}) "
            f"| {statistics.median(r.reader_ratios):.2f} "
            f"({min(r.reader_ratios):.2f}-{max(r.reader_ratios):.2f}) "
            f"| {_median_range(r.parser_ratios)} "
            f"| {verdict(ratio >= AIM_THROUGHPUT_RATIO)} |"
        )
    return lines


def _median_range(ratios: Sequence[float]) -> str:
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def pacing_table(results: Sequence[PacingResult]) -> list[str]:
    lines = [
        "| recording | frames | replay p50 / p99 / max (ms) | replay p99 per run (ms) "
        "| bare sleep loop p50 / p99 / max (ms) | aim p99 <= 2 ms |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        label = _label(r.recording)
        if r.load is not None:
            label += (
                f", **with** a speed-0 replay of the {r.load.channels} ch file in the same loop"
            )
        p99 = _stats(r.replay_ms)[1]
        judged = verdict(p99 <= AIM_PACING_P99_MS)
        per_run = ", ".join(f"{v:.2f}" for v in r.replay_p99_per_run)
        lines.append(
            f"| {label} | {sum(r.frames_per_run)} ({n_runs(len(r.frames_per_run))}) "
            f"| {_fmt_stats(r.replay_ms)} | {per_run} | {_fmt_stats(r.baseline_ms)} | {judged} |"
        )
    return lines


def aims_summary(throughput: Sequence[ThroughputResult], pacing: Sequence[PacingResult]) -> str:
    """One paragraph: is each aim of the issue met, with the figures that decide it."""
    ratios = [statistics.median(r.ratios) for r in throughput]
    readers = [statistics.median(r.reader_ratios) for r in throughput]
    parsers = [statistics.median(r.parser_ratios) for r in throughput if r.parser]
    parse_floor = (
        f"; pandas' parse alone, the file in memory, {csvfile_threads()} threads: "
        f"{', '.join(f'{x:.2f}' for x in parsers)}"
        if parsers
        else ""
    )
    plain = [r for r in pacing if r.load is None]
    p99s = [_stats(r.replay_ms)[1] for r in plain]
    bare = [_stats(r.baseline_ms)[1] for r in plain]
    stressed = [_stats(r.replay_ms)[1] for r in pacing if r.load is not None]
    stressed_bare = [_stats(r.baseline_ms)[1] for r in pacing if r.load is not None]
    rates = ", ".join(f"{r.recording.frequency:g} Hz" for r in plain)
    return (
        f"**Aims.** Throughput >= {AIM_THROUGHPUT_RATIO:g} x the plain parse: "
        f"{verdict(min(ratios) >= AIM_THROUGHPUT_RATIO)} "
        f"(replay / baseline {', '.join(f'{x:.2f}' for x in ratios)}; the CSV reader "
        f"alone, replay's ceiling: {', '.join(f'{x:.2f}' for x in readers)}{parse_floor}; "
        "CSV parser: "
        f"{csv_parser()}). "
        f"Pacing p99 <= {AIM_PACING_P99_MS:g} ms: "
        f"{verdict(max(p99s + stressed) <= AIM_PACING_P99_MS)} "
        f"(p99 at {rates}: {', '.join(f'{x:.2f}' for x in p99s)} ms; with a speed-0 replay "
        f"in the same loop: {', '.join(f'{x:.2f}' for x in stressed)} ms; "
        f"the bare event loop on the same schedules: {', '.join(f'{x:.2f}' for x in bare)} ms, "
        f"and sharing its loop with the same speed-0 replay (the floor of that case): "
        f"{', '.join(f'{x:.2f}' for x in stressed_bare)} ms)."
    )


def csvfile_threads() -> int:
    """Threads the CSV reader parses in (drivers/csvfile.py)."""
    from streaminghub_datamux.drivers.csvfile import PARSE_THREADS

    return PARSE_THREADS


def csv_parser() -> str:
    """Which parser CSV replay uses here (drivers/csvfast.py)."""
    from streaminghub_datamux.drivers import csvfast

    if csvfast.available():
        return f"pandas {csvfast.pd.__version__} C engine, {csvfile_threads()} threads"
    return "numpy loadtxt (pandas >= 3 not installed)"


def render_section(
    throughput: Sequence[ThroughputResult],
    pacing: Sequence[PacingResult],
    argv: Sequence[str],
    runs: int,
    loads: tuple[str, str],
    code: str,
) -> str:
    """The generated part of "## Replay": tables, verdicts, date, command, machine."""
    facts = machine_facts()
    facts["load average (1/5/15 min) at start -> end"] = f"{loads[0]} -> {loads[1]}"
    facts["code"] = code
    plain = [r for r in pacing if r.load is None]
    anchored = "; ".join(
        f"{r.recording.frequency:g} Hz: {_fmt_stats(r.anchored_ms)} ms" for r in plain
    )
    command = shlex.join(["python", "bench/replay.py", *argv])
    lines = [
        f"Measured {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} with `{command}` "
        f"({n_runs(runs)}; the stress case {n_runs(stress_runs(runs))}).",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in facts.items()) + ".",
        "",
        aims_summary(throughput, pacing),
        "",
        "### Throughput at speed 0",
        "",
        'Baseline: `np.loadtxt(path, delimiter=",", skiprows=1)` of the same file. Replay: '
        '`replay_collection_stream(..., speed=0, framing="throughput")`, timed from the '
        "request to END_OF_STREAM with the consumer draining the sink; the first replay of "
        "each recording is checked row by row against the baseline parse. Timestamps at "
        "1 kHz, values float32 written with 9 significant digits. The 64-channel recording "
        f"has 1/{WIDE_ROWS_DIVISOR} of the rows so the file stays around 200 MB. Medians "
        "over the runs; baseline and replay alternate within each run. Ceilings, each "
        "measured in every run beside its baseline: replay's CSV reader alone (its blocks "
        "iterated in one thread, no replay), and pandas' parse alone (the reader's blocks "
        "cut from the file in memory beforehand, then parsed by `csvfast.parse_floats` in "
        "the reader's threads: no reading, line counting or cast). The CPU time other "
        "processes take from the 2 cores lowers these two, with their parallel threads, more "
        "than the one-thread baseline: read every ratio with the load average.",
        "",
        *throughput_table(throughput),
        "",
        "### Pacing error at speed 1.0 (default framing)",
        "",
        "Error = `loop.time()` when the consumer takes a frame from the sink minus the "
        "frame's scheduled time `started_at + (t_last - t_first)`, with `started_at` read "
        "from the replay source itself (the bench wraps `API.recordings.open_replay` to keep the "
        "source), so the first frame is measured too. Percentiles over the frames of all "
        "runs pooled. Replay and baseline run on the agent's event loop "
        "(`preciseloop`: timers on time, not up to 1 ms late). "
        "Baseline: a bare `asyncio.sleep`-to-absolute-deadline loop on the "
        "same schedule (no file, no thread, no queue), run right after each replay; in the "
        "stress case the bare loop shares its event loop with the same speed-0 replay, so "
        "its row is the floor of that case (what any task in that loop can do).",
        "",
        *pacing_table(pacing),
        "",
        "Anchoring the schedule on the first frame instead (the first frame's error is then "
        f"0 by construction), p50 / p99 / max: {anchored}.",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows of the 8-channel throughput recording (default 1,000,000; "
        "the 64-channel one gets a quarter)",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (default 5)")
    parser.add_argument(
        "--pacing-seconds",
        type=float,
        default=None,
        help="length of each pacing recording (default 10)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run for CI: 100k rows, 2 runs, 2 s pacing"
    )
    parser.add_argument(
        "--write-doc",
        action="store_true",
        help=f"replace the '{SECTION}' section of --doc with the results",
    )
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the document to update")
    args = parser.parse_args(argv)
    quick_rows, quick_runs, quick_seconds = 100_000, 2, 2.0
    args.rows = args.rows or (quick_rows if args.quick else 1_000_000)
    args.runs = args.runs or (quick_runs if args.quick else 5)
    args.pacing_seconds = args.pacing_seconds or (quick_seconds if args.quick else 10.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        root = Path(tmp)
        log("writing recordings")
        narrow = write_recording(root, "narrow", args.rows, 8, THROUGHPUT_RATE_HZ)
        wide = write_recording(
            root, "wide", args.rows // WIDE_ROWS_DIVISOR, WIDE_CHANNELS, THROUGHPUT_RATE_HZ
        )
        paced = [
            write_recording(
                root, f"paced{int(hz)}", int(args.pacing_seconds * hz), PACING_CHANNELS, hz
            )
            for hz in PACING_RATES_HZ
        ]
        loads_at_start, code = load_average(), code_version(CODE_DIRS)
        api = make_api(root)
        throughput = []
        for recording in (narrow, wide):
            log(f"throughput: {recording.channels} ch, {recording.rows:,} rows")
            throughput.append(bench_throughput(api, recording, args.runs))
        pacing = []
        for recording in paced:
            log(f"pacing: {recording.frequency:g} Hz, {args.pacing_seconds:g} s")
            pacing.append(bench_pacing(root, recording, args.runs))
        stressed = paced[-1]
        log(f"pacing: {stressed.frequency:g} Hz with a speed-0 replay in the same loop")
        pacing.append(bench_pacing(root, stressed, stress_runs(args.runs), load=narrow))
        loads = (loads_at_start, load_average())
    generated = render_section(throughput, pacing, argv, args.runs, loads, code)
    print(f"{SECTION}\n\n{generated}")
    if args.write_doc:
        write_doc(args.doc, generated, __file__, SECTION, replace_unmarked=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
