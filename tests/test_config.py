"""Config layers, rc formats, error messages, and the init/config commands."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from streaminghub_datamux import config as config_module
from streaminghub_datamux.cli.setup_cmds import register
from streaminghub_datamux.config import (
    SCHEMA,
    describe,
    env_name,
    load_config,
    write_user_config,
)
from streaminghub_datamux.errors import ConfigError
from streaminghub_datamux.framing import PRESETS, Framing
from streaminghub_datamux.host import default_agent_id

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An isolated machine: its own HOME, project folder and fleet rc; no STREAMINGHUB_* env."""
    home, proj, etc = tmp_path / "home", tmp_path / "proj", tmp_path / "etc"
    for folder in (home, proj, etc):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(proj)
    monkeypatch.setattr(config_module, "SYSTEM_RC", etc / "streaminghubrc")
    for var in list(os.environ):
        if var.startswith("STREAMINGHUB_"):
            monkeypatch.delenv(var)
    return {"home": home, "proj": proj, "system": etc / "streaminghubrc"}


def load(box: dict[str, Path], **kwargs: Any):
    kwargs.setdefault("env", {})
    return load_config(home=box["home"], cwd=box["proj"], system_rc=box["system"], **kwargs)


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def run(argv: list[str], config_flags: dict[str, Any] | None = None) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.config_flags = config_flags
    return args.handler(args)


# --- layers ---------------------------------------------------------------------------


def test_defaults_when_nothing_is_configured(box):
    config = load(box)
    assert config.data_dir == box["home"] / "streaminghub" / "data"
    assert config.meta_dir == box["home"] / "streaminghub" / "meta"
    assert config.framing == {"preset": "balanced"}
    assert config.simulate == {"nodes": {}}
    assert config.log_level == "INFO"
    assert config.get("framing.max_samples") is None
    assert set(config.sources.values()) == {"default"}


def test_each_layer_overrides_the_one_below(box):
    # A staircase: key i is set by layers 0..i, so layer i must win it.
    home_rc = box["home"] / ".streaminghubrc"
    proj_rc = box["proj"] / ".streaminghubrc"
    system = {"framing": {"max_samples": 1, "preset": "throughput"}, "log_level": "ERROR"}
    write(box["system"], {**system, "meta_dir": "/sys/meta", "data_dir": "/sys/data"})
    user = {"framing": {"preset": "low-latency"}, "log_level": "WARNING"}
    write(home_rc, {**user, "meta_dir": "/user/meta", "data_dir": "/user/data"})
    write(proj_rc, {"log_level": "DEBUG", "meta_dir": "/proj/meta", "data_dir": "/proj/data"})
    env = {"STREAMINGHUB_META_DIR": "/env/meta", "STREAMINGHUB_DATA_DIR": "/env/data"}
    config = load(box, env=env, flags={"data_dir": "/flag/data"})

    assert config.get("framing.max_samples") == 1
    assert config.framing["preset"] == "low-latency"
    assert config.log_level == "DEBUG"
    assert config.meta_dir == Path("/env/meta")
    assert config.data_dir == Path("/flag/data")
    assert config.sources == {
        "framing.max_samples": str(box["system"]),
        "framing.preset": str(home_rc),
        "log_level": str(proj_rc),
        "meta_dir": "env STREAMINGHUB_META_DIR",
        "data_dir": "flag --data_dir",
        "framing.max_latency_ms": "default",
        "simulate.nodes": "default",
        **{
            key: "default"
            for key in SCHEMA
            if key.split(".")[0] in ("drivers", "broker", "agent", "client")
        },
    }


def test_none_flags_are_ignored(box):
    write(box["home"] / ".streaminghubrc", {"data_dir": "/user/data"})
    config = load(box, flags={"data_dir": None, "log_level": None})
    assert config.data_dir == Path("/user/data")
    assert config.sources["log_level"] == "default"


def test_rc_in_home_is_read_once_when_cwd_is_home(box, tmp_path):
    # cwd reaches home through a symlink: still one file, reported as the user rc.
    rc = write(box["home"] / ".streaminghubrc", {"log_level": "DEBUG"})
    (tmp_path / "link").symlink_to(box["home"])
    config = load_config(home=box["home"], cwd=tmp_path / "link", system_rc=box["system"], env={})
    assert config.log_level == "DEBUG"
    assert config.sources["log_level"] == str(rc)


