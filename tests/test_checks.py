"""The shared option checks: each error names the key that failed and how to fix it."""

from __future__ import annotations

import numpy as np
import pytest

from streaminghub_datamux.checks import config_bool, config_dtype, config_entries
from streaminghub_datamux.errors import ConfigError


def test_config_bool_takes_only_true_or_false():
    assert config_bool({}, "scan", "drivers.x", True, "use true") is True
    assert config_bool({"scan": False}, "scan", "drivers.x", True, "use true") is False
    with pytest.raises(ConfigError, match="expected true or false, got 1") as info:
        config_bool({"scan": 1}, "scan", "drivers.x", True, "use true")
    assert info.value.key == "drivers.x.scan" and info.value.fix == "use true"


def test_config_dtype_reads_names_and_refuses_text_where_numbers_are_needed():
    assert config_dtype({}, "p", "fix") == np.float32
    assert config_dtype({"dtype": "i16"}, "p", "fix") == np.int16
    assert config_dtype({"dtype": "str"}, "p", "fix").kind == "U"
    with pytest.raises(ConfigError, match="not numeric") as info:
        config_dtype({"dtype": "str"}, "p", "use f32", numeric=True)
    assert info.value.key == "p.dtype" and info.value.fix == "use f32"
    with pytest.raises(ConfigError, match="expected a dtype name, got 3"):
        config_dtype({"dtype": 3}, "p", "fix")
    with pytest.raises(ConfigError, match="unknown dtype 'f33'"):
        config_dtype({"dtype": "f33"}, "p", "fix")


def test_config_entries_is_an_object_or_nothing():
    assert config_entries({}, "devices", "drivers.x", "devices", "{}") == {}
    assert config_entries({"devices": None}, "devices", "drivers.x", "devices", "{}") == {}
    entries = {"a": {"port": "/dev/null"}}
    assert config_entries({"devices": entries}, "devices", "drivers.x", "devices", "{}") is entries
    with pytest.raises(ConfigError, match="JSON object of devices, got list") as info:
        config_entries({"devices": []}, "devices", "drivers.x", "devices", '{"a": {}}')
    assert info.value.key == "drivers.x.devices" and info.value.fix == 'write it as {"a": {}}'
