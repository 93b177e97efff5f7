"""The drivers.lsl options, their limits, and ids made safe for topics."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...checks import ID_PATTERN, check_keys, config_number

CONFIG_PATH = "drivers.lsl"
# Node and stream ids end up in MQTT topics and file names.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

PULL_TIMEOUT_S = 0.1  # how long one pull waits: also how fast a reader notices a stop
CONNECT_STEP_S = 0.25  # connect steps are sliced so a stop is noticed quickly
CONNECT_TIMEOUT_S = 3.0  # per candidate outlet: subscribe + first time correction
INFO_TIMEOUT_S = 2.0  # fetching one outlet's full description
INFO_RETRY_S = 10.0  # after a failed fetch, list the outlet without labels this long
LOSS_CHECK_S = 1.0  # a silent inlet asks the resolver this often whether its outlet is there
JOIN_TIMEOUT_S = 2.0
MAX_PENDING_CHUNKS = 16  # chunks between a reader thread and the loop; then liblsl buffers
MIN_PULL_ROWS = 1024
# Pulls are spaced by the framing's source period (half its latency budget), at most
# this: a 1 kHz outlet pushing sample by sample then costs 100 loop wakes a second, not
# 1000, and a low-latency task still gets its samples every 1 ms.
MAX_PULL_PERIOD_S = 0.01
MAX_PULL_ROWS = 65536
MAX_STRING_PULL_ROWS = 1024

_OPTION_KEYS = {"wait_s", "forget_after_s", "max_buffered_s"}


def safe_id(text: str, prefix: str = "", default: str = "stream") -> str:
    """``prefix + text`` made a valid id: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``.

    Other characters become ``_``; a leading ``.`` or ``-`` gets a ``_`` in front; the
    result is cut to 64 characters. Empty text gives ``prefix + default``.
    """
    body = _UNSAFE.sub("_", text.strip()) or default
    candidate = prefix + body
    if not ID_PATTERN.match(candidate[:1]):
        candidate = "_" + candidate
    return candidate[:64]


@dataclass(frozen=True)
class LslOptions:
    """The ``drivers.lsl`` options, validated.

    Attributes:
        wait_s: how long the first listing waits for the resolver to hear from outlets.
        forget_after_s: an outlet that stops answering is dropped from listings after
            this long (also how long a silently vanished outlet takes to be noticed).
        max_buffered_s: what an inlet buffers while the consumer is slow, in seconds of
            data (for irregular streams liblsl counts 100 samples per "second").
    """

    wait_s: float = 1.0
    forget_after_s: float = 5.0
    max_buffered_s: float = 60.0

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> LslOptions:
        """Validate the ``drivers.lsl`` section.

        Raises:
            ConfigError: naming ``drivers.lsl.<key>`` and how to fix it.
        """
        data = check_keys(options or {}, CONFIG_PATH, _OPTION_KEYS, "LSL driver option")
        return cls(
            wait_s=config_number(data, "wait_s", CONFIG_PATH, cls.wait_s, low=0, high=60),
            forget_after_s=config_number(
                data, "forget_after_s", CONFIG_PATH, cls.forget_after_s, positive=True
            ),
            max_buffered_s=config_number(
                data, "max_buffered_s", CONFIG_PATH, cls.max_buffered_s, low=1, high=3600
            ),
        )
