"""Notification decoders: the Heart Rate Measurement characteristic, and struct layouts."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from bleak.uuids import normalize_uuid_str

from ..base import Chunk

HEART_RATE_SERVICE = normalize_uuid_str("180d")
HEART_RATE_MEASUREMENT = normalize_uuid_str("2a37")  # 00002a37-0000-1000-8000-00805f9b34fb

# -- the Heart Rate Measurement characteristic ---------------------------------------------


@dataclass(frozen=True)
class HeartRate:
    """One Heart Rate Measurement notification (HRS 1.0, characteristic 0x2A37).

    Attributes:
        bpm: heart rate in beats per minute.
        contact: skin contact detected (True/False), or None if the sensor cannot tell.
        energy_kj: cumulative energy expended in kJ, when the sensor sends it.
        rr_s: RR intervals in seconds, oldest first (there may be none, or several).
    """

    bpm: int
    contact: bool | None = None
    energy_kj: int | None = None
    rr_s: tuple[float, ...] = ()


def _need(data: bytes, end: int, what: str) -> None:
    if len(data) < end:
        raise ValueError(f"heart rate measurement of {len(data)} bytes has no room for {what}")


def parse_heart_rate(data: bytes | bytearray | memoryview) -> HeartRate:
    """Decode a Heart Rate Measurement value.

    The flags byte says what follows, all little-endian: bit 0 the heart rate format
    (uint8 or uint16), bits 1-2 sensor contact (bit 2 supported, bit 1 detected), bit 3
    Energy Expended present (uint16, kJ), bit 4 RR intervals present (any number of
    uint16 in units of 1/1024 s, to the end of the value). Bits 5-7 are reserved and
    ignored, as are bytes after the last field a flag announces (the spec lets later
    versions append fields).

    Raises:
        ValueError: the value is shorter than its flags announce, or its RR intervals
            have an odd number of bytes.
    """
    data = bytes(data)
    _need(data, 1, "the flags")
    flags = data[0]
    if flags & 0x01:
        _need(data, 3, "a 16-bit heart rate")
        bpm, offset = int.from_bytes(data[1:3], "little"), 3
    else:
        _need(data, 2, "an 8-bit heart rate")
        bpm, offset = data[1], 2
    contact = bool(flags & 0x02) if flags & 0x04 else None
    energy = None
    if flags & 0x08:
        _need(data, offset + 2, "the energy expended")
        energy, offset = int.from_bytes(data[offset : offset + 2], "little"), offset + 2
    rr: tuple[float, ...] = ()
    if flags & 0x10:
        rest = data[offset:]
        if len(rest) % 2:
            raise ValueError(f"RR intervals take an even number of bytes, got {len(rest)}")
        rr = tuple(v / 1024.0 for v in struct.unpack(f"<{len(rest) // 2}H", rest))
    return HeartRate(bpm=bpm, contact=contact, energy_kj=energy, rr_s=rr)


def rr_timestamps(rr_s: Iterable[float] | np.ndarray, arrival: float) -> np.ndarray:
    """Timestamps for RR intervals that arrived together at ``arrival``.

    Each interval is stamped with the beat that ends it. The sensor sends an interval
    after its closing beat, so the newest interval ends about when the notification
    arrives and the older ones end earlier, by the intervals that follow them:
    ``[a, b, c]`` arriving at ``t`` are stamped ``[t - b - c, t - c, t]``.
    """
    rr = np.asarray(rr_s, dtype=np.float64)
    after = rr[::-1].cumsum()[::-1] - rr  # sum of the intervals that follow each one
    return arrival - after


def _decode_hr(data: bytes, arrival: float) -> Chunk:
    measurement = parse_heart_rate(data)
    return np.array([arrival]), np.array([[measurement.bpm]], dtype=np.float32)


def _decode_rr(data: bytes, arrival: float) -> Chunk:
    rr = np.array(parse_heart_rate(data).rr_s, dtype=np.float64)
    return rr_timestamps(rr, arrival), rr.reshape(-1, 1)


# -- custom characteristics ------------------------------------------------------------------


@dataclass(frozen=True)
class StructDecoder:
    """Decodes a notification holding whole samples of a :mod:`struct` layout.

    Attributes:
        layout: the struct format of one sample, with an explicit byte order (``"<hhh"``).
        dtype: the dtype of the decoded values.
        rate: sampling rate in Hz; 0 for irregular.
        scale: one factor per channel (values are ``raw * scale``), or None.
    """

    layout: str
    dtype: np.dtype
    rate: float = 0.0
    scale: tuple[float, ...] | None = None

    def __call__(self, data: bytes, arrival: float) -> Chunk:
        """Samples and their timestamps.

        A regular stream's samples are spaced ``1 / rate`` apart, the last one at
        ``arrival``; an irregular stream's samples all get ``arrival``.

        Raises:
            ValueError: the value is not a whole number of samples.
        """
        size = struct.calcsize(self.layout)
        if not data or len(data) % size:
            raise ValueError(f"{len(data)} bytes are not a whole number of {size}-byte samples")
        raw = np.array(list(struct.iter_unpack(self.layout, data)), dtype=np.float64)
        if self.scale is not None:
            raw *= np.asarray(self.scale)
        n = len(raw)
        if self.rate > 0:
            timestamps = arrival - np.arange(n - 1, -1, -1, dtype=np.float64) / self.rate
        else:
            timestamps = np.full(n, arrival)
        return timestamps, raw.astype(self.dtype)
