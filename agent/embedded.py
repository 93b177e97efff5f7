"""An in-process MQTT broker for a single box with no broker installed.

``datamux serve`` runs one when ``broker.embedded`` is ``"always"``, or when it is
``"auto"`` and :func:`broker_reachable` finds nothing on a loopback ``broker.host``.
The broker is amqtt (the optional ``embedded`` extra) on the caller's asyncio loop.
Production deployments point at mosquitto or a cluster instead.

What this broker is, and is not (measured on amqtt 0.12.1; docs/embedded-broker.md):

- MQTT 3.1.1 only. A client asking for MQTT 5 gets a 3.1.1 CONNACK with return code 1
  (paho 2.2 reports reason code 132, "Unsupported protocol version") and the connection
  is closed; clients fall back. amqtt logs two WARNING lines for each such attempt.
- Anonymous access; no TLS, no websocket listener, no ``$SYS`` topics.
- Retained messages and last wills (retained too) work; QoS 0, 1 and 2 work. Two amqtt
  bugs are worked around here: retained messages sent to clients that did not subscribe,
  and a socket leaked per connection closed before CONNECT (see :func:`_patched`).
- Clean sessions only, in effect: anonymous sessions are dropped about one second after
  the client disconnects, and nothing is queued for them while they are away. That keeps
  memory bounded on a small box; clients must subscribe again on every connect.
- Nothing survives :meth:`EmbeddedBroker.aclose` (no persistence).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from streaminghub_datamux.errors import ConfigError

if TYPE_CHECKING:
    from amqtt.broker import Broker

__all__ = ["EmbeddedBroker", "broker_reachable", "is_loopback"]

log = logging.getLogger(__name__)

INSTALL_FIX = (
    "pip install 'streaminghub-datamux[embedded]', or install mosquitto "
    "(apt-get install mosquitto) and set broker.embedded = 'never'"
)

# amqtt logs every connection, state change and plugin load at INFO, and the state
# machine library it uses (transitions) logs each callback at INFO too.
_NOISY_LOGGERS = ("amqtt", "transitions")
_AMQTT_BROKER_LOG = logging.getLogger("amqtt.broker")

# The smallest amqtt 0.12 config: one TCP listener and anonymous auth. Without
# "plugins", amqtt loads its default plugins, among them the $SYS one ($SYS traffic every
# 20 s, and a DeprecationWarning about psutil); "plugins": None loads entry-point plugins
# (a DeprecationWarning too). Both would fail tests under filterwarnings = ["error"].
_AUTH_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def broker_reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    """Tell whether something accepts TCP connections on ``host:port``.

    Only a TCP connect, no MQTT handshake: enough to decide whether an embedded broker
    would collide with one that is already there. It blocks for up to ``timeout``
    seconds per resolved address; from async code call it through
    :func:`asyncio.to_thread`.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is ``localhost`` or a loopback IP literal (no DNS lookup)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmbeddedBroker:
    """An amqtt broker listening on ``host:port``, running on the caller's loop.

    Create it with :meth:`start`; stop it with :meth:`aclose` or ``async with``::

        async with await EmbeddedBroker.start("127.0.0.1", 1883) as broker:
            ...
    """

    host: str
    port: int

    def __init__(self, broker: Broker, host: str, port: int, quiet: logging.Filter | None) -> None:
        """Wrap a started amqtt broker; use :meth:`start` instead."""
        self._broker: Broker | None = broker
        self._quiet = quiet
        self.host = host
        self.port = port

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        allow_remote: bool = False,
        debug: bool = False,
    ) -> Self:
        """Start a broker listening on ``host:port`` and return once it accepts clients.

        Args:
            host: Address to listen on. It must be loopback unless ``allow_remote`` is
                set, because the broker accepts anyone without a password.
            port: TCP port, 1 to 65535.
            allow_remote: Allow a non-loopback ``host`` such as ``0.0.0.0``.
            debug: Keep all of amqtt's logging. Otherwise its loggers are set to WARNING
                (unless configured already) and the ERROR it logs for every connection
                that closes before CONNECT, such as a :func:`broker_reachable` probe,
                is dropped.

        Raises:
            ConfigError: amqtt is not installed, the host is not allowed, or the
                address cannot be bound (for example the port is in use).
        """
        if not allow_remote and not is_loopback(host):
            raise ConfigError(
                f"the embedded broker would accept anyone without a password on {host}",
                key="broker.host",
                fix="use a loopback address such as 127.0.0.1, or run mosquitto with TLS "
                "and passwords for remote clients",
            )
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} is not between 1 and 65535", key="broker.port")
        broker_class, broker_error = _import_amqtt()
        config: dict[str, Any] = {
            # amqtt splits "bind" at the last colon, so IPv6 literals go without brackets.
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {_AUTH_PLUGIN: {"allow_anonymous": True}},
        }
        quiet = None if debug else _quiet_amqtt_logging()
        # amqtt logs a traceback at ERROR before raising; the ConfigError below says it all.
        startup_failure = _DropRecords("Broker startup failed")
        _AMQTT_BROKER_LOG.addFilter(startup_failure)
        try:
            broker = broker_class(config)
            await broker.start()
        except BaseException as exc:
            if quiet is not None:
                _AMQTT_BROKER_LOG.removeFilter(quiet)
            if isinstance(exc, broker_error):
                raise _bind_error(host, port, exc) from exc
            raise
        finally:
            _AMQTT_BROKER_LOG.removeFilter(startup_failure)
        log.info("embedded MQTT broker (amqtt) listening on %s:%d", host, port)
        return cls(broker, host, port, quiet)

    @property
    def running(self) -> bool:
        """Whether the broker is listening (until :meth:`aclose`)."""
        return self._broker is not None

    def quiet_shutdown(self) -> None:
        """Log only amqtt's errors from now on (unless started with ``debug``).

        While the agent and its clients leave, amqtt warns about what is expected then
        ("messages not broadcasted", a late PUBACK): nothing a user could act on.
        """
        if self._quiet is None:
            return
        for name in _NOISY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level <= logging.WARNING:
                logger.setLevel(logging.ERROR)

    async def aclose(self) -> None:
        """Stop listening and drop every client and retained message. Idempotent."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        self.quiet_shutdown()
        try:
            await broker.shutdown()
        finally:
            if self._quiet is not None:
                _AMQTT_BROKER_LOG.removeFilter(self._quiet)
        log.info("embedded MQTT broker on %s:%d stopped", self.host, self.port)

    async def __aenter__(self) -> Self:
        """Return the running broker."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker."""
        await self.aclose()

    def __repr__(self) -> str:
        """Show where it listens and whether it runs."""
        state = "running" if self.running else "closed"
        return f"<EmbeddedBroker {self.host}:{self.port} {state}>"


