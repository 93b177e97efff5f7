"""EDF/BDF recordings: streams described from real files, blocks equal to pyedflib's reading."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pyedflib = pytest.importorskip("pyedflib")

from edf_files import (  # noqa: E402
    BDF_RANGE,
    EDF_RANGE,
    SECONDS,
    START,
    START_EPOCH,
    _header,
    _physical,
    reference,
    write_file,
)

from streaminghub_datamux.drivers.edf import EdfFormat, _field_ids  # noqa: E402
from streaminghub_datamux.drivers.formats import format_for_path, get_format  # noqa: E402
from streaminghub_datamux.errors import DataError  # noqa: E402
from streaminghub_datamux.model import Field, Stream  # noqa: E402


def read_all(path: Path, stream: Stream, block_bytes: int = 1 << 20) -> tuple[list, list]:
    blocks = list(EdfFormat().blocks(path, stream, block_bytes))
    return [b[0] for b in blocks], [b[1] for b in blocks]


@pytest.fixture
def edf(tmp_path: Path) -> Path:
    return write_file(tmp_path / "rec.edf", pyedflib.FILETYPE_EDF)


@pytest.fixture
def edf_plus(tmp_path: Path) -> Path:
    notes = [(2.5, 1.0, "blink"), (1.0, -1, "start"), (7.25, 0.5, "end é")]
    return write_file(tmp_path / "plus.edf", pyedflib.FILETYPE_EDFPLUS, annotations=notes)


# -- describe ------------------------------------------------------------------------------


def test_registry_maps_edf_and_bdf_to_one_self_describing_format() -> None:
    assert isinstance(get_format("edf"), EdfFormat) and isinstance(get_format("bdf"), EdfFormat)
    assert isinstance(format_for_path(Path("a/x.BDF")), EdfFormat)
    assert EdfFormat.self_describing and EdfFormat.extensions == (".edf", ".bdf")


def test_describe_groups_signals_by_rate(edf: Path) -> None:
    streams = EdfFormat().describe(edf)
    assert list(streams) == ["signals_256hz", "signals_64hz"]
    fast, slow = streams["signals_256hz"], streams["signals_64hz"]
    assert fast.channels == ["Fp1", "Fp2"] and slow.channels == ["Resp"]
    assert (fast.frequency, slow.frequency) == (256.0, 64.0)
    assert [f.unit for f in fast.fields.values()] == ["uV", "uV"]
    assert slow.fields["Resp"].unit == "mV" and fast.unit == "uV"
    assert {f.dtype for s in streams.values() for f in s.fields.values()} == {"f64"}
    assert fast.dtype == np.float64
    index = fast.index["t"]
    assert (index.dtype, index.unit) == ("f64", "s")
    assert fast.attrs["format"] == "edf"
    assert fast.attrs["startdate"] == "2024-01-02T03:04:05"
    assert "Jane" in fast.attrs["patient"]
    assert "annotations" not in streams


def test_describe_edf_plus_adds_annotation_stream(edf_plus: Path) -> None:
    streams = EdfFormat().describe(edf_plus)
    assert list(streams) == ["signals_256hz", "signals_64hz", "annotations"]
    notes = streams["annotations"]
    assert notes.frequency == 0 and notes.channels == ["text"]
    assert notes.fields["text"].dtype == "str" and notes.dtype.kind == "U"
    # EDF+ identification subfields, "X" (unknown) left out; no annotation signal leaks in.
    assert streams["signals_64hz"].attrs["patient"] == "Jane"
    assert streams["signals_64hz"].attrs["recording"] == "amp01"
    assert all("Annotations" not in s.channels for s in streams.values())


def test_edf_plus_without_annotations_has_no_annotation_stream(tmp_path: Path) -> None:
    path = write_file(tmp_path / "quiet.edf", pyedflib.FILETYPE_EDFPLUS)
    assert list(EdfFormat().describe(path)) == ["signals_256hz", "signals_64hz"]


def test_one_rate_is_one_signals_stream_with_safe_unique_ids(tmp_path: Path) -> None:
    signals = [
        ("EEG Fp1", "uV", 128, -100.0, 100.0),
        ("EEG Fp1", "uV", 128, -100.0, 100.0),
        ("ECG/II", "mV", 128, -5.0, 5.0),
    ]
    streams = EdfFormat().describe(write_file(tmp_path / "r.edf", 0, signals=signals))
    assert list(streams) == ["signals"]
    stream = streams["signals"]
    assert stream.channels == ["EEG_Fp1", "EEG_Fp1_2", "ECG_II"]
    assert [f.name for f in stream.fields.values()] == ["EEG Fp1", "EEG Fp1", "ECG/II"]
    assert stream.unit == ""  # mixed units


def test_field_ids_are_valid_ids() -> None:
    ids = _field_ids(["", "-x", "a b", "a_b", "a b", "ü" * 80])
    assert ids == ["ch0", "x", "a_b", "a_b_2", "a_b_3", "_"]
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", i) for i in ids)


def test_fractional_rates_give_compact_ids(tmp_path: Path) -> None:
    path = tmp_path / "slow.edf"
    writer = pyedflib.EdfWriter(str(path), 2, file_type=pyedflib.FILETYPE_EDF)
    try:
        writer.setSignalHeaders([_header("slow", 0.5, EDF_RANGE), _header("fast", 4, EDF_RANGE)])
        writer.writeSamples([np.zeros(5), np.zeros(40)])
    finally:
        writer.close()
    streams = EdfFormat().describe(path)
    assert sorted(streams) == ["signals_0p5hz", "signals_4hz"]
    assert streams["signals_0p5hz"].frequency == 0.5


def test_latin1_annotation_is_read_without_warnings(tmp_path: Path) -> None:
    # pyedflib's readAnnotations() would warn here (pytest turns warnings into errors).
    path = tmp_path / "old.edf"
    writer = pyedflib.EdfWriter(str(path), 1, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setSignalHeaders([_header("x", 8, EDF_RANGE)])
        writer.writeSamples([np.zeros(16)])
        writer.writeAnnotation(1.0, -1, "cafe")
    finally:
        writer.close()
    # Old software wrote Latin-1; pyedflib's writer cannot, so patch the byte in place.
    path.write_bytes(path.read_bytes().replace(b"cafe\x14", b"caf\xe9\x14"))
    stream = EdfFormat().describe(path)["annotations"]
    texts = np.concatenate(read_all(path, stream)[1])
    assert texts[:, 0].tolist() == ["café"]


def test_discontinuous_file_is_a_data_error(edf_plus: Path) -> None:
    data = edf_plus.read_bytes()
    assert data[192:197] == b"EDF+C"
    edf_plus.write_bytes(data[:192] + b"EDF+D" + data[197:])
    with pytest.raises(DataError, match="discontinuous"):
        EdfFormat().describe(edf_plus)


# -- blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("file_type", [pyedflib.FILETYPE_EDF, pyedflib.FILETYPE_EDFPLUS])
def test_blocks_equal_pyedflib_values_and_start_plus_i_over_rate(
    tmp_path: Path, file_type: int
) -> None:
    path = write_file(tmp_path / "rec.edf", file_type)
    streams = EdfFormat().describe(path)
    for stream_id, channels, rate in [("signals_256hz", [0, 1], 256), ("signals_64hz", [2], 64)]:
        times, values = read_all(path, streams[stream_id])
        timestamps, table = np.concatenate(times), np.concatenate(values)
        assert table.dtype == np.float64 and table.shape == (SECONDS * rate, len(channels))
        np.testing.assert_array_equal(table, reference(path, channels))
        expected = START_EPOCH + np.arange(SECONDS * rate) / rate
        np.testing.assert_array_equal(timestamps, expected)
    # The values are the written shapes, within the 16-bit resolution of +/-100 uV.
    ramp = np.concatenate(read_all(path, streams["signals_256hz"])[1])[:, 1]
    np.testing.assert_allclose(ramp, _physical(256, 1), atol=200 / 65535)


def test_small_block_bytes_give_several_blocks_that_concatenate(edf: Path) -> None:
    stream = EdfFormat().describe(edf)["signals_256hz"]
    whole_t, whole_v = read_all(edf, stream)
    times, values = read_all(edf, stream, block_bytes=24 * 100)  # 100 rows of 3 float64
    assert len(whole_t) == 1 and len(times) == 26
    assert {len(t) for t in times[:-1]} == {100} and len(times[-1]) == 2560 - 2500
    np.testing.assert_array_equal(np.concatenate(times), whole_t[0])
    np.testing.assert_array_equal(np.concatenate(values), whole_v[0])
    assert all(v.shape[1] == 2 for v in values)


def test_blocks_follow_the_stream_fields_and_dtype(edf: Path) -> None:
    stream = EdfFormat().describe(edf)["signals_256hz"]
    only_fp2 = replace(stream, fields={"Fp2": Field("Fp2", dtype="f32")})
    table = np.concatenate(read_all(edf, only_fp2)[1])
    assert table.dtype == np.float32 and table.shape == (2560, 1)
    np.testing.assert_array_equal(table, reference(edf, [1]).astype(np.float32))


def test_annotations_in_onset_order_with_texts(edf_plus: Path) -> None:
    stream = EdfFormat().describe(edf_plus)["annotations"]
    times, values = read_all(edf_plus, stream)
    timestamps, texts = np.concatenate(times), np.concatenate(values)
    np.testing.assert_allclose(timestamps, START_EPOCH + np.array([1.0, 2.5, 7.25]), atol=1e-6)
    assert texts.shape == (3, 1) and texts.dtype.kind == "U"
    assert texts[:, 0].tolist() == ["start", "blink", "end é"]
    # One row per block when the budget is tiny.
    assert len(read_all(edf_plus, stream, block_bytes=1)[0]) == 3


def test_subsecond_start_is_shared_by_samples_and_annotations(tmp_path: Path) -> None:
    start = START.replace(microsecond=9000)
    path = write_file(
        tmp_path / "sub.edf", pyedflib.FILETYPE_EDFPLUS, annotations=[(1.0, -1, "x")], start=start
    )
    # The first time-keeping TAL holds the record start relative to the header's clock.
    offset = float(re.search(rb"\+(\d+(?:\.\d+)?)\x14\x14", path.read_bytes()).group(1))
    assert offset > 0
    streams = EdfFormat().describe(path)
    times = np.concatenate(read_all(path, streams["signals_256hz"])[0])
    notes = np.concatenate(read_all(path, streams["annotations"])[0])
    assert times[0] == pytest.approx(START_EPOCH + offset, abs=1e-6)
    assert notes[0] == pytest.approx(times[0] + 1.0, abs=1e-6)
    assert streams["signals_256hz"].attrs["startdate"].startswith("2024-01-02T03:04:05.")


def test_bdf_keeps_24_bit_values(tmp_path: Path) -> None:
    path = tmp_path / "rec.bdf"
    levels = np.array([-8388608, -8388607, -65536, -1, 0, 1, 40000, 8388606, 8388607])
    digital = np.resize(levels, 2 * 256).astype(np.int32)
    writer = pyedflib.EdfWriter(str(path), 1, file_type=pyedflib.FILETYPE_BDFPLUS)
    try:
        # Physical range = digital range: physical values are the 24-bit integers.
        writer.setSignalHeaders([_header("EXG1", 256, BDF_RANGE, physical=BDF_RANGE)])
        writer.writeSamples([digital], digital=True)
        writer.writeAnnotation(0.5, -1, "go")
    finally:
        writer.close()
    streams = EdfFormat().describe(path)
    assert list(streams) == ["signals", "annotations"]
    assert streams["signals"].attrs["format"] == "bdf"
    table = np.concatenate(read_all(path, streams["signals"], block_bytes=16 * 50)[1])
    np.testing.assert_array_equal(table[:, 0], digital.astype(np.float64))
    np.testing.assert_array_equal(table, reference(path, [0]))


def test_reader_is_closed_when_the_consumer_stops_early(edf: Path) -> None:
    from pyedflib._extensions._pyedflib import get_number_of_open_files

    stream = EdfFormat().describe(edf)["signals_256hz"]
    before = get_number_of_open_files()
    blocks = EdfFormat().blocks(edf, stream, 1000)
    next(blocks)
    assert get_number_of_open_files() == before + 1
    blocks.close()
    assert get_number_of_open_files() == before


# -- errors --------------------------------------------------------------------------------


def _broken_files(tmp_path: Path, edf: Path) -> list[Path]:
    truncated = tmp_path / "truncated.edf"
    truncated.write_bytes(edf.read_bytes()[:-100])
    text = tmp_path / "notes.edf"
    text.write_text("time,value\n0,1\n")
    header_only = tmp_path / "header.bdf"
    header_only.write_bytes(edf.read_bytes()[:200])
    return [truncated, text, header_only, tmp_path / "missing.edf"]


def test_broken_files_are_data_errors_naming_the_file(tmp_path: Path, edf: Path) -> None:
    stream = EdfFormat().describe(edf)["signals_256hz"]
    for path in _broken_files(tmp_path, edf):
        with pytest.raises(DataError) as described:
            EdfFormat().describe(path)
        assert described.value.file == str(path) and str(path) in str(described.value)
        with pytest.raises(DataError, match=re.escape(str(path))):
            next(EdfFormat().blocks(path, stream, 1 << 20))
    with pytest.raises(DataError, match="Filesize"):  # pyedflib's reason is kept
        EdfFormat().describe(tmp_path / "truncated.edf")


def test_unknown_stream_or_channel_is_a_data_error(edf: Path) -> None:
    stream = EdfFormat().describe(edf)["signals_256hz"]
    with pytest.raises(DataError, match="signals_64hz"):
        next(EdfFormat().blocks(edf, replace(stream, id="signals"), 1 << 20))
    with pytest.raises(DataError, match="Cz"):
        next(EdfFormat().blocks(edf, replace(stream, fields={"Cz": Field("Cz")}), 1 << 20))
