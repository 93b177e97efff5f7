"""The CSV reader's two parsers: pandas (fast-csv extra) gives numpy's values and errors."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import drain, gaze_collection, run

import streaminghub_datamux as dm

pytest.importorskip("pandas")

from streaminghub_datamux.drivers import csvfast
from streaminghub_datamux.drivers.csvfile import CsvStreamReader
from streaminghub_datamux.errors import DataError
from streaminghub_datamux.model import Stream

HEADER = "t,a,b,c\n"


def stream(dtype: str = "f32", channels: tuple[str, ...] = ("a", "b", "c")) -> Stream:
    return Stream.from_dict(
        "s",
        {
            "frequency": 100,
            "fields": {c: {"dtype": dtype} for c in channels},
            "index": {"t": {"dtype": "f64", "unit": "s"}},
        },
    )


def read(path: Path, meta: Stream, engine: str, block_bytes: int = 1 << 20):
    """Every block (those before an error too) and the error (message and line)."""
    blocks, error = [], None
    try:
        for block in CsvStreamReader(path, meta, block_bytes, engine=engine).blocks():
            blocks.append(block)
    except DataError as exc:
        error = (str(exc), exc.line)
    return blocks, error


def assert_same_reading(path: Path, meta: Stream, block_bytes: int = 1 << 20) -> tuple:
    numpy_blocks, numpy_error = read(path, meta, "numpy", block_bytes)
    pandas_blocks, pandas_error = read(path, meta, "pandas", block_bytes)
    assert pandas_error == numpy_error

    def joined(blocks):
        if not blocks:
            return np.zeros(0), np.zeros((0, len(meta.fields)), meta.dtype)
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])

    (nt, nv), (pt, pv) = joined(numpy_blocks), joined(pandas_blocks)
    assert pv.dtype == nv.dtype and pv.shape == nv.shape
    # Bit for bit, NaN included.
    assert pt.tobytes() == nt.tobytes()
    assert pv.tobytes() == nv.tobytes()
    return (nt, nv), numpy_error


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("fmt", ["%.17g", "%.9g", "%.6f", "%.3e", "%.25g", "%g"])
def test_values_are_bit_exact_with_numpy(tmp_path, dtype, fmt):
    rng = np.random.default_rng(12)
    n = 20_000
    span = 30 if dtype == "f32" else 300  # within the dtype's range: no overflow on cast
    values = rng.standard_normal((n, 3)) * 10.0 ** rng.integers(-span, span, (n, 3))
    values[::97, 0] = np.nan
    values[::89, 1] = np.inf
    values[::83, 2] = -np.inf
    rows = np.column_stack([1e9 + np.arange(n) / 100, values])
    path = tmp_path / "x.csv"
    with path.open("w") as handle:
        handle.write(HEADER)
        np.savetxt(handle, rows, delimiter=",", fmt=fmt)
    # Small blocks: many block boundaries, and the pandas path must still be taken.
    (t, _v), error = assert_same_reading(path, stream(dtype), block_bytes=16 << 10)
    assert error is None and len(t) == n


def test_long_digit_strings_and_spellings_are_bit_exact(tmp_path):
    lines = [
        "0,0.1000000000000000055511151231257827021181583404541015625,1e-320,-0",
        "1,2.2250738585072011e-308,4.9406564584124654e-324,1.7976931348623157e308",
        "2,NaN,NAN,nan",
        "3,+inf,-Infinity,inf",
        "4,123456789012345678901234567890,.5,5.",
        "5, 1 ,2 , 3",
    ]
    path = tmp_path / "x.csv"
    path.write_text(HEADER + "\r\n".join(lines) + "\r\n")
    (t, _v), error = assert_same_reading(path, stream("f64"))
    assert error is None and len(t) == len(lines)


BAD = {
    "short row": ("0,1,2,3\n0.01,4\n0.02,1,1,1\n", 3),
    # A shifted row: both parsers skip cells they are not asked for, so it is counted.
    "long row": ("0,1,2,3\n0.01,1,2,3,extra\n0.02,1,1,1\n", 3),
    "bad value": ("0,1,2,3\n0.01,oops,5,6\n", 3),
    "empty field": ("0,1,2,3\n0.01,,5,6\n", 3),
    "NA text": ("0,1,2,3\n0.01,NA,5,6\n", 3),
    "quoted number": ('0,1,2,3\n0.01,"4",5,6\n', 3),
    # numpy's reader and ours skip it differently; which line is named is #14's to decide.
    "line of spaces": ("0,1,2,3\n   \n0.02,1,1,1\n", None),
    "bad first row": ("0,1\n0.01,4,5,6\n", 2),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lines_give_the_same_rows_and_error_with_either_parser(tmp_path, case):
    body, line = BAD[case]
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + body)
    (_t, _v), error = assert_same_reading(path, stream())
    assert error is not None
    if line is not None:
        assert error[1] == line and f"line {line}" in error[0], error


def test_blank_lines_and_missing_final_newline(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text(HEADER + "0,1,2,3\n\n0.01,4,5,6\n0.02,7,8,9")
    (_t, v), error = assert_same_reading(path, stream(), block_bytes=8)
    assert error is None
    np.testing.assert_array_equal(v, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_integer_streams_keep_numpy_rules(tmp_path):
    """pandas would read '1.0' as an integer; integer streams stay on numpy's parser."""
    path = tmp_path / "x.csv"
    path.write_text(HEADER + "0,1,2,3\n0.01,1.0,2,3\n")
    _blocks, error = read(path, stream("i32"), "auto")
    assert error is not None and error[1] == 3