def test_defaults_come_from_os_environ_home_and_cwd(box, monkeypatch):
    write(box["home"] / ".streaminghubrc", {"meta_dir": "/user/meta"})
    write(box["proj"] / ".streaminghubrc", {"log_level": "ERROR"})
    monkeypatch.setenv("STREAMINGHUB_DATA_DIR", "/env/data")
    config = load_config()
    assert (config.data_dir, config.meta_dir, config.log_level) == (
        Path("/env/data"),
        Path("/user/meta"),
        "ERROR",
    )


# --- file formats ---------------------------------------------------------------------


def test_upstream_rc_loads_unchanged(box):
    # Exactly what upstream's `datamux init` wrote with json.dump.
    rc = box["home"] / ".streaminghubrc"
    rc.write_text('{"data_dir": "/srv/eye/data", "meta_dir": "/srv/eye/meta"}')
    config = load(box)
    assert config.data_dir == Path("/srv/eye/data")
    assert config.meta_dir == Path("/srv/eye/meta")
    assert config.sources["data_dir"] == config.sources["meta_dir"] == str(rc)


def test_dotted_keys_at_top_level(box):
    write(
        box["home"] / ".streaminghubrc", {"framing.max_latency_ms": 5, "simulate.nodes": {"a": {}}}
    )
    config = load(box)
    assert config.framing == {"preset": "balanced", "max_latency_ms": 5.0}
    assert config.simulate == {"nodes": {"a": {}}}


def test_toml_rc(box):
    write(
        box["system"],
        """# fleet config
data_dir = "/fleet/data"
log_level = "warning"

[framing]
preset = "throughput"
max_samples = 4096

[simulate.nodes.sim-1]
rate = 128
""",
    )
    config = load(box)
    assert config.data_dir == Path("/fleet/data")
    assert config.log_level == "WARNING"  # choices match case-insensitively
    assert config.framing == {"preset": "throughput", "max_samples": 4096}
    assert config.simulate == {"nodes": {"sim-1": {"rate": 128}}}


def test_null_unsets_an_optional_key_from_a_lower_layer(box):
    write(box["system"], {"framing": {"max_samples": 64}})
    write(box["home"] / ".streaminghubrc", {"framing": {"max_samples": None}})
    config = load(box)
    assert config.framing == {"preset": "balanced"}


def test_config_framing_feeds_framing_coerce(box):
    write(box["home"] / ".streaminghubrc", {"framing": {"preset": "low-latency", "max_samples": 8}})
    framing = Framing.coerce(load(box).framing)
    assert framing == Framing(max_samples=8, max_latency_ms=PRESETS["low-latency"].max_latency_ms)


# --- paths ----------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_files_folder(box):
    write(box["home"] / ".streaminghubrc", {"data_dir": "data"})
    write(box["proj"] / ".streaminghubrc", {"meta_dir": "../shared/meta"})
    config = load(box)
    assert config.data_dir == box["home"] / "data"
    assert config.meta_dir == box["proj"].parent / "shared" / "meta"


def test_relative_paths_in_env_and_flags_resolve_against_cwd(box):
    config = load(box, env={"STREAMINGHUB_DATA_DIR": "d"}, flags={"meta_dir": "m"})
    assert config.data_dir == box["proj"] / "d"
    assert config.meta_dir == box["proj"] / "m"


def test_tilde_and_home_var_expand_to_home(box):
    write(box["system"], {"data_dir": "~/data", "meta_dir": "$HOME/meta"})
    config = load(box)
    assert config.data_dir == box["home"] / "data"
    assert config.meta_dir == box["home"] / "meta"


# --- environment ----------------------------------------------------------------------


def test_env_values_are_parsed_to_the_keys_type(box):
    env = {
        "STREAMINGHUB_FRAMING__MAX_SAMPLES": "64",
        "STREAMINGHUB_FRAMING__MAX_LATENCY_MS": "2.5",
        "STREAMINGHUB_FRAMING__PRESET": "throughput",
        "STREAMINGHUB_SIMULATE__NODES": '{"sim-1": {"rate": 10}}',
        "STREAMINGHUB_LOG_LEVEL": "debug",
    }
    config = load(box, env=env)
    assert config.get("framing.max_samples") == 64
    assert config.get("framing.max_latency_ms") == 2.5
    assert config.framing["preset"] == "throughput"
    assert config.simulate == {"nodes": {"sim-1": {"rate": 10}}}
    assert config.log_level == "DEBUG"
    assert config.sources["framing.max_samples"] == "env STREAMINGHUB_FRAMING__MAX_SAMPLES"


