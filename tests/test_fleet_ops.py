"""Edge fleet operations with real processes: an agent whose LSL driver cannot load keeps
serving the others and says why (log, birth, health, `datamux status`); journald
priorities; READY/WATCHDOG timing against a broker that comes up late; the broker's
failure causes in the RemoteAPI's errors; `datamux doctor`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import LOOPBACK, Mosquitto, free_port
from helpers import run
from remote import AgentProcess, wait_until

import streaminghub_datamux as dm
from streaminghub_datamux.config import load_config
from streaminghub_datamux.errors import Unavailable

PREFIX = "streaminghub/v2"
AGENT = "pi-1"
WAIT_S = 30.0


def _datamux(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(cwd)
    return subprocess.run(
        [sys.executable, "-m", "streaminghub_datamux", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    with tempfile.TemporaryDirectory(prefix="sdn") as folder:
        path = str(Path(folder) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield path, sock
        finally:
            sock.close()


def _datagrams_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every datagram up to and including the first that contains ``wanted``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message:
            return seen
    raise AssertionError(f"no {wanted!r} in {timeout} s; got {seen}")


def _retained(
    broker: Mosquitto, topic: str, wait_s: float = 1.0, expect: tuple[str, ...] = ()
) -> dict[str, bytes]:
    """The retained messages on ``topic`` (a filter), by topic: those that came within
    ``wait_s`` of the broker's SUBACK, and at least the ``expect``-ed topics (bounded).

    Timed from the SUBACK, not from connecting, and waiting for what must be there: a
    loaded machine can take more than a fixed second to connect and subscribe.
    """
    got: dict[str, bytes] = {}
    subscribed: list[bool] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"peek-{time.time_ns()}")
    client.on_message = lambda c, u, m: got.__setitem__(m.topic, m.payload) if m.retain else None
    client.on_subscribe = lambda *args: subscribed.append(True)
    client.connect(broker.host, broker.port)
    client.subscribe(topic, 1)
    client.loop_start()
    try:
        wait_until(lambda: bool(subscribed), WAIT_S, f"the broker's SUBACK for {topic}")
        time.sleep(wait_s)
        wait_until(lambda: set(expect) <= set(got), WAIT_S, f"retained {list(expect)}")
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def _journal_env(log_path: Path) -> dict[str, str]:
    """$JOURNAL_STREAM naming the agent's stderr (its log file), as systemd names the journal."""
    log_path.touch()
    stat = os.stat(log_path)
    return {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}


# -- a driver that cannot load -----------------------------------------------------------


