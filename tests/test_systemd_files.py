"""The files in systemd/: the unit, the example fleet config, and the mosquitto examples.

The mosquitto tests run the example config (trimmed to loopback listeners on free
ports, with paths moved into tmp_path) and check the example ACL with real clients.
"""

from __future__ import annotations

import configparser
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from broker import LOOPBACK, free_port, mosquitto_binary, start_mosquitto, stop_process
from secure_broker import Peer, password, tool, write_passwd

from streaminghub_datamux.config import SCHEMA, env_name, load_config
from streaminghub_datamux.mqttio import BrokerSettings

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "streaminghub-agent.service"
FLEET_RC = SYSTEMD / "streaminghubrc.example"
AGENT_ENV = SYSTEMD / "agent.env.example"
MOSQUITTO_CONF = SYSTEMD / "mosquitto.conf.example"
MOSQUITTO_ACL = SYSTEMD / "acl" / "lab.acl"  # the "private" profile: test_security.py
PREFIX = "streaminghub/v2"
WAIT_S = 5.0

if not SYSTEMD.is_dir():
    # CI's wheel run copies tests/ without systemd/.
    pytest.skip("systemd/ is not beside tests/", allow_module_level=True)


# -- the unit ----------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    # strict=False: systemd allows a key more than once (the last wins here);
    # no interpolation: % starts systemd specifiers, not configparser references.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser


