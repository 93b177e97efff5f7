"""sd_notify against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaminghub_datamux.agent import sdnotify

RECV_TIMEOUT_S = 2.0
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test outside systemd, even when pytest itself runs in a unit."""
    for var in SYSTEMD_VARS:
        monkeypatch.delenv(var, raising=False)


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(RECV_TIMEOUT_S)
    sock.bind(address)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A listening socket file, named by $NOTIFY_SOCKET as systemd does."""
    with contextlib.ExitStack() as stack:
        folder = tmp_path
        if len(str(tmp_path / "notify")) > 100:  # sun_path holds 108 bytes
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdn")))
        path = folder / "notify"
        sock = stack.enter_context(_bound(str(path)))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket in Linux's abstract namespace: $NOTIFY_SOCKET starts with '@'."""
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract sockets are Linux-only")
    name = f"streaminghub-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_unset_socket_is_a_no_op() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog_ping() is False


def test_empty_socket_variable_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.ready() is False


@pytest.mark.parametrize("value", ["relative/notify", "vsock:2:9999"])
def test_unsupported_address_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_missing_socket_returns_false_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda: sdnotify.notify("FDSTORE=0"), b"FDSTORE=0"),
        (lambda: sdnotify.ready(), b"READY=1"),
        (lambda: sdnotify.ready("serving 3 nodes"), b"READY=1\nSTATUS=serving 3 nodes"),
        (lambda: sdnotify.stopping(), b"STOPPING=1"),
        (lambda: sdnotify.status("spool 12 MB"), b"STATUS=spool 12 MB"),
        (lambda: sdnotify.status("broker down\nretrying"), b"STATUS=broker down retrying"),
        (lambda: sdnotify.watchdog_ping(), b"WATCHDOG=1"),
        (lambda: sdnotify.status("héllo"), "STATUS=héllo".encode()),
    ],
    ids=["raw", "ready", "ready-status", "stopping", "status", "status-newline", "ping", "utf8"],
)
def test_datagrams_on_a_socket_file(path_socket: socket.socket, send, expected: bytes) -> None:
    assert send() is True
    assert path_socket.recv(4096) == expected


def test_datagrams_on_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready("up") is True
    assert sdnotify.watchdog_ping() is True
    assert abstract_socket.recv(4096) == b"READY=1\nSTATUS=up"
    assert abstract_socket.recv(4096) == b"WATCHDOG=1"


def test_each_message_is_one_datagram(path_socket: socket.socket) -> None:
    for _ in range(3):
        assert sdnotify.watchdog_ping()
    assert [path_socket.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    path_socket.settimeout(0.05)
    with pytest.raises(TimeoutError):
        path_socket.recv(4096)


# -- watchdog ------------------------------------------------------------------------


def test_no_watchdog_when_unset() -> None:
    assert sdnotify.watchdog_interval() is None


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # WatchdogSec=30
    assert sdnotify.watchdog_interval() == 15.0


def test_watchdog_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.5


def test_watchdog_for_another_pid_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited by a child process: only the main process may ping.
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize(
    ("usec", "pid"),
    [("abc", ""), ("", "1"), ("0", ""), ("-5", ""), ("30000000", "self"), ("1.5", "")],
)
def test_malformed_watchdog_variables(monkeypatch: pytest.MonkeyPatch, usec: str, pid: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() is None


def test_a_receiver_that_does_not_read_never_blocks_the_sender(path_socket: socket.socket) -> None:
    # The kernel queues about 10 datagrams per AF_UNIX socket; a blocking send would
    # then stall the agent's event loop. Past the queue, notifications are dropped.
    results = [sdnotify.watchdog_ping() for _ in range(200)]
    assert results[0] is True
    assert results[-1] is False
