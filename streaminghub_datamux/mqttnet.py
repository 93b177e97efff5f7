"""Who serves a paho client's socket: paho's own thread, or the asyncio loop.

:class:`ThreadNetwork` is paho's ``loop_start``: a thread reads, writes, pings and
reconnects, whatever the asyncio loop is doing. The RemoteAPI uses it: its loop belongs
to analytics code, which may block it for seconds, and the connection (keepalive, the
lease heartbeat) must outlive that.

:class:`LoopNetwork` serves the socket from the asyncio loop itself (paho's
"external event loop" mode: ``loop_read``/``loop_write``/``loop_misc`` driven by
``add_reader``/``add_writer``). The agent uses it: its loop is its own and never blocks,
and every frame it publishes then goes to the socket in the same thread, without a hop
to paho's thread and the GIL hand-over that goes with it (issue #12: 0.17 ms of the live
p50; docs/design.md, "paho on the agent's loop"). Connecting (DNS, TCP, TLS handshake)
still runs in a worker thread, since it blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import Any, Protocol

import paho.mqtt.client as mqtt

__all__ = ["LoopNetwork", "Network", "ThreadNetwork"]

log = logging.getLogger(__name__)

# paho pings and checks the keepalive when asked; it asks itself once a second.
MISC_PERIOD_S = 1.0
# Reading stops after this long per readiness event (and after READS_PER_WAKE packets):
# paho parses each packet in Python, and a flood of them (a hostile client's requests)
# must not hold the loop's timers: 64 packets were 6 ms of a replay's lateness.
READ_BUDGET_S = 0.001
READS_PER_WAKE = 64
# A connection must last this long for the next loss to reconnect after the least delay:
# one the broker drops right after its CONNACK (another client with our id takes the
# session over, and is taken over in turn) otherwise comes back every minimum delay.
STABLE_S = 5.0


class Network(Protocol):
    """What MqttLink needs from whoever serves the socket."""

    #: True when paho's calls may come from any thread (paho's own thread serves it).
    thread_safe: bool

    def start(self) -> None:
        """Begin connecting (connect_async was called), and reconnect after every loss."""

    async def stop(self, disconnect: bool) -> None:
        """Stop serving, after sending a DISCONNECT if ``disconnect``; no reconnects after."""

    def connected(self) -> None:
        """The broker accepted us (CONNACK): the next loss reconnects after the least delay."""

    def hold_writes(self) -> None:
        """Around a publish on the loop: its packet is written by :meth:`release_writes`."""

    def release_writes(self) -> None:
        """Write what was held, now."""


class ThreadNetwork:
    """paho's network thread (``loop_start``), with paho's own reconnect backoff.

    paho restarts its backoff from the least delay at every CONNACK, so a connection the
    broker drops right after accepting it (another client took the session over with
    our id) came back every 0.5 s for ever. The least delay given to paho therefore
    doubles with each connection lost within :data:`STABLE_S`, as :class:`LoopNetwork`'s
    own backoff does, and is the minimum again after one that lasted.
    """

    thread_safe = True

    def __init__(self, client: mqtt.Client, min_delay_s: float, max_delay_s: float) -> None:
        self._client = client
        self._min_delay_s, self._max_delay_s = min_delay_s, max_delay_s
        self._least_s = min_delay_s  # the delay after the next loss of an accepted connection
        self._connected_at: float | None = None  # when the broker last accepted us
        client.on_socket_open = lambda client, userdata, sock: _no_delay(sock)
        client.on_socket_close = self._socket_closed

    def start(self) -> None:
        self._client.loop_start()

    async def stop(self, disconnect: bool) -> None:
        if disconnect:
            self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    def connected(self) -> None:
        self._connected_at = time.monotonic()

    def _socket_closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho's thread, before it waits to reconnect: the wait it is about to take.
        accepted, self._connected_at = self._connected_at, None
        if accepted is None:
            return  # never accepted: paho doubles its delay itself
        if time.monotonic() - accepted >= STABLE_S:
            self._least_s = self._min_delay_s
        else:
            self._least_s = min(self._least_s * 2, self._max_delay_s)
        # paho's stubs say int; its backoff takes any number of seconds.
        client.reconnect_delay_set(self._least_s, self._max_delay_s)  # type: ignore[arg-type]

    def hold_writes(self) -> None:
        pass  # paho's thread writes

    def release_writes(self) -> None:
        pass


class LoopNetwork:
    """paho's socket read, written and kept alive by the running asyncio loop."""

    thread_safe = False

    def __init__(self, client: mqtt.Client, min_delay_s: float, max_delay_s: float) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._min_delay_s, self._max_delay_s = min_delay_s, max_delay_s
        self._delay_s = min_delay_s
        self._connected_at: float | None = None  # when the broker last accepted us
        self._fd: int | None = None  # the socket being watched
        self._writer = False  # add_writer is on (the socket's buffer was full)
        self._write_scheduled = False
        self._holding = self._held = False  # a publish in progress writes when it is done
        self._lost = asyncio.Event()  # the socket closed
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[Any] | None = None
        client.on_socket_open = self._socket_opened
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._write_wanted
        client.on_socket_unregister_write = self._write_not_wanted

    def start(self) -> None:
        self._task = self._loop.create_task(self._serve(), name="mqtt-network")

    def connected(self) -> None:
        self._connected_at = self._loop.time()

    def hold_writes(self) -> None:
        self._holding = True

    def release_writes(self) -> None:
        # The frame goes out in this loop step: no turn for a scheduled write (one per
        # frame, issue #12's loop turns) and no wait for one.
        self._holding = False
        if self._held:
            self._held = False
            self._write_ready()

    async def stop(self, disconnect: bool) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._connecting is not None:  # a thread still connecting: let it finish
            await asyncio.gather(self._connecting, return_exceptions=True)
        client = self._client
        if disconnect and client.socket() is not None:
            client.disconnect()
            client.loop_write()  # the DISCONNECT, after which paho closes the socket
        sock = client.socket()
        if sock is not None:  # not written (a full buffer) or not asked for
            self._unwatch()
            sock.close()

    # -- connecting and keeping alive ----------------------------------------------------

    async def _serve(self) -> None:
        client = self._client
        while not self._stopping:
            if client.socket() is None:
                # Kept for stop(), which waits for the thread rather than leave it to
                # open a socket nobody serves.
                connecting = asyncio.ensure_future(asyncio.to_thread(client.reconnect))
                self._connecting = connecting
                try:
                    await asyncio.shield(connecting)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    self._connecting = None
                    log.debug("connecting to the broker: %s", exc)
                    await self._back_off()
                    continue
                self._connecting = None
            self._lost.clear()
            while client.socket() is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(MISC_PERIOD_S):
                        await self._lost.wait()
                if client.socket() is not None:
                    client.loop_misc()  # PINGREQ when due; drops a silent broker
            accepted, self._connected_at = self._connected_at, None
            if accepted is not None and self._loop.time() - accepted >= STABLE_S:
                self._delay_s = self._min_delay_s
            await self._back_off()

    async def _back_off(self) -> None:
        await asyncio.sleep(self._delay_s)
        self._delay_s = min(self._delay_s * 2, self._max_delay_s)

    # -- paho's socket callbacks (the loop's thread, or the connecting thread) ----------

    def _on_loop(self, callback: Any, *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _socket_opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _no_delay(sock)
        self._on_loop(self._watch, sock)

    def _socket_closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch)

    def _write_wanted(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._schedule_write)

    def _write_not_wanted(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._stop_writer)

    # -- on the loop ---------------------------------------------------------------------

    def _watch(self, opened: Any) -> None:
        sock = self._client.socket()
        if self._stopping or sock is None or sock is not opened:
            return  # closed again, or a stale socket
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._read_ready)

    def _unwatch(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            if self._writer:
                self._loop.remove_writer(fd)
        self._writer = False
        self._lost.set()

    def _schedule_write(self) -> None:
        if self._holding:
            self._held = True
            return
        # One write per loop step, for every packet paho queued during that step.
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_ready)

    def _write_ready(self) -> None:
        self._write_scheduled = False
        client = self._client
        if client.socket() is None:
            return
        client.loop_write()
        # paho asks for writability once; if the buffer filled, watch for room.
        if client.want_write() and self._fd is not None and not self._writer:
            self._writer = True
            self._loop.add_writer(self._fd, self._write_ready)
        elif not client.want_write():
            self._stop_writer()

    def _stop_writer(self) -> None:
        if self._writer and self._fd is not None:
            self._loop.remove_writer(self._fd)
        self._writer = False

    def _read_ready(self) -> None:
        client = self._client
        until = time.monotonic() + READ_BUDGET_S
        for _ in range(READS_PER_WAKE):
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                return  # paho closed the socket and said why (on_disconnect)
            sock = client.socket()
            if sock is None or not _more_to_read(sock):
                return
            if time.monotonic() > until:
                break
        # More to read: epoll wakes the loop again for bytes on the socket (after the
        # timers now due), but not for TLS bytes already decrypted: those get a turn.
        sock = client.socket()
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            self._loop.call_soon(self._read_ready)


def _more_to_read(sock: Any) -> bool:
    """Whether another read would find data (without waiting for the next wake-up)."""
    if isinstance(sock, ssl.SSLSocket):
        return sock.pending() > 0  # decrypted bytes epoll cannot see
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return True  # paho's next read meets the error and reports it


def _no_delay(sock: Any) -> None:
    """Send small frames at once: paho leaves Nagle's algorithm on, and with QoS 0 nothing
    flows back to carry the ACK, so each frame waited 40 ms for the delayed ACK."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
