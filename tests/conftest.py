"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """An empty data_dir and meta_dir under a temporary folder."""
    return Workspace(tmp_path)