def test_lsl_without_liblsl_degrades_and_everyone_can_see_it(mosquitto, tmp_path, notify_socket):
    unloadable = tmp_path / "liblsl.so"
    unloadable.write_bytes(b"not a shared library")  # what an x86 liblsl is to an arm64 box
    notify_path, notify = notify_socket
    env = {
        "PYLSL_LIB": str(unloadable),
        "NOTIFY_SOCKET": notify_path,
        "STREAMINGHUB_AGENT__HEALTH_INTERVAL_S": "0.5",
        **_journal_env(tmp_path / f"agent-{AGENT}.log"),
    }
    agent = AgentProcess(mosquitto, tmp_path, AGENT, "--drivers", "sim,lsl", env=env)
    try:
        _datagrams_until(notify, "READY=1", WAIT_S)
        # READY=1 means serving: the retained birth is there already.
        state_topic = f"{PREFIX}/agents/{AGENT}/state"
        state = json_or_cbor(_retained(mosquitto, state_topic, expect=(state_topic,))[state_topic])
        assert state["state"] == "online"
        drivers = {d["name"]: d for d in state["drivers"]}
        assert drivers["sim"]["state"] == "ok"
        assert drivers["lsl"]["state"] == "unavailable"
        assert "liblsl" in drivers["lsl"]["reason"] and str(unloadable) in drivers["lsl"]["reason"]
        assert "PYLSL_LIB" in drivers["lsl"]["fix"] and "liblsl" in drivers["lsl"]["fix"]

        # The other driver serves.
        async def nodes() -> list[str]:
            config = load_config(flags={}, env={})
            api = dm.RemoteAPI("mqtt", "cbor", agent_id=AGENT, config=config)
            await api.connect(mosquitto.host, mosquitto.port)
            try:
                return [n.id for n in await api.list_live_nodes()]
            finally:
                await api.close()

        assert "demo" in run(nodes())

        # Health: JSON (readable in mosquitto_sub), with the driver states and the box.
        def health() -> dict:
            topic = f"{PREFIX}/agents/{AGENT}/health"
            payload = _retained(mosquitto, topic, 0.5).get(topic, b"")
            return json.loads(payload) if payload else {}

        wait_until(lambda: bool(health()), WAIT_S, "a health message")
        reading = health()
        assert reading["version"] == dm.__version__
        assert {d["name"]: d["state"] for d in reading["drivers"]} == {
            "sim": "ok",
            "lsl": "unavailable",
        }
        assert reading["disk_free_mb"] > 0 and "clock_synced" in reading
        assert reading["drivers"][1]["retry_in_s"] >= 0

        # `datamux status` shows it, for scripts and for people.
        done = _datamux("status", "--json", "-p", str(mosquitto.port), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        (seen,) = json.loads(done.stdout)["agents"]
        assert seen["agent"] == AGENT and seen["state"] == "online"
        assert {d["name"]: d["state"] for d in seen["drivers"]}["lsl"] == "unavailable"
        assert seen["health"]["version"] == dm.__version__
        done = _datamux("status", "-p", str(mosquitto.port), cwd=tmp_path)
        assert re.search(rf"^{AGENT}\s+online \d+s\s+\d{{4}}-", done.stdout, re.M), done.stdout
        assert "lsl UNAVAILABLE (pylsl cannot load liblsl" in done.stdout
        assert "fix: " in done.stdout and "PYLSL_LIB" in done.stdout
    finally:
        code = agent.terminate()
    log = agent.log_path.read_text()
    assert code == 0, log
    # One WARNING, with journald's priority, the cause and the fix; retries stay quiet.
    warnings = [line for line in log.splitlines() if "driver lsl unavailable" in line]
    assert len(warnings) == 1, log
    assert warnings[0].startswith("<4>WARNING") and "PYLSL_LIB" in warnings[0]
    assert any(line.startswith("<6>INFO") for line in log.splitlines()), log
    assert all(line.startswith("<") for line in log.splitlines() if line.strip()), log
    # A clean shutdown: offline, and the retained health is gone.
    left = _retained(mosquitto, f"{PREFIX}/agents/{AGENT}/+", expect=(state_topic,))
    assert json_or_cbor(left[f"{PREFIX}/agents/{AGENT}/state"])["state"] == "offline"
    assert f"{PREFIX}/agents/{AGENT}/health" not in left


@pytest.mark.parametrize(
    "command",
    [("simulate", "--lsl", "demo", "--seconds", "1"), ("lsl-out", "--node", "demo", "eeg")],
)
def test_lsl_out_without_liblsl_names_liblsl_not_the_installed_extra(tmp_path, command):
    """pylsl is installed (the extra is there) but liblsl does not load, as on a Pi: the
    fix is liblsl itself, not 'pip install ...[lsl]' again."""
    unloadable = tmp_path / "liblsl.so"
    unloadable.write_bytes(b"not a shared library")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env.update(HOME=str(tmp_path), PYLSL_LIB=str(unloadable), STREAMINGHUB_DRIVERS__ENABLED="sim")
    done = subprocess.run(
        [sys.executable, "-m", "streaminghub_datamux", *command],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert "pylsl cannot load liblsl" in error, done.stderr
    assert "PYLSL_LIB" in error and "github.com/sccn/liblsl/releases" in error, error
    assert "streaminghub-datamux[lsl]" not in done.stderr, done.stderr


def json_or_cbor(payload: bytes) -> dict:
    from streaminghub_datamux.codec import decode

    return decode(payload)


def test_a_driver_that_comes_up_later_serves_without_a_restart():
    from streaminghub_datamux.drivers.pending import PendingDriver
    from streaminghub_datamux.drivers.registry import DriverLoadError
    from streaminghub_datamux.drivers.simulate import SimDriver

    attempts = []

    def build():  # the adapter is plugged in before the third attempt
        attempts.append(time.monotonic())
        if len(attempts) < 2:
            raise DriverLoadError("sim", "no adapter", "plug it in", installed=True)
        return SimDriver.from_config({})

    async def body():
        driver = PendingDriver("sim", build, "no adapter", "plug it in", retry_min_s=0.05)
        try:
            assert driver.status().state == "unavailable"
            assert await driver.list_nodes() == []
            with pytest.raises(Unavailable, match="no adapter"):
                driver.open_stream("demo", "eeg", {}, dm.Framing())
            deadline = time.monotonic() + 10
            while driver.inner is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert driver.status().state == "ok"
            return [n.id for n in await driver.list_nodes()]
        finally:
            await driver.aclose()

    assert "demo" in run(body())
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 0.09  # backoff: the second wait doubled


def test_unknown_driver_names_are_still_config_errors():
    from streaminghub_datamux.drivers.registry import create_drivers
    from streaminghub_datamux.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown driver 'lsll'"):
        create_drivers("sim,lsll", {})


# -- systemd: READY, WATCHDOG, exit codes ----------------------------------------------------


def test_ready_only_once_the_broker_answers_and_the_watchdog_is_fed_meanwhile(
    tmp_path, notify_socket
):
    notify_path, notify = notify_socket
    broker = Mosquitto(tmp_path / "broker", port=free_port())  # not started yet
    env = {
        "NOTIFY_SOCKET": notify_path,
        "WATCHDOG_USEC": "1000000",  # a ping every 0.5 s
        **_journal_env(tmp_path / f"agent-{AGENT}.log"),
    }
    agent = AgentProcess(broker, tmp_path, AGENT, env=env)
    try:
        before = _datagrams_until(notify, "connection refused", WAIT_S)
        assert not any("READY=1" in m for m in before), before
        assert any(m.startswith("STATUS=waiting for the broker") for m in before), before
        pings = _datagrams_until(notify, "WATCHDOG=1", 5)
        assert not any("READY=1" in m for m in pings)
        # The cause is in the journal as a warning, named.
        wait_until(lambda: "connection refused" in agent.log(), WAIT_S, "the broker warning")
        line = next(ln for ln in agent.log().splitlines() if "connection refused" in ln)
        assert line.startswith("<4>WARNING") and f"{LOOPBACK}:{broker.port}" in line
        broker.start()
        after = _datagrams_until(notify, "READY=1", WAIT_S)
        assert "STATUS=serving as" in after[-1]
    finally:
        code = agent.terminate()
        broker.stop()
    assert code == 0, agent.log()


def test_a_config_error_exits_with_the_code_the_unit_does_not_restart(tmp_path):
    done = _datamux("serve", "--codec", "json", "--id", "no/slash", "-p", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "config error" in done.stderr and "agent.id" in done.stderr


# -- the broker's failure causes ------------------------------------------------------------


def _connect_error(port: int, host: str = LOOPBACK, **options) -> tuple[str, float]:
    async def body() -> tuple[str, float]:
        api = dm.RemoteAPI("mqtt", "cbor", config=load_config(flags={}, env={}))
        began = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await api.connect(host, port, **options)
        return str(caught.value), time.monotonic() - began

    return run(body())


def test_refused_connection_is_named_at_once():
    text, took = _connect_error(free_port())
    assert "connection refused" in text and "timed out" not in text
    assert took < 5.0  # not the 10 s timeout


def test_unknown_host_is_named():
    text, _ = _connect_error(1883, host="no-such-host.invalid")
    assert "unknown host 'no-such-host.invalid'" in text and "broker.host" in text


# paho-mqtt 2.x leaves the socket of a failed TLS handshake open (_ssl_wrap_socket has no
# close on error); its ResourceWarning surfaces at garbage collection, forced below so
# that it stays in this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tls_to_a_plain_listener_is_named(mosquitto, tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=127.0.0.1", "-days", "1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    text, took = _connect_error(mosquitto.port, ca_file=str(cert))
    gc.collect()
    assert "TLS" in text and "broker.tls" in text
    assert took < 8.0


def test_not_authorised_is_named(tmp_path):
    broker = Mosquitto(tmp_path / "locked")
    broker.conf_path.write_text(
        broker.conf_path.read_text().replace("allow_anonymous true", "allow_anonymous false")
    )
    broker.start()
    try:
        text, _ = _connect_error(broker.port, protocol="5")
    finally:
        broker.stop()
    assert "not authorised" in text and "broker.username" in text


def test_the_agent_keeps_reporting_while_it_waits(tmp_path):
    """A WARNING at the first failure and at each backoff step, with the time so far."""
    from streaminghub_datamux.mqttio import BrokerSettings, MqttLink

    port = free_port()
    records: list[str] = []

    async def body() -> None:
        import logging

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        handler = Keep(logging.WARNING)
        logging.getLogger("streaminghub_datamux.mqttio").addHandler(handler)
        link = MqttLink("waiting", BrokerSettings(host=LOOPBACK, port=port), on_message=print)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(9.0):  # reports at ~0.5 s, ~5.5 s; next ~15.5 s
                    await link.connect(timeout=None)  # the agent's way: wait for ever
            assert "connection refused" in link.problem
        finally:
            logging.getLogger("streaminghub_datamux.mqttio").removeHandler(handler)
            await link.close()

    run(body())
    reports = [r for r in records if "connection refused" in r]
    assert len(reports) == 2, records  # at ~0.5 s, then the first step (5 s)
    assert "still trying" in reports[0] and "next report in 5 s" in reports[0]
    assert "next report in 10 s" in reports[1]


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_names_each_problem_with_its_fix(mosquitto, tmp_path):
    unloadable = tmp_path / "liblsl.so"
    unloadable.write_bytes(b"junk")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env.update(HOME=str(tmp_path), PYLSL_LIB=str(unloadable))
    command = [sys.executable, "-m", "streaminghub_datamux", "doctor", "--json"]
    done = subprocess.run(
        [*command, "--drivers", "sim,lsl", "-p", str(mosquitto.port)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # liblsl fails
    checks = {c["check"]: c for c in json.loads(done.stdout)}
    assert checks["lsl"]["level"] == "fail" and "PYLSL_LIB" in checks["lsl"]["fix"]
    assert checks["broker"]["level"] == "ok"
    assert checks["disk"]["level"] == "ok"
    assert checks["clock"]["level"] in ("ok", "warn")
    env.pop("PYLSL_LIB")
    done = subprocess.run(
        [*command, "--drivers", "sim", "-p", str(free_port())],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    checks = {c["check"]: c for c in json.loads(done.stdout)}
    assert checks["broker"]["level"] == "fail"
    assert "connection refused" in checks["broker"]["detail"]
    assert "lsl" not in checks


def test_status_and_doctor_take_broker_as_ls_and_tail_do(mosquitto, tmp_path):
    """`tail --broker HOST:PORT` works, so a newcomer types `status --broker HOST:PORT`
    next: it means -H HOST -p PORT, and -p still wins when both are given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(tmp_path)
    broker = f"{mosquitto.host}:{mosquitto.port}"
    base = [sys.executable, "-m", "streaminghub_datamux"]
    for command in (["doctor", "--drivers", "sim"], ["status"]):
        done = subprocess.run(
            [*base, *command, "--json", "--broker", broker],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        json.loads(done.stdout)
    doctor = [*base, "doctor", "--drivers", "sim", "--json"]
    done = subprocess.run(
        [*doctor, "--broker", f"{LOOPBACK}:{free_port()}", "-p", str(mosquitto.port)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    bad = subprocess.run(
        [*base, "status", "--broker", "host:port"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == (
        "datamux status: error: argument --broker: takes HOST or HOST:PORT, not 'host:port'"
    )