def _import_amqtt() -> tuple[type[Broker], type[Exception]]:
    """Import amqtt only when an embedded broker is wanted (it is an optional extra)."""
    try:
        from amqtt.broker import Broker
        from amqtt.errors import BrokerError
    except ImportError as exc:
        raise ConfigError(
            "the embedded MQTT broker needs the optional package amqtt, which is not installed",
            key="broker.embedded",
            fix=INSTALL_FIX,
        ) from exc
    return _patched(Broker), BrokerError


@functools.cache
def _patched(base: type[Broker]) -> type[Broker]:
    """Fix two amqtt 0.12.1 bugs that our users would notice; see docs/embedded-broker.md.

    1. Retained messages for other clients' subscriptions. ``_handle_client_session``
       calls ``_publish_retained_messages_for_subscription`` for every topic filter that
       *any* client subscribed to whenever a client connects, so a client that never
       subscribed to ``a/#`` receives the retained ``a/b`` anyway (and one that does
       subscribe receives it twice). Mosquitto sends retained messages only on the
       subscriber's own SUBSCRIBE, as MQTT 3.1.1 section 3.3.1.3 says; so do we.
    2. Leaked sockets. A connection that closes before sending CONNECT (such as the
       probe of :func:`broker_reachable`) is abandoned without closing its transport:
       one file descriptor per probe until garbage collection, then a ResourceWarning.

    Both overrides are guarded, so an amqtt whose internals moved still starts;
    ``tests/test_embedded_broker.py`` checks that the fixes hold.
    """
    publish_retained = getattr(base, "_publish_retained_messages_for_subscription", None)
    stream_connected = getattr(base, "stream_connected", None)
    namespace: dict[str, Any] = {}

    if publish_retained is not None:

        async def _publish_retained_messages_for_subscription(
            self: Broker, subscription: tuple[str, int], session: Any
        ) -> None:
            subscribers = self.subscriptions.get(subscription[0], ())
            if any(sub.client_id == session.client_id for sub, _qos in subscribers):
                await publish_retained(self, subscription, session)

        namespace["_publish_retained_messages_for_subscription"] = (
            _publish_retained_messages_for_subscription
        )

    if stream_connected is not None:

        async def stream_connected_then_close(
            self: Broker,
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            listener_name: str,
        ) -> None:
            try:
                await stream_connected(self, reader, writer, listener_name)
            finally:
                writer.close()  # a no-op when amqtt closed it already

        namespace["stream_connected"] = stream_connected_then_close

    return type("EmbeddedAmqttBroker", (base,), namespace)


def _quiet_amqtt_logging() -> logging.Filter:
    """Set amqtt's loggers to WARNING unless configured; filter out probe noise."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    # A connection closed before CONNECT gets an ERROR and a WARNING naming this text.
    quiet = _DropRecords(contains="No data to decode MQTT packet fixed header")
    _AMQTT_BROKER_LOG.addFilter(quiet)
    return quiet


def _bind_error(host: str, port: int, exc: Exception) -> ConfigError:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return ConfigError(
            f"the embedded broker cannot listen on {host}:{port}: address already in use",
            key="broker.port",
            fix="stop whatever listens there, pick another broker.port, or set "
            "broker.embedded = 'auto' or 'never' to use the broker already running there",
        )
    reason = cause if isinstance(cause, OSError) else exc
    return ConfigError(
        f"the embedded broker cannot listen on {host}:{port}: {reason}",
        key="broker.host",
        fix="use an address of this machine, such as 127.0.0.1",
    )


class _DropRecords(logging.Filter):
    """Drop log records whose message is ``exactly`` or ``contains`` a text."""

    def __init__(self, exactly: str | None = None, *, contains: str | None = None) -> None:
        super().__init__()
        self.exactly, self.contains = exactly, contains

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.exactly is not None and message == self.exactly:
            return False
        return self.contains is None or self.contains not in message
