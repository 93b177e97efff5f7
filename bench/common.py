"""Helpers every bench shares: progress lines, the code version, and its docs section.

Each bench writes its figures into its own section of docs/performance.md, between
its own begin and end markers, with :func:`replace_section`.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The folders whose uncommitted changes a figure's code version names.
CODE_DIRS = ("streaminghub_datamux", "agent", "client", "drivers")

_BEGAN = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the markdown."""
    print(f"[{time.perf_counter() - _BEGAN:6.1f}s] {message}", file=sys.stderr, flush=True)


def write_doc(path: Path, generated: str, **where: Any) -> None:
    """Put ``generated`` into its section of the document at ``path`` (see
    :func:`replace_section` for ``where``). Read right before writing: other benches
    regenerate their own sections."""
    document = path.read_text() if path.exists() else ""
    path.write_text(replace_section(document, generated, **where))
    log(f"updated {path}")


def git(*args: str) -> str:
    """A git command's output in the repository ("" when git is missing or fails)."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.rstrip("\n")  # keep leading spaces: porcelain status columns


def code_version(dirs: Sequence[str] = CODE_DIRS) -> str:
    """The commit measured, and the code files in ``dirs`` that differ from it (others
    edit the tree)."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--", *dirs)
    changed = sorted(line[3:] for line in status.splitlines() if line.endswith(".py"))
    return commit + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def median_range(values: Sequence[float], fmt: str = ",.0f") -> str:
    """``median (min-max)`` of several runs."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def fill_markers(document: str, block: str, begin: str, end: str) -> str | None:
    """``document`` with the text from ``begin`` to ``end`` replaced by ``block`` (which
    holds both marks), or None when the marks are not there."""
    marked = re.compile(rf"{re.escape(begin)}.*?{re.escape(end)}", re.S)
    if not marked.search(document):
        return None
    return marked.sub(lambda _: block, document, count=1)


def replace_section(
    document: str,
    generated: str,
    *,
    section: str,
    begin: str,
    end: str,
    after: str | None = None,
    replace_unmarked: bool = False,
) -> str:
    """Put ``generated`` between a bench's markers in its ``section`` of ``document``.

    Only the text between the markers changes; hand-written findings elsewhere in the
    section, and every other section, keep their bytes. Without markers:
    ``replace_unmarked`` replaces an existing ``section`` whole. A missing section goes
    right after the ``after`` section (before the next "## " heading), else at the end.
    """
    block = f"{begin}\n{generated.strip()}\n{end}"
    if (filled := fill_markers(document, block, begin, end)) is not None:
        return filled
    if replace_unmarked:
        existing = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.M | re.S)
        if existing.search(document):
            return existing.sub(lambda _: f"{section}\n\n{block}\n\n", document, count=1)
    new = f"{section}\n\n{block}\n"
    if after is not None:
        found = re.search(rf"^{re.escape(after)}\n", document, re.M)
        following = re.compile(r"^## ", re.M).search(document, found.end()) if found else None
        if following is not None:
            return document[: following.start()] + new + "\n" + document[following.start() :]
    separator = "\n" if document.endswith("\n") else "\n\n" if document else ""
    return document + separator + new
