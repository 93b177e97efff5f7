"""Dataset-format benchmark: replay throughput of XDF, EDF and BDF files at speed 0.

Everything is local: the recordings are written in a temporary folder (one folder
collection per format, see docs/datasets.md) and replayed through ``dm.API`` (no broker,
no network). Each format's figure comes with a baseline measured in the same run: the
format's own reader loading the same file directly.

* XDF: a LabRecorder-like file written here (pyxdf has no writer): a 64-channel float32
  EEG stream at 1 kHz and a string marker stream, with ClockOffset, Boundary and
  StreamFooter chunks. Baseline: ``pyxdf.load_xdf(path, select_streams=[id],
  **LOAD_OPTIONS)``, the options replay uses.
* EDF+ and BDF+: 32 channels at 256 Hz written with pyedflib. Baseline:
  ``pyedflib.EdfReader`` and one whole-signal ``readSignal`` per channel, stacked.

Replay: ``replay_collection_stream(collection, stream, {"file": name}, sink, speed=0,
framing="throughput")`` drained to END_OF_STREAM. Baseline and replay alternate, K runs,
medians reported; the first replay of each file is checked against the baseline's arrays.

Usage::

    python bench/datasets.py                 # default run (~30 s on 2 cores)
    python bench/datasets.py --quick         # CI smoke run (~5 s)
    python bench/datasets.py --write-doc     # also update "## Dataset formats"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shlex
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pyedflib
import pyxdf
from common import code_version, log, n_runs, verdict, write_doc  # bench/common.py

# bench/replay.py sits next to this file (sys.path[0] when run as a script).
from replay import load_average, machine_facts, make_api

import streaminghub_datamux as dm
from streaminghub_datamux.drivers.xdf import LOAD_OPTIONS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "docs" / "performance.md"
SECTION = "## Dataset formats"
# The project-wide replay aim for formats: replay >= 50% of the format's own reader.
# (CSV's own aim is now 5 x np.loadtxt, issue #12; formats keep this one.)
AIM_RATIO = 0.5
AFTER_SECTION = "## Replay"  # a new section goes right after this one

XDF_CHANNELS, XDF_RATE_HZ = 64, 1000.0
EDF_CHANNELS, EDF_RATE_HZ = 32, 256
XDF_SECONDS, EDF_SECONDS = 300, 1800  # 300k rows; 460,800 rows per channel
QUICK_XDF_SECONDS, QUICK_EDF_SECONDS, QUICK_RUNS = 60, 600, 2


# -- XDF writer ----------------------------------------------------------------------
#
# XDF 1.0 (https://github.com/sccn/xdf/wiki/Specifications), all little-endian:
#   file   = b"XDF:" chunk*
#   chunk  = varlen(len(tag + content)) tag:u16 content
#   varlen = one byte saying how many bytes follow (1, 4 or 8), then the unsigned number
# Tags: 1 FileHeader (XML), 2 StreamHeader, 3 Samples, 4 ClockOffset, 5 Boundary,
# 6 StreamFooter; 2, 3, 4 and 6 start their content with the stream id (u32).
# Samples content: varlen(n) then per sample a timestamp flag byte (8: a float64 stamp
# follows; 0: none, the reader deduces last + 1/nominal_srate) and the values, numbers
# packed in the channel format, strings as varlen(byte length) + UTF-8 per channel.
# ClockOffset content: collection time and offset value, two float64.

TAG_FILE_HEADER, TAG_STREAM_HEADER, TAG_SAMPLES = 1, 2, 3
TAG_CLOCK_OFFSET, TAG_BOUNDARY, TAG_STREAM_FOOTER = 4, 5, 6
# The Boundary chunk's fixed UUID (readers scan for it to resync after corruption).
BOUNDARY_UUID = bytes.fromhex("43A546DCCBF5410FB30ED5467383CBE4")


def varlen(n: int) -> bytes:
    """An XDF variable-length unsigned integer, in the fewest bytes allowed."""
    if n < 1 << 8:
        return struct.pack("<BB", 1, n)
    if n < 1 << 32:
        return struct.pack("<BI", 4, n)
    return struct.pack("<BQ", 8, n)


def chunk(tag: int, content: bytes, stream_id: int | None = None) -> bytes:
    """One chunk; ``stream_id`` for the tags whose content starts with it."""
    head = struct.pack("<H", tag)
    if stream_id is not None:
        head += struct.pack("<I", stream_id)
    return varlen(len(head) + len(content)) + head + content


def xml_document(body: str) -> bytes:
    return ('<?xml version="1.0"?>' + body).encode("utf-8")


@dataclass
class XdfStreamSpec:
    """What the writer puts in a stream header (and the verifier expects back)."""

    xdf_id: int
    name: str
    type: str
    channel_count: int
    nominal_srate: float
    channel_format: str
    labels: list[str]
    unit: str = ""

    def header(self, created_at: float) -> bytes:
        channels = "".join(
            f"<channel><label>{escape(label)}</label><unit>{escape(self.unit)}</unit>"
            f"<type>{escape(self.type)}</type></channel>"
            for label in self.labels
        )
        return xml_document(
            f"<info><name>{escape(self.name)}</name><type>{escape(self.type)}</type>"
            f"<channel_count>{self.channel_count}</channel_count>"
            f"<nominal_srate>{self.nominal_srate:g}</nominal_srate>"
            f"<channel_format>{self.channel_format}</channel_format>"
            f"<source_id>bench-{self.xdf_id}</source_id><version>1.1</version>"
            f"<created_at>{created_at!r}</created_at><uid>bench-uid-{self.xdf_id}</uid>"
            "<session_id>default</session_id><hostname>bench</hostname>"
            f"<desc><channels>{channels}</channels></desc></info>"
        )


def footer(first: float, last: float, count: int, offsets: Sequence[tuple[float, float]]) -> bytes:
    entries = "".join(
        f"<offset><time>{t!r}</time><value>{v!r}</value></offset>" for t, v in offsets
    )
    return xml_document(
        f"<info><first_timestamp>{first!r}</first_timestamp>"
        f"<last_timestamp>{last!r}</last_timestamp><sample_count>{count}</sample_count>"
        f"<clock_offsets>{entries}</clock_offsets></info>"
    )


def numeric_samples(
    stream_id: int, timestamps: np.ndarray, values: np.ndarray, stamp_all: bool
) -> bytes:
    """A Samples chunk of float32 rows; with ``stamp_all`` False only the first is stamped.

    An unstamped sample's time is deduced by the reader as the previous one + 1/srate.
    """
    channels = values.shape[1]
    stamped = np.dtype([("flag", "u1"), ("t", "<f8"), ("v", "<f4", (channels,))])
    bare = np.dtype([("flag", "u1"), ("v", "<f4", (channels,))])
    n = len(timestamps)
    first = np.empty(n if stamp_all else 1, dtype=stamped)
    first["flag"], first["t"], first["v"] = 8, timestamps[: len(first)], values[: len(first)]
    parts = [varlen(n), first.tobytes()]
    if not stamp_all and n > 1:
        rest = np.empty(n - 1, dtype=bare)
        rest["flag"], rest["v"] = 0, values[1:]
        parts.append(rest.tobytes())
    return chunk(TAG_SAMPLES, b"".join(parts), stream_id)


def string_samples(stream_id: int, timestamps: Sequence[float], texts: Sequence[str]) -> bytes:
    """A Samples chunk of one-channel string samples, every one stamped."""
    parts = [varlen(len(texts))]
    for t, text in zip(timestamps, texts, strict=True):
        raw = text.encode("utf-8")
        parts.append(struct.pack("<Bd", 8, t) + varlen(len(raw)) + raw)
    return chunk(TAG_SAMPLES, b"".join(parts), stream_id)


def clock_offset(stream_id: int, collected_at: float, value: float) -> bytes:
    return chunk(TAG_CLOCK_OFFSET, struct.pack("<dd", collected_at, value), stream_id)


@dataclass
class XdfContent:
    """What was written: enough to check a raw (unsynchronised) load bit for bit."""

    eeg: XdfStreamSpec
    markers: XdfStreamSpec
    timestamps: np.ndarray  # the EEG stamps as the reader reconstructs them (raw clock)
    values: np.ndarray
    marker_times: list[float]
    marker_texts: list[str]
    offsets: dict[int, list[tuple[float, float]]]


# 10-10 positions plus mastoids and EOG: 64 labels.
_MONTAGE = (
    "Fp1 Fp2 AF7 AF3 AFz AF4 AF8 F7 F5 F3 F1 Fz F2 F4 F6 F8 FT7 FC5 FC3 FC1 FCz FC2 "
    "FC4 FC6 FT8 T7 C5 C3 C1 Cz C2 C4 C6 T8 TP7 CP5 CP3 CP1 CPz CP2 CP4 CP6 TP8 P7 "
    "P5 P3 P1 Pz P2 P4 P6 P8 PO7 PO3 POz PO4 PO8 O1 Oz O2 Iz M1 M2 EOG"
)
EEG_LABELS = _MONTAGE.split()
SAMPLES_PER_CHUNK = 500  # LabRecorder writes what arrived every ~0.5 s
CLOCK_OFFSET_EVERY_S = 5.0  # LabRecorder's clock offset interval
BOUNDARY_EVERY_S = 10.0


def write_xdf(path: Path, seconds: int) -> XdfContent:
    """A LabRecorder-like file: EEG (64 ch float32, 1 kHz) and string markers.

    EEG chunks alternate between every sample stamped (with 0.1 ms of jitter, as LSL
    stamps have) and only the first stamped (the rest deduced by the reader). Both
    streams get a ClockOffset every 5 s (offset about -34 ms, 20 us of noise), then a
    StreamFooter with the counts and offsets; a Boundary chunk every 10 s.
    """
    assert len(EEG_LABELS) == XDF_CHANNELS
    eeg = XdfStreamSpec(
        1, "EEG", "EEG", XDF_CHANNELS, XDF_RATE_HZ, "float32", EEG_LABELS, "microvolts"
    )
    markers = XdfStreamSpec(2, "Markers", "Markers", 1, 0.0, "string", ["marker"])
    rng = np.random.default_rng(20261124)
    n = int(seconds * XDF_RATE_HZ)
    t0 = 4711.25  # LSL's clock: seconds since the sender's boot
    values = (rng.standard_normal((n, XDF_CHANNELS)) * 10.0).astype(np.float32)
    values += (50.0 * np.sin(2 * np.pi * 10.0 * np.arange(n) / XDF_RATE_HZ)).astype(np.float32)[
        :, None
    ]
    nominal = t0 + np.arange(n) / XDF_RATE_HZ
    jittered = nominal + rng.normal(0.0, 1e-4, n)
    timestamps = jittered.copy()  # what a raw load gives back, deduced stamps included
    marker_times = sorted((t0 + rng.uniform(0.0, seconds, max(2, seconds // 2))).tolist())
    marker_texts = [
        f"{'stimulus' if i % 3 else 'response'}/{i} trial={i // 3} Reiz-Beginn ä"
        for i in range(len(marker_times))
    ]
    offsets: dict[int, list[tuple[float, float]]] = {eeg.xdf_id: [], markers.xdf_id: []}
    with path.open("wb") as out:
        out.write(b"XDF:")
        out.write(chunk(TAG_FILE_HEADER, xml_document("<info><version>1.0</version></info>")))
        out.write(chunk(TAG_STREAM_HEADER, eeg.header(t0 - 1.0), eeg.xdf_id))
        out.write(chunk(TAG_STREAM_HEADER, markers.header(t0 - 1.0), markers.xdf_id))
        next_offset, next_boundary, next_marker = t0, t0 + BOUNDARY_EVERY_S, 0
        for number, start in enumerate(range(0, n, SAMPLES_PER_CHUNK)):
            stop = min(n, start + SAMPLES_PER_CHUNK)
            stamp_all = number % 2 == 0
            if not stamp_all:
                # The reader adds 1/srate to the previous stamp, one sample at a time:
                # the same float steps here, so a raw load can be compared bit for bit.
                for k in range(start + 1, stop):
                    timestamps[k] = timestamps[k - 1] + 1.0 / XDF_RATE_HZ
            out.write(
                numeric_samples(eeg.xdf_id, timestamps[start:stop], values[start:stop], stamp_all)
            )
            now = nominal[stop - 1]
            due = []
            while next_marker < len(marker_times) and marker_times[next_marker] <= now:
                due.append(next_marker)
                next_marker += 1
            if due:
                texts = [marker_texts[i] for i in due]
                out.write(string_samples(markers.xdf_id, [marker_times[i] for i in due], texts))
            if now >= next_offset:
                for stream_id in offsets:
                    value = -0.0342 + rng.normal(0.0, 2e-5)
                    offsets[stream_id].append((now, value))
                    out.write(clock_offset(stream_id, now, value))
                next_offset += CLOCK_OFFSET_EVERY_S
            if now >= next_boundary:
                out.write(chunk(TAG_BOUNDARY, BOUNDARY_UUID))
                next_boundary += BOUNDARY_EVERY_S
        if next_marker < len(marker_times):
            rest = range(next_marker, len(marker_times))
            out.write(
                string_samples(
                    markers.xdf_id, [marker_times[i] for i in rest], [marker_texts[i] for i in rest]
                )
            )
        out.write(
            chunk(
                TAG_STREAM_FOOTER,
                footer(timestamps[0], timestamps[-1], n, offsets[eeg.xdf_id]),
                eeg.xdf_id,
            )
        )
        out.write(
            chunk(
                TAG_STREAM_FOOTER,
                footer(
                    marker_times[0], marker_times[-1], len(marker_times), offsets[markers.xdf_id]
                ),
                markers.xdf_id,
            )
        )
    return XdfContent(eeg, markers, timestamps, values, marker_times, marker_texts, offsets)


def verify_xdf(path: Path, content: XdfContent) -> None:
    """pyxdf reads back exactly what was written (raw), and synchronises it sensibly."""
    raw = {"synchronize_clocks": False, "dejitter_timestamps": False}
    streams, header = pyxdf.load_xdf(str(path), **raw)
    assert header["info"]["version"] == ["1.0"], header
    by_id = {int(s["info"]["stream_id"]): s for s in streams}
    assert sorted(by_id) == [1, 2], f"streams {sorted(by_id)}"
    eeg, markers = by_id[content.eeg.xdf_id], by_id[content.markers.xdf_id]
    info = eeg["info"]
    assert info["name"] == ["EEG"] and info["channel_format"] == ["float32"], info
    assert int(info["channel_count"][0]) == XDF_CHANNELS
    labels = [c["label"][0] for c in info["desc"][0]["channels"][0]["channel"]]
    assert labels == EEG_LABELS, labels
    assert eeg["time_series"].dtype == np.float32
    np.testing.assert_array_equal(eeg["time_series"], content.values)
    np.testing.assert_array_equal(eeg["time_stamps"], content.timestamps)
    assert int(eeg["footer"]["info"]["sample_count"][0]) == len(content.values)
    for stream, spec in ((eeg, content.eeg), (markers, content.markers)):
        written = content.offsets[spec.xdf_id]
        np.testing.assert_array_equal(stream["clock_times"], [t for t, _ in written])
        np.testing.assert_array_equal(stream["clock_values"], [v for _, v in written])
    assert [row[0] for row in markers["time_series"]] == content.marker_texts
    np.testing.assert_array_equal(markers["time_stamps"], content.marker_times)
    # With replay's options: clocks mapped (about -34 ms) and the jitter removed.
    synced, _ = pyxdf.load_xdf(str(path), select_streams=[1], **LOAD_OPTIONS)
    stamps = synced[0]["time_stamps"]
    nominal = content.timestamps[0] + np.arange(len(stamps)) / XDF_RATE_HZ
    segments = synced[0]["info"]["segments"]
    assert len(segments) == 1, f"dejittering found breaks: {segments}"
    assert np.max(np.abs(stamps - (nominal - 0.0342))) < 1e-3, "clock sync or dejitter is off"
    assert np.all(np.diff(stamps) > 0)


# -- EDF / BDF -----------------------------------------------------------------------


def write_edf(path: Path, seconds: int, bdf: bool) -> None:
    """EDF+ (16-bit) or BDF+ (24-bit): 32 EEG channels at 256 Hz and a few annotations.

    Digital values are written as they are (a noisy 10 Hz wave using most of the range),
    so the physical values read back are exactly ``digital * step + offset``.
    """
    file_type = pyedflib.FILETYPE_BDFPLUS if bdf else pyedflib.FILETYPE_EDFPLUS
    dmax = 8388607 if bdf else 32767
    pmax = 262143 if bdf else 3276.7  # uV: about 31 nV or 0.1 uV per step
    n = seconds * EDF_RATE_HZ
    rng = np.random.default_rng(256 + bdf)
    wave = 0.4 * dmax * np.sin(2 * np.pi * 10.0 * np.arange(n) / EDF_RATE_HZ)
    writer = pyedflib.EdfWriter(str(path), EDF_CHANNELS, file_type=file_type)
    try:
        writer.setStartdatetime(dt.datetime(2026, 11, 24, 9, 30, 0))
        writer.setSignalHeaders(
            [
                {
                    "label": label,
                    "dimension": "uV",
                    "sample_frequency": EDF_RATE_HZ,
                    "physical_max": pmax,
                    "physical_min": -pmax,
                    "digital_max": dmax,
                    "digital_min": -dmax,
                    "transducer": "AgAgCl electrode",
                    "prefilter": "HP:0.1Hz LP:100Hz",
                }
                for label in EEG_LABELS[:EDF_CHANNELS]
            ]
        )
        signals = []
        for chn in range(EDF_CHANNELS):
            noise = rng.normal(0.0, 0.05 * dmax, n)
            signals.append(np.clip(np.rint(wave * (1 + chn / 64) + noise), -dmax, dmax))
        writer.writeSamples([s.astype(np.int32) for s in signals], digital=True)
        for minute in range(0, seconds // 60, 5):
            writer.writeAnnotation(minute * 60.0, 1.0, f"block {minute // 5} start")
    finally:
        writer.close()


def read_edf(path: Path) -> np.ndarray:
    """Every signal read whole, one ``readSignal`` per channel, stacked to (n, channels)."""
    reader = pyedflib.EdfReader(str(path))
    try:
        return np.stack([reader.readSignal(c) for c in range(reader.signals_in_file)], axis=1)
    finally:
        reader.close()


def edf_timestamps(path: Path, rows: int) -> np.ndarray:
    """Sample times as docs/datasets.md defines them (start as UTC + i / rate)."""
    reader = pyedflib.EdfReader(str(path))
    try:
        start = reader.getStartdatetime().replace(tzinfo=dt.UTC).timestamp()
        rate = float(reader.samplefrequency(0))
    finally:
        reader.close()
    return start + np.arange(rows, dtype=np.float64) / rate


# -- measurement ---------------------------------------------------------------------


@dataclass
class Dataset:
    """One file in its own folder collection, and how to read it directly."""

    format: str
    collection_id: str
    stream_id: str
    path: Path
    rows: int
    channels: int
    frequency: float
    baseline_label: str
    load: Callable[[], tuple[np.ndarray | None, np.ndarray]]  # (timestamps, values)

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class Result:
    dataset: Dataset
    baseline_s: list[float] = field(default_factory=list)
    replay_s: list[float] = field(default_factory=list)

    @property
    def baseline(self) -> list[float]:
        """Rows per second, per run."""
        return [self.dataset.rows / s for s in self.baseline_s]

    @property
    def replay(self) -> list[float]:
        return [self.dataset.rows / s for s in self.replay_s]

    @property
    def ratios(self) -> list[float]:
        return [b / r for r, b in zip(self.replay_s, self.baseline_s, strict=True)]


async def replay_all(api: dm.API, dataset: Dataset) -> tuple[float, list[dm.Frame]]:
    """Seconds from the request to END_OF_STREAM at speed 0, and the frames."""
    sink: asyncio.Queue[Any] = asyncio.Queue()
    frames: list[dm.Frame] = []
    start = time.perf_counter()
    await api.replay_collection_stream(
        dataset.collection_id,
        dataset.stream_id,
        {"file": dataset.name},
        sink,
        speed=0,
        framing="throughput",
    )
    while True:
        item = await sink.get()
        if item is dm.END_OF_STREAM:
            break
        if not isinstance(item, dm.Frame):
            raise RuntimeError(f"replay sent {item!r}")
        frames.append(item)
    return time.perf_counter() - start, frames


def verify_replay(
    dataset: Dataset, frames: Sequence[dm.Frame], expected: tuple[np.ndarray | None, np.ndarray]
) -> None:
    """Every row arrived once, in order, with the baseline's values (and timestamps)."""
    timestamps, values = expected
    if timestamps is None:
        timestamps = edf_timestamps(dataset.path, len(values))
    samples = sum(len(f) for f in frames)
    assert samples == dataset.rows == len(values), f"{samples} rows of {dataset.rows}"
    assert [f.seq for f in frames] == list(range(len(frames))), "frame seq has gaps"
    labels = EEG_LABELS[: dataset.channels]
    assert all(f.channels == labels for f in frames), f"channels {frames[0].channels}"
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), timestamps)
    got = np.concatenate([f.values for f in frames])
    assert got.dtype == values.dtype, (got.dtype, values.dtype)
    np.testing.assert_array_equal(got, values)


