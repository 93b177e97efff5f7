"""Serving RPC requests: limits, parsing, one reply on the asker's own topic.

The method itself is the agent's (``call``: dispatched as protocol.TABLE declares it);
this module does everything around it. Nothing from the network is trusted: a request
that is too big, malformed or on a topic naming no valid client is counted, logged at a
bounded rate, and answered only where the broker let its sender write. A client over
its request budget (agent/ratelimit.py) is not served: told when to retry, and before
then only counted. A protocol v1 request gets an error telling its client to upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checks import is_id
from ..codec import codec_of, decode, encode
from ..errors import DatamuxError, InvalidRequest
from ..mqttio import Incoming, MqttLink
from ..paging import Pager
from ..protocol import (
    PROTOCOL_VERSION,
    TABLE,
    Request,
    Topics,
    error_reply,
    ok_reply,
    parse_request,
    request_id_of,
)
from ..util import describe_error
from .counters import Counters
from .leases import lease_key
from .ratelimit import RequestBudget, Verdict

__all__ = ["MAX_CONCURRENT_REQUESTS", "RateLimitedLog", "RequestServer"]

log = logging.getLogger(__name__)

MAX_CONCURRENT_REQUESTS = 32
# Requests up to this many times the limit are still decoded, to address the error reply.
OVERSIZE_DECODE_FACTOR = 4


@dataclass(eq=False, kw_only=True)
class RequestServer:
    """Takes requests off the agent's RPC topic and answers each exactly once.

    Args:
        agent_id: this agent.
        topics: builds the reply topics.
        link: the broker connection.
        counters: counts requests, bad ones and v1 ones.
        pager: splits listings larger than one message into pages.
        call: serves a parsed request (in the request's codec), returns the result.
        touch: a request is a sign of life of its client's connection (its lease).
        max_request_bytes: ``agent.max_request_bytes``.
        budget: each client's request budget (``agent.max_requests_per_s``,
            ``agent.request_burst``).
    """

    agent_id: str
    topics: Topics
    link: MqttLink
    counters: Counters
    pager: Pager
    call: Callable[[Request, str], Awaitable[Any]]
    touch: Callable[[str], None]
    max_request_bytes: int
    budget: RequestBudget
    # A flood of bad requests must not flood the journal (an SD card) too.
    bad_log: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog(log, per_window=20, window_s=10.0), init=False
    )
    limit_log: RateLimitedLog = field(
        # A flooder's refusals all say the same: a few lines, then a count.
        default_factory=lambda: RateLimitedLog(
            log, per_window=5, window_s=10.0, what="requests over budget"
        ),
        init=False,
    )
    _jobs: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def cancel_all(self) -> None:
        """The agent is stopping: each request in flight answers "unavailable"."""
        for job in list(self._jobs):
            job.cancel()

    def flush_logs(self) -> None:
        """Say how many warnings each rate-limited log left out (called every tick)."""
        self.bad_log.flush()
        self.limit_log.flush()

    def on_request(self, client: str, message: Incoming, *, stopping: bool = False) -> None:
        """A request from ``client``: the topic level the broker let that client write."""
        self.counters.requests += 1
        if not is_id(client):
            # No identity we could answer to: log and count, never reply elsewhere.
            self.counters.bad_requests += 1
            self.counters.unidentified_requests += 1
            self.bad_log.warning(
                "ignored a request on %r: no valid client id in the topic", message.topic[:200]
            )
            return
        verdict = self.budget.take(client)
        if verdict is not Verdict.SERVE:
            self._refuse_over_budget(client, message, verdict)
            return
        if message.retain:
            # The broker kept it and hands it to every new subscription: served, it would
            # run again at each restart of this agent. A request is an action, now.
            self.counters.bad_requests += 1
            self.bad_log.warning("ignored a retained request of client %s", client)
            text = "a retained request is not served (it would run again at every agent "
            text += "restart): publish requests with retain=False, and clear this one by "
            text += "publishing an empty retained message to its topic"
            self._reply_error(client, message, "invalid_request", text)
            return
        if len(self._jobs) >= MAX_CONCURRENT_REQUESTS or stopping:
            why = "agent is stopping" if stopping else "too many requests at once"
            self._reply_error(client, message, "unavailable", why)
            return
        job = asyncio.get_running_loop().create_task(self._serve(client, message))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _refuse_over_budget(self, client: str, message: Incoming, verdict: Verdict) -> None:
        """Not served, not decoded: only a NOTICE is answered (its id is read, to address
        the error), so a flood costs no reply per request."""
        self.counters.requests_rate_limited += 1
        budget = self.budget
        if verdict is Verdict.DROP:
            self.limit_log.warning("client %s is over its request budget: not served", client)
            return
        retry = budget.retry_after_s(client)
        text = (
            f"rate limited: client {client} sent more than {budget.burst:g} requests at once "
            f"or {budget.rate_per_s:g} per second (agent {self.agent_id}'s "
            f"agent.request_burst and agent.max_requests_per_s): this request was not "
            f"served, and requests sent before then get no reply; retry in {retry:.2f} s, "
            "and send fewer requests"
        )
        self.limit_log.warning("refused requests of client %s: over its budget", client)
        self._reply_error(client, message, "rate_limited", text, retry_after_s=retry)

    async def _serve(self, client: str, message: Incoming) -> None:
        codec = codec_of(message.payload)
        size = len(message.payload)
        if size > self.max_request_bytes:
            self.counters.bad_requests += 1
            text = f"request of {size} bytes exceeds the limit of {self.max_request_bytes}"
            self.bad_log.warning("refused a request of client %s: %s", client, text)
            self._reply_error(client, message, "invalid_request", text)
            return
        try:
            decoded = decode(message.payload)
        except InvalidRequest as exc:
            self.counters.bad_requests += 1
            self.bad_log.warning("refused a malformed request of client %s: %s", client, exc)
            self._reply_error(client, message, exc.code, str(exc), decodable=False)
            return
        request_id = request_id_of(decoded)
        try:
            request = _parse(decoded, client)
            self.touch(lease_key(client, request.session))
            result = await self.call(request, codec)
            if TABLE[request.method].paged:
                budget = self.pager.budget(self.link.max_packet_size)
                result = self.pager.reply(request.client, request.params, result, codec, budget)
            reply = ok_reply(request.id, result)
        except DatamuxError as exc:
            if isinstance(exc, InvalidRequest):
                self.counters.bad_requests += 1
            log.info("request %r of client %s failed: %s", request_id, client, exc)
            reply = error_reply(request_id, exc.code, str(exc))
        except asyncio.CancelledError:
            # The agent is stopping: the request still gets its one answer.
            reply = error_reply(request_id, "unavailable", "the agent is stopping")
            self._reply(client, message, reply, codec)
            raise
        except Exception as exc:
            code, text = describe_error(exc)
            log.exception("request %r of client %s failed", request_id, client)
            reply = error_reply(request_id, code, text)
        self._reply(client, message, reply, codec)

    def _reply_error(
        self,
        client: str,
        message: Incoming,
        code: str,
        text: str,
        *,
        decodable: bool = True,
        retry_after_s: float | None = None,
    ) -> None:
        request_id = None
        if decodable and len(message.payload) <= self.max_request_bytes * OVERSIZE_DECODE_FACTOR:
            with contextlib.suppress(InvalidRequest):
                request_id = request_id_of(decode(message.payload))
        reply = error_reply(request_id, code, text, retry_after_s=retry_after_s)
        self._reply(client, message, reply, codec_of(message.payload))

    def _reply(self, client: str, message: Incoming, reply: dict[str, Any], codec: str) -> None:
        """Answer on the client's own reply topic, the only place a reply ever goes.

        Nothing in the request (a payload field, an MQTT 5 Response Topic) can name
        another: the topic comes from the level the broker let this client write.
        """
        try:
            payload = encode(reply, codec)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. NaN metadata in JSON
            log.warning("reply to %r cannot be encoded: %s", reply.get("id"), exc)
            text = f"the reply cannot be encoded in {codec}: {exc}"
            payload = encode(error_reply(reply.get("id"), "internal", text), codec)
        topic = self.topics.reply(self.agent_id, client)
        self.link.publish_nowait(topic, payload, qos=1, correlation=message.correlation)

    def answer_v1(self, message: Incoming) -> None:
        """A protocol v1 request: a clear error, so that an old client is not left waiting.

        v1 clients listen on ``{p}/clients/{client}/rpc`` only. The error goes there, and
        nowhere else: the payload's client id, in the prefix the request came on. Its
        text is fixed, and v2 peers never read that topic (v2 ACLs do not even let an
        agent write it).
        """
        self.counters.requests += 1
        self.counters.bad_requests += 1
        self.counters.v1_requests += 1
        prefix = message.topic.rsplit("/agents/", 1)[0]
        decoded: Any = None
        if len(message.payload) <= self.max_request_bytes:
            with contextlib.suppress(InvalidRequest):
                decoded = decode(message.payload)
        client = decoded.get("client") if isinstance(decoded, Mapping) else None
        self.bad_log.warning(
            "a protocol v1 request on %s (client %s)", message.topic, _short_id(client)
        )
        if not is_id(client) or decoded.get("reply_to") != f"{prefix}/clients/{client}/rpc":
            return
        text = (
            f"agent {self.agent_id} speaks protocol v{PROTOCOL_VERSION} under "
            f"{self.topics.prefix}; this client speaks v1: upgrade streaminghub-datamux "
            "(docs/protocol.md, Versioning)"
        )
        reply = error_reply(request_id_of(decoded), "invalid_request", text)
        payload = encode(reply, codec_of(message.payload))
        self.link.publish_nowait(f"{prefix}/clients/{client}/rpc", payload, qos=1)


def _parse(message: Any, client: str) -> Request:
    """parse_request, with hostile shapes (huge numbers, cycles) as InvalidRequest."""
    try:
        return parse_request(message, client)
    except (RecursionError, OverflowError) as exc:
        raise InvalidRequest(f"malformed request: {type(exc).__name__}") from None


def _short_id(value: Any) -> str:
    return repr(value[:64]) if isinstance(value, str) else type(value).__name__


@dataclass(eq=False)
class RateLimitedLog:
    """Warnings, at most ``per_window`` every ``window_s``; then one line says how many
    ``what`` were left out (they are still counted in health)."""

    logger: logging.Logger
    per_window: int
    window_s: float
    what: str = "bad requests"
    _window_start: float = field(default=0.0, init=False)
    _logged: int = field(default=0, init=False)
    _skipped: int = field(default=0, init=False)

    def warning(self, text: str, *args: Any) -> None:
        """Log ``text``, unless this window has had its share."""
        self.flush()
        if self._logged < self.per_window:
            self._logged += 1
            self.logger.warning(text, *args)
        else:
            self._skipped += 1

    def flush(self) -> None:
        """Start a new window once the last is over, saying how many were left out."""
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self._skipped:
                self.logger.warning("%d more %s were not logged", self._skipped, self.what)
            self._window_start, self._logged, self._skipped = now, 0, 0
