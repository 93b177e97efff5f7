"""XDF replay chunk by chunk: the same values and timestamps as pyxdf.load_xdf, bit for bit."""

from __future__ import annotations

import logging
import re
import struct
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA
from xdf_files import _chunk, _header, _varlen, _write

pyxdf = pytest.importorskip("pyxdf")

from streaminghub_datamux.drivers.xdf import LOAD_OPTIONS, XdfFormat  # noqa: E402
from streaminghub_datamux.drivers.xdfstream import (  # noqa: E402
    _dejitter,
    _dejitter_agrees,
    _SampleChunk,
    _spans,
    index_stream,
)
from streaminghub_datamux.errors import DataError  # noqa: E402

DATA = SHARED_DATA / "xdf"
FORMATS = {"float32": "<f4", "double64": "<f8", "int16": "<i2", "int32": "<i4"}


def _samples(sid: int, stamps: list[float | None], rows: np.ndarray, fmt: str) -> bytes:
    """A Samples chunk; a stamp of None is left out (the reader adds the nominal step)."""
    body = bytearray(_varlen(len(stamps)))
    for stamp, row in zip(stamps, rows, strict=True):
        body += b"\x00" if stamp is None else b"\x08" + struct.pack("<d", stamp)
        body += np.asarray(row, FORMATS[fmt]).tobytes()
    return _chunk(3, struct.pack("<I", sid) + bytes(body))


def _clock(sid: int, time: float, offset: float) -> bytes:
    return _chunk(4, struct.pack("<I", sid) + struct.pack("<dd", time, offset))


def _footer(sid: int, count: int) -> bytes:
    xml = f"<?xml version='1.0'?><info><sample_count>{count}</sample_count></info>"
    return _chunk(6, struct.pack("<I", sid) + xml.encode())