def test_env_name_matches_what_load_reads(box):
    for key in ("data_dir", "framing.max_samples"):
        assert load(box, env={env_name(key): "7"}).sources[key] == f"env {env_name(key)}"


def test_unknown_and_empty_env_vars_are_ignored(box):
    env = {"STREAMINGHUB_NOT_A_KEY": "x", "STREAMINGHUB_DATA_DIR": "", "OTHER": "y"}
    config = load(box, env=env)
    assert set(config.sources.values()) == {"default"}


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("STREAMINGHUB_FRAMING__MAX_SAMPLES", "lots", "an integer"),
        ("STREAMINGHUB_FRAMING__MAX_LATENCY_MS", "soon", "a number"),
        ("STREAMINGHUB_SIMULATE__NODES", "[1, 2]", "an object"),
    ],
)
def test_bad_env_value_names_the_variable(box, var, text, expected):
    with pytest.raises(ConfigError) as info:
        load(box, env={var: text})
    message = str(info.value)
    assert f"env {var}" in message
    assert expected in message
    assert f"{var}=" in info.value.fix  # the fix shows a valid setting


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "bad", "suggested"),
    [
        ({"datadir": "/x"}, "datadir", "data_dir"),
        ({"framing": {"max_sampels": 3}}, "framing.max_sampels", "framing.max_samples"),
        ({"max_samples": 3}, "max_samples", "framing.max_samples"),
    ],
)
def test_unknown_key_names_file_key_and_closest_key(box, data, bad, suggested):
    rc = write(box["home"] / ".streaminghubrc", data)
    with pytest.raises(ConfigError) as info:
        load(box)
    assert info.value.source == str(rc)
    assert info.value.key == bad
    assert f"did you mean {suggested!r}" in info.value.fix
    assert str(rc) in str(info.value)


def test_unknown_flag_is_an_error(box):
    with pytest.raises(ConfigError, match=r"flag --data_dirr.*did you mean 'data_dir'"):
        load(box, flags={"data_dirr": "/x"})


def test_bad_json_reports_line_and_column(box):
    rc = write(box["proj"] / ".streaminghubrc", '{\n  "data_dir": "/x",\n  "meta_dir": "/y",\n}\n')
    with pytest.raises(ConfigError) as info:
        load(box)
    assert info.value.source == str(rc)
    assert "not valid JSON" in str(info.value)
    assert "line 4, column 1" in str(info.value)


def test_bad_toml_names_the_file(box):
    write(box["system"], "data_dir = \n")
    with pytest.raises(ConfigError, match=r"streaminghubrc: not valid TOML.*line 1"):
        load(box)


@pytest.mark.parametrize(
    ("data", "key", "expected", "example"),
    [
        (
            {"framing": {"max_samples": "64"}},
            "framing.max_samples",
            "an integer",
            '"max_samples": 256',
        ),
        ({"framing": {"max_samples": True}}, "framing.max_samples", "an integer", "256"),
        ({"data_dir": 5}, "data_dir", "a path", '{"data_dir": "~/streaminghub/data"}'),
        ({"simulate": {"nodes": ["a"]}}, "simulate.nodes", "an object", '"nodes": {'),
        ({"log_level": None}, "log_level", "null is not allowed", '"log_level": "INFO"'),
        ({"framing": "fast"}, "framing", "is a section", '{"framing": {'),
    ],
)
def test_wrong_type_names_expected_type_and_example(box, data, key, expected, example):
    rc = write(box["home"] / ".streaminghubrc", data)
    with pytest.raises(ConfigError) as info:
        load(box)
    assert (info.value.source, info.value.key) == (str(rc), key)
    assert expected in str(info.value)
    assert example in info.value.fix


