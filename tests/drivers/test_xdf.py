"""XDF recordings: describe() from stream headers, blocks() exactly as pyxdf loads them."""

from __future__ import annotations

import gzip
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA, needs_shared
from xdf_files import _header, _samples, _write

pyxdf = pytest.importorskip("pyxdf")

from streaminghub_datamux.drivers import xdf as xdf_module  # noqa: E402
from streaminghub_datamux.drivers.formats import format_for_path  # noqa: E402
from streaminghub_datamux.drivers.xdf import LOAD_OPTIONS, XdfFormat  # noqa: E402
from streaminghub_datamux.errors import DataError  # noqa: E402
from streaminghub_datamux.model import Stream  # noqa: E402

# The XDF maintainers' example files (read-only), beside the project: ../shared/data/xdf.
DATA = SHARED_DATA / "xdf"
needs_data = needs_shared("xdf")
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
FILES = ("minimal.xdf", "empty_streams.xdf", "clock_resets.xdf")


@pytest.fixture
def fmt() -> XdfFormat:
    return XdfFormat()


def _read_all(fmt: XdfFormat, path: Path, stream: Stream, block_bytes: int = 1 << 20):
    blocks = list(fmt.blocks(path, stream, block_bytes))
    if not blocks:
        return blocks, None, None
    return blocks, np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def _channels(*channels: tuple[str | None, str | None]) -> str:
    parts = []
    for label, unit in channels:
        inner = (f"<label>{label}</label>" if label is not None else "") + (
            f"<unit>{unit}</unit>" if unit is not None else ""
        )
        parts.append(f"<channel>{inner}</channel>")
    return f"<channels>{''.join(parts)}</channels>"


# -- describe ------------------------------------------------------------------------------


def test_registered_for_both_extensions(fmt: XdfFormat) -> None:
    assert format_for_path(Path("a.xdf")).name == "xdf"
    assert format_for_path(Path("a.XDFZ")).name == "xdf"
    assert (fmt.name, fmt.extensions, fmt.self_describing) == ("xdf", (".xdf", ".xdfz"), True)


@needs_data
def test_describe_minimal(fmt: XdfFormat) -> None:
    streams = fmt.describe(DATA / "minimal.xdf")
    assert list(streams) == ["SendDataC", "SendDataString"]
    data, text = streams["SendDataC"], streams["SendDataString"]
    assert (data.name, data.frequency, data.channels) == ("SendDataC", 10.0, ["ch0", "ch1", "ch2"])
    assert {f.dtype for f in data.fields.values()} == {"i16"}
    assert data.dtype == np.int16
    assert dict(data.attrs) == {"xdf_stream_id": 0, "type": "EEG", "source_id": ""}
    assert (data.index["t"].dtype, data.index["t"].unit) == ("f64", "s")
    assert text.attrs["xdf_stream_id"] == 46202862  # 0x02C0FFEE
    assert text.attrs["type"] == "StringMarker"
    assert text.dtype.kind == "U" and text.channels == ["ch0"]
    assert fmt.sample_count(DATA / "minimal.xdf", data) == 9
    assert fmt.sample_count(DATA / "minimal.xdf", text) == 9


@needs_data
def test_describe_lists_streams_without_samples(fmt: XdfFormat) -> None:
    path = DATA / "empty_streams.xdf"
    streams = fmt.describe(path)
    assert len(streams) == 4
    assert all(SAFE_ID.fullmatch(sid) for sid in streams)
    by_name = {s.name: s for s in streams.values()}
    counts = {s.name: fmt.sample_count(path, s) for s in streams.values()}
    assert counts == {
        "Empty data stream: test stream 0 counter": 0,
        "Data stream: test stream 0 counter": 10,
        "ctrl": 1,
        "Empty marker stream: test stream 0 counter": 0,
    }
    counter = by_name["Data stream: test stream 0 counter"]
    assert counter.id == "Data_stream__test_stream_0_counter"
    assert (counter.dtype, counter.frequency, counter.channels) == (np.int32, 1.0, ["ch:00"])
    assert counter.fields["ch:00"].description == "misc"
    assert by_name["Empty data stream: test stream 0 counter"].dtype == np.float32
    assert by_name["ctrl"].frequency == 0.0 and by_name["ctrl"].dtype.kind == "U"
    assert by_name["ctrl"].attrs["source_id"] == "kassia"


