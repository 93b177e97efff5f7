"""One MQTT connection, used from asyncio; shared by the agent and the RemoteAPI.

paho-mqtt does the protocol; its socket is served by paho's network thread (the
RemoteAPI) or by the asyncio loop itself (the agent; mqttnet.py says why). Either way
paho's callbacks run the link's handlers on the asyncio loop, so the rest of the code
runs on one thread.
Publishing has flow control: :meth:`MqttLink.publish` waits while too many messages are
unacknowledged, so a fast producer slows down instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .brokerprobe import (
    classify_connection_error,
    describe_refusal,
    diagnose_broker,
    is_definite,
)
from .errors import ConfigError, InvalidRequest, Unavailable
from .mqttnet import LoopNetwork, Network, ThreadNetwork
from .mqttvalues import BrokerSettings, Incoming, Will

__all__ = [
    "BrokerSettings",
    "Incoming",
    "MqttLink",
    "Will",
    "classify_connection_error",
    "describe_refusal",
    "diagnose_broker",
]

log = logging.getLogger(__name__)

# Unacknowledged publishes allowed before publish() waits (messages, bytes).
MAX_OUTSTANDING = 64
MAX_OUTSTANDING_BYTES = 16 << 20
# Reconnect quickly after a broker restart: the worst wait is about the maximum delay.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 2
# How long a session outlives its connection on an MQTT 5 broker: messages for us are
# queued that long while we reconnect (after a broker restart, too, with persistence on).
SESSION_EXPIRY_S = 120
# In "auto" mode, how long an MQTT 5 CONNECT may go unanswered before trying 3.1.1 (some
# 3.1.1-only brokers, amqtt among them, wait instead of refusing).
PROTOCOL_PROBE_S = 2.0
TIMED_OUT = "timed out"
_UNSUPPORTED_PROTOCOL = (1, 132)  # MQTT 3.1.1 and MQTT 5 reason codes
# While the broker cannot be reached: a first look after FIRST_LOOK_S (a definite cause
# is reported then), the first WARNING about silence after FIRST_REPORT_S, then one at
# each step. FIRST_REPORT_S leaves the 3.1.1 attempt after the MQTT 5 probe (which a
# 3.1.1-only broker such as amqtt lets run out) time to connect on a loaded box: a
# WARNING on a connect that succeeds is noise.
FIRST_LOOK_S = 0.5
FIRST_REPORT_S = PROTOCOL_PROBE_S + 2.5
REPORT_STEPS_S = (5.0, 10.0, 20.0, 40.0, 60.0)
# Connections dropped again and again sooner than this after their CONNACK are most
# likely taken over by another client with our id (mosquitto 2.0 just closes them).
SHORT_LIVED_S = 5.0
RETAIN_UNSUPPORTED = "retain not supported"  # MQTT 5 reason code 0x9A
_RETAIN_NOT_SUPPORTED = 154


class MqttLink:
    """One connection to the broker.

    Args:
        client_id: the MQTT client id (unique per broker).
        settings: broker address and credentials.
        on_message: called on the loop for every message on a subscribed topic.
        on_connect: called on the loop after every (re)connect, before queued work
            resumes; ``session_present`` says whether the broker kept our session.
        on_disconnect: called on the loop when the connection drops.
        will: published by the broker if we vanish without a clean close.
        network: who serves the socket: ``"thread"`` (paho's thread: the connection
            lives on while the loop is blocked) or ``"loop"`` (the asyncio loop: no
            thread hop per message, for a loop that never blocks, such as the agent's).
    """

    def __init__(
        self,
        client_id: str,
        settings: BrokerSettings,
        *,
        on_message: Callable[[Incoming], None],
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        will: Will | None = None,
        network: Literal["thread", "loop"] = "thread",
    ) -> None:
        self.client_id = client_id
        self._network_kind = network
        self._network: Network | None = None
        self._loop_thread: int | None = None
        self.settings = settings
        self.will = will
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._subscriptions: dict[str, int] = {}
        self._unsubscribed: set[str] = set()  # to unsubscribe on the next connect
        self._acks: dict[int, asyncio.Future[Any]] = {}  # SUBACK / UNSUBACK by mid
        self._acked_some = asyncio.Event()  # a PUBACK arrived (for flush)
        self._pending: dict[int, tuple[int, int]] = {}  # mid -> (qos, size), not yet sent/acked
        self._pending_bytes = 0
        # PUBACKed mids from paho's thread. The loop takes them when it publishes next;
        # paho's thread wakes it only while a coroutine waits for acks (_ack_waiters).
        self._acked_publishes: deque[int] = deque()
        self._drain_scheduled = False
        self._ack_waiters = 0
        self._room = asyncio.Event()
        self._room.set()
        self._connected = asyncio.Event()
        self._connected_at = 0.0  # loop time of the last CONNACK
        self._short_drops = 0  # connections in a row lost within SHORT_LIVED_S
        self._closing = False
        self._first: asyncio.Future[str | None] | None = None  # outcome of the first connect
        self._reporter: asyncio.Task[None] | None = None  # says why, while not connected
        self._definite = ""  # a cause a client with a timeout fails on at once
        #: Why the broker cannot be reached now ("" when connected or not yet known).
        self.problem = ""
        self.protocol: int = mqtt.MQTTv5
        self.disconnects = 0
        # The largest packet the broker accepts, when it says (MQTT 5 CONNACK).
        self.max_packet_size: int | None = None
        # False once the broker says it keeps no retained messages (MQTT 5): then the
        # retain flag is dropped everywhere, since such a broker disconnects a client
        # that sets it (docs/protocol.md, "What a broker must offer").
        self.retain_available = True

    # -- connection ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self, timeout: float | None = 10.0) -> None:
        """Connect (MQTT 5, or 3.1.1 as configured or when the broker needs it).

        With ``timeout=None`` this waits for the broker as long as it takes (the agent at
        boot); otherwise it raises :class:`Unavailable` when no broker answers in time.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._client is not None:
            raise Unavailable("already connected (or connecting)")
        versions = {"5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311]}.get(
            self.settings.protocol, [mqtt.MQTTv5, mqtt.MQTTv311]
        )
        deadline = None if timeout is None else loop.time() + timeout
        self._definite = ""
        self._start_reporting(fail_fast=deadline is not None)
        try:
            await self._connect_loop(versions, deadline)
        except asyncio.CancelledError:
            await self._stop_client()
            raise
        finally:
            self._stop_reporting()

    async def _connect_loop(self, versions: Sequence[int], deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        problem = ""
        while True:
            if self._closing:
                raise Unavailable(f"closed while connecting to {self.settings.address}")
            for index, version in enumerate(versions):
                remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
                probing = index < len(versions) - 1
                if probing:  # a 3.1.1-only broker may not answer MQTT 5 at all
                    remaining = min(remaining or PROTOCOL_PROBE_S, PROTOCOL_PROBE_S)
                problem = await self._attempt(version, remaining) or ""
                if not problem:
                    return
                if problem == RETAIN_UNSUPPORTED and self.retain_available:
                    log.warning(
                        "broker %s keeps no retained messages; going on without: agents "
                        "are found by discovery requests only",
                        self.settings.address,
                    )
                    self.retain_available = False
                    return await self._connect_loop(versions[index:], deadline)
                silent = problem.startswith(TIMED_OUT)
                if problem == "protocol" or (probing and silent and await self._tcp_open()):
                    continue  # the broker is there but not for this version: the next one
                if not silent:  # the broker said no (a password), or a definite cause
                    raise Unavailable(f"MQTT broker {self.settings.address}: {problem}")
                break
            if deadline is not None and loop.time() >= deadline:
                why = self.problem or problem
                raise Unavailable(f"no MQTT broker answered at {self.settings.address}: {why}")
            log.debug("broker %s: %s; trying again", self.settings.address, problem)

    async def _attempt(self, version: int, timeout: float | None) -> str | None:
        """One connection attempt: None once connected, else the problem."""
        self.protocol = version
        self._client = self._make_client(version)
        try:
            await asyncio.to_thread(
                self._client.connect_async,
                self.settings.host,
                self.settings.port,
                self.settings.keepalive_s,
                **self._connect_kwargs(version),
            )
        except (OSError, ValueError) as exc:
            raise Unavailable(f"MQTT broker {self.settings.address}: {exc}") from None
        self._network = self._make_network(self._client)
        self._network.start()
        outcome = await self._first_outcome(timeout)
        if outcome is not None:
            await self._stop_client()
        return outcome

    async def _tcp_open(self) -> bool:
        def probe() -> bool:
            try:
                with socket.create_connection((self.settings.host, self.settings.port), 0.5):
                    return True
            except OSError:
                return False

        return await asyncio.to_thread(probe)

    async def _first_outcome(self, timeout: float | None) -> str | None:
        """None once connected; else why not ("protocol" if the broker refused the version)."""
        assert self._loop is not None
        if self._definite:
            return self._definite
        self._first = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                return await self._first
        except TimeoutError:
            return f"{TIMED_OUT} (is the broker running, and is host:port right?)"

    def _start_reporting(self, fail_fast: bool) -> None:
        if self._reporter is None or self._reporter.done():
            loop = asyncio.get_running_loop()
            self._reporter = loop.create_task(self._report_until_connected(fail_fast))

    def _stop_reporting(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None

    async def _report_until_connected(self, fail_fast: bool) -> None:
        """While not connected: find out why, and say so (WARNING) at each backoff step.

        paho retries in its own thread without telling why; this probes the way it
        connects (DNS, TCP, TLS) so the log, ``self.problem`` (the agent's systemd
        STATUS=) and a client's error name the cause instead of "timed out".
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        steps = iter(REPORT_STEPS_S)
        wait = FIRST_LOOK_S
        while True:
            await asyncio.sleep(wait)
            if self.connected or self._closing:
                return
            found = await asyncio.to_thread(diagnose_broker, self.settings)
            if self.connected or self._closing:
                return
            problem = found or (
                f"{self.settings.address} accepts TCP but sends no MQTT CONNACK (is it an "
                "MQTT broker, and the right protocol? broker.protocol)"
            )
            elapsed = loop.time() - began
            if not is_definite(problem) and elapsed < FIRST_REPORT_S:
                wait = FIRST_REPORT_S - elapsed  # maybe just slow: look again before saying
                continue
            self.problem = problem
            if fail_fast and is_definite(problem):
                self._definite = problem
                if self._first is not None and not self._first.done():
                    self._first.set_result(problem)
                return
            wait = next(steps, REPORT_STEPS_S[-1])
            log.warning(
                "MQTT broker %s: %s; still trying (for %.0f s), next report in %g s",
                self.settings.address,
                problem,
                elapsed,
                wait,
            )

    def _make_network(self, client: mqtt.Client) -> Network:
        # Windows' default (proactor) loop cannot watch a socket: paho's thread serves it.
        proactor = getattr(asyncio, "ProactorEventLoop", None)
        on_proactor = proactor is not None and isinstance(self._loop, proactor)
        if self._network_kind == "loop" and not on_proactor:
            return LoopNetwork(client, RECONNECT_MIN_S, RECONNECT_MAX_S)
        return ThreadNetwork(client, RECONNECT_MIN_S, RECONNECT_MAX_S)

    def _connect_kwargs(self, version: int) -> dict[str, Any]:
        if version != mqtt.MQTTv5:
            return {}
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        return {"clean_start": mqtt.MQTT_CLEAN_START_FIRST_ONLY, "properties": properties}

    def _make_client(self, version: int) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion(version),
            # 3.1.1 has no session expiry: start clean and resubscribe on reconnect.
            clean_session=True if version != mqtt.MQTTv5 else None,
        )
        settings = self.settings
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.ca_file or settings.cert_file:
            try:
                client.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load TLS files: {exc}",
                    key="broker.tls",
                    fix="point broker.tls.* at readable PEM files",
                ) from None
        if self.will is not None:
            retain = self.will.retain and self.retain_available
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=retain)
        # paho's stubs say int; its backoff takes any number of seconds.
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        client.max_inflight_messages_set(MAX_OUTSTANDING)
        client.max_queued_messages_set(0)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        client.on_unsubscribe = self._paho_subscribe
        return client

    async def close(
        self, final: Sequence[tuple[str, bytes, int, bool]] = (), timeout: float = 3.0
    ) -> None:
        """Publish ``final`` messages (e.g. an offline state), wait for them, disconnect."""
        self._closing = True
        client = self._client
        if client is None:
            return
        if self.connected:
            for topic, payload, qos, retain in final:
                self.publish_nowait(topic, payload, qos, retain)
        try:
            async with asyncio.timeout(timeout):
                while self._take_acks() and self._pending and self.connected:
                    self._room.clear()
                    await self._wait_for_acks(self._room)
        except TimeoutError:
            log.warning("%d messages still unsent when closing", len(self._pending))
        await self._stop_client(disconnect=True)

    async def _stop_client(self, disconnect: bool = False) -> None:
        if self._closing:
            self._stop_reporting()
        client, self._client = self._client, None
        network, self._network = self._network, None
        if client is None:
            return
        if network is not None:
            await network.stop(disconnect)
        self._connected.clear()
        # Nothing will be acknowledged any more: release everyone waiting on the link.
        self._pending.clear()
        self._pending_bytes = 0
        self._room.set()
        for future in self._acks.values():
            if not future.done():
                future.set_exception(Unavailable("the MQTT connection was closed"))

    # -- subscribe / publish -------------------------------------------------------------

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe, and wait for the broker's SUBACK when connected.

        The subscription is remembered and made again after every reconnect (so one made
        while disconnected takes effect on the next connect).
        """
        _check_filter(topic)
        self._subscriptions[topic] = qos
        self._unsubscribed.discard(topic)
        await self._request_ack(lambda c: c.subscribe(topic, qos), f"subscribe {topic}", timeout)

    async def unsubscribe(self, topic: str, timeout: float = 10.0) -> None:
        """Unsubscribe (on the next connect if not connected now)."""
        if self._subscriptions.pop(topic, None) is None:
            return
        if not self.connected:
            self._unsubscribed.add(topic)  # the broker may have kept our session
            return
        await self._request_ack(lambda c: c.unsubscribe(topic), f"unsubscribe {topic}", timeout)

    async def _request_ack(
        self, send: Callable[[mqtt.Client], Any], what: str, timeout: float
    ) -> None:
        assert self._loop is not None
        if self._client is None or not self.connected:
            # Not connected: the subscription is remembered and made on reconnect.
            return
        future = self._loop.create_future()
        result, mid = send(self._client)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise Unavailable(f"{what}: {mqtt.error_string(result)}")
        self._acks[mid] = future
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise Unavailable(f"{what}: the broker did not answer in {timeout} s") from None
        finally:
            self._acks.pop(mid, None)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> bool:
        """Publish, first waiting while too much is unacknowledged.

        Returns False, without publishing, when not connected (the caller decides:
        spool, drop and count, or fail).
        """
        self._take_acks()
        while not self._has_room():
            if not self.connected or self._client is None or self._closing:
                return False
            self._room.clear()
            await self._wait_for_acks(self._room)
        return self.publish_nowait(
            topic, payload, qos, retain, response_topic=response_topic, correlation=correlation
        )

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> bool:
        """Publish now, without flow control (small control messages); False if offline."""
        self._take_acks()  # before paho hands out a mid that a queued ack could name
        client = self._client
        if client is None or not self.connected:
            return False
        properties = None
        if self.protocol == mqtt.MQTTv5 and (response_topic or correlation is not None):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        retain = retain and self.retain_available
        network = self._network
        assert network is not None  # set with the client
        network.hold_writes()
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
                log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
                return False
            if info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0:
                return False
            # Recorded before the packet is written (release_writes), and on_publish
            # reaches the loop through call_soon(_threadsafe): the ack finds it.
            self._pending[info.mid] = (qos, len(payload))
            self._pending_bytes += len(payload)
            return True
        finally:
            network.release_writes()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has acknowledged every QoS 1 message published so far.

        True when it has; False after ``timeout`` (not connected, or a slow broker).
        """
        waiting = set(self._pending)
        deadline = asyncio.get_running_loop().time() + timeout
        while self._take_acks() and waiting & self._pending.keys():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._acked_some.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wait_for_acks(self._acked_some)
        return True

    def _take_acks(self) -> bool:
        """Account for the PUBACKs paho's thread queued since the last look. True."""
        acked = self._acked_publishes
        while acked:
            self._published_on_loop(acked.popleft())
        return True

    async def _wait_for_acks(self, event: asyncio.Event) -> None:
        """Wait for ``event`` with paho's thread told to wake the loop on each PUBACK.

        Announced first, then the acks queued so far are taken (they may set ``event``):
        a PUBACK queued after the announcement wakes the loop, one queued before it is
        taken here, so none is missed.
        """
        self._ack_waiters += 1
        try:
            self._take_acks()
            await event.wait()
        finally:
            self._ack_waiters -= 1

    def publish_from_thread(self, topic: str, payload: bytes) -> None:
        """QoS 0, from any thread, no flow control: for small periodic messages."""
        client, network = self._client, self._network
        if client is None or network is None or not self.connected:
            return
        if network.thread_safe:  # sent even while the loop is blocked
            client.publish(topic, payload, qos=0)
        else:
            self._to_loop(client.publish, topic, payload, 0)

    def _has_room(self) -> bool:
        return len(self._pending) < MAX_OUTSTANDING and self._pending_bytes < (
            MAX_OUTSTANDING_BYTES
        )

    @property
    def unacknowledged(self) -> int:
        self._take_acks()
        return len(self._pending)

    # -- paho callbacks (paho's thread) -> the loop ----------------------------------------

    def _to_loop(self, callback: Callable[..., Any], *args: Any) -> bool:
        """Run ``callback`` on the loop, after the paho call in progress returns."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        if threading.get_ident() == self._loop_thread:  # the loop serves the socket
            loop.call_soon(callback, *args)
        else:
            loop.call_soon_threadsafe(callback, *args)
        return True

    def _paho_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        limit = getattr(properties, "MaximumPacketSize", None) if properties else None
        retain = getattr(properties, "RetainAvailable", 1) != 0 if properties else True
        self._to_loop(
            self._connected_on_loop, client, reason_code, flags.session_present, limit, retain
        )

    def _paho_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._to_loop(self._disconnected_on_loop, client, str(reason_code))

    def _paho_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        response_topic = correlation = None
        props = message.properties
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        incoming = Incoming(
            message.topic, bytes(message.payload), bool(message.retain), response_topic, correlation
        )
        self._to_loop(self._on_message, incoming)

    def _paho_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Queued for the loop, which takes them when it publishes next: a PUBACK wakes
        # the loop (a write to its wake-up pipe) only while a coroutine waits for one,
        # and once per burst, not once per message (issue #12: a loop wake per frame).
        self._acked_publishes.append(mid)
        if self._ack_waiters and not self._drain_scheduled:
            self._drain_scheduled = True
            if not self._to_loop(self._published_batch_on_loop):
                self._drain_scheduled = False  # no loop to drain them: allow a later try

    def _paho_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, *rest: Any) -> None:
        self._to_loop(self._acked_on_loop, mid)

    # -- on the loop ---------------------------------------------------------------------

    def _connected_on_loop(
        self,
        client: mqtt.Client,
        code: ReasonCode,
        session: bool,
        limit: int | None,
        retain: bool = True,
    ) -> None:
        if client is not self._client:
            return
        self.max_packet_size = int(limit) if limit else None
        if not retain:
            self.retain_available = False
        first = self._first
        if code.is_failure:
            problem = "protocol" if code.value in _UNSUPPORTED_PROTOCOL else describe_refusal(code)
            if code.value == _RETAIN_NOT_SUPPORTED:
                problem = RETAIN_UNSUPPORTED  # connect_loop tries again without retain
            elif problem != "protocol":
                self.problem = problem
            if first is not None and not first.done():
                first.set_result(problem)
            else:
                log.warning("broker %s: %s", self.settings.address, problem)
            return
        self._connected.set()
        self._connected_at = self._loop.time() if self._loop is not None else 0.0
        self.problem = ""
        if self._network is not None:
            self._network.connected()
        log.info(
            "connected to %s (MQTT %s, session %s)",
            self.settings.address,
            "5" if self.protocol == mqtt.MQTTv5 else "3.1.1",
            "kept" if session else "new",
        )
        # Made again every time: a kept session lacks what was asked while disconnected.
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos)
        for topic in self._unsubscribed:
            client.unsubscribe(topic)
        self._unsubscribed.clear()
        if self._on_connect is not None:
            self._on_connect(session)
        if first is not None and not first.done():
            first.set_result(None)
        self._room.set()

    def _disconnected_on_loop(self, client: mqtt.Client, reason: str) -> None:
        if client is not self._client:
            return
        was_connected = self.connected
        self._connected.clear()
        first = self._first
        if first is not None and not first.done() and self.protocol == mqtt.MQTTv5:
            # Closed before a CONNACK: a 3.1.1-only broker does this to an MQTT 5 CONNECT.
            first.set_result("protocol")
        # QoS 0 messages not yet written are gone with the connection; QoS 1 ones are
        # resent by paho after the reconnect and stay pending until acknowledged.
        for mid, (qos, size) in list(self._pending.items()):
            if qos == 0:
                del self._pending[mid]
                self._pending_bytes -= size
        self._room.set()
        if was_connected and not self._closing:
            self.disconnects += 1
            hint = ""
            lived = self._loop.time() - self._connected_at if self._loop is not None else 0.0
            self._short_drops = self._short_drops + 1 if lived < SHORT_LIVED_S else 0
            if self._short_drops >= 2:  # once is a broker restart; again and again is not
                hint = (
                    f" within {SHORT_LIVED_S:g} s of connecting, {self._short_drops} times "
                    f"in a row: does another client (a second agent?) use the client id "
                    f"{self.client_id!r}? Give each its own id"
                )
            log.warning(
                "lost the broker %s (%s)%s; reconnecting", self.settings.address, reason, hint
            )
            self._start_reporting(fail_fast=False)
            if self._on_disconnect is not None:
                self._on_disconnect(reason)

    def _published_batch_on_loop(self) -> None:
        # Cleared before draining: a PUBACK queued after this line schedules a new drain.
        self._drain_scheduled = False
        self._take_acks()

    def _published_on_loop(self, mid: int) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        self._acked_some.set()
        self._pending_bytes -= entry[1]
        if self._has_room():
            self._room.set()

    def _acked_on_loop(self, mid: int) -> None:
        future = self._acks.get(mid)
        if future is not None and not future.done():
            future.set_result(None)


def _check_filter(topic: str) -> None:
    """Refuse an invalid topic filter before it is remembered or sent (MQTT 4.7.1)."""
    levels = topic.split("/")
    problem = ""
    if not topic or len(topic.encode()) > 65535 or "\0" in topic:
        problem = "empty, too long, or holding a NUL"
    elif any(
        "#" in level and (level != "#" or i != len(levels) - 1) for i, level in enumerate(levels)
    ):
        problem = "'#' may only be a whole last level"
    elif any("+" in level and level != "+" for level in levels):
        problem = "'+' may only be a whole level"
    if problem:
        raise InvalidRequest(f"invalid topic filter {topic!r}: {problem}")
