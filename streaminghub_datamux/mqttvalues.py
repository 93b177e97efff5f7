"""The values an MQTT link is set up with and hands out: where the broker is and how to
log in (:class:`BrokerSettings`), our last will (:class:`Will`), a received message
(:class:`Incoming`). Plain data, so that settings can be built and checked (``datamux
doctor``, the status command) without the connection code of mqttio.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import InvalidRequest

__all__ = ["BrokerSettings", "Incoming", "Will"]


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in (``broker.*`` config keys)."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "auto"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 10
    prefix: str = "streaminghub/v2"

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> BrokerSettings:
        def path(key: str) -> str | None:
            value = config.get(key)
            return None if value is None else str(value)

        values: dict[str, Any] = dict(
            host=config.get("broker.host"),
            port=config.get("broker.port"),
            protocol=config.get("broker.protocol"),
            username=config.get("broker.username"),
            password=config.get("broker.password"),
            ca_file=path("broker.tls.ca_file"),
            cert_file=path("broker.tls.cert_file"),
            key_file=path("broker.tls.key_file"),
            keepalive_s=config.get("broker.keepalive_s"),
            prefix=config.get("broker.prefix"),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidRequest(f"broker port must be 1 to 65535, not {self.port!r}")
        if isinstance(self.keepalive_s, bool) or not (
            isinstance(self.keepalive_s, int | float) and self.keepalive_s >= 2
        ):
            raise InvalidRequest(f"keepalive_s must be at least 2 s, not {self.keepalive_s!r}")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise InvalidRequest(f"protocol must be auto, 5 or 3.1.1, not {self.protocol!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us if we vanish without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Incoming:
    """A received message; ``response_topic``/``correlation`` are set by MQTT 5 peers."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation: bytes | None = None
