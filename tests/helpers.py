"""Helpers for tests: bounded async runs, real DFDS collections in temporary folders."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from streaminghub_datamux.config import load_config

T = TypeVar("T")

# Read-only data the tests share (the XDF maintainers' examples, upstream DFDS metadata):
# the folder shared/data beside this checkout, or wherever DATAMUX_TEST_DATA points.
SHARED_DATA = Path(
    os.environ.get("DATAMUX_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def needs_shared(subfolder: str) -> pytest.MarkDecorator:
    """Skip a test, saying where the data should be, when ``SHARED_DATA/subfolder`` is missing."""
    path = SHARED_DATA / subfolder
    return pytest.mark.skipif(
        not path.is_dir(),
        reason=f"shared test data not found at {path}: put the 'shared' folder beside this "
        f"checkout (../shared/data/{subfolder}) or set DATAMUX_TEST_DATA to its data folder",
    )


# Every async test body runs under this bound, so a bug never hangs the suite.
TEST_TIMEOUT_S = 30.0


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT_S) -> T:
    """Run one async test body with a hard time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def write_csv(path: Path, header: list[str], rows: np.ndarray, fmt: str = "%.17g") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        handle.write(",".join(header) + "\n")
        np.savetxt(handle, rows, delimiter=",", fmt=fmt)


def gaze_collection(frequency: float = 100.0, index_unit: str | None = "s") -> dict[str, Any]:
    index: dict[str, Any] = {"name": "timestamp", "dtype": "f64"}
    if index_unit:
        index["unit"] = index_unit
    return {
        "name": "Gaze study",
        "description": "eye movements",
        "keywords": ["gaze"],
        "authors": [{"name": "A. Researcher"}],
        "streams": {
            "gaze": {
                "name": "Gaze",
                "unit": "px",
                "frequency": frequency,
                "fields": {
                    "x": {"name": "gaze x", "dtype": "f32"},
                    "y": {"name": "gaze y", "dtype": "f32"},
                },
                "index": {"t": index},
            },
            "pupil": {
                "name": "Pupil",
                "unit": "mm",
                "frequency": frequency,
                "fields": {"d": {"name": "diameter", "dtype": "f64"}},
                "index": {"t": index},
            },
        },
        "groups": {
            "subject": {"values": ["A", "B"]},
            "session": {"values": ["1", "2"]},
        },
        "pattern": "csv://{subject}/{session}_gaze",
    }


class Workspace:
    """A data_dir and meta_dir with helpers to add collections and recordings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.meta_dir = root / "meta"
        self.data_dir.mkdir()
        self.meta_dir.mkdir()

    def add_collection(self, collection_id: str, metadata: dict[str, Any]) -> Path:
        path = self.meta_dir / f"{collection_id}.collection.json"
        path.write_text(json.dumps(metadata, indent=2))
        return path

    def add_gaze_recording(
        self,
        subject: str,
        session: str,
        n: int = 1000,
        frequency: float = 100.0,
        t0: float = 10.0,
        collection_id: str = "study",
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(hash((subject, session)) % 2**32)
        timestamps = t0 + np.arange(n) / frequency
        values = rng.standard_normal((n, 3)).astype(np.float32)
        rows = np.column_stack([timestamps, values.astype(np.float64)])
        path = self.data_dir / collection_id / subject / f"{session}_gaze.csv"
        write_csv(path, ["t", "x", "y", "d"], rows)
        return timestamps, values

    def config(self, **extra: Any):
        # Only the simulator unless a test asks for more: no LSL discovery wait, no ports.
        flags = {
            "data_dir": str(self.data_dir),
            "meta_dir": str(self.meta_dir),
            "drivers.enabled": "sim",
            **extra,
        }
        return load_config(
            flags=flags, env={}, cwd=self.root, home=self.root, system_rc=self.root / "none"
        )


async def drain(sink: asyncio.Queue[Any], limit: int = 1_000_000) -> list[Any]:
    """Every item up to and including END_OF_STREAM (bounded in count)."""
    from streaminghub_datamux import END_OF_STREAM

    items = []
    for _ in range(limit):
        item = await sink.get()
        items.append(item)
        if item is END_OF_STREAM:
            return items
    raise AssertionError(f"no END_OF_STREAM within {limit} items")


def frames_of(items: list[Any]) -> list[Any]:
    from streaminghub_datamux import Frame

    return [i for i in items if isinstance(i, Frame)]


async def collect(sink: asyncio.Queue[Any], samples: int, timeout: float = 10.0) -> list[Any]:
    """Items until ``samples`` samples have arrived in frames."""
    items: list[Any] = []
    async with asyncio.timeout(timeout):
        while sum(len(f) for f in frames_of(items)) < samples:
            items.append(await sink.get())
    return items
