"""mosquitto as a shared lab broker: passwords, client certificates and an ACL profile.

Two loopback listeners share one ACL (systemd/acl/*.acl): one checks passwords
(mosquitto_passwd), the other requires a client certificate and takes the user name from
its CN (``use_identity_as_username``). Certificates come from the openssl command line.
Started and stopped by its own pid.
"""

from __future__ import annotations

import getpass
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import LOOPBACK, free_port, mosquitto_binary, start_mosquitto, stop_process
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from streaminghub_datamux.mqttio import BrokerSettings

ROOT = Path(__file__).resolve().parent.parent
ACL_PROFILES = {name: ROOT / "systemd" / "acl" / f"{name}.acl" for name in ("lab", "private")}
WAIT_S = 10.0


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None
    )
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def password(user: str) -> str:
    return f"pw-{user}"


def write_passwd(path: Path, users: Iterable[str]) -> Path:
    """A mosquitto password file: each user with :func:`password`, hashed by mosquitto's tool."""
    passwd_tool = tool("mosquitto_passwd")
    for i, user in enumerate(users):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            [passwd_tool, *create, "-b", str(path), user, password(user)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return path


class Certificates:
    """A CA, a server certificate for 127.0.0.1 and one client certificate per user."""

    def __init__(self, folder: Path) -> None:
        self.openssl = tool("openssl")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = folder / "ca.crt"
        self._ca_key = folder / "ca.key"
        self._run(
            "req", "-x509", *self._new_key(self._ca_key), "-days", "1",
            "-subj", "/CN=test CA", "-out", str(self.ca),
        )  # fmt: skip
        self.server = self.issue("127.0.0.1", server=True)

    @staticmethod
    def _new_key(path: Path) -> list[str]:
        # EC keys: generated in milliseconds, unlike RSA.
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(path)]  # fmt: skip

    def _run(self, *args: str) -> None:
        subprocess.run([self.openssl, *args], check=True, capture_output=True, timeout=60)

    def issue(self, common_name: str, *, server: bool = False) -> tuple[Path, Path]:
        """(certificate, key) for ``common_name``, signed by the CA."""
        cert, key = self.folder / f"{common_name}.crt", self.folder / f"{common_name}.key"
        csr = self.folder / f"{common_name}.csr"
        self._run("req", *self._new_key(key), "-subj", f"/CN={common_name}", "-out", str(csr))
        extensions = self.folder / f"{common_name}.ext"
        extensions.write_text(
            "subjectAltName=IP:127.0.0.1\n" if server else "extendedKeyUsage=clientAuth\n"
        )
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self._ca_key),
            "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(cert),
        )  # fmt: skip
        return cert, key


@dataclass
class SecureBroker:
    """mosquitto with one ACL profile, passwords on ``port``, certificates on ``tls_port``."""

    folder: Path
    profile: str
    users: tuple[str, ...]
    certificates: Certificates
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    host: str = LOOPBACK
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.skip("mosquitto is not installed")
        self.binary = binary
        self.folder.mkdir(parents=True, exist_ok=True)
        passwd = write_passwd(self.folder / "passwd", self.users)
        acl = ACL_PROFILES[self.profile]
        server_cert, server_key = self.certificates.server
        self.conf = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        self.conf.write_text(
            "\n".join(
                [
                    "per_listener_settings true",
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    f"user {getpass.getuser()}",
                    f"listener {self.port} {LOOPBACK}",
                    "allow_anonymous false",
                    f"password_file {passwd}",
                    f"acl_file {acl}",
                    f"listener {self.tls_port} {LOOPBACK}",
                    "allow_anonymous false",
                    f"acl_file {acl}",
                    f"cafile {self.certificates.ca}",
                    f"certfile {server_cert}",
                    f"keyfile {server_key}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "",
                ]
            )
        )

    def start(self) -> None:
        self.process = start_mosquitto(self.binary, self.conf, self.log, [self.port, self.tls_port])

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)

    def settings(self, user: str, auth: str) -> BrokerSettings:
        """How ``user`` logs in: ``auth`` is "password" or "certificate"."""
        if auth == "password":
            return BrokerSettings(
                host=self.host, port=self.port, username=user, password=password(user)
            )
        cert, key = self.certificates.issue(user)
        return BrokerSettings(
            host=self.host,
            port=self.tls_port,
            ca_file=str(self.certificates.ca),
            cert_file=str(cert),
            key_file=str(key),
        )


@dataclass
class Peer:
    """A bare paho MQTT 5 client: records what it receives and each PUBACK's verdict."""

    client: mqtt.Client
    received: list[mqtt.MQTTMessage] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    acks: dict[int, str] = field(default_factory=dict)
    acked: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def connect(
        cls,
        settings: BrokerSettings,
        client_id: str,
        wait_s: float = WAIT_S,
        will: tuple[str, bytes] | None = None,
    ) -> Peer:
        """Connect as ``settings`` say (password, server-only TLS or a client certificate)."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if settings.username:
            client.username_pw_set(settings.username, settings.password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        if settings.ca_file:
            client.tls_set(
                ca_certs=settings.ca_file,
                certfile=settings.cert_file,
                keyfile=settings.key_file,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        peer = cls(client)
        connected = threading.Event()
        codes: list[Any] = []

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            codes.append(reason)
            connected.set()

        client.on_connect = on_connect
        client.connect(settings.host, settings.port, keepalive=10)
        client.loop_start()
        if not connected.wait(wait_s) or codes[0].is_failure:
            client.loop_stop()
            raise AssertionError(f"{client_id} could not connect: {codes}")
        return peer

    def __post_init__(self) -> None:
        def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
            with self.arrived:
                self.received.append(message)
                self.arrived.notify_all()

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            with self.acked:
                self.acks[mid] = str(reason) if reason.is_failure else "ok"
                self.acked.notify_all()

        self.client.on_message = on_message
        self.client.on_publish = on_publish

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> str:
        """Publish at QoS 1: "ok", or the broker's refusal ("Not authorized")."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        with self.acked:
            ok = self.acked.wait_for(lambda: info.mid in self.acks, timeout=WAIT_S)
            assert ok, f"no PUBACK for {topic}"
            return self.acks.pop(info.mid)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(WAIT_S), f"no SUBACK for {topic}"

    def wait_for(self, payload: bytes) -> list[tuple[str, bytes, bool]]:
        """(topic, payload, retained) of everything received up to ``payload`` (bounded)."""
        with self.arrived:
            ok = self.arrived.wait_for(
                lambda: any(m.payload == payload for m in self.received), timeout=WAIT_S
            )
            seen = [(m.topic, m.payload, bool(m.retain)) for m in self.received]
        assert ok, f"{payload!r} never arrived; got {seen}"
        return seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