def test_pandas_parse_lets_other_threads_run(tmp_path):
    """Unlike np.loadtxt, pandas' parse releases the GIL: a ticking thread keeps ticking."""
    rng = np.random.default_rng(1)
    rows = np.column_stack([np.arange(400_000) / 1000, rng.random((400_000, 3))])
    path = tmp_path / "big.csv"
    with path.open("w") as handle:
        handle.write(HEADER)
        np.savetxt(handle, rows, delimiter=",", fmt="%.9g")

    def longest_stall(engine: str) -> tuple[float, float]:
        gaps: list[float] = []
        done = threading.Event()

        def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                time.sleep(0.0005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = threading.Thread(target=tick)
        ticker.start()
        start = time.perf_counter()
        try:
            # One block for the whole file: the parse call is long enough to see.
            list(CsvStreamReader(path, stream(), 64 << 20, engine=engine).blocks())
        finally:
            elapsed = time.perf_counter() - start
            done.set()
            ticker.join(timeout=10)
        return max(gaps), elapsed

    numpy_stall, numpy_time = longest_stall("numpy")
    assert numpy_stall > 0.5 * numpy_time  # the control: numpy holds the GIL
    # On a loaded machine the OS can also hold the ticker back: the best of three pandas
    # parses (one that held the GIL would stall the ticker every time).
    pandas_stalls = []
    for _ in range(3):
        pandas_stall, pandas_time = longest_stall("pandas")
        pandas_stalls.append(pandas_stall)
        if pandas_stall < 0.5 * numpy_stall:
            break
    assert min(pandas_stalls) < 0.5 * numpy_stall, (pandas_stalls, numpy_stall, pandas_time)


def test_unknown_engine_and_empty_blocks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="engine"):
        CsvStreamReader(tmp_path / "x.csv", stream(), engine="fast")
    with pytest.raises(ValueError, match="block_bytes must be > 0"):
        CsvStreamReader(tmp_path / "x.csv", stream(), 0)


# -- parse threads: blocks parsed side by side, in order, errors on the right line -----


def parse_threads(monkeypatch) -> list[tuple[str, bytes]]:
    """``(thread name, text)`` of each block pandas parses, filled in as the reader runs.

    The first two parses wait for each other, so two threads surely parse side by side
    (a pool reuses an idle thread rather than start a second one).
    """
    parsed: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=10)
    real = csvfast.parse_floats

    def parse(text, *args, **kwargs):
        with lock:
            parsed.append((threading.current_thread().name, text))
            first_two = len(parsed) <= 2
        if first_two:
            both.wait()
        return real(text, *args, **kwargs)

    monkeypatch.setattr(csvfast, "parse_floats", parse)
    return parsed


def live_parse_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("csv-parse")]


def write_lines(
    path: Path, header: str, rows: np.ndarray, replace: dict[int, str] | None = None
) -> None:
    """``header``, then one line per row (``%.9g``), with the rows in ``replace`` swapped
    for the given text."""
    replace = replace or {}
    lines = [",".join(f"{v:.9g}" for v in row) for row in rows.tolist()]
    for index, text in replace.items():
        lines[index] = text
    path.write_text(header + "\n".join(lines) + "\n")


