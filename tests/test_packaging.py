"""Packaging: every sub-package is shipped, and the public names are what __all__ says."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import streaminghub_datamux as dm

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


@pytest.mark.skipif(not PYPROJECT.exists(), reason="runs from a source checkout")
def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_public_names_match_all():
    public = {name for name in vars(dm) if not name.startswith("_")}
    modules = {
        "api",
        "catalog",
        "config",
        "config_schema",
        "dfds",
        "framing",
        "model",
        "tasks",
        "drivers",
        "cli",
        "recording",
        "agent",
        "client",
        "codec",
        "mqttio",
        "brokerprobe",
        "mqttvalues",
        "mqttnet",
        "preciseloop",
        "protocol",
        "dirs",
        "host",
        "sample",
        "paging",
        "clocks",
        "lslout",
        "interface",
        "methods",
        "wire",
        "channel",
        "checks",
        "sampleclock",
    }
    assert set(dm.__all__) - {"__version__"} == public - modules
    assert dm.util.END_OF_STREAM is dm.END_OF_STREAM


def test_subpackages_import_under_the_public_name():
    import streaminghub_datamux.agent
    import streaminghub_datamux.cli
    import streaminghub_datamux.client
    import streaminghub_datamux.drivers.simulate as simulate

    assert simulate.SimDriver.name == "sim"
    assert streaminghub_datamux.cli.main is not None
    assert streaminghub_datamux.agent.__all__ == ["Agent"]
    assert streaminghub_datamux.client.RemoteAPI is dm.RemoteAPI


@pytest.mark.skipif(not PYPROJECT.exists(), reason="runs from a source checkout")
def test_python_m_runs_in_the_checkout_root_whatever_is_installed():
    """The checkout's folder shadows an installed package there; it must work on its own.

    A regular (non-editable) install is what this simulates: the editable finder, which
    maps agent/, client/ and drivers/ into the package, is taken away.
    """
    code = (
        "import runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"
        "sys.path.insert(0, '')\n"
        "sys.argv = ['datamux', 'ls', 'demo']\n"
        "runpy.run_module('streaminghub_datamux', run_name='__main__', alter_sys=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["STREAMINGHUB_DRIVERS__ENABLED"] = "sim"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "streams:"
