"""The driver registry: built-ins, third-party drivers through entry points, clear errors."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run

import streaminghub_datamux as dm
from streaminghub_datamux.drivers.registry import available, create_drivers, load_driver
from streaminghub_datamux.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def counter_plugin(tmp_path, monkeypatch):
    """Install examples/counter_driver.py as a real distribution with an entry point."""
    shutil.copy(EXAMPLES / "counter_driver.py", tmp_path / "counter_driver.py")
    info = tmp_path / "counter_driver-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: counter-driver\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        '[streaminghub_datamux.drivers]\ncounter = "counter_driver:CounterDriver"\n'.replace(
            '"', ""
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_builtin_drivers_are_known():
    assert {"sim", "lsl", "serial", "ble"} <= set(available())
    assert load_driver("sim").name == "sim"


def test_unknown_driver_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"drivers\.enabled.*unknown driver 'nope'"):
        create_drivers("sim,nope", {})


def test_third_party_driver_from_an_entry_point(workspace, counter_plugin):
    assert available()["counter"] == "counter_driver:CounterDriver"

    async def body():
        config = workspace.config(
            **{"drivers.enabled": "auto", "drivers.extra": {"counter": {"step": 2}}}
        )
        api = dm.API(config)
        nodes = [n.id for n in await api.list_live_nodes()]
        sink = asyncio.Queue()
        ack = await api.proxy_live_stream("counter-1", "count", {}, sink, framing="low-latency")
        frames = []
        while sum(len(f) for f in frames) < 6:
            frames.append(await sink.get())
        await api.stop_task(ack.randseq)
        return nodes, frames

    nodes, frames = run(body())
    assert "counter-1" in nodes and "demo" in nodes
    values = np.concatenate([f.values[:, 0] for f in frames])
    np.testing.assert_array_equal(values[:6], np.arange(6))
    assert frames[0].channels == ["n"] and values.dtype == np.int32


def test_enabled_list_limits_the_drivers(workspace, counter_plugin):
    async def body():
        api = dm.API(workspace.config(**{"drivers.enabled": "counter"}))
        return [n.id for n in await api.list_live_nodes()]

    assert run(body()) == ["counter-1"]


def test_bad_plugin_options_name_the_key(workspace, counter_plugin):
    with pytest.raises(ConfigError, match=r"drivers\.extra\.counter\.step"):
        dm.API(
            workspace.config(
                **{"drivers.enabled": "counter", "drivers.extra": {"counter": {"step": 0}}}
            )
        )