def test_wrong_type_in_toml_shows_a_toml_example(box):
    write(box["system"], 'framing.max_latency_ms = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load(box)
    assert "a number" in str(info.value)
    assert info.value.fix == "write it like framing.max_latency_ms = 20.0"


def test_bad_choice_and_out_of_range_values(box):
    write(box["home"] / ".streaminghubrc", {"framing": {"preset": "low-latncy"}})
    with pytest.raises(ConfigError) as info:
        load(box)
    assert "did you mean 'low-latency'" in info.value.fix
    (box["home"] / ".streaminghubrc").unlink()
    with pytest.raises(ConfigError, match="must be greater than 0"):
        load(box, flags={"framing.max_samples": 0})


def test_same_key_twice_in_one_file(box):
    write(
        box["home"] / ".streaminghubrc", {"framing": {"max_samples": 1}, "framing.max_samples": 2}
    )
    with pytest.raises(ConfigError, match="set twice"):
        load(box)


def test_get_unknown_key_suggests(box):
    config = load(box)
    with pytest.raises(KeyError, match="did you mean 'meta_dir'"):
        config.get("metadir")


# --- init -----------------------------------------------------------------------------


def test_write_user_config_round_trips_and_keeps_other_keys(box):
    rc = write(box["home"] / ".streaminghubrc", {"data_dir": "/old", "framing": {"max_samples": 9}})
    path = write_user_config("~/d", "rel/meta", home=box["home"])
    assert path == rc
    written = json.loads(rc.read_text())
    assert written == {
        "data_dir": str(box["home"] / "d"),
        "framing": {"max_samples": 9},
        "meta_dir": str(box["proj"] / "rel" / "meta"),  # relative to where init ran
    }
    assert (box["home"] / "d").is_dir() and (box["proj"] / "rel" / "meta").is_dir()
    config = load(box)
    assert config.data_dir == box["home"] / "d"
    assert config.get("framing.max_samples") == 9
    assert config.sources["meta_dir"] == str(rc)


def test_write_user_config_refuses_a_broken_file_unless_forced(box):
    rc = write(box["home"] / ".streaminghubrc", "{not json")
    with pytest.raises(ConfigError, match="--force"):
        write_user_config("d", "m", home=box["home"])
    assert rc.read_text() == "{not json"
    write_user_config("d", "m", home=box["home"], force=True)
    assert set(json.loads(rc.read_text())) == {"data_dir", "meta_dir"}
    assert (box["home"] / ".streaminghubrc.bak").read_text() == "{not json"


def test_init_command_writes_rc_and_reports_it(box, capsys):
    assert run(["init", "--data-dir", "data", "--meta_dir", "/abs/meta"]) == 0
    rc = box["home"] / ".streaminghubrc"
    assert json.loads(rc.read_text()) == {
        "data_dir": str(box["proj"] / "data"),
        "meta_dir": "/abs/meta",
    }
    out = capsys.readouterr().out
    assert f"Wrote {rc}" in out
    assert f"data_dir = {box['proj'] / 'data'}" in out


def test_init_command_defaults_to_the_default_dirs(box):
    assert run(["init"]) == 0
    written = json.loads((box["home"] / ".streaminghubrc").read_text())
    assert written["data_dir"] == str(box["home"] / "streaminghub" / "data")
    assert (box["home"] / "streaminghub" / "meta").is_dir()


# --- config command -------------------------------------------------------------------


def test_config_command_shows_each_values_source(box, capsys, monkeypatch):
    nodes = {f"node-{i}": {"streams": {}} for i in range(10)}  # too long for one row
    rc = write(box["home"] / ".streaminghubrc", {"meta_dir": "/user/meta", "simulate.nodes": nodes})
    monkeypatch.setenv("STREAMINGHUB_FRAMING__MAX_SAMPLES", "32")
    assert run(["config"], config_flags={"data_dir": "/flag/data"}) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(SCHEMA)
    assert lines["data_dir"].endswith("(flag --data_dir)") and "= /flag/data " in lines["data_dir"]
    assert lines["meta_dir"].endswith(f"({rc})") and "= /user/meta " in lines["meta_dir"]
    assert lines["framing.max_samples"].endswith("(env STREAMINGHUB_FRAMING__MAX_SAMPLES)")
    assert lines["log_level"].endswith("(default)")
    assert '{"node-0": {"streams": {}}' in lines["simulate.nodes"]
    assert re.search(r"\.\.\.\s+\(/", lines["simulate.nodes"])  # cut; the source still shows
    long_path = "/a/very/long/path/that/nobody/wants/to/see/cut/in/the/middle/data"
    assert run(["config"], config_flags={"data_dir": long_path}) == 0
    assert f"= {long_path}  " in capsys.readouterr().out  # paths are never cut
    # Aligned: every "=" and every "(" in the same column.
    assert len({line.index(" = ") for line in lines.values()}) == 1
    assert len({line.rindex("  (") for line in lines.values()}) == 1


def test_config_command_json(box, capsys):
    write(box["proj"] / ".streaminghubrc", {"framing": {"max_samples": 16}})
    assert run(["config", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["framing.max_samples"] == {
        "value": 16,
        "source": str(box["proj"] / ".streaminghubrc"),
    }
    assert data["data_dir"] == {
        "value": str(box["home"] / "streaminghub" / "data"),
        "source": "default",
    }


def test_config_command_single_key(box, capsys):
    assert run(["config", "log_level"], config_flags={"log_level": "error"}) == 0
    assert capsys.readouterr().out == "ERROR\n"
    assert run(["config", "loglevel"]) == 2
    assert "did you mean 'log_level'" in capsys.readouterr().err


def test_config_command_reports_a_bad_rc(box, capsys):
    rc = write(box["home"] / ".streaminghubrc", {"data_dri": "/x"})
    assert run(["config"]) == 2
    err = capsys.readouterr().err
    assert str(rc) in err and "data_dri" in err and "data_dir" in err


def test_describe_rows_follow_the_schema(box):
    rows = describe(load(box, flags={"framing.max_samples": 3}))
    assert [row[0] for row in rows] == list(SCHEMA)
    assert ("framing.max_samples", "3", "flag --framing.max_samples") in rows
    assert ("framing.max_latency_ms", "(not set)", "default") in rows


# --- docs -----------------------------------------------------------------------------


def test_docs_list_every_key_and_its_env_var():
    text = DOCS.read_text(encoding="utf-8")
    for key in SCHEMA:
        assert f"`{key}`" in text, f"docs/config.md does not document {key}"
        assert env_name(key) in text, f"docs/config.md does not name {env_name(key)}"


def test_config_shows_the_agent_id_and_state_dir_in_use(box, capsys, monkeypatch):
    # Empty defaults stand for values found at run time: show those, and where from.
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(box["home"] / "xdg-state"))
    assert run(["config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"= {default_agent_id()} " in lines["agent.id"]
    assert lines["agent.id"].endswith("(default (host name))")
    state = box["home"] / "xdg-state" / "streaminghub"
    assert f"= {state} " in lines["agent.state_dir"]
    assert "platformdirs" in lines["agent.state_dir"]
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/streaminghub:/var/lib/other")
    assert run(["config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "= /var/lib/streaminghub " in lines["agent.state_dir"]
    assert lines["agent.state_dir"].endswith("(default ($STATE_DIRECTORY))")


def test_configuration_directory_holds_the_system_rc(tmp_path, monkeypatch):
    # Under systemd, ConfigurationDirectory= names the folder of the fleet rc.
    folder = tmp_path / "etc-streaminghub"
    folder.mkdir()
    rc = write(folder / "streaminghubrc", {"agent": {"id": "pi-lab1"}})
    config = load_config(env={"CONFIGURATION_DIRECTORY": str(folder)}, cwd=tmp_path, home=tmp_path)
    assert config.get("agent.id") == "pi-lab1"
    assert config.sources["agent.id"] == str(rc)


def test_config_command_names_an_unknown_driver_as_serve_would(box, capsys):
    write(box["home"] / ".streaminghubrc", {"drivers": {"enabled": "lsl,seral"}})
    assert run(["config"]) == 2
    assert capsys.readouterr().err == (
        "datamux: config error: key 'drivers.enabled': unknown driver 'seral' (fix: use some "
        "of ['ble', 'lsl', 'serial', 'sim'], or install the package that provides it)\n"
    )
    write(box["home"] / ".streaminghubrc", {"drivers": {"enabled": "lsl, serial"}})
    assert run(["config", "drivers.enabled"]) == 0