@needs_data
def test_describe_clock_resets(fmt: XdfFormat) -> None:
    path = DATA / "clock_resets.xdf"
    streams = fmt.describe(path)
    assert list(streams) == ["MyMarkerStream", "BioSemi"]
    eeg, markers = streams["BioSemi"], streams["MyMarkerStream"]
    assert (eeg.dtype, eeg.frequency, len(eeg.channels)) == (np.float32, 100.0, 8)
    assert (markers.dtype.kind, markers.frequency, markers.attrs["type"]) == ("U", 0.0, "Markers")
    assert fmt.sample_count(path, eeg) == 27_815
    assert fmt.sample_count(path, markers) == 175


@needs_data
def test_describe_reads_headers_only(fmt: XdfFormat, monkeypatch: pytest.MonkeyPatch) -> None:
    xdf_module._cached_description.cache_clear()

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("describe must not load samples")

    monkeypatch.setattr(pyxdf, "load_xdf", no_load)
    assert len(fmt.describe(DATA / "clock_resets.xdf")) == 2


def test_describe_maps_names_labels_units_and_formats(fmt: XdfFormat, tmp_path: Path) -> None:
    labels = _channels(("Fp1", "uV"), ("Fp1", "uV"), ("", None), ("a,b", "mV"))
    path = _write(
        tmp_path / "synthetic.xdf",
        _header(7, "Eye tracker/left", "double64", 4, 250, labels),
        _header(8, "Eye tracker/left", "int8", 1, 0),
        _header(9, "-x" * 40, "int64", 2, 0, _channels(("only one", None))),
        _header(10, "", "int32", 1, 0),
    )
    streams = fmt.describe(path)
    assert list(streams) == ["Eye_tracker_left-7", "Eye_tracker_left-8", "_x" + "-x" * 31, "stream"]
    assert all(SAFE_ID.fullmatch(sid) for sid in streams)
    eye = streams["Eye_tracker_left-7"]
    assert eye.name == "Eye tracker/left" and eye.attrs["xdf_stream_id"] == 7
    assert eye.channels == ["Fp1", "Fp1_2", "ch2", "ch3"]
    assert [f.unit for f in eye.fields.values()] == ["uV", "uV", "", "mV"]
    assert eye.fields["ch3"].name == "a,b"
    assert (eye.dtype, eye.frequency, eye.attrs["source_id"]) == (np.float64, 250.0, "src7")
    assert streams["Eye_tracker_left-8"].dtype == np.int8
    # One label for two channels cannot be matched to columns: all fall back.
    assert streams["_x" + "-x" * 31].channels == ["ch0", "ch1"]
    assert streams["_x" + "-x" * 31].dtype == np.int64


def test_describe_is_cached_per_file_version(fmt: XdfFormat, tmp_path: Path) -> None:
    path = _write(tmp_path / "a.xdf", _header(1, "A", "float32", 1, 0))
    assert list(fmt.describe(path)) == ["A"]
    _write(path, _header(1, "B", "float32", 1, 0), _header(2, "C", "float32", 1, 0))
    assert list(fmt.describe(path)) == ["B", "C"]