def _values(section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (Environment=, SupplementaryGroups=)."""
    values, current = [], None
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(key + "="):
            values.append(line.split("=", 1)[1])
    return values


def test_unit_is_a_notify_service_with_a_watchdog() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) == 30
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"] == "2s"
    exec_start = service["ExecStart"].split()
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/datamux")
    assert exec_start[1:] == ["serve"]


def test_unit_stops_cleanly_and_is_bounded() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) == 15
    assert service["MemoryMax"] == "200M"
    assert unit["Unit"]["StartLimitBurst"].isdigit()
    assert unit["Unit"]["StartLimitIntervalSec"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_state_config_and_environment() -> None:
    service = _unit()["Service"]
    assert service["StateDirectory"] == "streaminghub"
    assert service["ConfigurationDirectory"] == "streaminghub"
    assert service["User"] == "streaminghub"
    assert service["EnvironmentFile"] == "-/etc/streaminghub/agent.env"
    assert "PYTHONUNBUFFERED=1" in _values("Service", "Environment")
    assert {"dialout", "bluetooth"} <= set(_values("Service", "SupplementaryGroups"))


def test_unit_sandbox() -> None:
    service = _unit()["Service"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
    }
    assert {key: service.get(key) for key in expected} == expected
    families = set(service["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_BLUETOOTH"}
    # Each of these would hide /dev/ttyUSB* from the serial driver.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert key not in service, key


def test_unit_ready_and_config_errors() -> None:
    service = _unit()["Service"]
    # READY=1 comes once serving; waiting for a broker at boot is not a failed start.
    assert service["TimeoutStartSec"] == "infinity"
    # `datamux` exits 2 on a config error (streaminghub_datamux/cli): no restart loop.
    assert service["RestartPreventExitStatus"] == "2"


def _verifiable_copy(tmp_path: Path) -> Path:
    # verify insists that ExecStart exists; datamux is not installed in /usr/local here.
    datamux = shutil.which("datamux") or "/bin/true"
    text = UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/datamux", datamux)
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(_verifiable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", output)
    if match is None and "--offline" in output:
        pytest.skip(f"this systemd-analyze has no --offline: {output[-300:]}")
    assert match is not None, output
    assert float(match.group(1)) <= 2.0, output
    # The hardening keeps what the drivers need.
    service = _unit()["Service"]
    assert "PrivateDevices" not in service and "PrivateUsers" not in service
    assert "AF_BLUETOOTH" in service["RestrictAddressFamilies"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists; datamux is not installed in /usr/local here.
    datamux = shutil.which("datamux") or "/bin/true"
    text = UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/datamux", datamux)
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown or invalid settings are only warnings: fail on them too.
    for word in ("Unknown", "ignoring", "Invalid"):
        assert word not in output, output


# -- the example fleet config and env file -----------------------------------------------


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        if key not in SCHEMA and isinstance(value, dict):
            out.update(_flat(value, key + "."))
        else:
            out[key] = value
    return out


def test_fleet_config_is_json_with_known_keys() -> None:
    data = json.loads(FLEET_RC.read_text(encoding="utf-8"))
    unknown = sorted(set(_flat(data)) - set(SCHEMA))
    assert not unknown, f"not in streaminghub_datamux.config.SCHEMA: {unknown}"


def test_fleet_config_loads_as_the_system_rc(tmp_path: Path) -> None:
    config = load_config(flags=None, env={}, cwd=tmp_path, home=tmp_path, system_rc=FLEET_RC)
    for key, value in _flat(json.loads(FLEET_RC.read_text(encoding="utf-8"))).items():
        assert config.sources[key] == str(FLEET_RC), key
        expected = Path(value) if SCHEMA[key].kind == "path" else value
        assert config.get(key) == expected, key
    assert config.get("broker.tls.ca_file") == Path("/etc/streaminghub/ca.crt")
    # Per-box values are not in the fleet file.
    assert config.sources["agent.id"] == "default"
    assert config.sources["agent.state_dir"] == "default"
    assert config.get("broker.username") is None


def test_fleet_config_driver_sections_are_valid(tmp_path: Path) -> None:
    pytest.importorskip("serial")
    pytest.importorskip("bleak")
    from streaminghub_datamux.drivers.ble import BleOptions
    from streaminghub_datamux.drivers.serialport import parse_options

    config = load_config(env={}, cwd=tmp_path, home=tmp_path, system_rc=FLEET_RC)
    parse_options(config.get("drivers.serial"))
    BleOptions.parse(config.get("drivers.ble"))


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them (simple subset)."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_agent_env_example_sets_known_keys(tmp_path: Path) -> None:
    env = _env_file(AGENT_ENV)
    assert env, "no settings in the env file"
    names = {env_name(key): key for key in SCHEMA}
    assert set(env) <= set(names), sorted(set(env) - set(names))
    config = load_config(env=env, cwd=tmp_path, home=tmp_path, system_rc=FLEET_RC)
    assert config.get("broker.username") == env["STREAMINGHUB_BROKER__USERNAME"]
    assert config.sources["broker.password"] == "env STREAMINGHUB_BROKER__PASSWORD"


# -- mosquitto: the example config, run, and the example ACL, enforced -------------------

AGENT, OTHER_AGENT, ANALYST, OPS = "pi-lab1", "pi-lab2", "alice", "ops"
TLS_KEYS = {"certfile", "keyfile", "cafile", "tls_version", "require_certificate"}


def _make_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 (its own CA), or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "broker.crt", folder / "broker.key"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass
class Broker:
    """mosquitto running the example config, trimmed to loopback ports."""

    binary: str
    conf: Path
    port: int
    tls_port: int | None
    ca_file: Path | None
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        self.process = start_mosquitto(self.binary, self.conf, self.log, ports)

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)


def _trimmed_conf(folder: Path, port: int, tls: tuple[int, Path, Path] | None, acl: Path) -> str:
    """The example, with the loopback listener on ``port``, the TLS one on ``tls`` (or
    dropped), and files in ``folder``. Every other line is kept as written."""
    replace = {
        "password_file": str(folder / "passwd"),
        "acl_file": str(acl),
        "persistence_location": f"{folder}/",
    }
    lines = []
    for line in MOSQUITTO_CONF.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(" ")
        if key == "listener" and value.startswith("1883"):
            line = f"listener {port} {LOOPBACK}"
        elif key == "listener" and value.startswith("8883"):
            if tls is None:
                continue
            line = f"listener {tls[0]} {LOOPBACK}"
        elif key in TLS_KEYS:
            if tls is None:
                continue
            if key in ("certfile", "cafile"):
                line = f"{key} {tls[1]}"
            elif key == "keyfile":
                line = f"{key} {tls[2]}"
        elif key in replace:
            line = f"{key} {replace[key]}"
        lines.append(line)
    # As root, mosquitto would switch to user "mosquitto", who cannot read tmp_path.
    lines.append(f"user {getpass.getuser()}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Any]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    tool("mosquitto_passwd")  # skips the test here when it is missing
    started: list[Broker] = []

    def make(acl_text: str | None = None, tls: bool = True) -> Broker:
        folder = tmp_path / f"mosquitto-{len(started)}"
        folder.mkdir()
        write_passwd(folder / "passwd", (AGENT, OTHER_AGENT, ANALYST, "bob", OPS))
        acl = folder / "streaminghub.acl"
        acl.write_text(acl_text or MOSQUITTO_ACL.read_text(encoding="utf-8"), encoding="utf-8")
        certificate = _make_certificate(folder) if tls else None
        port = free_port()
        tls_port = free_port() if certificate else None
        tls_args = (tls_port, *certificate) if certificate and tls_port else None
        conf = folder / "mosquitto.conf"
        conf.write_text(_trimmed_conf(folder, port, tls_args, acl), encoding="utf-8")
        broker = Broker(
            binary, conf, port, tls_port, certificate[0] if certificate else None, folder / "log"
        )
        started.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in started:
            broker.stop()


def _connect(
    broker: Broker,
    user: str,
    client_id: str,
    *,
    will: str | None = None,
    will_payload: bytes = b"offline",
    tls: bool = False,
) -> Peer:
    port = broker.tls_port if tls else broker.port
    assert port is not None
    settings = BrokerSettings(
        host=LOOPBACK,
        port=port,
        username=user,
        password=password(user),
        ca_file=str(broker.ca_file) if tls else None,
    )
    return Peer.connect(settings, client_id, will=(will, will_payload) if will else None)


def _agent(broker: Broker, agent: str = AGENT, **kwargs: Any) -> Peer:
    return _connect(broker, agent, f"dm-agent-{agent}", **kwargs)


def _token() -> bytes:
    return uuid.uuid4().hex.encode()


def test_agent_publishes_under_its_own_id_only(broker_factory: Any) -> None:
    broker = broker_factory(tls=False)
    ops = _connect(broker, OPS, "ops-watch")
    ops.subscribe(f"{PREFIX}/#")
    agent = _agent(broker, will=f"{PREFIX}/agents/{AGENT}/state")
    own = f"{PREFIX}/agents/{AGENT}"
    mine = (f"{own}/state", f"{own}/health", f"{own}/tasks/c1/t1/data", f"{own}/reply/c1")
    for topic in mine:
        assert agent.publish(topic, b"own") == "ok", topic
    forged = _token()
    other = f"{PREFIX}/agents/{OTHER_AGENT}"
    for topic in (f"{other}/state", f"{other}/tasks/c1/t1/data", f"{other}/reply/c1",
                  f"{PREFIX}/clients/x/state", f"{own}/rpc/c1"):  # fmt: skip
        assert agent.publish(topic, forged) == "Not authorized", topic
    end = _token()
    agent.publish(f"{own}/health", end)
    received = ops.wait_for(end)
    assert not [m for m in received if m[1] == forged]
    assert len([m for m in received if m[1] == b"own"]) == 4
    agent.close()
    ops.close()


def test_agent_last_will_under_another_id_is_dropped(broker_factory: Any) -> None:
    broker = broker_factory(tls=False)
    ops = _connect(broker, OPS, "ops-watch")
    ops.subscribe(f"{PREFIX}/agents/+/state")
    state = f"{PREFIX}/agents/{OTHER_AGENT}/state"
    rogue = _agent(broker, will=state, will_payload=b"forged")
    honest = _agent(broker, OTHER_AGENT, will=state)
    for peer in (rogue, honest):  # die without DISCONNECT: the broker sends the will
        peer.client.loop_stop()
        sock = peer.client.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        time.sleep(0.2)  # one after the other: the forged will would come first
    received = ops.wait_for(b"offline")
    assert [m[1] for m in received] == [b"offline"]
    ops.close()


def test_agent_reads_its_own_requests_and_answers_clients(broker_factory: Any) -> None:
    broker = broker_factory(tls=False)
    agent = _agent(broker)
    agent.subscribe(f"{PREFIX}/agents/+/rpc/+")  # accepted, but only its own is delivered
    agent.subscribe(f"{PREFIX}/clients/+/state")
    client = _connect(broker, ANALYST, "alice-1")
    client.subscribe(f"{PREFIX}/agents/+/reply/{ANALYST}")
    assert client.publish(f"{PREFIX}/clients/{ANALYST}/state", b"online", retain=True) == "ok"
    assert client.publish(f"{PREFIX}/agents/{OTHER_AGENT}/rpc/{ANALYST}", b"not-for-you") == "ok"
    request = _token()
    assert client.publish(f"{PREFIX}/agents/{AGENT}/rpc/{ANALYST}", request) == "ok"
    received = agent.wait_for(request)
    assert (f"{PREFIX}/clients/{ANALYST}/state", b"online", False) in received
    assert not [m for m in received if m[1] == b"not-for-you"]
    reply = _token()
    assert agent.publish(f"{PREFIX}/agents/{AGENT}/reply/{ANALYST}", reply) == "ok"
    client.wait_for(reply)
    agent.close()
    client.close()


def test_analyst_reads_agents_but_cannot_pose_as_one(broker_factory: Any) -> None:
    broker = broker_factory(tls=False)
    analyst = _connect(broker, ANALYST, "alice-1")
    analyst.subscribe(f"{PREFIX}/agents/#")
    for topic in (
        f"{PREFIX}/agents/{ANALYST}/state",
        f"{PREFIX}/agents/{AGENT}/state",
        f"{PREFIX}/agents/{AGENT}/reply/{ANALYST}",
        f"{PREFIX}/agents/{AGENT}/tasks/{ANALYST}/t1/data",
        f"{PREFIX}/agents/{AGENT}/rpc/bob",
        f"{PREFIX}/clients/bob/state",
    ):
        assert analyst.publish(topic, b"fake") == "Not authorized", topic
    agent = _agent(broker)
    data = _token()
    agent.publish(f"{PREFIX}/agents/{AGENT}/tasks/bob/t1/data", data)  # "lab": every stream
    analyst.wait_for(data)
    agent.close()
    analyst.close()


def test_retained_state_survives_a_broker_restart(broker_factory: Any) -> None:
    broker = broker_factory(tls=False)
    agent = _agent(broker)
    state = _token()
    assert agent.publish(f"{PREFIX}/agents/{AGENT}/state", state, retain=True) == "ok"
    agent.close()
    broker.stop()
    broker.start()
    ops = _connect(broker, OPS, "ops-watch")
    ops.subscribe(f"{PREFIX}/agents/+/state")
    assert (f"{PREFIX}/agents/{AGENT}/state", state, True) in ops.wait_for(state)
    ops.close()


def test_tls_listener_serves_the_broker_certificate(broker_factory: Any) -> None:
    broker = broker_factory(tls=True)
    if broker.tls_port is None:
        pytest.skip("openssl is not installed: no certificate for the TLS listener")
    agent = _agent(broker, tls=True)
    assert agent.publish(f"{PREFIX}/agents/{AGENT}/health", b"over tls") == "ok"
    agent.close()


def test_mosquitto_conf_example_keeps_what_production_needs() -> None:
    settings: dict[str, list[str]] = {}
    for line in MOSQUITTO_CONF.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value)
    assert settings["persistence"] == ["true"]
    assert settings["allow_anonymous"] == ["false"]
    assert settings["listener"] == ["1883 127.0.0.1", "8883"]
    assert int(settings["max_packet_size"][0]) >= 4 * 1024 * 1024
    assert {"password_file", "acl_file", "certfile", "keyfile"} <= set(settings)
    assert os.path.basename(settings["acl_file"][0]) == "streaminghub.acl"
