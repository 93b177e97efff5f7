"""Why the broker cannot be reached, in words an operator can act on.

paho retries in its own thread and does not say why a connect fails; while one is
overdue, :func:`diagnose_broker` does what paho does (DNS, TCP, TLS handshake) and
:func:`classify_connection_error` names the cause and what to check.
:func:`describe_refusal` does the same for a broker that answered and said no.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

    from .mqttvalues import BrokerSettings

__all__ = [
    "DEFINITE_CAUSES",
    "DIAGNOSE_TIMEOUT_S",
    "NOT_AUTHORISED",
    "classify_connection_error",
    "describe_refusal",
    "diagnose_broker",
    "is_definite",
]

DIAGNOSE_TIMEOUT_S = 3.0
# Causes that waiting does not cure; a client with a timeout fails on them at once.
DEFINITE_CAUSES = ("unknown host", "connection refused", "TLS", "not authorised")
NOT_AUTHORISED = (134, 135, 138)  # bad user name or password, not authorized, banned


def classify_connection_error(exc: BaseException, settings: BrokerSettings) -> str:
    """Why a connection to the broker failed, in words an operator can act on.

    The text starts with the cause (``unknown host``, ``connection refused``,
    ``no answer``, ``network unreachable``, ``TLS``), then says what to check.
    """
    address = settings.address
    if isinstance(exc, socket.gaierror):
        return (
            f"unknown host {settings.host!r} ({exc.strerror or exc}): check broker.host "
            "and the box's DNS"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted ({exc.verify_message or exc}): broker.tls.ca_file "
            f"must hold the CA that signed {address}'s certificate, for that host name"
        )
    if isinstance(exc, ssl.SSLError | ConnectionResetError) and (
        settings.ca_file or settings.cert_file
    ):
        return (
            f"TLS handshake with {address} failed ({exc}): is that port a TLS listener, "
            "and do broker.tls.* match it?"
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection refused by {address}: no broker listens there (is it running, "
            "and is broker.port right?)"
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return (
            f"no answer from {address}: a firewall, a wrong address, or the network or "
            "the broker's host is down"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"network unreachable for {address} ({exc.strerror}): is the network up?"
    return f"cannot connect to {address}: {exc}"


def describe_refusal(code: ReasonCode) -> str:
    """The broker answered and said no: the reason code in words, with the fix."""
    if code.value in NOT_AUTHORISED:
        return (
            f"not authorised ({code}): check broker.username and broker.password, and "
            "the broker's ACL for this client id"
        )
    return f"refused ({code})"


def diagnose_broker(settings: BrokerSettings, timeout: float = DIAGNOSE_TIMEOUT_S) -> str | None:
    """Try what paho does (resolve, TCP, TLS handshake) and say what fails; None if none.

    Blocking; run it in a thread. Only called while a connect is overdue, so it costs a
    healthy broker nothing.
    """
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            if settings.ca_file or settings.cert_file:
                context = ssl.create_default_context(cafile=settings.ca_file)
                if settings.cert_file:
                    context.load_cert_chain(settings.cert_file, settings.key_file)
                tls = context.wrap_socket(
                    sock, server_hostname=settings.host, do_handshake_on_connect=False
                )
                with tls:  # closed on a failed handshake too
                    tls.do_handshake()
    except (OSError, ValueError) as exc:
        return classify_connection_error(exc, settings)
    return None


def is_definite(problem: str) -> bool:
    """Whether ``problem`` is a cause that waiting does not cure (see DEFINITE_CAUSES)."""
    return problem.startswith(DEFINITE_CAUSES)