def write_session(
    path: Path,
    *,
    seconds: float = 30,
    rate: float = 250,
    channels: int = 8,
    reset: bool,
    pylsl67: bool,
) -> Path:
    """Two regular streams with every stamping pattern, jitter, a gap, clock offsets."""
    rng = np.random.default_rng(5)
    chunks = [_header(1, "EEG", "float32", channels, rate), _header(2, "Aux", "int16", 2, rate / 2)]
    per_chunk = 25
    t, n, total = 100.0, 0, int(seconds * rate)
    patterns = ["all", "first", "none", "mixed"]
    for index, start in enumerate(range(0, total, per_chunk)):
        if start == total // 2:
            t += 3.0  # a gap longer than the dejitter break threshold
        stamps: list[float | None] = []
        for k in range(per_chunk):
            ts = t + k / rate + rng.normal(0, 2e-4)
            pattern = patterns[index % 4]
            keep = {"all": True, "first": k == 0, "none": False}.get(pattern, k % 3 == 0)
            stamps.append(ts if keep or (index == 0 and k == 0) else None)
        values = rng.standard_normal((per_chunk, channels)).astype(np.float32)
        chunks.append(_samples(1, stamps, values, "float32"))
        if index % 2 == 0:
            aux = rng.integers(-999, 999, (per_chunk // 2, 2))
            chunks.append(_samples(2, [t] + [None] * (per_chunk // 2 - 1), aux, "int16"))
        if index % 20 == 0:
            jump = 500.0 if reset and start > total // 2 else 0.0
            chunks.append(_clock(1, t + jump, -0.25 + rng.normal(0, 1e-5)))
            chunks.append(_clock(2, t, 0.5 + rng.normal(0, 1e-5)))
        t += per_chunk / rate
        n += per_chunk
    if pylsl67:
        # The pylsl#67 bug: one extra sample after the footer count, a garbage offset.
        chunks.append(_samples(1, [t], np.zeros((1, channels), np.float32), "float32"))
        chunks.append(_clock(1, t + 1e6, 1e6))
    chunks += [_footer(1, n), _footer(2, n // 4)]
    return _write(path, *chunks)


def assert_same_as_pyxdf(path: Path, xdf_id: int, block_bytes: int = 1 << 16) -> int:
    expected = pyxdf.load_xdf(str(path), select_streams=[xdf_id], **LOAD_OPTIONS)[0][0]
    index = index_stream(path, xdf_id, LOAD_OPTIONS)  # not Unsupported: really streamed
    dtype = np.asarray(expected["time_series"]).dtype
    blocks = list(index.blocks(block_bytes, dtype))
    timestamps = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0)
    assert timestamps.tobytes() == np.asarray(expected["time_stamps"], np.float64).tobytes()
    if blocks:
        values = np.concatenate([b[1] for b in blocks])
        assert values.dtype == expected["time_series"].dtype
        assert values.tobytes() == np.ascontiguousarray(expected["time_series"]).tobytes()
    return len(timestamps)


@pytest.mark.parametrize(("reset", "pylsl67"), [(False, False), (True, False), (False, True)])
def test_generated_sessions_match_load_xdf(tmp_path, caplog, reset, pylsl67):
    path = write_session(tmp_path / "s.xdf", reset=reset, pylsl67=pylsl67)
    n = assert_same_as_pyxdf(path, 1)
    assert n == 30 * 250  # pylsl67: the extra sample is dropped, as pyxdf does
    assert assert_same_as_pyxdf(path, 2) > 0


@pytest.mark.skipif(not DATA.is_dir(), reason="shared XDF files not found")
@pytest.mark.parametrize("name", ["minimal.xdf", "clock_resets.xdf", "empty_streams.xdf"])
def test_shared_files_match_load_xdf(name):
    path = DATA / name
    streams = XdfFormat().describe(path)
    numeric = [s for s in streams.values() if s.dtype.kind != "U"]
    assert numeric
    for stream in numeric:
        assert_same_as_pyxdf(path, int(stream.attrs["xdf_stream_id"]))


def test_replay_holds_blocks_not_the_stream(tmp_path):
    """Peak traced memory of reading every block is far below the stream's values."""
    path = write_session(tmp_path / "s.xdf", seconds=120, channels=64, reset=False, pylsl67=False)
    stream = XdfFormat().describe(path)["EEG"]
    tracemalloc.start()
    try:
        rows = sum(len(t) for t, _ in XdfFormat().blocks(path, stream, 1 << 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    values_bytes = rows * 64 * 4
    # What is held per sample is its timestamp and the dejitter fit's design matrix (16
    # bytes while it runs; LAPACK's own copies are not traced), not 256 bytes of values.
    assert peak < 0.5 * values_bytes, (peak, values_bytes)


@pytest.mark.parametrize("block_bytes", [1, 300, 4096, 1 << 16, 1 << 22])
def test_blocks_of_any_size_match_load_xdf(tmp_path, block_bytes):
    """Blocks smaller than a chunk, or spanning many, hold the same samples in order."""
    path = write_session(tmp_path / "s.xdf", seconds=8, reset=False, pylsl67=False)
    assert assert_same_as_pyxdf(path, 1, block_bytes) == 8 * 250
    assert assert_same_as_pyxdf(path, 2, block_bytes) > 0


def test_blocks_are_full_contiguous_and_not_views_of_the_file(tmp_path):
    path = write_session(tmp_path / "s.xdf", seconds=8, reset=False, pylsl67=False)
    index = index_stream(path, 1, LOAD_OPTIONS)
    # 32 samples per block (8 bytes of timestamp + 8 x 4 of values each); chunks hold 25.
    blocks = list(index.blocks(32 * 40, np.dtype(np.float32)))
    rows = 32
    assert [len(t) for t, _ in blocks[:-1]] == [rows] * (len(blocks) - 1)
    assert sum(len(t) for t, _ in blocks) == 8 * 250
    for timestamps, values in blocks:
        # A view on the bytes read would be read-only and keep the whole read alive.
        assert values.flags.c_contiguous and values.flags.writeable
        assert values.dtype == np.float32 and values.shape == (len(timestamps), 8)


def test_blocks_select_columns_and_convert(tmp_path):
    path = write_session(tmp_path / "s.xdf", seconds=4, reset=False, pylsl67=False)
    expected = pyxdf.load_xdf(str(path), select_streams=[1], **LOAD_OPTIONS)[0][0]
    index = index_stream(path, 1, LOAD_OPTIONS)
    blocks = list(index.blocks(2048, np.dtype(np.float64), [6, 1]))
    values = np.concatenate([v for _, v in blocks])
    assert values.dtype == np.float64
    wanted = np.asarray(expected["time_series"])[:, [6, 1]].astype(np.float64)
    assert values.tobytes() == wanted.tobytes()


def test_a_file_cut_short_after_indexing_names_the_file(tmp_path):
    path = write_session(tmp_path / "s.xdf", seconds=8, reset=False, pylsl67=False)
    index = index_stream(path, 1, LOAD_OPTIONS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*changed while replaying"):
        for _ in index.blocks(1 << 12, np.dtype(np.float32)):
            pass


def test_reads_span_neighbouring_chunks_but_skip_far_ones():
    """One read covers neighbouring chunks; another stream's big chunk in between splits."""
    near = [_SampleChunk(100 + k * 60, 50, 1, 0) for k in range(10)]
    spans = list(_spans(near, 1 << 20))
    assert [(start, stop, len(group)) for start, stop, group in spans] == [(100, 690, 10)]
    assert [len(g) for _, _, g in _spans(near, 200)] == [3, 3, 3, 1]  # at most 200 bytes
    far = [_SampleChunk(0, 50, 1, 0), _SampleChunk(10_000, 50, 1, 0)]
    assert [len(g) for _, _, g in _spans(far, 1 << 20)] == [1, 1]  # not 9,900 bytes for 100


def test_xdf_replay_reads_blocks_of_at_least_min_block_bytes(tmp_path, monkeypatch):
    """Replay asks for 256 KiB blocks; XDF reads 4 MiB, so frames are views of a block."""
    from streaminghub_datamux.drivers import replay as replay_module

    seen: list[int] = []
    original = XdfFormat.blocks

    def spy(self, path, stream, block_bytes):
        seen.append(block_bytes)
        return original(self, path, stream, block_bytes)

    monkeypatch.setattr(XdfFormat, "blocks", spy)
    path = write_session(tmp_path / "s.xdf", seconds=2, reset=False, pylsl67=False)
    stream = XdfFormat().describe(path)["EEG"]

    class OneFile:
        attrs = {"file": "s"}
        dataset = None

        def file_for(self, stream_id):
            return path

    blocks = replay_module.open_reader(OneFile(), stream, block_bytes=256 << 10)
    assert sum(len(t) for t, _ in blocks()) == 2 * 250
    assert seen == [XdfFormat.min_block_bytes] and XdfFormat.min_block_bytes >= 4 << 20


# -- the lean dejitter fit against pyxdf's _jitter_removal --------------------------------


def _stream_data(rate: float, stamps: np.ndarray, can_drop: bool = False) -> tuple:
    """A pyxdf StreamData with ``stamps`` (a copy), from a real header's XML, and its header."""
    desc = "<synchronization><can_drop_samples>true</can_drop_samples></synchronization>"
    xml = (
        f"<info><channel_count>1</channel_count><nominal_srate>{rate}</nominal_srate>"
        f"<channel_format>float32</channel_format><desc>{desc if can_drop else ''}</desc></info>"
    )
    header = pyxdf.pyxdf._xml2dict(ET.fromstring(xml))
    stream = pyxdf.pyxdf.StreamData(header)
    stream.time_stamps = np.array(stamps, dtype=np.float64)
    return stream, header


def _jittered(rate: float, n: int, seed: int, start: float = 1000.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return start + np.arange(n) / rate + rng.normal(0, 0.2 / rate, n)


def _assert_dejitter_like_pyxdf(caplog, rate: float, stamps: np.ndarray, **kw) -> object:
    """Ours and pyxdf's on copies of the same stamps: bytes, segments, rate and log equal."""
    theirs, header = _stream_data(rate, stamps, **kw)
    ours, _ = _stream_data(rate, stamps, **kw)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyxdf"):
        pyxdf.pyxdf._jitter_removal({3: theirs}, 1, 500, stream_headers={3: header})
        their_log = [r.getMessage() for r in caplog.records]
        caplog.clear()
        _dejitter(ours, 3, header)
        our_log = [r.getMessage() for r in caplog.records]
    assert ours.time_stamps.tobytes() == theirs.time_stamps.tobytes()
    assert ours.segments == theirs.segments
    rates = np.float64(ours.effective_srate), np.float64(theirs.effective_srate)
    assert rates[0].tobytes() == rates[1].tobytes()
    assert our_log == their_log
    return theirs


def test_lean_dejitter_is_pyxdfs_across_time_and_sample_breaks(caplog):
    """Breaks by the 1 s threshold (1 kHz) and by the 500-sample one (100 Hz: 5 s)."""
    fast = _jittered(1000.0, 20_000, 1)
    fast[3_000:] += 1.5  # > 1 s: a break
    fast[9_000:] -= 2.5  # backwards: a break too (pyxdf takes the absolute difference)
    fast[15_000:] += 0.9  # below 1 s: no break
    result = _assert_dejitter_like_pyxdf(caplog, 1000.0, fast)
    assert [s for s, _ in result.segments] == [0, 3_000, 9_000]
    slow = _jittered(100.0, 4_000, 2)
    slow[1_000:] += 3.0  # 3 s: no break at 100 Hz (threshold 500 samples = 5 s)
    slow[2_000:] += 6.0  # a break
    result = _assert_dejitter_like_pyxdf(caplog, 100.0, slow)
    assert [s for s, _ in result.segments] == [0, 2_000]


def test_lean_dejitter_is_pyxdfs_for_lone_samples(caplog):
    """Segments of one sample: first, in the middle, last, and a stream of only those."""
    stamps = _jittered(250.0, 3_000, 3)
    for at in (1, 1_500, 1_501, 2_999):
        stamps[at:] += 10.0  # lone samples at 0, 1_500 and 2_999
    result = _assert_dejitter_like_pyxdf(caplog, 250.0, stamps)
    assert (0, 0) in result.segments and (2_999, 2_999) in result.segments
    # Every sample alone: no rate can be measured, and pyxdf warns about it (so do we).
    lone = 100.0 + 20.0 * np.arange(5)
    _assert_dejitter_like_pyxdf(caplog, 250.0, lone)
    assert "effective sampling rate" in caplog.text
    _assert_dejitter_like_pyxdf(caplog, 250.0, lone[:1])


def test_lean_dejitter_is_pyxdfs_for_long_segments(caplog):
    """Segments over a million samples, starting mid-stream and spanning write blocks."""
    stamps = _jittered(1000.0, 2_400_000, 4, start=5e5)
    stamps[1_000_001:] += 30.0
    result = _assert_dejitter_like_pyxdf(caplog, 1000.0, stamps)
    assert result.segments == [(0, 1_000_000), (1_000_001, 2_399_999)]


def test_lean_dejitter_leaves_irregular_and_droppable_streams_as_pyxdf_does(caplog):
    stamps = _jittered(500.0, 1_000, 5)
    stamps[500:] += 4.0
    for rate, can_drop in ((0.0, False), (500.0, True)):
        result = _assert_dejitter_like_pyxdf(caplog, rate, stamps, can_drop=can_drop)
        assert result.time_stamps.tobytes() == stamps.tobytes()  # untouched
        assert result.segments == [(0, 999)]
    _assert_dejitter_like_pyxdf(caplog, 500.0, np.zeros(0))


def test_lean_dejitter_traces_a_third_of_pyxdfs_memory():
    """numpy arrays alive at the peak, ours vs pyxdf's, same 1 M stamps.

    Ours: the design matrix (16 bytes a sample; pyxdf's break detection, 17, is as much);
    pyxdf's adds int64 copies, a float cast and a gathered copy of the stamps. LAPACK's
    own copies (24 bytes a sample in both) are malloc'd by numpy's linalg module, so they
    are not traced here.
    """
    peaks = []
    for fit in ("ours", "pyxdf"):
        stream, header = _stream_data(1000.0, _jittered(1000.0, 1_000_000, 6))
        tracemalloc.start()
        try:
            if fit == "ours":
                _dejitter(stream, 3, header)
            else:
                pyxdf.pyxdf._jitter_removal({3: stream}, 1, 500, stream_headers={3: header})
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    ours, theirs = peaks
    assert ours <= 18 * 1_000_000 and theirs >= 2.5 * ours, peaks


def test_the_installed_pyxdf_dejitters_as_our_fit():
    """The canary index_stream consults (a differing pyxdf means load_xdf, not our fit)."""
    assert _dejitter_agrees()
