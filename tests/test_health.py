"""The box's readings (agent/health.py) from folders laid out like /sys and /run, and the
journald log format (cli/logs.py) on a real stderr stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streaminghub_datamux.agent import health
from streaminghub_datamux.cli.logs import JournalFormatter, syslog_priority


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_a_pi_reports_its_cpu_temperature_and_throttling(tmp_path):
    _write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    _write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "61234")
    _write(tmp_path, "sys/class/thermal/thermal_zone1/type", "battery")
    _write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "70000")  # hotter, not the CPU
    # Under-voltage now, and throttling has occurred since boot (vcgencmd's bits).
    _write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "0x40001")
    readings = health.system_readings(tmp_path, root=tmp_path)
    assert readings["cpu_temp_c"] == 61.2 and readings["thermal_zone"] == "cpu-thermal"
    assert readings["throttled"] == "0x40001"
    assert readings["throttled_now"] == ["under-voltage"]
    assert readings["throttled_since_boot"] == ["throttled"]


def test_an_x86_box_reports_throttle_events(tmp_path):
    _write(tmp_path, "sys/class/thermal/thermal_zone0/type", "x86_pkg_temp")
    _write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "45000")
    for cpu, count in (("cpu0", "3"), ("cpu1", "7")):
        folder = f"sys/devices/system/cpu/{cpu}/thermal_throttle"
        _write(tmp_path, f"{folder}/package_throttle_count", count)
    readings = health.system_readings(tmp_path, root=tmp_path)
    assert readings["cpu_temp_c"] == 45.0 and readings["throttle_events"] == 7


def test_what_the_kernel_does_not_expose_is_left_out(tmp_path):
    readings = health.system_readings(tmp_path / "spool" / "not-yet", root=tmp_path)
    assert "cpu_temp_c" not in readings and "throttled" not in readings
    assert readings["clock_synced"] is None and readings["clock_source"] == "unknown"
    assert readings["disk_free_mb"] > 0  # measured at the nearest folder that exists


@pytest.mark.parametrize(("flag", "synced"), [(True, True), (False, False)])
def test_clock_sync_from_timesyncd(tmp_path, flag, synced):
    (tmp_path / "run/systemd/timesync").mkdir(parents=True)
    if flag:
        (tmp_path / "run/systemd/timesync/synchronized").touch()
    assert health.clock_sync(tmp_path) == {"clock_synced": synced, "clock_source": "timesyncd"}


def test_clock_sync_from_the_kernel():
    state = health.clock_sync()
    # adjtimex works unprivileged with no changes; a seccomp filter may forbid it.
    assert state["clock_source"] in ("adjtimex", "timesyncd", "unknown")
    if state["clock_source"] == "adjtimex":
        assert isinstance(state["clock_synced"], bool)


# -- journald ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
    ],
)
def test_syslog_priorities(level, priority):
    assert syslog_priority(level) == priority


def test_every_line_of_a_record_carries_the_priority():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "first\nsecond", None, None)
    assert JournalFormatter().format(record) == "<3>ERROR x: first\n<3>second"


def _log_from_child(tmp_path: Path, journal: str | None) -> str:
    out = tmp_path / "stderr.txt"
    out.touch()
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal == "this":
        stat = os.stat(out)
        env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
    elif journal is not None:
        env["JOURNAL_STREAM"] = journal
    code = (
        "import logging; from streaminghub_datamux.cli.logs import configure_logging; "
        "configure_logging(logging.INFO); logging.getLogger('t').warning('disk low')"
    )
    with out.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, timeout=60, check=True)
    return out.read_text()


def test_journald_prefixes_only_when_stderr_is_the_journal_stream(tmp_path):
    assert _log_from_child(tmp_path, "this") == "<4>WARNING t: disk low\n"
    # Inherited from a parent whose stderr was the journal, but ours is elsewhere.
    other = _log_from_child(tmp_path, "1:2")
    assert other.endswith("WARNING t: disk low\n") and not other.startswith("<")
    assert not _log_from_child(tmp_path, None).startswith("<")
