"""Every example in README.md and docs/*.md runs as written, against the sample collection.

Each fenced ``python`` block runs as a program; top-level ``await`` is allowed, as in
``python -m asyncio``. Each ``sh``/``bash`` block runs in bash (``set -e``), and each
``console`` block runs its ``$ `` lines. Every test gets a fresh HOME holding what
``datamux init --example`` writes. A block that cannot run here (another host,
hardware, root) says so in the markdown just before its fence, with
``<!-- no-run: why -->``; those are reported as skips with that reason.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from streaminghub_datamux.config import write_user_config
from streaminghub_datamux.sample import sample_metadata, write_sample

ROOT = Path(__file__).resolve().parent.parent
DOCS = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]
PYTHON = {"python"}
SHELL = {"sh", "bash", "console"}
# Languages that are not examples to run: data, config files and output.
NOT_RUN = {"json", "toml", "ini", "text"}
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NO_RUN = re.compile(r"^<!--\s*no-run:\s*(.+?)\s*-->$")
TIMEOUT_S = 60

# Runs a block the way ``python -m asyncio`` would: top-level await allowed.
_RUNNER = """
import ast, asyncio, inspect, sys
path = sys.argv[1]
code = compile(open(path).read(), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__main__"}
result = eval(code, namespace)  # the doc block: trusted text from this repository
if inspect.iscoroutine(result):
    asyncio.run(result)
"""


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    no_run: str | None

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks_in(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, indent, lang = i, len(match[1]), match[2]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = _NO_RUN.match(before)
        code = "\n".join(ln[indent:] for ln in lines[start + 1 : end]) + "\n"
        found.append(Block(path, start + 1, lang, code, marker[1] if marker else None))
        i = end + 1
    return found


ALL = [block for path in DOCS for block in blocks_in(path)]
EXAMPLES = [b for b in ALL if b.lang in PYTHON | SHELL]


def test_every_fence_names_its_language():
    """An untagged fence would be neither run nor reported."""
    unknown = [
        f"{b.id} ({b.lang or 'no language'})" for b in ALL if b.lang not in PYTHON | SHELL | NOT_RUN
    ]
    assert not unknown, (
        f"tag these fences with one of {sorted(PYTHON | SHELL | NOT_RUN)}: {unknown}"
    )


def test_no_run_markers_only_on_examples():
    misplaced = [b.id for b in ALL if b.no_run and b.lang not in PYTHON | SHELL]
    assert not misplaced, f"no-run markers before blocks that never run: {misplaced}"


def _awaits_at_top_level(code: str) -> bool:
    try:
        compile(code, "<doc>", "exec")  # ast.parse would accept a stray await
        return False
    except SyntaxError:
        pass
    try:
        compile(code, "<doc>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        return True
    except SyntaxError:
        return False  # not a program at all (a signature listing)


def test_top_level_await_is_explained_where_it_is_used():
    """Such a snippet only runs in ``python -m asyncio``: its page must say so."""
    unexplained = sorted(
        {
            str(b.file.relative_to(ROOT))
            for b in EXAMPLES
            if b.lang in PYTHON
            and not (b.no_run and "excerpt" in b.no_run)  # a part of a function
            and _awaits_at_top_level(b.code)
            and "python -m asyncio" not in b.file.read_text(encoding="utf-8")
        }
    )
    assert not unexplained, f"say 'run it in python -m asyncio' in {unexplained}"


def test_blocks_are_found_with_their_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n\n<!-- no-run: needs a BLE adapter -->\n```python\nscan()\n```\n"
        "1. a step\n   ```sh\n   datamux ls\n   ```\n"
    )
    first, second = blocks_in(doc)
    assert (first.lang, first.code, first.no_run) == ("python", "scan()\n", "needs a BLE adapter")
    assert (second.lang, second.code, second.no_run) == ("sh", "datamux ls\n", None)


def test_collections_md_shows_the_sample_collection():
    """collections.md's metadata file is the one ``datamux init --example`` writes."""
    shown = next(b for b in blocks_in(ROOT / "docs" / "collections.md") if b.lang == "json")
    assert json.loads(shown.code) == sample_metadata()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME as ``datamux init --example`` leaves it (written in-process: faster)."""
    home = tmp_path / "home"
    data, meta = home / "streaminghub" / "data", home / "streaminghub" / "meta"
    write_user_config(data, meta, home=home)
    write_sample(data, meta)
    return home


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(home)
    # The datamux script next to this interpreter (venv or CI's wheel install).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _shell_script(block: Block) -> str:
    if block.lang != "console":
        return block.code
    return "\n".join(ln[2:] for ln in block.code.splitlines() if ln.startswith("$ ")) + "\n"


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_doc_example_runs(block: Block, home: Path, tmp_path: Path) -> None:
    if block.no_run:
        pytest.skip(f"{block.id} no-run: {block.no_run}")
    work = tmp_path / "work"
    work.mkdir()
    if block.lang in PYTHON:
        script = work / "example.py"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, "-c", _RUNNER, str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", _shell_script(block)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=work, env=_env(home)
    )
    assert result.returncode == 0, (
        f"{block.id} failed (exit {result.returncode}):\n{block.code}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
