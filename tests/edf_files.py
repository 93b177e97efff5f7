"""Real EDF/BDF files written with pyedflib's writer, and what pyedflib reads back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyedflib

START = datetime(2024, 1, 2, 3, 4, 5)
START_EPOCH = START.replace(tzinfo=UTC).timestamp()
SECONDS = 10
EDF_RANGE = (-32768, 32767)
BDF_RANGE = (-8388608, 8388607)

# (label, unit, rate, physical min, physical max)
SIGNALS = [
    ("Fp1", "uV", 256, -100.0, 100.0),
    ("Fp2", "uV", 256, -100.0, 100.0),
    ("Resp", "mV", 64, -5.0, 5.0),
]


def _physical(rate: int, number: int) -> np.ndarray:
    """A sine, a ramp and a cosine: distinct known shapes inside each physical range."""
    t = np.arange(SECONDS * rate) / rate
    if number == 0:
        return 50.0 * np.sin(2 * np.pi * t)
    if number == 1:
        return np.linspace(-90.0, 90.0, len(t))
    return 4.0 * np.cos(2 * np.pi * 0.25 * t)


def _header(
    label: str,
    rate: float,
    digital: tuple[int, int],
    physical: tuple[float, float] = (-1.0, 1.0),
    unit: str = "",
) -> dict[str, object]:
    """A pyedflib signal header."""
    return {
        "label": label,
        "dimension": unit,
        "sample_frequency": rate,
        "physical_min": physical[0],
        "physical_max": physical[1],
        "digital_min": digital[0],
        "digital_max": digital[1],
    }


def write_file(
    path: Path,
    file_type: int,
    signals: list[tuple[str, str, int, float, float]] = SIGNALS,
    annotations: list[tuple[float, float, str]] = (),
    start: datetime = START,
) -> Path:
    """Write a real EDF/EDF+/BDF/BDF+ file with pyedflib's writer."""
    digital = (
        BDF_RANGE if file_type in (pyedflib.FILETYPE_BDF, pyedflib.FILETYPE_BDFPLUS) else EDF_RANGE
    )
    writer = pyedflib.EdfWriter(str(path), len(signals), file_type=file_type)
    try:
        writer.setSignalHeaders(
            [
                _header(label, rate, digital, physical=(pmin, pmax), unit=unit)
                for label, unit, rate, pmin, pmax in signals
            ]
        )
        writer.setPatientName("Jane")
        writer.setEquipment("amp01")
        writer.setStartdatetime(start)
        writer.writeSamples([_physical(s[2], i) for i, s in enumerate(signals)])
        for onset, duration, text in annotations:
            writer.writeAnnotation(onset, duration, text)
    finally:
        writer.close()
    return path


def reference(path: Path, channels: list[int]) -> np.ndarray:
    """What pyedflib itself reads: physical values, (n, channels)."""
    with pyedflib.EdfReader(str(path)) as reader:
        return np.column_stack([reader.readSignal(c) for c in channels])
