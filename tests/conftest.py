"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto
from helpers import SHARED_DATA, Workspace
from remote import remote_api, running_agent

import streaminghub_datamux as dm


def pytest_report_header() -> str:
    """Say up front where the shared test data is, or that tests needing it will skip."""
    if SHARED_DATA.is_dir():
        return f"shared test data: {SHARED_DATA}"
    return (
        f"shared test data: NOT FOUND at {SHARED_DATA}; the tests that need it will skip "
        "(put the 'shared' folder beside this checkout, or set DATAMUX_TEST_DATA)"
    )


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


@pytest.fixture(params=["local", "remote-cbor"])
def api_kind(request: pytest.FixtureRequest) -> str:
    """Which API a ``serve`` test runs against (a test may parametrize it further)."""
    return request.param


@pytest.fixture
def serve(request: pytest.FixtureRequest, api_kind: str, tmp_path: Path) -> Any:
    """``async with serve(api) as client``: ``api`` itself, or a RemoteAPI serving it.

    The agent runs on the test's own loop over a real mosquitto, so its drivers talk to
    the test's outlets, ptys or fakes, and the test can still look at them.
    """
    broker = None if api_kind == "local" else request.getfixturevalue("mosquitto")

    @contextlib.asynccontextmanager
    async def through(api: dm.API) -> AsyncIterator[Any]:
        if broker is None:
            async with api:
                yield api
            return
        codec = api_kind.removeprefix("remote-")
        async with (
            api,  # closed by the agent already, unless it never started
            running_agent(api.config, broker, tmp_path / "state", api=api),
            remote_api(api.config, broker, codec=codec) as client,
        ):
            yield client

    return through