def bench(api: dm.API, dataset: Dataset, runs: int) -> Result:
    """Alternate the direct read and the replay ``runs`` times; check the first replay."""
    result = Result(dataset)
    for run in range(runs):
        start = time.perf_counter()
        expected = dataset.load()
        result.baseline_s.append(time.perf_counter() - start)
        seconds, frames = asyncio.run(replay_all(api, dataset))
        result.replay_s.append(seconds)
        if run == 0:
            verify_replay(dataset, frames, expected)
        del expected, frames
    return result


def xdf_dataset(root: Path, seconds: int) -> Dataset:
    path = root / "data" / "xdf_bench" / "session1.xdf"
    path.parent.mkdir(parents=True)
    content = write_xdf(path, seconds)
    verify_xdf(path, content)
    xdf_id = content.eeg.xdf_id

    def load() -> tuple[np.ndarray, np.ndarray]:
        streams, _ = pyxdf.load_xdf(str(path), select_streams=[xdf_id], **LOAD_OPTIONS)
        return streams[0]["time_stamps"], streams[0]["time_series"]

    return Dataset(
        "XDF",
        "xdf_bench",
        content.eeg.name,
        path,
        len(content.values),
        XDF_CHANNELS,
        XDF_RATE_HZ,
        "`pyxdf.load_xdf(path, select_streams=[1], **LOAD_OPTIONS)`",
        load,
    )


