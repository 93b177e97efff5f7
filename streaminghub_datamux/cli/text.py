"""Wording shared by the commands."""

from __future__ import annotations

__all__ = ["count"]


def count(n: int, noun: str) -> str:
    """``count(1, "stream")`` is "1 stream", ``count(2, "stream")`` "2 streams"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
