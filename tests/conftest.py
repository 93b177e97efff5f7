"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Mosquitto
from helpers import Workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """An empty data_dir and meta_dir under a temporary folder."""
    return Workspace(tmp_path)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