N_ROWS = 3000
# 2 KiB asked, 8 KiB blocks for pandas: about 200 rows per block, 15 blocks
SMALL_BLOCKS = 2 << 10
ROWS = np.column_stack(
    [np.arange(N_ROWS) / 100, np.random.default_rng(5).standard_normal((N_ROWS, 3))]
)


@pytest.mark.parametrize("bad_row", [250, 1600, N_ROWS - 1])
def test_a_bad_line_in_any_block_is_named_with_its_file_line(tmp_path, monkeypatch, bad_row):
    """Blocks are parsed by two threads; the rows before the bad line arrive exact, the
    error names the line in the file (header = line 1), whichever thread parsed it."""
    parsed = parse_threads(monkeypatch)
    path = tmp_path / "x.csv"
    write_lines(path, HEADER, ROWS, {bad_row: "12.5,1,oops,3"})
    blocks, error = read(path, stream(), "pandas", SMALL_BLOCKS)
    assert error is not None
    assert error[1] == bad_row + 2, error
    assert "could not convert 'oops' to float32 in column 3 (b)" in error[0], error
    t = np.concatenate([b[0] for b in blocks])
    v = np.concatenate([b[1] for b in blocks])
    np.testing.assert_array_equal(t, ROWS[:bad_row, 0])
    expected = np.loadtxt(path, delimiter=",", skiprows=1, max_rows=bad_row, dtype=np.float64)
    assert v.tobytes() == expected[:, 1:].astype(np.float32).tobytes()
    threads = [name for name, _text in parsed]
    assert set(threads) == {"csv-parse_0", "csv-parse_1"}, threads
    bad_block = next(i for i, (_name, text) in enumerate(parsed) if b"oops" in text)
    if bad_row == 250:  # in the second block: the one the other thread parsed
        assert bad_block == 1 and threads[1] != threads[0], threads
    assert_same_reading(path, stream(), SMALL_BLOCKS)


def test_last_line_without_newline_and_a_bad_one(tmp_path):
    path = tmp_path / "x.csv"
    write_lines(path, HEADER, ROWS)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    (t, _v), error = assert_same_reading(path, stream(), SMALL_BLOCKS)
    assert error is None and len(t) == N_ROWS
    path.write_bytes(path.read_bytes() + b"\n1,2")
    (t, _v), error = assert_same_reading(path, stream(), SMALL_BLOCKS)
    assert error is not None and error[1] == N_ROWS + 2 and len(t) == N_ROWS
    assert "expected 4 columns, got 2" in error[0]


def test_a_line_longer_than_a_block_is_read_whole(tmp_path):
    path = tmp_path / "x.csv"
    wide = 600  # one line of about 6 KiB, blocks of 64 bytes for numpy, 256 for pandas
    header = "t," + ",".join(f"c{i}" for i in range(wide)) + "\n"
    rows = np.random.default_rng(2).standard_normal((5, wide + 1))
    write_lines(path, header, rows)
    meta = stream("f64", tuple(f"c{i}" for i in range(wide)))
    (_t, v), error = assert_same_reading(path, meta, block_bytes=64)
    assert error is None
    assert v.tobytes() == np.loadtxt(path, delimiter=",", skiprows=1)[:, 1:].tobytes()


SUBSET_HEADER = "t,x,c,a,b,y\n"  # a file that also holds another stream's x and y


@pytest.mark.parametrize(
    ("case", "line", "message"),
    [
        ("good", None, None),
        ("long row", 1702, "expected 6 columns, got 7"),
        ("short row", 1702, "expected 6 columns, got 5"),
        ("bad unread cell", None, None),  # a cell the stream does not read is not parsed
    ],
)
def test_a_stream_reading_some_columns(tmp_path, case, line, message):
    """Reading a subset of the columns, in another order than the file's: pandas skips
    the other cells, so the width of each line is counted instead."""
    rows = np.column_stack([ROWS, ROWS[:, 1:3] * 2])  # t, a, b, c, x, y
    path = tmp_path / "x.csv"
    lines = [",".join(f"{v:.9g}" for v in r) for r in rows[:, [0, 4, 3, 1, 2, 5]].tolist()]
    bad = {
        "long row": lines[1700] + ",7",
        "short row": lines[1700].rsplit(",", 1)[0],
        "bad unread cell": ",".join(["17", "oops", *lines[1700].split(",")[2:]]),
    }
    if case in bad:
        lines[1700] = bad[case]
    path.write_text(SUBSET_HEADER + "\n".join(lines) + "\n")
    (t, v), error = assert_same_reading(path, stream(), SMALL_BLOCKS)
    if line is None:
        assert error is None and len(t) == N_ROWS
        expected = np.loadtxt(path, delimiter=",", skiprows=1, usecols=[0, 3, 4, 2], ndmin=2)
        assert v.tobytes() == expected[:, 1:].astype(np.float32).tobytes()
    else:
        assert error is not None and error[1] == line and message in error[0], error
        assert len(t) == 1700


