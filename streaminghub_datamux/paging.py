"""Paged listings: a listing larger than one MQTT message travels as several replies.

A listing request (a method declared ``paged`` in protocol.TABLE) may carry ``page``: 0
asks for the first page. The agent lists once, cuts the items into pages of at most
:data:`PAGE_BYTES` encoded bytes (less if the broker's packets are smaller), keeps them
for :data:`KEEP_S` seconds and replies
``{"items": [...], "page": 0, "pages": n, "token": t}``; ``page`` k with that ``token``
gets page k of the same listing, so a folder that changes between pages never yields a
torn listing. A request without ``page`` gets the plain list as before, or, when it
would not fit in one message, an error saying to ask for pages (docs/protocol.md).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .codec import encode
from .errors import DatamuxError, InvalidRequest

__all__ = ["PAGE_PARAMS", "Pager", "fetch_all_pages"]

PAGE_BYTES = 256 << 10
KEEP_S = 60.0
MAX_LISTINGS = 16  # listings kept at once (per agent), oldest dropped first
MAX_PAGES = 100_000  # a client never asks for more
_ENVELOPE_BYTES = 1024  # id, ok, page, pages, token and the MQTT header


def _page(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_PAGES:
        raise InvalidRequest(f"{name} must be an integer from 0 to {MAX_PAGES - 1}")
    return value


def _token(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise InvalidRequest(f"{name} must be the token of the listing's first page")
    return value


#: Parameters every paged method accepts (added to the protocol's schema).
PAGE_PARAMS = {"page": (_page, False), "page_token": (_token, False)}


class Pager:
    """The agent's side: cuts listings into pages and keeps them until fetched."""

    def __init__(self, page_bytes: int = PAGE_BYTES, keep_s: float = KEEP_S) -> None:
        self.page_bytes = page_bytes
        self.keep_s = keep_s
        self._listings: OrderedDict[str, tuple[float, str, list[list[Any]]]] = OrderedDict()

    def budget(self, max_packet_size: int | None) -> int:
        """Bytes of items per page: at most ``page_bytes``, and what the broker takes."""
        limit = self.page_bytes
        if max_packet_size:
            limit = min(limit, max_packet_size - _ENVELOPE_BYTES)
        return max(limit, 1024)

    def reply(
        self, client: str, params: Mapping[str, Any], items: list[Any], codec: str, budget: int
    ) -> Any:
        """What to send back for a listing request (the list, or one page of it).

        Raises:
            InvalidRequest: no ``page`` and the listing does not fit in one message; or
                a page of a listing that expired or does not exist.
        """
        page = params.get("page")
        if page is None:
            size = len(encode(items, codec))
            if size > budget:
                raise InvalidRequest(
                    f"the listing has {len(items)} entries, {size} bytes, more than one "
                    f"reply may carry ({budget}); ask for it in pages: add the parameter "
                    "page=0, then page=1... with page_token (docs/protocol.md)"
                )
            return items
        self._expire()
        if page == 0:
            token = secrets.token_hex(8)
            pages = self._cut(items, codec, budget)
            self._listings[token] = (time.monotonic(), client, pages)
            while len(self._listings) > MAX_LISTINGS:
                self._listings.popitem(last=False)
        else:
            token = params.get("page_token", "")
            kept = self._listings.get(token)
            if kept is None or kept[1] != client:
                raise InvalidRequest(
                    f"no listing with page_token {token!r} (pages are kept {self.keep_s:g} s); "
                    "start again with page=0"
                )
            pages = kept[2]
            if page >= len(pages):
                raise InvalidRequest(f"page {page} of a listing of {len(pages)} pages")
        return {"items": pages[page], "page": page, "pages": len(pages), "token": token}

    @staticmethod
    def _cut(items: list[Any], codec: str, budget: int) -> list[list[Any]]:
        pages: list[list[Any]] = [[]]
        used = 0
        for item in items:
            size = len(encode(item, codec)) + 1
            if pages[-1] and used + size > budget:
                pages.append([])
                used = 0
            pages[-1].append(item)
            used += size
        return pages

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, (made, _, _) in self._listings.items() if now - made > self.keep_s]:
            del self._listings[token]


async def fetch_all_pages(
    call: Callable[[str, str, Mapping[str, Any]], Awaitable[Any]],
    agent: str,
    method: str,
    params: Mapping[str, Any],
) -> list[Any]:
    """The client's side: every page of a listing, in order, as one list.

    An agent from before paging refuses the ``page`` parameter: it is asked once more
    without it, and its one reply is the listing.

    Raises:
        DatamuxError: a malformed page (nothing from the network is trusted).
    """
    try:
        first = await call(agent, method, {**params, "page": 0})
    except InvalidRequest as exc:
        if "unknown parameters ['page']" not in str(exc):
            raise
        whole = await call(agent, method, params)
        if not isinstance(whole, list):
            raise DatamuxError(f"{method}: malformed reply from agent {agent!r}") from None
        return whole
    items, pages, token = _checked(first, 0, method, agent)
    for page in range(1, pages):
        reply = await call(agent, method, {**params, "page": page, "page_token": token})
        more, _, _ = _checked(reply, page, method, agent)
        items.extend(more)
    return items


def _checked(reply: Any, page: int, method: str, agent: str) -> tuple[list[Any], int, str]:
    ok = (
        isinstance(reply, Mapping)
        and isinstance(reply.get("items"), list)
        and reply.get("page") == page
        and isinstance(reply.get("pages"), int)
        and not isinstance(reply.get("pages"), bool)
        and 0 < reply["pages"] <= MAX_PAGES
        and isinstance(reply.get("token"), str)
    )
    if not ok:
        raise DatamuxError(f"{method}: malformed page {page} from agent {agent!r}")
    return list(reply["items"]), int(reply["pages"]), str(reply["token"])