def edf_dataset(root: Path, seconds: int, bdf: bool) -> Dataset:
    kind = "bdf" if bdf else "edf"
    path = root / "data" / f"{kind}_bench" / f"night1.{kind}"
    path.parent.mkdir(parents=True)
    write_edf(path, seconds, bdf)
    with_check = read_edf(path)
    assert with_check.shape == (seconds * EDF_RATE_HZ, EDF_CHANNELS), with_check.shape
    del with_check
    return Dataset(
        f"{kind.upper()}+",
        f"{kind}_bench",
        "signals",
        path,
        seconds * EDF_RATE_HZ,
        EDF_CHANNELS,
        float(EDF_RATE_HZ),
        "`pyedflib.EdfReader` + `readSignal(c)` per channel, `np.stack`",
        lambda: (None, read_edf(path)),
    )


# -- report --------------------------------------------------------------------------


def results_table(results: Sequence[Result]) -> list[str]:
    lines = [
        "| format | recording | rows x channels | file (MB) | baseline | baseline rows/s "
        "(values/s) | replay rows/s (values/s) | median s, baseline / replay "
        "| replay / baseline (range over runs) | aim >= 0.50 |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        d = r.dataset
        base, rep = statistics.median(r.baseline), statistics.median(r.replay)
        ratio = statistics.median(r.ratios)
        lines.append(
            f"| {d.format} | `{d.path.name}`, stream `{d.stream_id}`, {d.frequency:g} Hz, "
            f"{d.rows / d.frequency / 60:g} min | {d.rows:,} x {d.channels} "
            f"| {d.path.stat().st_size / 1e6:.0f} | {d.baseline_label} "
            f"| {base:,.0f} ({base * d.channels:,.0f}) | {rep:,.0f} ({rep * d.channels:,.0f}) "
            f"| {statistics.median(r.baseline_s):.2f} / {statistics.median(r.replay_s):.2f} "
            f"| {ratio:.2f} ({min(r.ratios):.2f}-{max(r.ratios):.2f}) "
            f"| {verdict(ratio >= AIM_RATIO)} |"
        )
    return lines


def aims_summary(results: Sequence[Result]) -> str:
    parts = ", ".join(f"{r.dataset.format} {statistics.median(r.ratios):.2f}" for r in results)
    ok = all(statistics.median(r.ratios) >= AIM_RATIO for r in results)
    return (
        "**Aim.** The issue asks for replay throughput per format beside a direct read of "
        "the same file and sets no number for formats; judged against the project-wide aim "
        f"(replay >= {AIM_RATIO:.0%} of its baseline): "
        f"{verdict(ok)} (replay / baseline: {parts})."
    )


def render_section(
    results: Sequence[Result], argv: Sequence[str], runs: int, loads: tuple[str, str], code: str
) -> str:
    """The generated part of "## Dataset formats"."""
    facts = machine_facts()
    facts["pyxdf"] = pyxdf.__version__
    facts["pyedflib"] = pyedflib.__version__
    facts["load average (1/5/15 min) at start -> end"] = f"{loads[0]} -> {loads[1]}"
    facts["code"] = code
    command = shlex.join(["python", "bench/datasets.py", *argv])
    xdf = next((r.dataset for r in results if r.dataset.format == "XDF"), None)
    lines = [
        f"Measured {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} with `{command}` "
        f"({n_runs(runs)}).",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in facts.items()) + ".",
        "",
        aims_summary(results),
        "",
        "Replay throughput at speed 0 of a folder collection per format (docs/datasets.md): "
        '`replay_collection_stream(collection, stream, {"file": name}, sink, speed=0, '
        'framing="throughput")`, timed from the request to END_OF_STREAM with the consumer '
        "draining the sink. Baseline: the format's own reader loading the same stream of the "
        "same file into arrays, in the same process. They alternate, baseline first, in "
        "each run; medians over the runs. The first replay of each file is checked against "
        "the baseline's arrays: same rows, channel ids, values and dtype, and the same "
        "timestamps (XDF: pyxdf's synchronised, dejittered ones; EDF/BDF: the header's "
        "start read as UTC + i / rate). *rows/s* counts samples of the stream (one row = "
        "one timestamp and one value per channel); *values/s* is rows/s x channels.",
        "",
        *results_table(results),
        "",
    ]
    if xdf is not None:
        lines += [
            "The XDF file is written by the bench (pyxdf has no writer) like LabRecorder's: "
            f"stream `EEG` ({XDF_CHANNELS} ch float32, {XDF_RATE_HZ:g} Hz, "
            f"{SAMPLES_PER_CHUNK} samples per Samples chunk, half of the chunks with every "
            "sample stamped, half with the first only), a string marker stream, a "
            f"ClockOffset per stream every {CLOCK_OFFSET_EVERY_S:g} s, a Boundary chunk every "
            f"{BOUNDARY_EVERY_S:g} s and a StreamFooter per stream. Before timing it is read "
            "back with pyxdf: raw (no synchronisation), values, timestamps, clock offsets "
            "and markers are bit for bit what was written; with `LOAD_OPTIONS` the "
            "timestamps are the offset-corrected, dejittered line. EDF+ and BDF+: "
            f"{EDF_CHANNELS} channels at {EDF_RATE_HZ} Hz written by pyedflib (16 and 24-bit "
            "digital values), 1 s data records, a few annotations. For CSV see "
            "[Replay](#replay).",
            "",
        ]
    return "\n".join(lines).rstrip("\n")


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per format (default 5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small smoke run for CI: {QUICK_XDF_SECONDS} s of XDF, "
        f"{QUICK_EDF_SECONDS // 60} min of EDF/BDF, {QUICK_RUNS} runs",
    )
    parser.add_argument(
        "--write-doc",
        action="store_true",
        help=f"replace the '{SECTION}' section of --doc with the results",
    )
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the document to update")
    args = parser.parse_args(argv)
    args.runs = args.runs or (QUICK_RUNS if args.quick else 5)
    args.xdf_seconds = QUICK_XDF_SECONDS if args.quick else XDF_SECONDS
    args.edf_seconds = QUICK_EDF_SECONDS if args.quick else EDF_SECONDS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as tmp:
        root = Path(tmp)
        log(f"writing and checking XDF ({args.xdf_seconds} s at {XDF_RATE_HZ:g} Hz)")
        datasets = [xdf_dataset(root, args.xdf_seconds)]
        for bdf in (False, True):
            log(f"writing {'BDF' if bdf else 'EDF'} ({args.edf_seconds} s at {EDF_RATE_HZ} Hz)")
            datasets.append(edf_dataset(root, args.edf_seconds, bdf))
        loads_at_start, code = load_average(), code_version()
        api = make_api(root)
        results = []
        for dataset in datasets:
            log(f"{dataset.format}: {dataset.rows:,} rows x {dataset.channels}, {args.runs} runs")
            results.append(bench(api, dataset, args.runs))
            r = results[-1]
            log(
                f"  baseline {statistics.median(r.baseline):,.0f} rows/s, "
                f"replay {statistics.median(r.replay):,.0f} rows/s, "
                f"ratio {statistics.median(r.ratios):.2f}"
            )
        loads = (loads_at_start, load_average())
        generated = render_section(results, argv, args.runs, loads, code)
    print(f"{SECTION}\n\n{generated}")
    if args.write_doc:
        write_doc(
            args.doc, generated, __file__, SECTION, after=AFTER_SECTION, replace_unmarked=True
        )
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
