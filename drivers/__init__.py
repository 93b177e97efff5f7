"""Drivers: the sources of samples (simulated devices, recordings, and later LSL, serial, BLE)."""

from .base import Chunk, Driver, Source

__all__ = ["Chunk", "Driver", "Source"]
