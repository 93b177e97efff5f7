"""The sample collection that ``datamux init --example`` writes and every doc example uses.

``n_back``: eye tracking during an n-back task, 2 subjects x 2 tasks, one second each at
100 Hz, in the layout of upstream DataMux: ``<meta_dir>/n_back.collection.json`` whose
``"name"`` is ``n_back`` too, so the recordings folder ``<data_dir>/n_back/`` is the same
whether it is looked up by the collection's id or by its name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SAMPLE_ID", "sample_metadata", "write_sample"]

SAMPLE_ID = "n_back"
_RATE_HZ = 100
_SECONDS = 1
_SUBJECTS = ("1", "2")
_TASKS = ("1", "2")


def sample_metadata() -> dict[str, Any]:
    """The DFDS metadata of the sample collection (what collections.md shows)."""
    index = {"t": {"name": "timestamp", "dtype": "f64", "unit": "s"}}
    return {
        "name": SAMPLE_ID,
        "description": "Eye movements during an n-back task (a small synthetic sample)",
        "keywords": ["n-back", "sample"],
        "authors": [{"name": "streaminghub-datamux", "affiliation": "sample data"}],
        "streams": {
            "gaze": {
                "name": "Gaze",
                "unit": "px",
                "frequency": _RATE_HZ,
                "fields": {
                    "x": {"name": "gaze x", "dtype": "f32"},
                    "y": {"name": "gaze y", "dtype": "f32"},
                },
                "index": index,
            },
            "pupil": {
                "name": "Pupil",
                "unit": "mm",
                "frequency": _RATE_HZ,
                "fields": {"d": {"name": "pupil diameter", "dtype": "f32"}},
                "index": index,
            },
        },
        "groups": {
            "subject": {"description": "participant", "values": list(_SUBJECTS)},
            "task": {"description": "n of the n-back task", "values": list(_TASKS)},
        },
        "pattern": "csv://S{subject}/task{task}",
    }


def _rows(subject: int, task: int) -> list[str]:
    """Deterministic gaze and pupil samples, written with 3 decimals like a tracker's."""
    n = _RATE_HZ * _SECONDS
    t = np.arange(n) / _RATE_HZ
    phase = 2 * np.pi * t * (0.5 + 0.25 * task)
    x = 512 + 200 * np.sin(phase + subject)
    y = 384 + 150 * np.cos(phase + subject)
    d = 3.5 + 0.2 * subject + 0.1 * np.sin(2 * np.pi * t)
    return [f"{a:.2f},{b:.3f},{c:.3f},{e:.3f}" for a, b, c, e in zip(t, x, y, d, strict=True)]


def write_sample(data_dir: Path, meta_dir: Path) -> tuple[list[Path], list[Path]]:
    """Write the sample collection; files that already exist are left as they are.

    Returns:
        The files written, and the files kept because they existed.
    """
    written: list[Path] = []
    kept: list[Path] = []

    def put(path: Path, text: str) -> None:
        if path.exists():
            kept.append(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)

    put(meta_dir / f"{SAMPLE_ID}.collection.json", json.dumps(sample_metadata(), indent=2) + "\n")
    for subject in _SUBJECTS:
        for task in _TASKS:
            lines = ["t,x,y,d", *_rows(int(subject), int(task))]
            put(data_dir / SAMPLE_ID / f"S{subject}" / f"task{task}.csv", "\n".join(lines) + "\n")
    return written, kept