# -- blocks --------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", FILES)
def test_blocks_match_pyxdf(fmt: XdfFormat, name: str) -> None:
    path = DATA / name
    expected = {
        s["info"]["stream_id"]: s for s in pyxdf.load_xdf(str(path), **LOAD_OPTIONS)[0]
    }  # the whole file, so selecting one stream must not change anything
    for stream in fmt.describe(path).values():
        want = expected[stream.attrs["xdf_stream_id"]]
        blocks, timestamps, values = _read_all(fmt, path, stream)
        if not len(want["time_stamps"]):
            assert blocks == []
            continue
        assert timestamps.dtype == np.float64
        np.testing.assert_array_equal(timestamps, want["time_stamps"])
        assert np.all(np.diff(timestamps) >= 0), "samples must come out in time order"
        assert values.shape == (len(timestamps), len(stream.channels))
        # str streams are fixed-width numpy strings, as wide as their longest value.
        assert values.dtype.kind == stream.dtype.kind
        assert stream.dtype.kind == "U" or values.dtype == stream.dtype
        if stream.dtype.kind == "U":
            assert values.tolist() == want["time_series"]
        else:
            np.testing.assert_array_equal(values, want["time_series"])


@needs_data
def test_small_blocks_concatenate_to_the_same(fmt: XdfFormat) -> None:
    path = DATA / "clock_resets.xdf"
    eeg = fmt.describe(path)["BioSemi"]
    _, all_t, all_v = _read_all(fmt, path, eeg)
    blocks, t, v = _read_all(fmt, path, eeg, block_bytes=40 * 1024)
    assert len(blocks) > 5
    assert all(len(b[0]) <= 40 * 1024 // (8 + 8 * 4) for b in blocks)
    assert all(b[0].base is not None and b[1].base is not None for b in blocks), "views"
    np.testing.assert_array_equal(t, all_t)
    np.testing.assert_array_equal(v, all_v)


@needs_data
def test_clock_resets_are_synchronised_into_time_order(fmt: XdfFormat) -> None:
    path = DATA / "clock_resets.xdf"
    raw = pyxdf.load_xdf(str(path), synchronize_clocks=False, select_streams=[2])[0][0]
    assert np.any(np.diff(raw["time_stamps"]) < 0), "the file's raw stamps jump back"
    _, timestamps, _ = _read_all(fmt, path, fmt.describe(path)["BioSemi"])
    assert np.all(np.diff(timestamps) > 0)


@needs_data
def test_markers_are_strings(fmt: XdfFormat) -> None:
    path = DATA / "clock_resets.xdf"
    _, timestamps, values = _read_all(fmt, path, fmt.describe(path)["MyMarkerStream"], 256)
    assert values.dtype.kind == "U" and values.shape == (175, 1)
    assert values[:3, 0].tolist() == ["XXX", "Test", "Blah"]
    assert len(timestamps) == 175


@needs_data
def test_empty_streams_yield_nothing(fmt: XdfFormat) -> None:
    path = DATA / "empty_streams.xdf"
    for stream in fmt.describe(path).values():
        if stream.name.startswith("Empty"):
            assert list(fmt.blocks(path, stream, 4096)) == []


@needs_data
def test_stream_found_by_id_without_attrs(fmt: XdfFormat) -> None:
    path = DATA / "minimal.xdf"
    described = fmt.describe(path)["SendDataString"]
    plain = Stream(id="SendDataString", fields=described.fields)
    _, _, values = _read_all(fmt, path, plain)
    assert values[1:5, 0].tolist() == ["Hello", "World", "from", "LSL"]
    with pytest.raises(DataError, match="no stream 'nope'"):
        list(fmt.blocks(path, replace(plain, id="nope"), 4096))
    with pytest.raises(DataError, match="xdf_stream_id 5"):
        list(fmt.blocks(path, replace(plain, attrs={"xdf_stream_id": 5}), 4096))


@needs_data
def test_xdfz_reads_like_xdf(fmt: XdfFormat, tmp_path: Path) -> None:
    packed = tmp_path / "minimal.xdfz"
    packed.write_bytes(gzip.compress((DATA / "minimal.xdf").read_bytes()))
    streams = fmt.describe(packed)
    assert list(streams) == ["SendDataC", "SendDataString"]
    _, _, values = _read_all(fmt, packed, streams["SendDataC"])
    assert values[0].tolist() == [192, 255, 238]


def test_python_warnings_are_logged_not_raised(
    fmt: XdfFormat, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two samples of a regular stream at the same instant: pyxdf's effective-rate
    # arithmetic divides by zero (a numpy RuntimeWarning; pytest turns warnings into errors).
    path = _write(
        tmp_path / "same_time.xdf",
        _header(1, "S", "float32", 1, 100),
        _samples(1, [1.0, 1.0], [[1.0], [2.0]], "float32"),
    )
    with caplog.at_level(logging.WARNING, logger=xdf_module.__name__):
        _, _, values = _read_all(fmt, path, fmt.describe(path)["S"])
    # pyxdf releases disagree on the order they leave two same-instant samples in
    # (1.17.5 dejitters them into descending time, which the reader then sorts).
    assert sorted(values[:, 0].tolist()) == [1.0, 2.0]
    # Older pyxdf warns through numpy (a RuntimeWarning, logged by the reader); 1.17.5
    # computes the rate without dividing by zero and logs it itself. Either way the
    # reader survives pytest's warnings-as-errors and the degenerate stream is reported.
    messages = [r.getMessage() for r in caplog.records]
    assert any("RuntimeWarning" in m or "effective sampling rate" in m for m in messages)


def test_out_of_order_samples_are_sorted_stably() -> None:
    timestamps = np.array([1.0, 3.0, 2.0, 2.0])
    values = np.array([["a"], ["b"], ["c"], ["d"]])
    t, v = xdf_module._in_time_order(timestamps, values, Path("x.xdf"), 1)
    assert t.tolist() == [1.0, 2.0, 2.0, 3.0]
    assert v[:, 0].tolist() == ["a", "c", "d", "b"]


# -- broken files --------------------------------------------------------------------------


def test_text_file_is_a_data_error(fmt: XdfFormat, tmp_path: Path) -> None:
    path = tmp_path / "notes.xdf"
    path.write_text("hello\nthis is not XDF\n")
    with pytest.raises(DataError, match=re.escape(str(path))):
        fmt.describe(path)
    with pytest.raises(DataError, match="not an XDF file"):
        list(fmt.blocks(path, Stream(id="x"), 4096))


def test_missing_and_empty_files_are_data_errors(fmt: XdfFormat, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot open"):
        fmt.describe(tmp_path / "gone.xdf")
    (tmp_path / "magic.xdf").write_bytes(b"XDF:")
    with pytest.raises(DataError, match="no chunks"):
        fmt.describe(tmp_path / "magic.xdf")


@needs_data
def test_file_cut_in_a_stream_header_is_a_data_error(fmt: XdfFormat, tmp_path: Path) -> None:
    path = tmp_path / "cut.xdf"
    path.write_bytes((DATA / "minimal.xdf").read_bytes()[:100])
    with pytest.raises(DataError, match=re.escape(str(path))):
        fmt.describe(path)


@needs_data
def test_file_cut_in_its_samples_replays_then_raises(fmt: XdfFormat, tmp_path: Path) -> None:
    path = tmp_path / "cut.xdf"
    shutil.copyfile(DATA / "minimal.xdf", path)
    path.write_bytes(path.read_bytes()[:1000])
    streams = fmt.describe(path)  # the headers are whole: the streams are listed
    assert list(streams) == ["SendDataC", "SendDataString"]
    got = []
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*cut short"):
        for block in fmt.blocks(path, streams["SendDataC"], 4096):
            got.append(block)
    recovered = pyxdf.load_xdf(str(path), **LOAD_OPTIONS)[0][0]["time_stamps"]
    assert sum(len(b[0]) for b in got) == len(recovered) > 0