def test_closing_the_reader_early_stops_its_parse_threads(tmp_path):
    path = tmp_path / "x.csv"
    write_lines(path, HEADER, np.tile(ROWS, (10, 1)))
    blocks = CsvStreamReader(path, stream(), SMALL_BLOCKS, engine="pandas").blocks()
    next(blocks)
    next(blocks)
    assert live_parse_threads(), "the rest of the file is being parsed ahead"
    blocks.close()
    assert live_parse_threads() == []


def test_stopping_a_replay_stops_its_parse_threads(workspace):
    workspace.add_collection("study", gaze_collection(frequency=1000))
    workspace.add_gaze_recording("A", "1", n=300_000, frequency=1000)  # 15 MB, 15 blocks

    async def body():
        api = dm.API(workspace.config())
        sink: asyncio.Queue = asyncio.Queue(maxsize=1)  # the replay waits on its consumer
        ack = await api.replay_collection_stream("study", "gaze", {"subject": "A"}, sink, speed=0)
        first = await asyncio.wait_for(sink.get(), 10)
        assert isinstance(first, dm.Frame), first
        assert live_parse_threads(), "the next blocks are being parsed ahead"
        await api.stop_task(ack.randseq)
        await drain(sink)
        # The block in flight cannot be interrupted: its parse ends, then the threads.
        for _ in range(100):
            if not live_parse_threads():
                break
            await asyncio.sleep(0.05)
        return live_parse_threads()

    assert run(body()) == []


def test_without_pandas_numpy_reads_and_the_log_says_how_to_get_it(tmp_path, monkeypatch, caplog):
    """The fallback where the extra is missing (armv7l): same values, one hint in the log."""
    monkeypatch.setattr(csvfast, "pd", None)
    monkeypatch.setattr(csvfast, "_warned", False)
    path = tmp_path / "x.csv"
    write_lines(path, HEADER, ROWS, {1600: "12.5,1,oops,3"})
    with caplog.at_level("WARNING"):
        blocks, error = read(path, stream(), "auto", SMALL_BLOCKS)
        read(path, stream(), "auto", SMALL_BLOCKS)
    hints = [r.getMessage() for r in caplog.records if "fast-csv" in r.getMessage()]
    assert len(hints) == 1 and "not installed" in hints[0], hints
    assert error is not None and error[1] == 1602
    assert not live_parse_threads()
    v = np.concatenate([b[1] for b in blocks])
    expected = np.loadtxt(path, delimiter=",", skiprows=1, max_rows=1600)
    assert v.tobytes() == expected[:, 1:].astype(np.float32).tobytes()
    with pytest.raises(ValueError, match="fast-csv"):
        CsvStreamReader(path, stream(), engine="pandas")


def test_public_read_gives_the_same_columns_as_the_engine(tmp_path):
    """Where a pandas lacks the engine's column dict, the DataFrame route is taken."""
    import io
    import types

    import pandas as pd

    text = (HEADER + "0,1.5,nan,3\n0.01,4,5,-inf\n").encode().split(b"\n", 1)[1]

    def reader():
        return pd.read_csv(io.BytesIO(text), header=None, dtype=np.float64, iterator=True)

    with reader() as engine_reader, reader() as public_reader:
        by_engine = csvfast._read_columns(engine_reader)
        by_frame = csvfast._read_columns(types.SimpleNamespace(read=public_reader.read))
    assert sorted(by_engine) == sorted(by_frame) == [0, 1, 2, 3]
    for position in by_engine:
        assert by_engine[position].tobytes() == by_frame[position].tobytes()
