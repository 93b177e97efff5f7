"""Upstream DataMux's five example collections, with recordings in upstream's layout.

The collection files are copied unchanged from ``../shared/data/dfds-upstream/``; the
recordings are written as upstream keeps them (SOURCE.md there): CSV and Parquet files
under ``data_dir/<collection "name">/``, HDF5 datasets in ``data_dir/<name>/data.h5``,
every stream's columns in one table, index units left for the reader to infer.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

UPSTREAM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dfds-upstream"
if not UPSTREAM.is_dir():  # a worktree beside the shared folder, or the main checkout
    UPSTREAM = Path("/work/shared/data/dfds-upstream")

COLLECTIONS = ("adhd_sin", "battleship_gaze", "n_back", "pg_weather", "tdbrain")

# The recordings written for each collection: the placeholders' values.
RECORDINGS: dict[str, list[dict[str, str]]] = {
    "adhd_sin": [
        {"participant": "003", "noise": "0", "question": "1"},
        {"participant": "047", "noise": "25", "question": "18"},
    ],
    "battleship_gaze": [{"session": "1"}, {"session": "3"}],
    "n_back": [
        {"subject": "1", "mode": "baseline", "task": "1", "position": "top_left"},
        {"subject": "12", "mode": "task", "task": "2", "position": "center"},
    ],
    "pg_weather": [
        {"state": "new york", "city": "manhattan"},
        {"state": "texas", "city": "el paso"},
    ],
    "tdbrain": [
        {"subject": "19681349", "session": "1", "task": "restEO"},
        {"subject": "19686324", "session": "2", "task": "restEC"},
    ],
}
# Seconds per index unit each collection's files use (inferred from the frequency).
UNITS = {"adhd_sin": 1e-3, "battleship_gaze": 1e-6, "n_back": 1e-3, "pg_weather": 1.0}
UNITS["tdbrain"] = 1e-9


@dataclass
class Expected:
    """What one stream of one recording must replay as."""

    timestamps: np.ndarray  # float64 seconds, as the reader computes them
    values: np.ndarray  # (n, channels) in the stream's dtype


def metadata(collection_id: str) -> dict[str, Any]:
    return json.loads((UPSTREAM / f"{collection_id}.collection.json").read_text())


def copy_collections(meta_dir: Path) -> None:
    for collection_id in COLLECTIONS:
        name = f"{collection_id}.collection.json"
        shutil.copyfile(UPSTREAM / name, meta_dir / name)


def _template(meta: dict[str, Any]) -> str:
    return meta["pattern"].split("://", 1)[1]


def _columns(meta: dict[str, Any], streams: list[str], n: int, seed: int) -> dict[str, Any]:
    """Random values for every field of ``streams``, in each field's dtype."""
    rng = np.random.default_rng(seed)
    columns: dict[str, Any] = {}
    for stream_id in streams:
        for field_id, field in meta["streams"][stream_id]["fields"].items():
            if field_id in columns:
                continue
            dtype = {"f32": np.float32, "i32": np.int32, "i8": np.int8}[field["dtype"]]
            if np.dtype(dtype).kind == "i":
                columns[field_id] = rng.integers(-100, 100, n).astype(dtype)
            else:
                columns[field_id] = (rng.standard_normal(n) * 100).astype(dtype)
    return columns


def _expected(meta, stream_id, index_raw, columns, unit) -> Expected:
    from streaminghub_datamux.model import Stream

    stream = Stream.from_dict(stream_id, meta["streams"][stream_id])
    fields = list(meta["streams"][stream_id]["fields"])
    values = np.column_stack([columns[f] for f in fields]).astype(stream.dtype)
    raw = np.asarray(index_raw, dtype=np.float64)
    # Seconds as the closest float: 1001 ms is 1001 / 1e3, not 1001 * 1e-3 (one ulp off).
    return Expected(raw if unit == 1.0 else raw / round(1 / unit), values)


def _write_csv(path: Path, index_name: str, index_text: list[str], columns) -> dict[str, Any]:
    """Write a CSV as upstream's tools do; returns the columns as a reader parses them.

    Each value is the shortest text of its own dtype (float32 values as float32 text).
    Like upstream (pandas), a reader parses the text as float64 and casts it to the
    stream's dtype: exact for float32 streams, float64 parses for mixed ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [index_name, *columns]
    texts = {k: np.asarray(c).astype(str).tolist() for k, c in columns.items()}
    rows = [",".join(row) for row in zip(index_text, *texts.values(), strict=True)]
    path.write_text(",".join(names) + "\n" + "\n".join(rows) + "\n")
    return {k: np.array(t, dtype=np.float64) for k, t in texts.items()}


def write_recordings(data_dir: Path, n: int = 120) -> dict[tuple[str, str, tuple], Expected]:
    """Write every recording; returns what each (collection, stream, attrs) replays as."""
    expected: dict[tuple[str, str, tuple], Expected] = {}
    for collection_id in COLLECTIONS:
        meta = metadata(collection_id)
        folder = data_dir / meta["name"]
        folder.mkdir(parents=True, exist_ok=True)
        template = _template(meta)
        unit = UNITS[collection_id]
        streams = list(meta["streams"])
        for number, attrs in enumerate(RECORDINGS[collection_id]):
            seed = zlib.crc32(f"{collection_id}/{number}".encode())
            name = template.format(**attrs, stream_name="{stream_name}")
            period = 1.0 / meta["streams"][streams[0]]["frequency"] / unit
            if collection_id == "battleship_gaze":
                # One file per stream: ses-{session}/{stream_name}.csv.
                for stream_id in streams:
                    columns = _columns(meta, [stream_id], n, seed + len(stream_id))
                    raw = np.round(5e6 + np.arange(n) * period)
                    text = [str(int(v)) for v in raw]
                    path = folder / f"{name.format(stream_name=stream_id)}.csv"
                    columns = _write_csv(path, "origin-timestamp", text, columns)
                    key = (collection_id, stream_id, tuple(sorted(attrs.items())))
                    expected[key] = _expected(meta, stream_id, raw, columns, unit)
                continue
            columns = _columns(meta, streams, n, seed)
            index_name = next(iter(meta["streams"][streams[0]]["index"]))
            if collection_id == "adhd_sin":
                raw_text = [f"{v:.3f}" for v in 1000.0 + np.arange(n) * period]
                raw = np.array([float(t) for t in raw_text])
                columns = _write_csv(folder / f"{name}.csv", index_name, raw_text, columns)
            elif collection_id in ("n_back", "pg_weather"):
                index_dtype = np.float32 if collection_id == "n_back" else np.int32
                raw = (np.arange(n) * period + 100).astype(index_dtype)
                fields = [(index_name, raw.dtype)] + [(k, v.dtype) for k, v in columns.items()]
                table = np.empty(n, dtype=fields)
                table[index_name] = raw
                for k, v in columns.items():
                    table[k] = v
                with h5py.File(folder / "data.h5", "a") as handle:
                    handle.create_dataset(name, data=table)
            else:  # tdbrain: one Parquet file per recording, as pandas writes them
                raw = (np.arange(n, dtype=np.int64) * round(period)) + 10**12
                arrays = {index_name: pa.array(raw), **{k: pa.array(v) for k, v in columns.items()}}
                pq.write_table(pa.table(arrays), folder / f"{name}.parquet", row_group_size=50)
            for stream_id in streams:
                key = (collection_id, stream_id, tuple(sorted(attrs.items())))
                expected[key] = _expected(meta, stream_id, raw, columns, unit)
    return expected
